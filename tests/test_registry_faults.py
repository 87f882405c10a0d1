"""Bad minutes of a registry, through harness.proxy in front of a real docker-registry:
5xx, 429 + Retry-After, resets mid-body, stalls, 200 instead of 206, refused HEAD,
redirects to expiring signed URLs on another port, and mirrors via hosts.toml
(pull-through docker-registry) with the upstream/mirror stopped halfway.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import time
from pathlib import Path

import pytest

from harness.proxy import Fault, start_proxy
from harness.registry import push_image, start_registry
from snapshotter.fetch import Fetcher, FetchOptions
from snapshotter.fetch.sources import IndexCodec, RegistryBlobSource
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.registry import ProtocolError, RegistryClient, RegistryConfig, RetryPolicy, UnavailableError
from snapshotter.registry.manifest import sha256_digest
from snapshotter.store import ChunkStore
from tests.test_fs import make_layer_tar
from tests.test_layers import _sample


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Messages plus the structured fields of every record (where values would leak)."""
    return caplog.text + "\n".join(repr(getattr(r, "fields", "")) for r in caplog.records)


FAST = RetryPolicy(max_attempts=5, base_delay=0.02, max_delay=0.2, deadline=10.0)


def make_client(tmp_path: Path, *, hosts_dir: Path | None = None, retry: RetryPolicy = FAST,
                docker_config: dict | None = None, **kw: object) -> RegistryClient:
    cfg = tmp_path / "docker-config.json"
    cfg.write_text(json.dumps(docker_config or {}))
    return RegistryClient(RegistryConfig(docker_config=cfg, hosts_dir=hosts_dir, retry=retry,
                                         **kw))  # type: ignore[arg-type]


@pytest.fixture
def blob_setup(tmp_path: Path):
    """A registry holding one 2 MiB blob, and a proxy in front of it."""
    data = os.urandom(2 << 20)
    with start_registry(tmp_path / "reg") as reg:
        async def push() -> None:
            async with make_client(tmp_path) as c:
                await c.push_blob(f"{reg.host}/t/blob", data)
        asyncio.run(push())
        with start_proxy(reg.url) as px:
            yield reg, px, data


@pytest.mark.parametrize("fault", [
    Fault("status", status=503, times=2, path="/blobs/"),
    Fault("status", status=500, times=1, path="/blobs/"),
    Fault("reset", after_bytes=1000, times=2, path="/blobs/"),
    Fault("stall", after_bytes=10, seconds=3.0, times=1, path="/blobs/"),
], ids=["503x2", "500", "reset-mid-body", "stall"])
async def test_transient_faults_recover(tmp_path: Path, blob_setup, fault: Fault) -> None:
    reg, px, data = blob_setup
    dg = sha256_digest(data)
    ref = f"{px.host}/t/blob"
    px.add_fault(fault)
    async with make_client(tmp_path, read_timeout=1.0) as c:
        got = await c.read_range(ref, dg, 100, 600_000)
        assert got == data[100:600_000]
        assert c.stats.retries >= 1
        assert fault.times == 0  # the fault really fired
        px.add_fault(Fault(fault.kind, status=fault.status, after_bytes=fault.after_bytes,
                           seconds=fault.seconds, times=1, path="/blobs/"))
        whole = b"".join([x async for x in c.stream_blob(ref, dg)])
        assert whole == data


async def test_429_honours_retry_after(tmp_path: Path, blob_setup) -> None:
    reg, px, data = blob_setup
    dg = sha256_digest(data)
    px.add_fault(Fault("status", status=429, retry_after=1, times=1, path="/blobs/"))
    async with make_client(tmp_path) as c:
        t0 = time.monotonic()
        assert await c.read_range(f"{px.host}/t/blob", dg, 0, 10) == data[:10]
        assert time.monotonic() - t0 >= 0.95  # waited as told, not FAST's 20 ms
        assert c.stats.retries == 1


async def test_200_instead_of_206(tmp_path: Path, blob_setup) -> None:
    reg, px, data = blob_setup
    dg = sha256_digest(data)
    px.add_fault(Fault("ignore_range", times=-1, path="/blobs/"))
    async with make_client(tmp_path) as c:
        got = await c.read_range(f"{px.host}/t/blob", dg, 1000, 5000)
        assert got == data[1000:5000]
        assert c.stats.range_ignored == 1
        # only what was needed was read, then the connection was dropped
        assert c.stats.bytes_by_purpose["range"] == 5000
        assert await c.read_ranges(f"{px.host}/t/blob", dg, [(10, 20), (1 << 20, (1 << 20) + 5)]) == \
            [data[10:20], data[1 << 20:(1 << 20) + 5]]


