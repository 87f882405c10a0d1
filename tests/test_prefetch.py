"""Recorder, prefetcher and background fill against the real fetch path (no FUSE, no registry).

A gzip layer on disk is indexed for real; chunks are fetched through ``Fetcher`` /
``LayerFetcher`` from a ``FileBlobSource`` that logs the ranges asked for, decoded by the
C core and stored in a real ``ChunkStore``; reads go through the real ``LayerData``.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapshotter.fetch import Fetcher, FetchOptions
from snapshotter.fetch.sources import FileBlobSource, IndexCodec
from snapshotter.fs import LayerData
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.prefetch import background
from snapshotter.prefetch import profile as P
from snapshotter.prefetch.lookup import find
from snapshotter.prefetch.manager import ProfileManager
from snapshotter.prefetch.options import PrefetchOptions
from snapshotter.registry.signatures import Voucher
from snapshotter.store import ChunkStore

SPAN = 128 << 10
CHUNK = 32 << 10


def _data(name: str, n: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(n // 32))


FILES = {f"app/f{i}.bin": _data(f"f{i}", 96 << 10) for i in range(12)}


class LoggingSource(FileBlobSource):
    """The blob file; remembers every range read (what the registry would have served)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.ranges: list[tuple[int, int]] = []

    async def read_range(self, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        return await super().read_range(start, end)


@dataclass
class Layer:
    """What the manager needs of a provided layer (the provider's ``ProvidedLayer`` fields)."""

    digest: str
    index: IndexFile
    fetcher: Any
    data: LayerData
    verified: bool = False


class Host:
    """The provider's side of the manager's contract (``prefetch.manager.LayerHost``)."""

    def __init__(self) -> None:
        self.layers: dict[str, Layer] = {}
        self.client = None
        self.verified: list[str] = []
        self.failed: set[str] = set()

    def layer(self, digest: str) -> Layer | None:
        return self.layers.get(digest)

    def prepare_failed(self, digest: str) -> bool:
        return digest in self.failed

    async def check_complete(self, layer: Layer) -> bool:
        # the provider streams the blob and re-indexes it; here the blob is the local file
        layer.verified = True
        self.verified.append(layer.digest)
        return True


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, IndexFile, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in FILES.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(buf.getvalue(), 1))
    write_index(tmp_path / "idx", index_file(str(path), span=SPAN, chunk_size=CHUNK))
    idx = IndexFile.open(tmp_path / "idx")
    return path, idx, idx.info.blob_digest


def _setup(tmp_path: Path, blob: tuple[Path, IndexFile, str], opts: PrefetchOptions) -> tuple[Host, ProfileManager,
                                                                                              Layer, LoggingSource]:
    path, idx, digest = blob
    store = ChunkStore(tmp_path / "root")
    host = Host()
    mgr = ProfileManager(tmp_path / "root", host, store, opts, voucher=LOCAL_ONLY)
    src = LoggingSource(path)
    lf = Fetcher(store, FetchOptions(max_concurrency=4, deadline_s=10)).layer(digest, IndexCodec(idx), src)
    data = LayerData(idx, store, lf, on_access=mgr.recorder.hook(digest, idx))
    layer = Layer(digest, idx, lf, data)
    host.layers[digest] = layer
    mgr.layer_ready(digest)
    return host, mgr, layer, src


def _entry(idx: IndexFile, path: str) -> Any:
    e = idx.lookup(path)
    assert e is not None
    return e


MANIFEST = "sha256:" + "ab" * 32
LOCAL_ONLY = Voucher("local-only")
READS = [("app/f7.bin", 0, 4096), ("app/f2.bin", 40 << 10, 50 << 10), ("app/f7.bin", 100, 10),
         ("app/f9.bin", 90 << 10, 6 << 10)]


async def _start(layer: Layer) -> list[bytes]:
    return [await layer.data.read(_entry(layer.index, p), off, n) for p, off, n in READS]


