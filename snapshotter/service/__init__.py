"""containerd snapshotter service: Snapshots API over gRPC, SQLite metadata, remote hook.

``Snapshotter`` holds the semantics, ``SnapshotService`` serves it on a unix socket,
``LayerProvider`` is the protocol the lazy (FUSE) layer provider implements.

The server and snapshotter are imported lazily so that the layers package can import
the provider contract (``snapshotter.service.provider``) without pulling in gRPC.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from snapshotter.service.provider import (LayerProvider, NoRemoteProvider, ProviderError, RemoteLayerRequest,
                                          parse_remote_request)

if TYPE_CHECKING:
    from snapshotter.service.server import SnapshotService
    from snapshotter.service.snapshotter import Snapshotter

__all__ = ["LayerProvider", "NoRemoteProvider", "ProviderError", "RemoteLayerRequest", "SnapshotService",
           "Snapshotter", "parse_remote_request"]


def __getattr__(name: str) -> Any:
    if name == "SnapshotService":
        from snapshotter.service.server import SnapshotService
        return SnapshotService
    if name == "Snapshotter":
        from snapshotter.service.snapshotter import Snapshotter
        return Snapshotter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