async def test_wrong_content_range_is_an_error_not_wrong_bytes(tmp_path: Path, blob_setup) -> None:
    reg, px, data = blob_setup
    dg = sha256_digest(data)
    px.add_fault(Fault("shift_range", shift=7, times=-1, path="/blobs/"))
    async with make_client(tmp_path) as c:
        with pytest.raises(ProtocolError) as ei:
            await c.read_range(f"{px.host}/t/blob", dg, 1000, 2000)
        assert "[1007, 2007)" in str(ei.value) and dg in str(ei.value)
        px.clear_faults()
        assert await c.read_range(f"{px.host}/t/blob", dg, 1000, 2000) == data[1000:2000]


async def test_head_refused_falls_back_to_range_probe(tmp_path: Path, blob_setup) -> None:
    reg, px, data = blob_setup
    px.add_fault(Fault("status", status=405, method="HEAD", times=-1))
    async with make_client(tmp_path) as c:
        assert await c.blob_size(f"{px.host}/t/blob", sha256_digest(data)) == len(data)
        assert px.stats.request_log[-1][2] == "bytes=0-0"


async def test_persistent_failure_gives_clear_error_within_deadline(tmp_path: Path, blob_setup) -> None:
    reg, px, data = blob_setup
    px.add_fault(Fault("status", status=503, times=-1, path="/blobs/"))
    policy = RetryPolicy(max_attempts=100, base_delay=0.05, max_delay=0.3, deadline=1.5)
    async with make_client(tmp_path, retry=policy) as c:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as ei:
            await c.read_range(f"{px.host}/t/blob", sha256_digest(data), 0, 10)
        assert time.monotonic() - t0 < 3.0
    msg = str(ei.value)
    assert "HTTP 503" in msg and px.host in msg and "t/blob" in msg and sha256_digest(data) in msg


async def test_per_host_concurrency_is_bounded(tmp_path: Path, blob_setup) -> None:
    reg, px, data = blob_setup
    dg = sha256_digest(data)
    px.add_fault(Fault("stall", after_bytes=0, seconds=0.2, times=-1, path="/blobs/"))
    async with make_client(tmp_path, per_host_concurrency=3) as c:
        ranges = [(i * 10_000, i * 10_000 + 5_000) for i in range(12)]
        got = await asyncio.gather(*(c.read_range(f"{px.host}/t/blob", dg, s, e) for s, e in ranges))
        assert got == [data[s:e] for s, e in ranges]
    assert px.stats.max_in_flight == 3


async def test_redirect_to_expiring_signed_urls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Blob GETs redirect to signed URLs on another port that expire mid-test; the
    client re-resolves on 403 and never sends Authorization to the storage host."""
    caplog.set_level(logging.DEBUG)
    secret = "redirect-secret-pw"
    data = os.urandom(1 << 20)
    with start_registry(tmp_path / "reg", htpasswd=("dave", secret)) as reg, \
            start_proxy(reg.url, redirect_blobs=True, signed_url_ttl=2.0,
                        upstream_auth=("dave", secret)) as px:
        ref = f"{px.host}/t/redir:v1"
        auth = {"auths": {px.host: {"auth": base64.b64encode(f"dave:{secret}".encode()).decode()}}}
        async with make_client(tmp_path, docker_config=auth) as c:
            img = await push_image(c, ref, [data])
            dg = img["layer_digests"][0]
            ri = await c.resolve(ref)  # config blob goes through a redirect too
            assert ri.manifest_digest == img["manifest_digest"]
            redirects = c.stats.redirects
            assert await c.read_range(ref, dg, 0, 4096) == data[:4096]
            assert c.stats.redirects == redirects + 1
            # cached storage URL: no new redirect while it is valid
            assert await c.read_range(ref, dg, 8192, 9000) == data[8192:9000]
            assert c.stats.redirects == redirects + 1
            await asyncio.sleep(3.1)  # past the (whole-second, rounded-up) expiry: the behaviour under test
            assert await c.read_range(ref, dg, 500_000, 600_000) == data[500_000:600_000]
            assert px.stats.storage_expired == 1
            assert c.stats.redirects == redirects + 2
            whole = b"".join([x async for x in c.stream_blob(ref, dg)])
            assert whole == data
        assert px.stats.storage_requests >= 5
        assert px.stats.storage_auth_headers == []
    logged = log_text(caplog)
    assert "storage_url_refused" in logged  # the expiry was logged…
    assert "X-Signature" not in logged and secret not in logged  # …without the signed query


def _hosts_toml(hosts_dir: Path, registry: str, mirrors: list[str]) -> None:
    d = hosts_dir / registry
    d.mkdir(parents=True)
    lines = [f'server = "http://{registry}"', ""]
    for m in mirrors:
        lines += [f'[host."http://{m}"]', '  capabilities = ["pull", "resolve"]', ""]
    (d / "hosts.toml").write_text("\n".join(lines))


async def _wait_cached(storage: Path, digest: str, size: int, timeout: float = 20.0) -> None:
    """Poll the pull-through registry's storage until it holds the whole blob."""
    hexd = digest.split(":")[1]
    deadline = time.monotonic() + timeout
    while True:
        found = list(storage.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))
        linked = list(storage.rglob(f"repositories/*/*/_layers/sha256/{hexd}/link"))
        if found and found[0].stat().st_size == size and linked:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"mirror never cached {digest}")
        await asyncio.sleep(0.05)


