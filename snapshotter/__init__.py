"""lazysnap: a lazy-loading container image snapshotter for containerd."""
from __future__ import annotations

__version__ = "0.1.0"
