"""Lazy fetch through FUSE from a real docker-registry behind the fault proxy.

Every read goes mount → fs → fetch scheduler → RegistryClient.read_range → proxy →
registry; bytes are compared with the tar, registry bytes with the blob size.
"""
from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import logging
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from harness.proxy import Fault, start_proxy
from harness.registry import push_image, start_registry
from snapshotter.fetch import Fetcher, FetchOptions, PriorityGate, Priority
from snapshotter.fetch.sources import IndexCodec, RegistryBlobSource
from snapshotter.fs import LayerData, LayerTree
from snapshotter.fs.thread import FuseThread
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.registry import RegistryClient, RegistryConfig, RetryPolicy
from snapshotter.store import ChunkStore
from tests.test_fs import make_layer_tar
from tests.test_layers import _sample

pytestmark = pytest.mark.root


class Env:
    def __init__(self, tmp: Path, compression: str, deadline: float = 4.0) -> None:
        self.tmp = tmp
        tar = tmp / "layer.tar"
        make_layer_tar(tar)
        self.tar = tar
        raw = tar.read_bytes()
        self.blob = {"gzip": lambda: gzip.compress(raw, 6), "tar": lambda: raw,
                     # one frame: no random access, the layer is streamed once into the store
                     "zstd": lambda: zstandard.ZstdCompressor(level=3).compress(raw)}[compression]()
        media = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                 "tar": "application/vnd.oci.image.layer.v1.tar",
                 "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}[compression]
        (tmp / "blob").write_bytes(self.blob)
        write_index(tmp / "idx", index_file(str(tmp / "blob"), span=256 << 10, chunk_size=256 << 10))
        self.index = IndexFile.open(tmp / "idx")
        self.reg = start_registry(tmp / "reg")
        self.proxy = start_proxy(self.reg.url)
        self.ft = FuseThread(tmp / "root" / "mnt")
        self.store = ChunkStore(tmp / "root")
        self.deadline = deadline
        cfg = RegistryConfig(retry=RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.3, deadline=1.5),
                             read_timeout=2, connect_timeout=1)
        self.client = self.ft.call(lambda: RegistryClient(cfg))
        ref = f"{self.proxy.host}/lazy/test:v1"
        pushed = self.ft.run(lambda: push_image(self.client, ref, [self.blob], layer_media_type=media))
        self.digest = pushed["layer_digests"][0]
        self.fetcher = Fetcher(self.store, FetchOptions(max_concurrency=4, deadline_s=deadline,
                                                        attempt_timeout_s=2.0))
        self.lf = self.fetcher.layer("L", IndexCodec(self.index), RegistryBlobSource(self.client, ref, self.digest),
                                     sequential_only=self.index.info.sequential_only)
        tree = LayerTree.build(self.index.entries())
        self.dir = self.ft.run(lambda: self.ft.fs.add_layer(self.digest.split(":")[1], tree,
                                                            LayerData(self.index, self.store, self.lf)))
        self.proxy.reset_stats()

    def close(self) -> None:
        try:
            self.ft.run(self.client.close)
        finally:
            self.ft.stop()
            self.proxy.stop()
            self.reg.stop()
            self.index.close()


@pytest.fixture(params=["tar", "gzip", "zstd"])
def env(tmp_path: Path, request: pytest.FixtureRequest):
    e = Env(tmp_path, request.param)
    try:
        yield e
    finally:
        e.close()


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name.removeprefix("./"): tf.extractfile(m).read() for m in tf.getmembers() if m.isreg()
                and "/.wh." not in "/" + m.name}


def test_zstd_single_frame_is_sequential(tmp_path: Path) -> None:
    e = Env(tmp_path, "zstd")
    try:
        assert e.index.info.sequential_only
        assert (e.dir / "many/f0299").read_bytes() == b"299\n" * 300
        assert e.proxy.stats.body_bytes == len(e.blob)  # streamed exactly once
        assert e.lf.missing_chunks() == []
    finally:
        e.close()


def test_small_read_fetches_a_small_part(env: Env) -> None:
    # read-ahead of the next span is off by default (and has its own test)
    assert not env.fetcher.options.readahead_spans
    assert (env.dir / "etc/hostname").read_bytes() == b"lazy\n"
    fetched = env.proxy.stats.body_bytes
    if env.index.info.sequential_only:
        # no random access: one stream from the start (may still run in the background)
        assert 0 < fetched <= len(env.blob)
        env.ft.run(lambda: env.lf.fetch_all(Priority.ON_DEMAND))  # joins the running stream
        assert env.proxy.stats.body_bytes == len(env.blob)
    else:
        assert 0 < fetched < len(env.blob) // 4, (fetched, len(env.blob))
    # second read: page cache or store, no registry traffic
    before = env.proxy.stats.body_bytes
    assert (env.dir / "etc/hostname").read_bytes() == b"lazy\n"
    assert env.proxy.stats.body_bytes == before


