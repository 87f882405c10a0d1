"""``lazysnap.v1.Node`` on the daemon's socket: the status document and prune.

The status document (``status_document``; schema in docs/status-json.md, pinned by
tests/test_status.py) joins what the layer provider reports (``ProviderStatus``), the
snapshotter's recent fallbacks and the daemon's recent warnings. A provider that serves
nothing lazily (remote layers off) has no images and no store to report or prune.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import grpc

from snapshotter.api.lazysnap.v1 import control_pb2 as pb
from snapshotter.api.lazysnap.v1 import control_pb2_grpc as pb_grpc
from snapshotter.log import get_logger
from snapshotter.service.recent import RecentErrors
from snapshotter.version import package_version

if TYPE_CHECKING:
    from snapshotter.layers.status import ProviderStatus
    from snapshotter.service.snapshotter import Snapshotter
    from snapshotter.store import PruneResult

__all__ = ["SCHEMA_VERSION", "NodeServicer", "StatusProvider", "status_document"]

SCHEMA_VERSION = 1
log = get_logger("lazysnap.service")


@runtime_checkable
class StatusProvider(Protocol):
    """A layer provider that can describe itself and prune its store (the lazy provider)."""

    async def status(self) -> ProviderStatus:
        ...

    async def prune(self, apply: bool) -> PruneResult:
        ...


def status_document(snapshotter: Snapshotter, errors: RecentErrors, *, address: str, started: float,
                    provider_status: ProviderStatus | None) -> dict[str, Any]:
    """The JSON object ``lazysnap status --json`` prints."""
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "daemon": {"version": package_version(), "pid": os.getpid(), "root": str(snapshotter.root),
                   "address": address, "uptime_s": round(time.time() - started, 1),
                   "lazy": provider_status is not None},
        "images": [],
        "store": None,
        "fallbacks": [asdict(f) for f in snapshotter.fallbacks.list()],
        "errors": [asdict(e) for e in errors.list()],
    }
    if provider_status is not None:
        layers = {s.digest: asdict(s) for s in provider_status.layers}
        doc["images"] = [{"ref": img.ref, "manifest_digest": img.manifest_digest,
                          "layers": [layers[d] for d in img.layers if d in layers]}
                         for img in provider_status.images]
        doc["store"] = {**asdict(provider_status.store), "policy": provider_status.store_policy}
    return doc


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, snapshotter: Snapshotter, errors: RecentErrors, address: str) -> None:
        self.sn = snapshotter
        self.errors = errors
        self.address = address
        self.started = time.time()

    def _provider(self) -> StatusProvider | None:
        provider = self.sn.provider
        return provider if isinstance(provider, StatusProvider) else None

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> Any:
        provider = self._provider()
        status = await provider.status() if provider is not None else None
        doc = status_document(self.sn, self.errors, address=self.address, started=self.started,
                              provider_status=status)
        return pb.GetStatusResponse(status_json=json.dumps(doc).encode())

    async def Prune(self, request: pb.PruneRequest, context: grpc.aio.ServicerContext) -> Any:
        provider = self._provider()
        if provider is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "remote layers are disabled: this daemon has no chunk store")
        assert provider is not None
        r = await provider.prune(request.apply)
        log.info("prune", applied=r.applied, chunks=r.chunks, bytes=r.bytes, kept_bytes=r.kept_bytes)
        return pb.PruneResponse(applied=r.applied, chunks=r.chunks, bytes=r.bytes, kept_chunks=r.kept_chunks,
                                kept_bytes=r.kept_bytes)
