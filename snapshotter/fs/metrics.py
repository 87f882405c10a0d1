"""Prometheus metrics of the FUSE filesystem (daemon registry)."""
from __future__ import annotations

from prometheus_client import Counter

from snapshotter.store.metrics import REGISTRY

FUSE_REQUESTS = Counter("lazysnap_fuse_requests", "FUSE requests answered, by operation: every one is a round "
                        "trip through the kernel and the daemon, so their number is the FUSE path's cost",
                        ["op"], registry=REGISTRY)
OPS = {op: FUSE_REQUESTS.labels(op) for op in
       ("lookup", "getattr", "readlink", "opendir", "readdir", "statfs", "getxattr", "listxattr", "open", "read")}