async def test_record_then_prefetch_in_first_access_order(tmp_path: Path, blob: Any) -> None:
    host, mgr, layer, src = _setup(tmp_path / "a", blob, PrefetchOptions(background=False))
    rec, _ = await mgr.start_recording("img", MANIFEST, [layer.digest])
    out = await _start(layer)
    assert out == [FILES[p][off:off + n] for p, off, n in READS]
    prof, path = await mgr.stop_recording(rec)
    assert path == P.profile_path(tmp_path / "a" / "root", MANIFEST)
    lp = prof.layers[0]
    e7, e2, e9 = (_entry(layer.index, f"app/f{i}.bin") for i in (7, 2, 9))
    want = [e7.first_chunk, e2.first_chunk + 1, e2.first_chunk + 2, e9.first_chunk + 2]  # f2 40K-90K: chunks 1-2
    assert lp.ordered_chunks() == want
    assert [a.path for a in lp.accesses] == ["app/f7.bin", "app/f2.bin", "app/f2.bin", "app/f9.bin"]
    assert lp.bytes == 4 * CHUNK and lp.chunk_count == layer.index.chunk_count
    times = [a.first_us for a in lp.accesses]
    assert times == sorted(times)

    # a second recording merges into the same profile
    rec, _ = await mgr.start_recording("img", MANIFEST, [layer.digest])
    await layer.data.read(e9, 0, 10)
    prof, _ = await mgr.stop_recording(rec)
    assert prof.recordings == 2 and prof.layers[0].ordered_chunks()[0] == e9.first_chunk

    # fresh node (empty store): the profile's chunks become local, spans in first-access order
    host2, mgr2, layer2, src2 = _setup(tmp_path / "b", blob, PrefetchOptions(background=False, prefetch_window=1))
    P.save(tmp_path / "b" / "root", prof)
    found = await find(tmp_path / "b" / "root", None, ["img"], MANIFEST, LOCAL_ONLY, registry=False)
    assert found is not None and found.profile == prof
    await mgr2._prefetch("img", found.profile, [layer2.digest])
    codec = layer2.fetcher.codec
    assert all(mgr2.store.has(codec.digest(c)) for c in prof.layers[0].ordered_chunks())
    assert layer2.fetcher.missing_chunks(), "prefetch fetched more than the profile's spans"
    # one range per span, requested in the order the spans were first read
    order = []
    for c in prof.layers[0].ordered_chunks():
        start = codec.plan([c])[0].c_start
        if start not in order:
            order.append(start)
    requested = [s for s, _ in src2.ranges]
    assert requested and requested == [s for s in order if s in requested]  # (a span may already be local)
    # the start now reads only local chunks: every first read is a hit
    mgr2.recorder.open_windows([layer2.digest], 60)
    n_ranges = len(src2.ranges)
    assert await _start(layer2) == out
    win = mgr2.recorder._windows[layer2.digest]
    assert win.misses == 0 and win.hits == 4
    assert len(src2.ranges) == n_ranges
    await mgr.close()
    await mgr2.close()


async def _profile_saved(root: Path, recordings: int) -> P.Profile:
    deadline = time.monotonic() + 10
    while True:
        prof = P.load(root, MANIFEST)
        if prof is not None and prof.recordings >= recordings:
            return prof
        assert time.monotonic() < deadline, "no profile saved"
        await asyncio.sleep(0.05)


async def test_a_first_start_without_a_profile_is_recorded_by_the_daemon(tmp_path: Path, blob: Any) -> None:
    """[prefetch] record_first_start: the reads of an image's start become its local profile,
    recorded from its first Prepare (before the profile lookup answers); an image that has
    one is not recorded again, and the next start prefetches it."""
    opts = PrefetchOptions(background=False, registry_lookup=False, record_first_start=True, record_first_start_s=0.3)
    host, mgr, layer, src = _setup(tmp_path, blob, opts)
    root = tmp_path / "root"
    mgr.image_started("img", MANIFEST, [layer.digest])
    await asyncio.sleep(0)  # the image's task runs up to its profile lookup
    assert await _start(layer) == [FILES[p][off:off + n] for p, off, n in READS]
    prof = await _profile_saved(root, 1)
    e7, e2, e9 = (_entry(layer.index, f"app/f{i}.bin") for i in (7, 2, 9))
    assert prof.layers[0].ordered_chunks() == [e7.first_chunk, e2.first_chunk + 1, e2.first_chunk + 2,
                                               e9.first_chunk + 2]
    await mgr._images[MANIFEST]
    # the next start finds the profile: prefetched, not recorded again
    host2, mgr2, layer2, src2 = _setup(tmp_path / "b", blob, opts)
    P.save(tmp_path / "b" / "root", prof)
    mgr2.image_started("img", MANIFEST, [layer2.digest])
    await mgr2._images[MANIFEST]
    codec = layer2.fetcher.codec
    assert all(mgr2.store.has(codec.digest(c)) for c in prof.layers[0].ordered_chunks())
    assert not mgr2.recorder._recordings and not mgr2._background
    await asyncio.sleep(2 * opts.record_first_start_s)
    assert P.load(tmp_path / "b" / "root", MANIFEST).recordings == 1
    await mgr.close()
    await mgr2.close()


async def test_profile_layer_for_other_index_is_not_used(tmp_path: Path, blob: Any) -> None:
    host, mgr, layer, src = _setup(tmp_path, blob, PrefetchOptions(background=False))
    lp = P.LayerProfile(layer.digest, layer.index.chunk_count + 1, [P.ChunkAccess(0, CHUNK, "x", 0, 1, [1])])
    await mgr._prefetch("img", P.Profile(MANIFEST, [lp]), [layer.digest])
    assert src.ranges == []
    await mgr.close()


