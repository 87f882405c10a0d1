"""The gRPC face: Snapshots API + grpc.health.v1 on one unix socket.

Each RPC is a thin translation to :class:`~snapshotter.service.snapshotter.Snapshotter`;
typed errors become status codes here and nowhere else. Every call is counted and timed
(``lazysnap_grpc_requests_total{method,code}``, ``lazysnap_grpc_request_seconds``) and
logged as one key=value line with containerd's namespace.
"""
from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from snapshotter import metrics
from snapshotter.fsutil import prepare_socket
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.lazysnap.v1 import control_pb2_grpc as pb_node
from snapshotter.log import get_logger
from snapshotter.service.convert import info_from_pb, info_to_pb, mounts_to_pb
from snapshotter.service.errors import SnapshotError, Unavailable
from snapshotter.service.node import NodeServicer
from snapshotter.service.recent import RecentErrors
from snapshotter.service.snapshotter import Snapshotter
from snapshotter.version import METADATA_KEY, package_version

__all__ = ["SnapshotsServicer", "SnapshotService", "SERVICE_NAME", "LIST_BATCH", "ROOT_LOCK", "hold_root"]

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"
LIST_BATCH = 100
NAMESPACE_KEY = "containerd-namespace"
ROOT_LOCK = "daemon.lock"  # under the root: a shared flock held while a daemon serves it
log = get_logger("lazysnap.service")
_NS_KEY = re.compile(r"^([^/]+)/\d+/")
_MUTATING = {"Prepare", "View", "Commit", "Remove", "Update", "Cleanup"}


def _namespace(context: grpc.aio.ServicerContext, key: str = "") -> str:
    """containerd's namespace: the ``containerd-namespace`` metadata, else the key's prefix.

    containerd's metadata layer rewrites keys as ``<namespace>/<seq>/<key>``; GC calls and
    some versions' proxy client carry no namespace metadata, so the key is the fallback.
    """
    for k, v in context.invocation_metadata() or ():
        if k == NAMESPACE_KEY:
            return str(v)
    m = _NS_KEY.match(key)
    return m.group(1) if m else ""


