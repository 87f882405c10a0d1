"""``RegistryClient``: the OCI distribution client every lazy read goes through.

Public API (stable; the fetch/FUSE layer calls it):

- ``resolve(ref, platform)`` → ``ResolvedImage`` (manifest, config, layer descriptors)
- ``blob_size(ref, digest)``; ``read_range(ref, digest, start, end)`` (exactly
  ``[start, end)``); ``read_ranges(ref, digest, ranges)`` (coalesced); ``stream_blob``
  (whole blob, digest verified at the end); ``fetch_blob(ref, digest, max_size)``
- ``referrers``, ``push_blob``, ``push_manifest``, ``push_artifact`` (``referrers.py``,
  which sees this client through its ``RegistryTransport``: ``request``, ``retrying``,
  ``read_body``, ``get_manifest``)
- ``stats`` (``RegistryStats``: ``registry_bytes``, ``requests``, per purpose)
- ``close()``; also an async context manager.

How a request travels: endpoints from hosts.toml (mirrors first, then upstream) are
tried in order; on each, auth is attached when the host is known to need it (401 →
challenge → retry), 3xx are followed by hand (``Authorization`` only to the same host,
the storage URL cached per blob and dropped on 401/403), and transient failures (resets,
truncated bodies, timeouts, 5xx, 429) go round again with jittered backoff inside one
deadline. Errors name host/repo/digest, never credentials or signed URLs.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

from snapshotter.log import get_logger
from snapshotter.registry import referrers as _referrers
from snapshotter.registry.auth import Authenticator
from snapshotter.registry.config import RegistryConfig
from snapshotter.registry.credentials import Credentials, DockerCredentials
from snapshotter.registry.ecr import EcrHost, EcrTokenProvider, ecr_host_for
from snapshotter.registry.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    ProtocolError,
    RegistryError,
    UnavailableError,
)
from snapshotter.registry.hosts import Endpoint, HostsConfig
from snapshotter.registry.manifest import (
    ACCEPT,
    INDEX_TYPES,
    MAX_MANIFEST,
    Descriptor,
    ResolvedImage,
    config_of,
    layers_of,
    media_type_of,
    parse_json,
    select_platform,
    sha256_digest,
)
from snapshotter.registry.ranges import check_range, coalesce, parse_content_range
from snapshotter.registry.reference import Reference, as_reference, check_digest
from snapshotter.registry.stats import RegistryStats

log = get_logger("lazysnap.registry")
T = TypeVar("T")
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5


class _Retry(Exception):
    """A transient failure: try again (maybe on the next endpoint) after a backoff."""

    def __init__(self, reason: str, retry_after: float | None = None, *, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.connect = connect  # the host could not be reached at all


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _safe_url(url: str) -> str:
    """scheme://host/path without the query (presigned URLs carry signatures)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


