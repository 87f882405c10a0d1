"""Content-addressed chunk store (a leaf package: imports nothing else of lazysnap)."""
from __future__ import annotations

from snapshotter.store.chunks import ChunkCorrupt, ChunkStore, FsyncPolicy, LocalShare, PruneResult, StoreStats, StoreUsage

__all__ = ["ChunkCorrupt", "ChunkStore", "FsyncPolicy", "LocalShare", "PruneResult", "StoreStats", "StoreUsage"]
