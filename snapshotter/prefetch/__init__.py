"""Start-up profiles: record what an image reads while it starts, share it, prefetch it first."""
from __future__ import annotations

from snapshotter.prefetch.options import PrefetchOptions
from snapshotter.prefetch.profile import (
    ARTIFACT_TYPE,
    MEDIA_TYPE,
    ChunkAccess,
    LayerProfile,
    Profile,
    ProfileError,
)

__all__ = ["ARTIFACT_TYPE", "MEDIA_TYPE", "ChunkAccess", "LayerProfile", "PrefetchOptions", "Profile",
           "ProfileError"]