async def test_other_manifest_and_corrupt_local_profiles_are_ignored(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    other = "sha256:" + "cd" * 32
    # a profile stored under this image's name but made for another manifest
    path = P.profile_path(root, MANIFEST)
    path.parent.mkdir(parents=True)
    path.write_bytes(P.dumps(P.Profile(other, [])))
    assert await find(root, None, ["img"], MANIFEST, LOCAL_ONLY, registry=False) is None
    path.write_bytes(b'{"schema": "lazysnap.profile.v1", "manifest": ')
    assert await find(root, None, ["img"], MANIFEST, LOCAL_ONLY, registry=False) is None
    path.write_bytes(b" " * (P.MAX_PROFILE_BYTES + 1))
    assert await find(root, None, ["img"], MANIFEST, LOCAL_ONLY, registry=False) is None
    lines = [str(r.fields.get("reason")) for r in caplog.records  # type: ignore[attr-defined]
             if r.getMessage() == "profile_rejected"]
    assert len(lines) == 3, lines
    assert "is for manifest" in lines[0] and "not JSON" in lines[1] and "byte limit" in lines[2]
    path.write_bytes(P.dumps(P.Profile(MANIFEST, [])))
    found = await find(root, None, ["img"], MANIFEST, LOCAL_ONLY, registry=False)
    assert found is not None and found.profile == P.Profile(MANIFEST, [])


def test_record_flags_after_ref_are_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    """Flags may follow REF; everything after ``--`` is the command, flags included."""
    from snapshotter.cli import parse_args

    args = parse_args(["record", "r/i:1", "--address", "/a.sock", "--containerd", "/c.sock",
                       "--timeout", "5", "--", "sh", "-c", "echo --address"])
    assert args.cmd == ["sh", "-c", "echo --address"]
    assert (args.address, args.containerd, args.timeout, args.namespace) == ("/a.sock", "/c.sock", 5.0, "default")
    args = parse_args(["record", "r/i:1", "--address", "/b.sock"])
    assert args.cmd == [] and args.address == "/b.sock"
    with pytest.raises(SystemExit):
        parse_args(["record", "r/i:1", "--bogus", "1"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["ls", "x", "--", "y"])


async def test_background_fill_bounded_pausable_and_verified(tmp_path: Path, blob: Any) -> None:
    rate = 600 << 10
    host, mgr, layer, src = _setup(tmp_path, blob, PrefetchOptions(background_bytes_per_s=rate,
                                                                   background_concurrency=2,
                                                                   idle_before_background_s=0))
    size = blob[0].stat().st_size
    mgr.pause.hold()
    mgr._start_fill(layer.digest)
    await asyncio.sleep(0.3)
    assert src.ranges == [], "background ran while an image was starting"
    t0 = time.monotonic()
    mgr.pause.release()
    await asyncio.wait_for(mgr._fills[layer.digest], 30)
    elapsed = time.monotonic() - t0
    assert layer.fetcher.missing_chunks() == []
    assert host.verified == [layer.digest] and background.is_complete(tmp_path / "root", layer.digest)
    # token bucket: one second of burst, then `rate` bytes/s
    assert elapsed >= (size - rate) / rate * 0.8, (elapsed, size)
    # every chunk of every file reads back right, with no further fetch
    n = len(src.ranges)
    for name, data in FILES.items():
        assert await layer.data.read(_entry(layer.index, name), 0, len(data)) == data
    assert len(src.ranges) == n
    await mgr.close()


async def test_background_waits_for_every_layer_of_the_image(tmp_path: Path, blob: Any) -> None:
    """No layer of an image is filled while another is still being provided (an image without
    a published index streams its layers to build one: they need the cores, and so does the
    container's start right after)."""
    opts = PrefetchOptions(prefetch=False, registry_lookup=False, pause_after_start_s=0, idle_before_background_s=0)
    host, mgr, layer, src = _setup(tmp_path, blob, opts)
    building = "sha256:" + "cd" * 32
    mgr.image_started("img", MANIFEST, [layer.digest, building])
    await asyncio.sleep(0.5)
    assert src.ranges == [], "a layer was filled while another was still being provided"
    mgr.layer_ready(building)  # provided (here: not lazily, so the fill skips it)
    await asyncio.wait_for(mgr._images[MANIFEST], 5)
    await asyncio.wait_for(mgr._fills[layer.digest], 30)
    assert layer.fetcher.missing_chunks() == [] and src.ranges
    await mgr.close()


async def test_release_cancels_background(tmp_path: Path, blob: Any) -> None:
    host, mgr, layer, src = _setup(tmp_path, blob, PrefetchOptions(background_bytes_per_s=64 << 10,
                                                                   background_concurrency=1,
                                                                   idle_before_background_s=0))
    mgr._start_fill(layer.digest)
    task = mgr._fills[layer.digest]
    await asyncio.sleep(0.5)
    mgr.layer_released(layer.digest)
    with pytest.raises(asyncio.CancelledError):
        await task
    n = len(src.ranges)
    await asyncio.sleep(0.5)
    assert len(src.ranges) == n and layer.fetcher.missing_chunks()
    assert not background.is_complete(tmp_path / "root", layer.digest)
    await mgr.close()
