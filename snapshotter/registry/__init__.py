"""OCI distribution client for lazy fetching (aiohttp): auth, Range, redirects, mirrors,
referrers. Import ``RegistryClient`` and ``RegistryConfig`` from here."""
from __future__ import annotations

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.config import RegistryConfig, RetryPolicy
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.ecr import EcrHost
from snapshotter.registry.errors import (
                                         AuthError,
                                         ConfigError,
                                         DigestMismatchError,
                                         InvalidReferenceError,
                                         NotFoundError,
                                         PlatformError,
                                         ProtocolError,
                                         RegistryError,
                                         UnavailableError,
)
from snapshotter.registry.manifest import Descriptor, ResolvedImage
from snapshotter.registry.reference import Reference
from snapshotter.registry.stats import RegistryStats

__all__ = [
    "RegistryClient", "RegistryConfig", "RetryPolicy", "Credentials", "EcrHost", "Descriptor",
    "ResolvedImage", "Reference", "RegistryStats", "RegistryError", "AuthError", "ConfigError",
    "DigestMismatchError", "InvalidReferenceError", "NotFoundError", "PlatformError",
    "ProtocolError", "UnavailableError",
]
