"""A loopback reverse proxy in front of a registry, with counters and fault injection.

Tests put it between the client and a real docker-registry to produce the bad minutes
a production registry has: 5xx, 429 + Retry-After, a connection reset mid-body, a stall,
a 200 that ignores ``Range``, a refused HEAD. With ``redirect_blobs=True`` blob GETs are
answered with a 307 to a short-lived signed URL on a second port (the way ECR sends
clients to presigned S3 URLs); that "storage" server answers 403 once the URL has
expired and records any ``Authorization`` header that reaches it (there must be none).

    with start_proxy(reg.url) as px:
        px.add_fault(Fault("status", status=503, times=2, path="/blobs/"))
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import math
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web

from harness.loopthread import LoopThread

__all__ = ["Fault", "Proxy", "ProxyStats", "start_proxy"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length"}
_KIND = re.compile(r"/(blobs|manifests|referrers|tags)/.*")
_BLOB_GET = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(slots=True)
class Fault:
    """One injected misbehaviour, consumed ``times`` times (-1: forever).

    kind: ``status`` (answer ``status``, with ``Retry-After: retry_after`` if set),
    ``reset`` (forward, then abort the connection after ``after_bytes`` body bytes),
    ``stall`` (forward, sleep ``seconds`` after ``after_bytes`` body bytes),
    ``ignore_range`` (drop the request's Range: the registry answers 200 + whole blob),
    ``shift_range`` (move the requested Range by ``shift`` bytes: a 206 with the wrong
    Content-Range, as a buggy cache would send), ``corrupt`` (forward with one byte in
    every 4 KiB of the body flipped from ``after_bytes`` on: a cache serving rotten bytes
    with the right headers).
    ``method``/``path`` (regex, searched in the path) restrict which requests match.
    """

    kind: str
    times: int = 1
    method: str | None = None
    path: str | None = None
    status: int = 503
    retry_after: float | None = None
    after_bytes: int = 0
    seconds: float = 0.0
    shift: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times == 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        return not self.path or re.search(self.path, path) is not None


@dataclass(slots=True)
class ProxyStats:
    requests: Counter[str] = field(default_factory=Counter)  # "GET /v2/x/blobs" style keys
    faults: Counter[str] = field(default_factory=Counter)
    body_bytes: int = 0  # response body bytes sent to clients by the proxy
    in_flight: int = 0
    max_in_flight: int = 0  # most requests the proxy was answering at once
    storage_requests: int = 0
    storage_bytes: int = 0
    storage_expired: int = 0
    storage_auth_headers: list[str] = field(default_factory=list)  # must stay empty
    request_log: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


class Proxy:
    """See module docstring. ``url``/``host`` address the proxy; ``storage_url`` the
    redirect target server (only when ``redirect_blobs``)."""

    def __init__(self, upstream: str, *, redirect_blobs: bool = False,
                 signed_url_ttl: float = 30.0, upstream_auth: tuple[str, str] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self._storage_auth = ("Basic " + base64.b64encode(":".join(upstream_auth).encode()).decode()
                              if upstream_auth else None)
        self.redirect_blobs = redirect_blobs
        self.signed_url_ttl = signed_url_ttl
        self.stats = ProxyStats()
        self._faults: list[Fault] = []
        self._secret = secrets.token_bytes(16)
        self._thread = LoopThread("fault-proxy")
        self._session: aiohttp.ClientSession | None = None

        async def make_session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))

        self._session = self._thread.call(make_session)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.port = self._thread.serve(app)
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.storage_port = 0
        if redirect_blobs:
            sapp = web.Application()
            sapp.router.add_get("/s/{name:.+}/{digest}", self._storage)
            self.storage_port = self._thread.serve(sapp)
        self.storage_url = f"http://127.0.0.1:{self.storage_port}"

    # -- control ---------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self._faults.clear()

    def reset_stats(self) -> None:
        self.stats = ProxyStats()

    def stop(self) -> None:
        session = self._session
        if session is not None:
            self._session = None

            async def close() -> None:
                await session.close()

            with contextlib.suppress(Exception):
                self._thread.call(close, timeout=10)
        self._thread.stop()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                if fault.times > 0:
                    fault.times -= 1
                self.stats.faults[fault.kind] += 1
                return fault
        return None

    # -- signed URLs -----------------------------------------------------------------
    def _sign(self, name: str, digest: str, expires: int) -> str:
        msg = f"{name}\n{digest}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def signed_url(self, name: str, digest: str) -> str:
        # rounded up, as S3 does: the URL stays valid for at least the TTL
        expires = math.ceil(time.time() + self.signed_url_ttl)
        sig = self._sign(name, digest, expires)
        return f"{self.storage_url}/s/{quote(name, safe='/')}/{digest}?X-Expires={expires}&X-Signature={sig}"

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        self.stats.storage_requests += 1
        if "Authorization" in request.headers:
            self.stats.storage_auth_headers.append(request.headers["Authorization"])
        name, digest = unquote(request.match_info["name"]), request.match_info["digest"]
        try:
            expires = int(request.query.get("X-Expires", "0"))
        except ValueError:
            expires = 0
        good = hmac.compare_digest(self._sign(name, digest, expires),
                                   request.query.get("X-Signature", ""))
        if not good:
            return web.Response(status=403, text="<Error><Code>SignatureDoesNotMatch</Code></Error>")
        if time.time() > expires:
            self.stats.storage_expired += 1
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code>"
                                "<Message>Request has expired</Message></Error>")
        # The storage server has its own access to the blobs (``upstream_auth``), never
        # the client's credentials.
        headers = {k: v for k, v in request.headers.items() if k.lower() == "range"}
        if self._storage_auth is not None:
            headers["Authorization"] = self._storage_auth
        return await self._relay(request, f"{self.upstream}/v2/{name}/blobs/{digest}", headers,
                                 None, storage=True, fault=None)

    # -- proxying --------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._proxy(request)
        finally:
            self.stats.in_flight -= 1

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        key = method + " " + _KIND.sub(r"/\1", path)
        self.stats.requests[key] += 1
        self.stats.request_log.append((method, path, request.headers.get("Range")))
        fault = self._take_fault(method, path)
        if fault is not None and fault.kind == "status":
            await request.read()
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            return web.Response(status=fault.status, headers=headers,
                                text='{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}',
                                content_type="application/json")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if fault is not None and fault.kind == "ignore_range":
            headers.pop("Range", None)
            headers.pop("range", None)
        if fault is not None and fault.kind == "shift_range" and "Range" in headers:
            m_range = re.match(r"bytes=(\d+)-(\d*)", headers["Range"])
            if m_range:
                lo = int(m_range[1]) + fault.shift
                hi = f"{int(m_range[2]) + fault.shift}" if m_range[2] else ""
                headers["Range"] = f"bytes={lo}-{hi}"
        m = _BLOB_GET.match(path)
        if self.redirect_blobs and method == "GET" and m:
            # Let the registry authenticate the client first (401 passes through).
            check = await self._session.head(f"{self.upstream}{path}",  # type: ignore[union-attr]
                                             headers={k: v for k, v in headers.items()
                                                      if k.lower() in ("authorization", "host")},
                                             allow_redirects=False)
            check.release()
            if check.status != 200:
                fwd = {k: v for k, v in check.headers.items() if k.lower() not in _HOP}
                return web.Response(status=check.status, headers=fwd)
            return web.Response(status=307, headers={
                "Location": self.signed_url(m["name"], m["digest"])})
        body = await request.read() if request.can_read_body else None
        return await self._relay(request, f"{self.upstream}{request.path_qs}", headers, body,
                                 storage=False, fault=fault)

    async def _relay(self, request: web.Request, url: str, headers: dict[str, str],
                     body: bytes | None, *, storage: bool, fault: Fault | None) -> web.StreamResponse:
        assert self._session is not None
        async with self._session.request(request.method, url, headers=headers, data=body,
                                         allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    resp.headers.add(k, v)
            if up.headers.get("Content-Length") is not None:
                resp.content_length = int(up.headers["Content-Length"])
            await resp.prepare(request)
            if request.method == "HEAD":
                await resp.write_eof()
                return resp
            sent = 0
            tripped = False
            async for chunk in up.content.iter_chunked(64 << 10):
                if fault is not None and not tripped and sent + len(chunk) >= fault.after_bytes \
                        and fault.kind in ("reset", "stall"):
                    head = chunk[: max(0, fault.after_bytes - sent)]
                    if head:
                        await resp.write(head)
                        sent += len(head)
                        self._count(storage, len(head))
                    chunk = chunk[len(head):]
                    tripped = True
                    if fault.kind == "reset":
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    await asyncio.sleep(fault.seconds)
                if fault is not None and fault.kind == "corrupt" and chunk:
                    chunk = _flip(chunk, sent, fault.after_bytes)
                if chunk:
                    await resp.write(chunk)
                    sent += len(chunk)
                    self._count(storage, len(chunk))
            await resp.write_eof()
            return resp

    def _count(self, storage: bool, n: int) -> None:
        if storage:
            self.stats.storage_bytes += n
        else:
            self.stats.body_bytes += n


def _flip(chunk: bytes, at: int, start: int) -> bytes:
    """``chunk`` (body bytes from ``at``) with every byte at a body offset >= ``start`` that is
    a multiple of 4096 from it XOR-ed with 0x5A."""
    out = bytearray(chunk)
    first = max(start, at)
    first += (start - first) % 4096
    for off in range(first - at, len(out), 4096):
        out[off] ^= 0x5A
    return bytes(out)


def start_proxy(upstream: str, *, redirect_blobs: bool = False, signed_url_ttl: float = 30.0,
                upstream_auth: tuple[str, str] | None = None) -> Proxy:
    """Start a proxy to ``upstream`` (e.g. ``reg.url``) on a free loopback port.
    ``upstream_auth`` (user, password) is what the redirect storage server uses to read
    blobs from an auth-protected upstream."""
    return Proxy(upstream, redirect_blobs=redirect_blobs, signed_url_ttl=signed_url_ttl,
                 upstream_auth=upstream_auth)