def _rpc(method: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Count, time and log one unary call; map typed errors to gRPC status codes."""
    def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(self: SnapshotsServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            try:
                return await fn(self, request, context)
            except SnapshotError as exc:
                code, message = exc.code, str(exc)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - report, never crash the server
                code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
                log.error("rpc_internal_error", method=method, error=message)
            finally:
                elapsed = time.perf_counter() - start
                metrics.RPC_REQUESTS.labels(method=method, code=code.name).inc()
                metrics.RPC_LATENCY.labels(method=method).observe(elapsed)
                key = getattr(request, "key", "") or getattr(getattr(request, "info", None), "name", "")
                fields = {"method": method, "namespace": _namespace(context, key), "key": key,
                          "code": code.name, "ms": round(elapsed * 1000, 2)}
                if message:
                    fields["error"] = message
                if method in _MUTATING or code != grpc.StatusCode.OK:
                    log.info("rpc", **fields)
                else:
                    log.debug("rpc", **fields)
            await context.abort(code, message)
        return wrapper
    return deco


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_rpc("Prepare")
    async def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        mounts = await self.sn.prepare(request.key, request.parent, dict(request.labels),
                                       namespace=_namespace(context, request.key))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc("View")
    async def View(self, request: pb.ViewSnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        mounts = await self.sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc("Mounts")
    async def Mounts(self, request: pb.MountsRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.MountsResponse(mounts=mounts_to_pb(await self.sn.mounts(request.key)))

    @_rpc("Commit")
    async def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        await self.sn.commit(request.name, request.key, dict(request.labels), request.parent)
        return Empty()

    @_rpc("Remove")
    async def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        await self.sn.remove(request.key)
        return Empty()

    @_rpc("Stat")
    async def Stat(self, request: pb.StatSnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.StatSnapshotResponse(info=info_to_pb(await self.sn.stat(request.key)))

    @_rpc("Update")
    async def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        info = await self.sn.update(info_from_pb(request.info), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    async def List(self, request: pb.ListSnapshotsRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ListSnapshotsResponse]:
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        try:
            infos = await self.sn.walk(list(request.filters))
        except SnapshotError as exc:
            code, message = exc.code, str(exc)
            infos = []
        finally:
            metrics.RPC_REQUESTS.labels(method="List", code=code.name).inc()
            metrics.RPC_LATENCY.labels(method="List").observe(time.perf_counter() - start)
            log.debug("rpc", method="List", namespace=_namespace(context), filters=",".join(request.filters),
                      code=code.name, **({"error": message} if message else {}))
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i:i + LIST_BATCH]])

    @_rpc("Usage")
    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> Any:
        u = await self.sn.usage(request.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    @_rpc("Cleanup")
    async def Cleanup(self, request: pb.CleanupRequest, context: grpc.aio.ServicerContext) -> Any:
        removed = await self.sn.cleanup()
        if removed:
            log.info("cleanup", removed_dirs=len(removed))
        return Empty()


def hold_root(root: Path) -> int:
    """Take a shared lock on ``<root>/daemon.lock`` for the daemon's life (the fd is the lock).

    Shared, so two daemons may overlap on one root during a hand-over; ``lazysnap prune``
    without a daemon takes it exclusively and so refuses to touch a store a daemon owns.
    """
    fd = os.open(root / ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


class VersionedHealth(health_aio.HealthServicer):
    """grpc.health.v1 whose every answer carries the daemon's version as initial metadata
    (``lazysnap-version``): a probe tells which build a node runs without another call."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self._version_md = ((METADATA_KEY, version),)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await context.send_initial_metadata(self._version_md)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata(self._version_md)
        await super().Watch(request, context)


class SnapshotService:
    """The daemon's server: start, probe health periodically, stop gracefully."""

    def __init__(self, snapshotter: Snapshotter, address: str, *, probe_interval: float = 2.0,
                 mode: int = 0o660) -> None:
        self.snapshotter = snapshotter
        self.address = address
        self.mode = mode  # of the socket: 0660 for containerd's group, 0600 behind the FUSE holder
        self.probe_interval = probe_interval
        self.health = VersionedHealth(package_version())
        self._server: grpc.aio.Server | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self.errors = RecentErrors()
        self._root_lock: int | None = None

    async def start(self) -> None:
        prepare_socket(self.address)
        self._root_lock = hold_root(self.snapshotter.root)
        self.errors.install()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(self.snapshotter), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.snapshotter.provider.add_services(server)
        pb_node.add_NodeServicer_to_server(NodeServicer(self.snapshotter, self.errors, self.address), server)
        server.add_insecure_port(f"unix:{self.address}")
        old = os.umask(0o777 & ~self.mode)  # created with its mode: never wider, even briefly
        try:
            await server.start()
        finally:
            os.umask(old)
        os.chmod(self.address, self.mode)
        self._server = server
        await self._check_health()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="lazysnap-health-probe")
        log.info("serving", address=self.address, root=str(self.snapshotter.root))

    async def _check_health(self) -> None:
        try:
            await self.snapshotter.probe(timeout=min(1.0, self.probe_interval))
            serving, reason = True, ""
        except Unavailable as exc:
            serving, reason = False, str(exc)
        if serving != self._serving:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set("", status)
            await self.health.set(SERVICE_NAME, status)
            if self._serving is not None or not serving:
                log.warning("health", status="SERVING" if serving else "NOT_SERVING", reason=reason)
            self._serving = serving

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            await self._check_health()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight calls finish (up to ``grace``), close the DB, remove the socket."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            try:
                await self._probe_task
            except asyncio.CancelledError:
                pass
            self._probe_task = None
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        await self.snapshotter.close()
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        self.errors.uninstall()
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None
        log.info("stopped", address=self.address)
