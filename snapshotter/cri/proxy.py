"""A CRI v1 proxy for kubelet: every call goes to containerd's CRI socket unchanged.

kubelet → ``--container-runtime-endpoint`` (this socket) → containerd. The proxy is
method-agnostic: one generic handler relays each call as raw bytes in both directions
(request and response streams, metadata, deadline, status), so RuntimeService and
ImageService methods a newer kubelet calls keep working without a change here. Only
``ImageService/PullImage`` is decoded, to keep its ``AuthConfig`` per registry host
(``CriCredentials``) before the call is forwarded: containerd then prepares the image's
layers through lazysnap, whose registry client finds the credentials there.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import grpc

from snapshotter.api.k8s.cri.runtime.v1 import api_pb2 as cri
from snapshotter.cri.credentials import CriCredentials, from_auth_config
from snapshotter.log import get_logger

__all__ = ["PULL_IMAGE", "CriProxy"]

log = get_logger("lazysnap.cri")
PULL_IMAGE = "/runtime.v1.ImageService/PullImage"
MAX_MESSAGE = 64 << 20
# headers the gRPC transport sets itself: forwarding them would duplicate or break them
_TRANSPORT_HEADERS = frozenset({"user-agent", "content-type", "te", "grpc-timeout", "grpc-encoding",
                                "grpc-accept-encoding", "grpc-message-type"})
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def _forwardable(metadata: object) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in (metadata or ())  # type: ignore[attr-defined]
            if not k.startswith(":") and k not in _TRANSPORT_HEADERS]


class _Relay(grpc.GenericRpcHandler):
    """Every method, as a bidirectional stream of raw messages (gRPC's wire format is the
    same for unary and streaming calls, so one handler shape relays all four kinds)."""

    def __init__(self, proxy: CriProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for response in self.proxy.forward(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(relay)


class CriProxy:
    """Serves ``address`` (a unix socket, 0660) and forwards to ``upstream``."""

    def __init__(self, address: str, upstream: str, credentials: CriCredentials) -> None:
        self.address = address
        self.upstream = upstream
        self.credentials = credentials
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        from snapshotter.fsutil import prepare_socket  # refuse a live socket, drop a stale one

        prepare_socket(self.address)
        target = self.upstream if self.upstream.startswith("unix:") else f"unix:{self.upstream}"
        self._channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        server = grpc.aio.server(options=_OPTIONS)
        server.add_generic_rpc_handlers((_Relay(self),))
        server.add_insecure_port(f"unix:{self.address}")
        old = os.umask(0o117)
        try:
            await server.start()
        finally:
            os.umask(old)
        os.chmod(self.address, 0o660)
        self._server = server
        log.info("cri_proxy_serving", address=self.address, upstream=self.upstream,
                 credential_ttl_s=self.credentials.ttl_s)

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        log.info("cri_proxy_stopped", address=self.address)

    def _capture(self, raw: bytes) -> None:
        """Keep a PullImage's credentials (never logged: only which kind was given)."""
        try:
            req = cri.PullImageRequest.FromString(raw)
        except Exception:  # noqa: BLE001 - undecodable: forward it anyway, containerd answers
            log.warning("cri_pull_undecodable", bytes=len(raw))
            return
        a = req.auth
        creds = from_auth_config(a.username, a.password, a.auth, a.identity_token, a.registry_token)
        if creds is None:
            log.info("cri_pull", image=req.image.image, login="none")
            return
        kind = ("identity_token" if creds.identity_token else "registry_token" if creds.registry_token
                else "basic")
        host = self.credentials.remember(req.image.image, creds)
        log.info("cri_pull", image=req.image.image, registry=host or "", login=kind)

    async def forward(self, method: str, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        assert self._channel is not None
        capture = method == PULL_IMAGE

        async def upstream_requests() -> AsyncIterator[bytes]:
            async for raw in requests:
                if capture:
                    self._capture(raw)
                yield raw

        remaining = context.time_remaining()
        call = self._channel.stream_stream(method)(upstream_requests(), metadata=_forwardable(
            context.invocation_metadata()), timeout=remaining)
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(_forwardable(initial))
            async for response in call:
                yield response  # type: ignore[misc]
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(_forwardable(trailing))
        except grpc.aio.AioRpcError as exc:
            trailing = exc.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(_forwardable(trailing))
            if exc.code() != grpc.StatusCode.OK:
                log.debug("cri_call_failed", method=method, code=exc.code().name)
            await context.abort(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            call.cancel()
            raise