def test_every_byte_equals_the_layer(env: Env) -> None:
    want = _members(env.tar)
    for name, data in want.items():
        assert (env.dir / name).read_bytes() == data, name
    # fully read: nothing is fetched twice beyond span overlap (registry bytes ≈ blob size)
    assert env.proxy.stats.body_bytes < 2 * len(env.blob)
    assert env.lf.missing_chunks() == []


def test_single_flight_concurrent_readers(env: Env) -> None:
    import concurrent.futures as cf

    want = _members(env.tar)["data/big.bin"]
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: (env.dir / "data/big.bin").read_bytes(), range(6)))
    assert all(r == want for r in results)
    # six readers, one fetch per span: well under two copies of the blob
    assert env.proxy.stats.body_bytes < 1.5 * len(env.blob)
    assert env.store.stats().dedup_hits == 0  # no chunk was fetched and stored twice


def test_registry_down_eio_within_deadline_then_recovers(env: Env) -> None:
    env.reg.stop()
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        (env.dir / "data/big.bin").read_bytes()
    elapsed = time.monotonic() - t0
    assert exc.value.errno == errno.EIO
    assert env.deadline - 0.5 <= elapsed <= env.deadline + 2, elapsed  # one deadline, not two
    env.reg.start()
    time.sleep(env.fetcher.options.fail_fast_s)  # documented fail-fast window after an EIO
    assert (env.dir / "data/big.bin").read_bytes() == _members(env.tar)["data/big.bin"]


def test_transient_faults_are_retried(env: Env) -> None:
    env.proxy.add_fault(Fault("status", status=503, times=2, path="/blobs/"))
    env.proxy.add_fault(Fault("reset", times=1, after_bytes=1000, path="/blobs/"))
    assert (env.dir / "many/f0100").read_bytes() == b"100\n" * 101


def test_corrupt_registry_blob_is_never_served(env: Env) -> None:
    """Flip bytes in the registry's stored blob: reads fail with EIO, nothing is cached."""
    hexd = env.digest.split(":")[1]
    data_file = next((env.tmp / "reg").rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))
    raw = bytearray(data_file.read_bytes())
    for off in range(100, len(raw) - 100, 997):
        raw[off] ^= 0x5A
    data_file.write_bytes(bytes(raw))
    failed = _sample("lazysnap_fetch_corrupt_ranges_total", outcome="failed")
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        (env.dir / "data/big.bin").read_bytes()
    elapsed = time.monotonic() - t0
    assert exc.value.errno == errno.EIO
    assert env.store.stats().chunks == 0
    if not env.index.info.sequential_only:
        # a range that fails verification twice is a hard EIO at once, not refetched until
        # the deadline, and counted
        assert elapsed < env.deadline / 2, elapsed
        assert _sample("lazysnap_fetch_corrupt_ranges_total", outcome="failed") > failed


async def test_priority_gate_orders_waiters() -> None:
    gate = PriorityGate(2)
    order: list[str] = []
    await gate.acquire(Priority.BACKGROUND)  # low work holds the one low slot
    await gate.acquire(Priority.ON_DEMAND)  # on-demand can still get the other

    async def waiter(name: str, prio: Priority) -> None:
        await gate.acquire(prio)
        order.append(name)

    tasks = [asyncio.create_task(waiter("bg", Priority.BACKGROUND)),
             asyncio.create_task(waiter("pf", Priority.PREFETCH)),
             asyncio.create_task(waiter("od", Priority.ON_DEMAND))]
    await asyncio.sleep(0)
    assert order == []
    gate.release(Priority.ON_DEMAND)  # frees a slot: on-demand first even though it came last
    await asyncio.sleep(0)
    assert order == ["od"]
    gate.release(Priority.BACKGROUND)
    await asyncio.sleep(0)
    assert order == ["od", "pf"]
    gate.release(Priority.ON_DEMAND)
    gate.release(Priority.PREFETCH)
    await asyncio.gather(*tasks)
    assert order == ["od", "pf", "bg"]



def _span_of(codec: IndexCodec, cid: int) -> list[int]:
    return [c for c in codec.span_mates([cid]) if c != cid]


