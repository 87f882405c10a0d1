"""The daemon's public gRPC socket, held by the FUSE holder across daemon restarts.

containerd's proxy-snapshotter client gives a new connection about a second (its first
backoff step; containerd 1.6 sets no minimum connect timeout) to complete the HTTP/2
handshake; a dial that is refused, or accepted but not answered in time, fails the call in
progress: a `ctr run` issued while ``lazysnap serve`` restarts fails (measured: refused
for 1.2-1.7 s after every restart). Holding the listening socket is not enough - a byte
relay or systemd socket activation still leaves the handshake to the daemon. So the holder
terminates gRPC itself, answers the handshake at once, and forwards every call to the
daemon's private socket (``<root>/daemon.sock``) with ``wait_for_ready``: a call made while
no daemon runs waits for the next one (at most ``wait_s``, or the caller's deadline).
Messages pass as bytes (nothing is decoded); metadata, status codes and details pass
unchanged.
"""
from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2
from snapshotter.api.lazysnap.v1 import control_pb2
from snapshotter.log import get_logger

log = get_logger("lazysnap.relay")


def _streaming_methods() -> set[str]:
    """``/package.Service/Method`` of every server-streaming method the daemon serves."""
    out: set[str] = set()
    for module in (snapshots_pb2, control_pb2, health_pb2):
        for svc in module.DESCRIPTOR.services_by_name.values():
            out.update(f"/{svc.full_name}/{m.name}" for m in svc.methods if m.server_streaming)
    return out


class GrpcRelay(grpc.GenericRpcHandler):
    def __init__(self, daemon_address: str, wait_s: float) -> None:
        self.wait_s = wait_s
        self._channel = grpc.aio.insecure_channel(f"unix:{daemon_address}")
        self._streaming = _streaming_methods()
        self.server: grpc.aio.Server | None = None

    async def start(self, address: str) -> None:
        server = grpc.aio.server(handlers=[self])
        server.add_insecure_port(f"unix:{address}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=2.0)
        await self._channel.close()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        # partials, not lambdas: grpc.aio tells coroutine and async-generator handlers apart
        # by the function it is given
        if method in self._streaming:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._stream, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))

    def _timeout(self, context: Any) -> float:
        remaining = context.time_remaining()
        return min(self.wait_s, remaining) if remaining is not None else self.wait_s

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        t0 = time.monotonic()
        call = self._channel.unary_unary(method)(request, timeout=self._timeout(context), wait_for_ready=True,
                                                 metadata=_forwarded(context))
        try:
            await context.send_initial_metadata(await call.initial_metadata())
            response = await call
        except grpc.aio.AioRpcError as exc:
            await self._fail(context, method, exc, t0)
            raise  # not reached: abort raises
        context.set_trailing_metadata(await call.trailing_metadata())
        return response

    async def _stream(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        t0 = time.monotonic()
        call = self._channel.unary_stream(method)(request, timeout=self._timeout(context), wait_for_ready=True,
                                                  metadata=_forwarded(context))
        try:
            await context.send_initial_metadata(await call.initial_metadata())
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            await self._fail(context, method, exc, t0)

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: grpc.aio.AioRpcError,
                    t0: float) -> None:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            log.warning("relay_no_daemon", method=method, waited_s=round(time.monotonic() - t0, 3))
        context.set_trailing_metadata(exc.trailing_metadata() or ())
        await context.abort(exc.code(), exc.details() or "")


_TRANSPORT_KEYS = frozenset(("user-agent", "te", "content-type", "authority"))


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The caller's own metadata (containerd's namespace among it), not the transport's."""
    return tuple((k, v) for k, v in context.invocation_metadata() or ()
                 if k not in _TRANSPORT_KEYS and not k.startswith((":", "grpc-")))
