"""lazysnap: a lazy-loading container image snapshotter for containerd."""
from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # the installed package's metadata, read only when asked (``lazysnap health`` stays cheap)
    if name == "__version__":
        from snapshotter.version import package_version

        return package_version()
    raise AttributeError(f"module 'snapshotter' has no attribute {name!r}")