def _chunk_with_mates(codec: IndexCodec, skip: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    for cid in range(codec.chunk_count):
        mates = _span_of(codec, cid)
        if len(mates) >= 2 and cid not in skip and not skip.intersection(mates):
            return cid
    raise AssertionError("test layer needs spans holding several chunks")


def test_prefetch_stores_only_the_profile_chunks(tmp_path: Path) -> None:
    """A profile names exactly what a start reads: prefetch must not decode and store the
    rest of the span (on-demand misses do, for the next sequential read)."""
    e = Env(tmp_path, "gzip")
    try:
        codec = e.lf.codec
        cid = _chunk_with_mates(codec)
        e.ft.run(lambda: e.lf.ensure([cid], Priority.PREFETCH))
        assert e.store.has(codec.digest(cid))
        assert not any(e.store.has(codec.digest(c)) for c in _span_of(codec, cid))
        # on demand: the whole span is decoded and stored
        other = _chunk_with_mates(codec, {cid, *_span_of(codec, cid)})
        e.ft.run(lambda: e.lf.ensure([other], Priority.ON_DEMAND))
        assert all(e.store.has(codec.digest(c)) for c in _span_of(codec, other))
    finally:
        e.close()


def test_on_demand_miss_reads_the_next_span_ahead(tmp_path: Path) -> None:
    e = Env(tmp_path, "gzip")
    try:
        e.fetcher.options.readahead_spans = True  # off by default (bench/RESULTS.md)
        codec = e.lf.codec
        first = 0
        ahead = codec.readahead_chunks([first])
        assert ahead and not set(ahead) & set(codec.span_mates([first]))
        e.ft.run(lambda: e.lf.ensure([first], Priority.ON_DEMAND))

        async def settle() -> None:  # the read-ahead runs in the background
            while e.lf._tasks:
                await asyncio.wait(list(e.lf._tasks))

        e.ft.run(settle)
        for c in ahead:
            assert e.store.has(codec.digest(c))
            assert hashlib.sha256(e.store.read(codec.digest(c))).digest() == e.index.chunk(c).digest
        # without read-ahead the same miss leaves what follows alone
        e.fetcher.options.readahead_spans = False
        far = codec.readahead_chunks([ahead[-1]])
        assert far
        after = codec.readahead_chunks([far[0]])
        e.ft.run(lambda: e.lf.ensure([far[0]], Priority.ON_DEMAND))
        e.ft.run(settle)
        assert not any(e.store.has(codec.digest(c)) for c in after)
    finally:
        e.close()


def test_retry_backoff_is_exponential_jittered_and_bounded(tmp_path: Path) -> None:
    opts = FetchOptions(retry_base_s=0.1, retry_max_s=2.0)
    lf = Fetcher(ChunkStore(tmp_path / "root"), opts).layer("L", None, None)  # type: ignore[arg-type]
    far = time.monotonic() + 3600
    for attempt, (lo, hi) in {1: (0.05, 0.1), 2: (0.1, 0.2), 3: (0.2, 0.4), 5: (0.8, 1.6), 9: (1.0, 2.0)}.items():
        delays = [lf._backoff(attempt, far) for _ in range(200)]
        assert all(lo <= d <= hi for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > (hi - lo) / 4  # jittered: readers do not retry in step
    assert lf._backoff(9, time.monotonic() + 0.3) <= 0.3  # never past the deadline
    assert lf._backoff(9, time.monotonic() - 1) == 0.0


def test_disk_full_is_one_error_line_and_reads_recover(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The chunk store on a 1 MiB filesystem: reads of a bigger file get its bytes (served
    from memory as they arrive) or EIO, never wrong bytes; the node says so once (path,
    free space), not once per span; with space again it says that once too."""
    caplog.set_level(logging.INFO, logger="lazysnap")
    chunks = tmp_path / "root" / "chunks"
    chunks.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lzs-full", str(chunks)], check=True)
    env = None
    try:
        env = Env(tmp_path, "gzip")
        big = _members(env.tar)["data/big.bin"]
        assert len(big) > 2 << 20
        for _ in range(3):
            try:
                assert (env.dir / "data/big.bin").read_bytes() == big
            except OSError as exc:
                assert exc.errno == errno.EIO
        events = [r.getMessage() for r in caplog.records]
        assert events.count("store_full") == 1, events
        full = next(r for r in caplog.records if r.getMessage() == "store_full")
        assert full.fields["path"] == str(chunks) and full.fields["free_bytes"] >= 0  # type: ignore[attr-defined]
        assert "span_fetch_error" not in events
        assert _sample("lazysnap_chunk_write_errors_total", errno="ENOSPC") > 0
        # room again: the same read succeeds, and the store says it is writable
        subprocess.run(["mount", "-o", "remount,size=64m", str(chunks)], check=True)
        time.sleep(env.fetcher.options.fail_fast_s)
        fd = os.open(env.dir / "data/big.bin", os.O_RDONLY)
        try:  # reads served from memory earlier may be in the page cache: read through FUSE
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert (env.dir / "data/big.bin").read_bytes() == big
        assert [r.getMessage() for r in caplog.records].count("store_writable") == 1
        # nothing half-written left behind (a span's chunks are written after its readers
        # are answered: wait for writes still in flight)
        deadline = time.monotonic() + 10
        while list((chunks / ".tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list((chunks / ".tmp").iterdir())
    finally:
        if env is not None:
            env.close()
        subprocess.run(["umount", "-l", str(chunks)], check=False)