async def _error_code(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.content.read(4096)
        doc = parse_json(body, "error")
        errs = doc.get("errors") or []
        return str(errs[0].get("code", "")) if errs else ""
    except (TimeoutError, RegistryError, aiohttp.ClientError, AttributeError, IndexError):
        return ""


class RegistryClient:
    """An async OCI distribution client; see module docstring."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config or RegistryConfig()
        self.hosts = HostsConfig(self.config.hosts_dir)
        self.stats = RegistryStats()
        self.docker = DockerCredentials(self.config.docker_config)
        self.ecr = EcrTokenProvider()
        self._session: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._sizes: dict[tuple[str, str, str], int] = {}
        self._blob_urls: dict[tuple[str, str, str], str] = {}
        self._mirror_down: dict[str, float] = {}  # mirror host → monotonic time it may be retried
        # one writer at a time of each referrers fallback tag from this client (referrers.py)
        self.fallback_tag_locks: dict[str, asyncio.Lock] = {}

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._auth = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self.config
            connector = aiohttp.TCPConnector(limit=cfg.pool_size, limit_per_host=cfg.per_host_concurrency,
                                             keepalive_timeout=30, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, read_bufsize=1 << 20,
                headers={"User-Agent": cfg.user_agent},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                              sock_read=cfg.read_timeout))
            self._auth = Authenticator(
                self._session, self._credentials,
                aiohttp.ClientTimeout(total=cfg.connect_timeout + cfg.read_timeout,
                                      sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout),
                on_request=self._auth_request)
        return self._session

    @property
    def auth(self) -> Authenticator:
        _ = self.session
        assert self._auth is not None
        return self._auth

    def _auth_request(self, purpose: str, nbytes: int) -> None:
        self.stats.request(purpose)
        self.stats.received(purpose, nbytes)

    async def _credentials(self, host: str, registry: str, force: bool) -> Credentials | None:
        """The credential source (kubelet's, through the CRI proxy), then docker config /
        helpers; ECR hosts fall back to GetAuthorizationToken."""
        # The upstream server (not a mirror) may also use the registry name's credentials.
        upstream = self.hosts.endpoints(registry, "pull")[-1].host == host
        source = self.config.credential_source
        if source is not None:
            creds = source.get(host) or (source.get(registry) if upstream and registry != host else None)
            if creds is not None:
                return creds
        if force:
            self.docker.forget(host)
        creds = await self.docker.get(host)
        if creds is not None:
            return creds
        if upstream and registry != host:
            creds = await self.docker.get(registry)
            if creds is not None:
                return creds
        ecr = ecr_host_for(host, self.config.ecr_hosts) or (
            ecr_host_for(registry, self.config.ecr_hosts) if upstream else None)
        if ecr is not None:
            if ecr.endpoint_url is None and self.config.ecr_endpoint_url:
                ecr = EcrHost(ecr.region, ecr.registry_id, self.config.ecr_endpoint_url)
            return await self.ecr.get(host, ecr, force=force)
        return None

    def _sem(self, host: str) -> asyncio.Semaphore:
        sem = self._sems.get(host)
        if sem is None:
            sem = self._sems[host] = asyncio.Semaphore(self.config.per_host_concurrency)
        return sem

    # -- request machinery -----------------------------------------------------------
    async def retrying(self, ref: Reference, digest: str, what: str,
                       op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it succeeds, a permanent error, or the policy gives up."""
        policy = self.config.retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.deadline
        attempt = 0
        reason = ""
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    return await op()
            except _Retry as exc:
                reason, retry_after = exc.reason, exc.retry_after
            except TimeoutError:
                reason = f"deadline passed (last error: {reason})" if reason else "deadline passed"
                retry_after = None
            remaining = deadline - loop.time()
            if attempt >= policy.max_attempts or remaining <= 0:
                raise UnavailableError(f"{what} failed after {attempt} attempts "
                                       f"({policy.deadline:g}s deadline): {reason}",
                                       host=ref.registry, repo=ref.repository, digest=digest) from None
            delay = min(policy.delay(attempt, retry_after), max(remaining - 0.001, 0))
            self.stats.retries += 1
            log.warning("registry_retry", host=ref.registry, repo=ref.repository, digest=digest or "-",
                        op=what, attempt=attempt, reason=reason, delay=round(delay, 3))
            await asyncio.sleep(delay)

    @asynccontextmanager
    async def request(self, ref: Reference, method: str, path: str, *, purpose: str,
                      capability: str = "pull", headers: dict[str, str] | None = None,
                      data: bytes | None = None, blob: str | None = None,
                      ok: tuple[int, ...] = (200, 206),
                      avoid: Collection[str] = ()) -> AsyncIterator[tuple[Endpoint, aiohttp.ClientResponse]]:
        """Yield (endpoint, response) from the first endpoint that answers usefully.

        Mirrors that fail (transient error, 404, auth) fall through to the next host;
        the last host's error propagates. Hosts in ``avoid`` (they served bytes that failed
        verification) are skipped while another host is left. The per-host semaphore is
        held while the caller reads the body.
        """
        eps = self.hosts.endpoints(ref.registry, capability)
        if avoid:
            eps = [ep for ep in eps if ep.host not in avoid] or eps
        now = time.monotonic()
        for i, ep in enumerate(eps):
            last = i == len(eps) - 1
            if not last and self._mirror_down.get(ep.host, 0.0) > now:
                self.stats.mirror_fallbacks += 1
                continue
            sem = self._sem(ep.host)
            await sem.acquire()
            try:
                try:
                    resp = await self._send(ep, ref, method, path, purpose=purpose, headers=headers,
                                            data=data, blob=blob, ok=ok, push=capability == "push")
                except (_Retry, NotFoundError, AuthError, ProtocolError) as exc:
                    if last:
                        raise
                    self.stats.mirror_fallbacks += 1
                    if isinstance(exc, _Retry) and exc.connect:
                        self._mirror_down[ep.host] = time.monotonic() + self.config.mirror_cooldown
                    # a mirror without the content is ordinary (a referrers lookup of an image
                    # with none, a tag the mirror has not cached): said at debug, not on every start
                    (log.debug if isinstance(exc, NotFoundError) else log.warning)(
                        "mirror_fallback", host=ref.registry, repo=ref.repository, mirror=ep.host,
                        error=exc.reason if isinstance(exc, _Retry) else type(exc).__name__)
                    continue
                try:
                    yield ep, resp
                finally:
                    resp.release()
                return
            finally:
                sem.release()

    async def _send(self, ep: Endpoint, ref: Reference, method: str, path: str, *, purpose: str,
                    headers: dict[str, str] | None, data: bytes | None, blob: str | None,
                    ok: tuple[int, ...], push: bool) -> aiohttp.ClientResponse:
        """One logical request on one endpoint: auth rounds and redirects included."""
        session = self.session
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        registry_url = path if path.startswith(("http://", "https://")) else ep.url(path)
        blob_key = (ep.host, ref.repository, blob) if blob and method in ("GET", "HEAD") else None
        url = self._blob_urls.get(blob_key, registry_url) if blob_key else registry_url
        authz = await self.auth.header(ep.host, ref.registry, scope)
        auth_rounds = 0
        storage_retries = 0
        hops = 0
        ssl = ep.ssl_context()
        while True:
            same_host = urlsplit(url).netloc == ep.host
            h = dict(ep.headers)
            h.update(headers or {})
            if authz and same_host:
                h["Authorization"] = authz
            self.stats.request(purpose)
            try:
                try:
                    resp = await session.request(method, url, headers=h, data=data, allow_redirects=False,
                                                 ssl=ssl if same_host else True)
                except BaseException:
                    if blob_key and not same_host:  # storage unreachable: next time ask the registry
                        self._blob_urls.pop(blob_key, None)
                    raise
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
                raise ProtocolError(f"TLS with {urlsplit(url).netloc} failed ({type(exc).__name__}); "
                                    "set `ca` or `skip_verify` in its hosts.toml", host=ep.host) from None
            except aiohttp.ClientConnectorError as exc:
                raise _Retry(f"cannot connect to {urlsplit(url).netloc} ({type(exc).__name__})",
                             connect=same_host) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise _Retry(f"{type(exc).__name__} from {urlsplit(url).netloc}") from None
            except TimeoutError:
                raise _Retry(f"timeout from {urlsplit(url).netloc}") from None
            status = resp.status
            if status in ok:
                return resp
            try:
                if status in _REDIRECTS and resp.headers.get("Location"):
                    hops += 1
                    if hops > _MAX_REDIRECTS:
                        raise ProtocolError("too many redirects", host=ep.host, repo=ref.repository)
                    url = urljoin(url, resp.headers["Location"])
                    self.stats.redirects += 1
                    if blob_key and urlsplit(url).netloc != ep.host:
                        self._blob_urls[blob_key] = url
                    continue
                if not same_host and status in (401, 403) and storage_retries < 2:
                    # Expired or revoked storage URL: drop it and ask the registry again.
                    storage_retries += 1
                    log.info("storage_url_refused", host=ep.host, repo=ref.repository, digest=blob or "-",
                             status=status, storage=_safe_url(url))
                    if blob_key:
                        self._blob_urls.pop(blob_key, None)
                    url, hops = registry_url, 0
                    continue
                if status == 401 and same_host and auth_rounds < 2:
                    auth_rounds += 1
                    authz = await self.auth.challenge(ep.host, ref.registry, scope,
                                                      resp.headers.get("WWW-Authenticate", ""),
                                                      previous=authz)
                    continue
                if blob_key and not same_host:
                    self._blob_urls.pop(blob_key, None)
                code = await _error_code(resp)
                detail = f"HTTP {status}" + (f" {code}" if code else "")
                where = dict(host=ep.host, repo=ref.repository, digest=blob or "")
                if status == 429 or status >= 500 or status == 408:
                    raise _Retry(f"{detail} from {urlsplit(url).netloc}",
                                 _retry_after(resp.headers.get("Retry-After")))
                if status == 404:
                    what = "upload" if path.startswith("http") else path.split("?")[0]
                    raise NotFoundError(f"not found: {method} {what} ({detail})", **where)
                if status in (401, 403):
                    raise AuthError(f"access denied ({detail})", **where)
                if status == 416:
                    raise ProtocolError(f"range not satisfiable ({detail})", **where)
                raise ProtocolError(f"unexpected {detail} for {method}", **where)
            finally:
                if resp.status not in ok:
                    resp.release()

    async def read_body(self, resp: aiohttp.ClientResponse, purpose: str, limit: int) -> bytes:
        length = resp.content_length
        if length is not None and length > limit:
            raise ProtocolError(f"response of {length} bytes exceeds the {limit}-byte limit")
        try:
            if length is not None:
                # Known length: one read, one join inside aiohttp; a short body raises.
                body = await resp.read()
                self.stats.received(purpose, len(body))
                if len(body) != length:
                    raise _Retry(f"truncated body ({len(body)} of {length} bytes)")
                return body
            chunks: list[bytes] = []
            total = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                total += len(chunk)
                self.stats.received(purpose, len(chunk))
                if total > limit:
                    raise ProtocolError(f"response exceeds the {limit}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise _Retry(f"body interrupted: {type(exc).__name__}") from None
        except TimeoutError:
            raise _Retry("read timeout") from None

    # -- manifests -------------------------------------------------------------------
    async def get_manifest(self, ref: str | Reference, obj: str | None = None) -> tuple[bytes, str, str]:
        """Raw manifest/index bytes, media type and digest (verified when pinned)."""
        r = as_reference(ref)
        target = obj or r.object
        capability = "pull" if target.startswith("sha256:") else "resolve"

        async def once() -> tuple[bytes, str, str]:
            async with self.request(r, "GET", f"/{r.repository}/manifests/{target}", purpose="manifest",
                                  capability=capability, headers={"Accept": ACCEPT}, ok=(200,)) as (_, resp):
                body = await self.read_body(resp, "manifest", MAX_MANIFEST)
                ctype = resp.headers.get("Content-Type")
            return body, ctype or "", sha256_digest(body)

        body, ctype, digest = await self.retrying(r, target if ":" in target else "", "manifest", once)
        if target.startswith("sha256:") and digest != target:
            raise DigestMismatchError("manifest bytes do not match the digest", host=r.registry,
                                      repo=r.repository, digest=target)
        return body, media_type_of(parse_json(body, "manifest"), ctype), digest

    async def resolve(self, ref: str | Reference, platform: str = "linux/amd64") -> ResolvedImage:
        """Reference → one platform's manifest, config and layer descriptors."""
        r = as_reference(ref)
        body, mt, digest = await self.get_manifest(r)
        index_digest = None
        if mt in INDEX_TYPES:
            index_digest = digest
            chosen = select_platform(parse_json(body, "index"), platform)
            body, mt, digest = await self.get_manifest(r, chosen.digest)
            if mt in INDEX_TYPES:
                raise ProtocolError("nested image index is not supported", host=r.registry,
                                    repo=r.repository, digest=digest)
        manifest = parse_json(body, "manifest")
        cfg_desc = config_of(manifest)
        config = parse_json(await self.fetch_blob(r, cfg_desc.digest, MAX_MANIFEST, purpose="config"),
                            "image config")
        return ResolvedImage(reference=str(r), manifest_digest=digest, media_type=mt, manifest=manifest,
                             manifest_bytes=body, config=config, layers=layers_of(manifest),
                             index_digest=index_digest)

    # -- blobs -----------------------------------------------------------------------
    async def blob_size(self, ref: str | Reference, digest: str) -> int:
        """Size of a blob: HEAD, or ``Range: bytes=0-0`` where HEAD is refused."""
        r = as_reference(ref)
        check_digest(digest)
        key = (r.registry, r.repository, digest)
        if key in self._sizes:
            return self._sizes[key]
        path = f"/{r.repository}/blobs/{digest}"

        async def head() -> int | None:
            try:
                async with self.request(r, "HEAD", path, purpose="size", blob=digest, ok=(200,)) as (_, resp):
                    return resp.content_length
            except ProtocolError:  # 405/400/403-style refusal of HEAD
                return None

        async def probe() -> int:
            async with self.request(r, "GET", path, purpose="size", blob=digest,
                                  headers={"Range": "bytes=0-0"}) as (_, resp):
                if resp.status == 206:
                    _, _, total = parse_content_range(resp.headers.get("Content-Range"))
                    await self.read_body(resp, "size", 1 << 16)
                    if total is None:
                        raise ProtocolError("Content-Range has no total size", host=r.registry,
                                            repo=r.repository, digest=digest)
                    return total
                if resp.content_length is None:
                    raise ProtocolError("cannot determine blob size", host=r.registry,
                                        repo=r.repository, digest=digest)
                resp.close()  # a 200 with the whole blob: do not read it
                return resp.content_length

        size = await self.retrying(r, digest, "blob size", head)
        if size is None:
            size = await self.retrying(r, digest, "blob size", probe)
        self._sizes[key] = size
        return size

    async def read_range(self, ref: str | Reference, digest: str, start: int, end: int, *,
                         purpose: str = "range") -> bytes:
        """Exactly the bytes ``[start, end)`` of a blob."""
        return (await self.read_range_from(ref, digest, start, end, purpose=purpose))[1]

    async def read_range_from(self, ref: str | Reference, digest: str, start: int, end: int, *,
                              purpose: str = "range", avoid: Collection[str] = ()) -> tuple[str, bytes]:
        """(host that served them, exactly the bytes ``[start, end)`` of a blob), from a host
        not in ``avoid`` while one is left."""
        r = as_reference(ref)
        check_digest(digest)
        check_range(start, end)
        if start == end:
            return "", b""
        path = f"/{r.repository}/blobs/{digest}"

        async def once() -> tuple[str, bytes]:
            async with self.request(r, "GET", path, purpose=purpose, blob=digest, avoid=avoid,
                                  headers={"Range": f"bytes={start}-{end - 1}"}) as (ep, resp):
                return ep.host, await self._range_body(r, digest, resp, start, end, purpose)

        return await self.retrying(r, digest, "range read", once)

    def pull_hosts(self, ref: str | Reference) -> list[str]:
        """The hosts a blob of ``ref`` may come from, in the order they are tried."""
        return [ep.host for ep in self.hosts.endpoints(as_reference(ref).registry, "pull")]

    async def _range_body(self, r: Reference, digest: str, resp: aiohttp.ClientResponse,
                          start: int, end: int, purpose: str) -> bytes:
        where = dict(host=r.registry, repo=r.repository, digest=digest)
        if resp.status == 206:
            a, b, total = parse_content_range(resp.headers.get("Content-Range"))
            if total is not None:
                self._sizes.setdefault((r.registry, r.repository, digest), total)
            if a > start or b < end:
                raise ProtocolError(f"server sent bytes [{a}, {b}) for a request of [{start}, {end})", **where)
            if resp.content_length is not None and resp.content_length != b - a:
                raise ProtocolError("Content-Length does not match Content-Range", **where)
            body = await self.read_body(resp, purpose, b - a)
            if len(body) != b - a:
                raise _Retry(f"truncated range body ({len(body)} of {b - a} bytes)")
            return body if (a, b) == (start, end) else body[start - a:end - a]
        # 200: the server ignored Range. Read only up to ``end``, then drop the connection.
        self.stats.range_ignored += 1
        if resp.content_length is not None and resp.content_length < end:
            raise ProtocolError(f"blob is {resp.content_length} bytes, range ends at {end}", **where)
        try:
            data = await resp.content.readexactly(end)
        except asyncio.IncompleteReadError as exc:
            self.stats.received(purpose, len(exc.partial))
            raise _Retry(f"truncated body ({len(exc.partial)} of {end} bytes)") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise _Retry(f"body interrupted: {type(exc).__name__}") from None
        except TimeoutError:
            raise _Retry("read timeout") from None
        finally:
            if resp.content_length is None or resp.content_length > end:
                resp.close()
        self.stats.received(purpose, len(data))
        return data[start:end]

    async def read_ranges(self, ref: str | Reference, digest: str, ranges: list[tuple[int, int]], *,
                          purpose: str = "range") -> list[bytes]:
        """Several ranges of one blob; nearby ones share a request. Results in input order."""
        spans = coalesce(list(ranges), self.config.coalesce_gap, self.config.max_coalesced)
        datas = await asyncio.gather(*(self.read_range(ref, digest, s.start, s.end, purpose=purpose)
                                       for s in spans))
        out: list[bytes] = [b""] * len(ranges)
        for span, data in zip(spans, datas):
            for idx, s, e in span.parts:
                out[idx] = data[s - span.start:e - span.start]
        return out

    async def stream_blob(self, ref: str | Reference, digest: str, *, purpose: str = "blob",
                          chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The whole blob in chunks; an interrupted body resumes with Range at the
        offset reached. The digest is checked at the end (``DigestMismatchError``)."""
        r = as_reference(ref)
        check_digest(digest)
        if not digest.startswith("sha256:"):
            raise ProtocolError("only sha256 blobs can be streamed and verified", digest=digest)
        hasher = hashlib.sha256()
        # Hashing runs on a worker thread (hashlib releases the GIL), overlapped with the
        # next network read; updates stay ordered because each waits for the previous.
        loop = asyncio.get_running_loop()
        hashing: asyncio.Future[None] | None = None
        offset = 0
        path = f"/{r.repository}/blobs/{digest}"
        policy = self.config.retry
        failures = 0
        while True:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                async with self.request(r, "GET", path, purpose=purpose, blob=digest,
                                      headers=headers) as (_, resp):
                    skip = 0
                    if offset and resp.status == 200:
                        skip = offset  # range ignored on resume: discard what we have
                        self.stats.range_ignored += 1
                    elif offset:
                        a, _, _ = parse_content_range(resp.headers.get("Content-Range"))
                        if a != offset:
                            raise ProtocolError(f"resume at {offset} answered from {a}", host=r.registry,
                                                repo=r.repository, digest=digest)
                    parts: list[bytes] = []
                    pending = 0
                    interrupted = ""
                    try:
                        async for chunk in resp.content.iter_chunked(chunk_size):
                            self.stats.received(purpose, len(chunk))
                            if skip:
                                cut = min(skip, len(chunk))
                                chunk, skip = chunk[cut:], skip - cut
                                if not chunk:
                                    continue
                            parts.append(chunk)
                            pending += len(chunk)
                            if pending < chunk_size:
                                continue
                            block = b"".join(parts)
                            parts, pending = [], 0
                            if hashing is not None:
                                await hashing
                            hashing = loop.run_in_executor(None, hasher.update, block)
                            offset += len(block)
                            failures = 0
                            yield block
                    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                        interrupted = f"body interrupted: {type(exc).__name__}"
                    except TimeoutError:
                        interrupted = "read timeout"
                    if parts:  # the tail, or what arrived before an interruption
                        block = b"".join(parts)
                        if hashing is not None:
                            await hashing
                        hashing = loop.run_in_executor(None, hasher.update, block)
                        offset += len(block)
                        yield block
                    if interrupted:
                        raise _Retry(interrupted)
                    expected = self._sizes.get((r.registry, r.repository, digest))
                    if resp.status == 200 and resp.content_length is not None:
                        expected = resp.content_length
                    elif resp.status == 206:
                        _, _, expected = parse_content_range(resp.headers.get("Content-Range"))
                    if expected is not None and offset < expected:
                        raise _Retry(f"truncated body ({offset} of {expected} bytes)")
                break
            except _Retry as exc:
                failures += 1
                if failures >= policy.max_attempts:
                    raise UnavailableError(f"blob download failed after {failures} attempts without "
                                           f"progress: {exc.reason}", host=r.registry, repo=r.repository,
                                           digest=digest) from None
                delay = policy.delay(failures, exc.retry_after)
                self.stats.retries += 1
                log.warning("registry_retry", host=r.registry, repo=r.repository, digest=digest, op="stream",
                            offset=offset, attempt=failures, reason=exc.reason, delay=round(delay, 3))
                await asyncio.sleep(delay)
        if hashing is not None:
            await hashing
        if "sha256:" + hasher.hexdigest() != digest:
            raise DigestMismatchError(f"downloaded {offset} bytes do not match the digest",
                                      host=r.registry, repo=r.repository, digest=digest)

    async def fetch_blob(self, ref: str | Reference, digest: str, max_size: int, *,
                         purpose: str = "blob") -> bytes:
        """A whole (small) blob, verified; ``ProtocolError`` if larger than ``max_size``."""
        r = as_reference(ref)
        check_digest(digest)

        async def once() -> bytes:
            async with self.request(r, "GET", f"/{r.repository}/blobs/{digest}", purpose=purpose,
                                  blob=digest, ok=(200,)) as (_, resp):
                return await self.read_body(resp, purpose, max_size)

        data = await self.retrying(r, digest, "blob fetch", once)
        algo = digest.split(":", 1)[0]
        if f"{algo}:" + hashlib.new(algo, data).hexdigest() != digest:
            raise DigestMismatchError("blob bytes do not match the digest", host=r.registry,
                                      repo=r.repository, digest=digest)
        return data

    # -- push and referrers (implemented in referrers.py) ----------------------------
    async def push_blob(self, ref: str | Reference, data: bytes,
                        media_type: str = "application/octet-stream") -> Descriptor:
        """Upload a blob (monolithic POST + PUT) unless the registry already has it."""
        return await _referrers.push_blob(self, ref, data, media_type)

    async def push_manifest(self, ref: str | Reference, manifest: bytes | dict[str, Any],
                            media_type: str | None = None, *, tag: str | None = None) -> Descriptor:
        """PUT a manifest by ``tag`` (default: the ref's tag) or by digest."""
        return await _referrers.push_manifest(self, ref, manifest, media_type, tag=tag)

    async def push_artifact(self, ref: str | Reference, *, subject: Descriptor, artifact_type: str,
                            blobs: list[tuple[Any, ...]],
                            annotations: dict[str, str] | None = None) -> Descriptor:
        """Publish an OCI artifact whose subject is ``subject``; ``blobs`` are
        ``(media_type, data[, annotations])``. Maintains the referrers fallback tag."""
        return await _referrers.push_artifact(self, ref, subject=subject, artifact_type=artifact_type,
                                              blobs=blobs, annotations=annotations)

    async def referrers(self, ref: str | Reference, subject_digest: str,
                        artifact_type: str | None = None) -> list[Descriptor]:
        """Artifacts referring to ``subject_digest`` (referrers API, else the fallback tag)."""
        return await _referrers.referrers(self, ref, subject_digest, artifact_type)