async def test_pull_through_mirror_fallback_order(tmp_path: Path) -> None:
    """hosts.toml: dead mirror, pull-through docker-registry mirror, then upstream."""
    layer_a, layer_b = os.urandom(700_000), os.urandom(300_000)
    with start_registry(tmp_path / "up") as up:
        ref = f"{up.host}/t/mirrored:v1"
        async with make_client(tmp_path) as c:
            img = await push_image(c, ref, [layer_a, layer_b])
        with start_registry(tmp_path / "mirror", proxy_remote=up.url) as mirror, \
                start_proxy(mirror.url) as mirror_px, start_proxy(up.url) as up_px:
            dead = start_registry(tmp_path / "dead")
            dead_host = dead.host
            dead.stop()  # a configured mirror that is down: connection refused
            # Route through counting proxies to see who served what.
            hosts = tmp_path / "hosts"
            _hosts_toml(hosts, up.host, [dead_host, mirror_px.host])
            (hosts / up.host / "hosts.toml").write_text(
                (hosts / up.host / "hosts.toml").read_text().replace(f"http://{up.host}", up_px.url))
            async with make_client(tmp_path, hosts_dir=hosts) as c:
                ri = await c.resolve(ref)
                assert ri.manifest_digest == img["manifest_digest"]
                a = ri.layers[0].digest
                assert await c.read_range(ref, a, 10, 70_000) == layer_a[10:70_000]
                assert up_px.stats.total_requests == 0  # the mirror answered everything
                assert mirror_px.stats.total_requests >= 3
                assert c.stats.mirror_fallbacks >= 3  # the dead mirror was skipped each time
                assert dead_host in c._mirror_down  # and is not dialled again for a while
                # prime the mirror's cache with the whole of layer A
                assert b"".join([x async for x in c.stream_blob(ref, a)]) == layer_a
                await _wait_cached(mirror.storage, a, len(layer_a))  # the cache writes it behind us
                # halfway: the upstream goes away; the pull-through cache still serves A
                up.stop()
                assert await c.read_range(ref, a, 600_000, 700_000) == layer_a[600_000:700_000]
                assert up_px.stats.total_requests == 0
                # now the mirror dies and the upstream returns: fall back to the server
                mirror.stop()
                up.start()
                b = ri.layers[1].digest
                assert await c.read_range(ref, b, 0, 300_000) == layer_b
                assert up_px.stats.total_requests >= 1


async def test_tls_registry_with_hosts_toml_ca_and_skip_verify(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    with start_registry(tmp_path / "reg", tls=True) as reg:
        hosts = tmp_path / "hosts"
        (hosts / reg.host).mkdir(parents=True)
        toml = hosts / reg.host / "hosts.toml"
        toml.write_text(f'server = "https://{reg.host}"\nca = "{reg.ca_path}"\n')
        ref = f"{reg.host}/t/tls:v1"
        async with make_client(tmp_path, hosts_dir=hosts) as c:
            img = await push_image(c, ref, [data])
            ri = await c.resolve(ref)
            assert ri.manifest_digest == img["manifest_digest"]
            assert await c.read_range(ref, ri.layers[0].digest, 99_000, 100_000) == data[99_000:]
        toml.write_text(f'server = "https://{reg.host}"\nskip_verify = true\n')
        async with make_client(tmp_path, hosts_dir=hosts) as c:
            assert await c.fetch_blob(ref, ri.layers[0].digest, 1 << 20) == data
        toml.write_text(f'server = "https://{reg.host}"\n')  # system CAs only: refused, clearly
        async with make_client(tmp_path, hosts_dir=hosts) as c:
            with pytest.raises(ProtocolError) as ei:
                await c.resolve(ref)
        assert "TLS" in str(ei.value) and "hosts.toml" in str(ei.value)


async def test_mirror_without_the_content_falls_back_quietly(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A mirror that answers 404 (an image with no referrers, a tag it does not hold) is
    ordinary: the server answers, and nothing is logged at warning level."""
    caplog.set_level(logging.DEBUG, logger="lazysnap.registry")
    with start_registry(tmp_path / "up") as up, start_registry(tmp_path / "empty") as empty:
        ref = f"{up.host}/t/quiet:v1"
        async with make_client(tmp_path) as c:
            img = await push_image(c, ref, [os.urandom(10_000)])
        hosts = tmp_path / "hosts"
        _hosts_toml(hosts, up.host, [empty.host])
        async with make_client(tmp_path, hosts_dir=hosts) as c:
            assert (await c.resolve(ref)).manifest_digest == img["manifest_digest"]
            assert await c.referrers(ref, img["manifest_digest"]) == []
            assert c.stats.mirror_fallbacks >= 2
    fallbacks = [r for r in caplog.records if r.getMessage() == "mirror_fallback"]
    assert fallbacks and all(r.levelno == logging.DEBUG for r in fallbacks)



@pytest.mark.parametrize("upstream_corrupt", [False, True])
async def test_corrupt_range_from_a_mirror_is_fetched_from_the_next_host(tmp_path: Path,
                                                                          upstream_corrupt: bool) -> None:
    """A mirror serving rotten bytes (right headers, flipped bytes) costs the reader nothing
    while the upstream is good: the range is fetched again from the next host and the mirror
    is not asked for that blob again. If every host serves rotten bytes the read is a hard
    error after one fetch from each, not refetches until the deadline."""
    make_layer_tar(tmp_path / "layer.tar")
    blob = gzip.compress((tmp_path / "layer.tar").read_bytes(), 6)
    (tmp_path / "blob").write_bytes(blob)
    write_index(tmp_path / "idx", index_file(str(tmp_path / "blob"), span=256 << 10, chunk_size=256 << 10))
    retried = _sample("lazysnap_fetch_corrupt_ranges_total", outcome="retried")
    failed = _sample("lazysnap_fetch_corrupt_ranges_total", outcome="failed")
    with IndexFile.open(tmp_path / "idx") as index, start_registry(tmp_path / "reg") as reg, \
            start_proxy(reg.url) as up_px, start_proxy(reg.url) as mirror_px:
        ref = f"{up_px.host}/t/rotten:v1"
        async with make_client(tmp_path) as c:
            digest = (await push_image(c, ref, [blob]))["layer_digests"][0]
        mirror_px.add_fault(Fault("corrupt", times=-1, path="/blobs/"))
        if upstream_corrupt:
            up_px.add_fault(Fault("corrupt", times=-1, path="/blobs/"))
        hosts = tmp_path / "hosts"
        _hosts_toml(hosts, up_px.host, [mirror_px.host])
        async with make_client(tmp_path, hosts_dir=hosts) as c:
            fetcher = Fetcher(ChunkStore(tmp_path / "root"),
                              FetchOptions(max_concurrency=2, deadline_s=20.0, attempt_timeout_s=5.0))
            source = RegistryBlobSource(c, ref, digest)
            lf = fetcher.layer("L", IndexCodec(index), source)
            if upstream_corrupt:
                t0 = time.monotonic()
                with pytest.raises(OSError, match="failed verification"):
                    await lf.ensure([0])
                assert time.monotonic() - t0 < 10  # not refetched until the deadline
                assert source.distrusted == {mirror_px.host, up_px.host}
                assert _sample("lazysnap_fetch_corrupt_ranges_total", outcome="failed") == failed + 1
                assert fetcher.store.stats().chunks == 0  # nothing rotten stored
                return
            await lf.fetch_all()  # every chunk verified against the index before it is stored
            assert lf.missing_chunks() == []
            assert source.distrusted == {mirror_px.host}
            assert _sample("lazysnap_fetch_corrupt_ranges_total", outcome="retried") > retried
            assert _sample("lazysnap_fetch_corrupt_ranges_total", outcome="failed") == failed
            # the mirror is not asked for this blob again
            mirror_gets = mirror_px.stats.requests["GET /v2/t/rotten/blobs"]
            assert mirror_gets >= 1
            again = Fetcher(ChunkStore(tmp_path / "root2"), fetcher.options).layer("L", IndexCodec(index), source)
            await again.fetch_all()
            assert mirror_px.stats.requests["GET /v2/t/rotten/blobs"] == mirror_gets
            assert _sample("lazysnap_fetch_corrupt_ranges_total", outcome="failed") == failed
