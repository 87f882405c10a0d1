"""Chunk store: atomic writes, dedup, eviction, corruption detection, concurrent writers."""
from __future__ import annotations

import array
import errno
import gzip
import hashlib
import multiprocessing
import os
import struct
import threading
from pathlib import Path

import pytest

from snapshotter import native
from snapshotter.store import ChunkCorrupt, ChunkStore, lodging


def _chunk(i: int, size: int = 4096) -> tuple[bytes, bytes]:
    data = hashlib.sha256(str(i).encode()).digest() * (size // 32)
    return hashlib.sha256(data).digest(), data


def test_put_read_layout_and_dedup(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    d, data = _chunk(1)
    assert store.put(d, data) is True
    path = tmp_path / "chunks" / d.hex()[:2] / d.hex()[2:]
    assert path.read_bytes() == data
    assert store.read(d) == data
    assert store.read(d, 10, 20) == data[10:30]
    buf = bytearray(100)
    assert store.readinto(d, memoryview(buf), 5) == 100 and bytes(buf) == data[5:105]
    # the same content from another layer: stored once, counted as a dedup hit
    assert store.put(d, data) is False
    assert store.stats().dedup_hits == 1
    assert store.stats().chunks == 1 and store.stats().bytes == len(data)
    assert not list((tmp_path / "chunks" / ".tmp").iterdir())


def test_put_rejects_wrong_digest(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    d, data = _chunk(2)
    with pytest.raises(ChunkCorrupt):
        store.put(d, data[:-1] + b"x")
    assert not store.has(d)
    assert store.read(d) is None


def test_crash_leftovers_are_never_served(tmp_path: Path) -> None:
    """A half-written temp file (crash before rename) is not a chunk and is cleaned up."""
    ChunkStore(tmp_path).close()  # creates the layout
    d, data = _chunk(3)
    # simulate a writer that died mid-write: pid that does not exist
    (tmp_path / "chunks" / ".tmp" / f"{d.hex()}.999999999.1.0").write_bytes(data[:100])
    store2 = ChunkStore(tmp_path)
    assert store2.read(d) is None
    assert not list((tmp_path / "chunks" / ".tmp").iterdir())


def test_corrupt_chunk_detected_on_first_read_after_restart(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    d, data = _chunk(4)
    store.put(d, data)
    store.close()
    path = store.path_of(d)
    raw = bytearray(path.read_bytes())
    raw[7] ^= 0xFF
    path.write_bytes(bytes(raw))
    store2 = ChunkStore(tmp_path)
    assert store2.read(d) is None  # detected, dropped: a miss, so the caller refetches
    assert not path.exists()
    assert store2.stats().corrupt == 1
    assert store2.put(d, data) is True  # the refetch stores it again
    assert store2.read(d) == data


def test_truncated_chunk_detected(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    d, data = _chunk(5)
    store.put(d, data)
    store.close()
    os.truncate(store.path_of(d), 10)
    assert ChunkStore(tmp_path).read(d) is None


def test_eviction_lru_respects_pins(tmp_path: Path) -> None:
    size = 4096
    store = ChunkStore(tmp_path, limit_bytes=10 * size)
    chunks = [_chunk(100 + i, size) for i in range(10)]
    for d, data in chunks:
        store.put(d, data)
    store.pin("layerA", [chunks[0][0], chunks[1][0]])
    assert store.read(chunks[2][0]) is not None  # chunk 2 becomes most recently used
    extra = [_chunk(200 + i, size) for i in range(3)]
    for d, data in extra:
        store.put(d, data)
    st = store.stats()
    assert st.bytes <= 10 * size and st.evictions > 0
    assert store.has(chunks[0][0]) and store.has(chunks[1][0])  # pinned
    assert store.has(chunks[2][0])  # recently used
    assert not store.has(chunks[3][0])  # least recently used, unpinned: evicted
    assert all(store.has(d) for d, _ in extra)
    store.unpin("layerA")
    assert not store.is_pinned(chunks[0][0])


def test_all_pinned_over_limit_keeps_data(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, limit_bytes=4096)
    chunks = [_chunk(300 + i) for i in range(3)]
    store.pin("L", [d for d, _ in chunks])
    for d, data in chunks:
        store.put(d, data)
    assert all(store.read(d) == data for d, data in chunks)


def test_concurrent_writers_threads(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    chunks = [_chunk(400 + i, 64 * 1024) for i in range(16)]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for d, data in chunks:
                store.put(d, data)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(store.read(d) == data for d, data in chunks)
    st = store.stats()
    assert st.chunks == 16
    # racing writers may each write a chunk (how many do is up to the scheduler): every put
    # is a write or a dedup hit, and once a chunk is present every put is a hit
    assert st.dedup_hits <= 16 * 6 - 16
    assert not any(store.put(d, data) for d, data in chunks)
    assert store.stats().dedup_hits == st.dedup_hits + 16
    assert not list((tmp_path / "chunks" / ".tmp").iterdir())


def _proc_writer(root: str, start: int) -> None:
    store = ChunkStore(root, fsync="file")
    for i in range(20):
        d, data = _chunk(500 + (start + i) % 20, 32 * 1024)
        store.put(d, data)


def test_concurrent_writers_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_proc_writer, args=(str(tmp_path), k * 5)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ChunkStore(tmp_path)
    for i in range(20):
        d, data = _chunk(500 + i, 32 * 1024)
        assert store.read(d) == data
    assert store.stats().chunks == 20


def test_reads_racing_eviction_never_return_wrong_bytes(tmp_path: Path) -> None:
    """Eviction closes cached fds while readers use them: a reader must get the chunk's
    bytes or a miss, never bytes of another file that reused the fd number."""
    size = 8192
    store = ChunkStore(tmp_path, limit_bytes=6 * size)
    chunks = [_chunk(600 + i, size) for i in range(24)]
    by_digest = dict(chunks)
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for d, data in chunks:
                got = store.read(d)
                if got is not None and got != data:
                    bad.append(d.hex())

    def writer() -> None:
        for _ in range(30):
            for d, data in chunks:
                store.put(d, data)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    writer()
    stop.set()
    for t in readers:
        t.join()
    assert not bad
    assert store.stats().evictions > 0
    assert all(store.read(d) in (None, by_digest[d]) for d, _ in chunks)


def test_staged_chunks_are_served_until_written(tmp_path: Path) -> None:
    """Write-behind: a reader gets verified bytes from memory while ``put`` writes them."""
    store = ChunkStore(tmp_path)
    d, data = _chunk(900, 8192)
    assert not store.has(d)
    store.stage({d: data})
    assert store.has(d)
    assert store.read(d, 100, 50) == data[100:150]
    assert store.read_cached(d, 0, 10) == data[:10]
    buf = bytearray(16)
    assert store.readinto(d, memoryview(buf), 8) == 16 and bytes(buf) == data[8:24]
    assert not (tmp_path / "chunks" / d.hex()[:2] / d.hex()[2:]).exists()
    # staging is not storing: the write that follows really writes (no false dedup hit)
    assert store.put(d, data, verified=True) is True
    store.unstage([d])
    assert store.stats().dedup_hits == 0
    assert (tmp_path / "chunks" / d.hex()[:2] / d.hex()[2:]).read_bytes() == data
    assert store.read(d) == data
    e, _ = _chunk(901)
    store.unstage([e])  # unknown digest: no error
    assert not store.has(e) and store.read(e) is None


def test_put_many_batch_dedup_and_watchers(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    added: list[bytes] = []
    store.watch_verified(added.append, lambda d: None)
    chunks = [_chunk(i, 4096 + i) for i in range(20)]
    assert store.put(*chunks[0]) is True
    added.clear()
    assert store.put_many(chunks + [chunks[3]]) == 19  # one stored before, one twice in the batch
    for d, data in chunks:
        assert (tmp_path / "chunks" / d.hex()[:2] / d.hex()[2:]).read_bytes() == data
        assert store.read_cached(d, 0, 10) == data[:10]  # verified: no re-check
    assert set(b"".join(added)[i:i + 32] for i in range(0, 32 * 19, 32)) == {d for d, _ in chunks[1:]}
    st = store.stats()
    assert st.chunks == 20 and st.bytes == sum(len(b) for _, b in chunks) and st.dedup_hits == 2
    assert not list((tmp_path / "chunks" / ".tmp").iterdir())


def test_put_many_does_not_trust_a_file_from_before(tmp_path: Path) -> None:
    """A chunk file already on disk (another process, a crash) is adopted, not vouched for:
    its first read checks it, so a torn one is dropped instead of served."""
    d, data = _chunk(7)
    path = tmp_path / "chunks" / d.hex()[:2] / d.hex()[2:]
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:100])  # torn
    store = ChunkStore(tmp_path)
    store._lru.pop(d, None)  # as if written by another process after this one scanned
    assert store.put_many([(d, data)]) == 0
    assert store.read(d) is None  # checked on first read: wrong size/digest, dropped
    assert store.put_many([(d, data)]) == 1 and store.read(d) == data


def test_put_many_reports_write_errors_after_storing_the_rest(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    good = _chunk(1)
    bad = _chunk(2)
    sub = tmp_path / "chunks" / bad[0].hex()[:2]
    if good[0].hex()[:2] == bad[0].hex()[:2]:
        pytest.skip("digests share a fan-out directory")
    sub.write_bytes(b"not a directory")  # the fan-out dir cannot be created
    with pytest.raises(OSError, match="cannot store chunk"):
        store.put_many([bad, good])
    assert store.read(good[0]) == good[1] and store.stats().chunks == 1
    assert not store.known(bad[0])
    assert not list((tmp_path / "chunks" / ".tmp").iterdir())


def test_a_vanished_chunk_is_unmarked_and_marked_again_when_stored(tmp_path: Path) -> None:
    """Watchers (the C filesystem) must learn a chunk back after it vanished and was refetched."""
    store = ChunkStore(tmp_path)
    marks: list[str] = []
    store.watch_verified(lambda d: marks.append("+"), lambda d: marks.append("-"))
    d, data = _chunk(9)
    store.put(d, data)
    store.close()  # no cached fd: the next read opens the file
    os.unlink(store.path_of(d))
    assert store.read(d) is None
    assert store.put(d, data) is True and store.read(d) == data
    assert marks == ["+", "-", "+"]


def _lodging(tmp_path: Path, chunks: list[tuple[bytes, bytes]]) -> Path:
    """A file holding these chunks back to back (what a FUSE backing file is)."""
    path = tmp_path / "files" / "ab" / "cdef"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(data for _, data in chunks))
    return path


def test_lodged_chunks_are_read_from_their_file_and_their_own_files_go(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    chunks = [_chunk(i) for i in range(3)] + [_chunk(9, 1024)]  # the last one shorter
    for d, data in chunks:
        store.put(d, data)
    added: list[bytes] = []
    dropped: list[bytes] = []
    store.watch_verified(added.append, dropped.append)
    path = _lodging(tmp_path, chunks)
    size = path.stat().st_size
    store.lodge(path, size, [d for d, _ in chunks], 4096, verified=True)
    assert not any(store.path_of(d).exists() for d, _ in chunks)  # on disk once
    assert store.stats().bytes == 0 and store.usage().bytes == store.held_bytes == size
    usage = store.usage()  # status: on the node, held by the file's layer, not cache
    assert (usage.chunks, usage.bytes, usage.pinned_bytes, usage.evictable_bytes) == (4, size, size, 0)
    for d, data in chunks:
        assert store.has(d) and store.known(d)
        assert store.read(d) == data
        assert store.read(d, 100, 50) == data[100:150]
        buf = bytearray(8192)  # bigger than the chunk: never the next chunk's bytes
        assert store.readinto(d, memoryview(buf), 10) == len(data) - 10 and bytes(buf[:len(data) - 10]) == data[10:]
        assert store.read_cached(d, 0, 8192) in (data, False)
    assert store.put(*chunks[1]) is False  # a dedup hit, no second copy
    assert not store.path_of(chunks[1][0]).exists()
    share = store.local_share([d for d, _ in chunks], [len(data) for _, data in chunks])
    assert share.chunks == 4 and share.bytes == size
    assert store.prune(apply=True).chunks == 0  # held: not cache

    # another process (a CLI, the next daemon) finds them through the record, unchecked
    other = ChunkStore(tmp_path)
    assert all(other.known(d) for d, _ in chunks) and other.read(chunks[3][0]) == chunks[3][1]

    assert store.spare(path)  # no layer uses it any more: cache, pruned whole
    dry = store.prune(apply=False)
    assert (dry.chunks, dry.bytes) == (4, size)
    assert store.prune(apply=True).chunks == 4
    assert not path.exists() and not (path.parent / (path.name + ".chunks")).exists()
    assert not store.known(chunks[0][0]) and store.read(chunks[0][0]) is None
    assert sorted(dropped) == sorted(d for d, _ in chunks)


def test_a_spare_lodging_file_is_evicted_whole_unless_a_layer_pins_its_chunks(tmp_path: Path) -> None:
    chunks = [_chunk(i) for i in range(4)]
    path = _lodging(tmp_path, chunks)
    store = ChunkStore(tmp_path, limit_bytes=6 * 4096)
    store.lodge(path, 4 * 4096, [d for d, _ in chunks], 4096, verified=True)
    store.spare(path)
    store.pin("L", [chunks[0][0]])
    for i in range(10, 13):
        store.put(*_chunk(i))
    assert path.exists()  # over the limit, but a layer pins a chunk of it: the others go
    store.unpin("L")
    for i in range(20, 23):
        store.put(*_chunk(i))
    assert not path.exists() and not store.known(chunks[0][0])  # the oldest entry, whole
    assert all(store.known(_chunk(i)[0]) for i in range(20, 23))
    assert store.stats().bytes <= 6 * 4096


def test_an_unchecked_lodging_is_checked_on_first_read(tmp_path: Path) -> None:
    """A file found on disk (a previous daemon's) is lodged unchecked: each chunk is hashed
    on its first read, and a damaged one is a miss (fetched again), never served."""
    chunks = [_chunk(i) for i in range(3)]
    path = _lodging(tmp_path, chunks)
    ChunkStore(tmp_path).lodge(path, 3 * 4096, [d for d, _ in chunks], 4096, verified=True)
    with open(path, "r+b") as f:
        f.seek(4096 + 7)
        f.write(b"!")
    store = ChunkStore(tmp_path)
    assert store.read(chunks[0][0]) == chunks[0][1]
    assert store.read(chunks[1][0]) is None
    assert store.stats().corrupt == 1 and not store.known(chunks[1][0])
    assert store.read(chunks[2][0], 1, 2) == chunks[2][1][1:3]
    assert store.put(*chunks[1]) is True  # fetched again: a chunk file of its own
    assert store.read(chunks[1][0]) == chunks[1][1]


def test_a_record_without_its_file_is_ignored(tmp_path: Path) -> None:
    chunks = [_chunk(i) for i in range(2)]
    path = _lodging(tmp_path, chunks)
    ChunkStore(tmp_path).lodge(path, 2 * 4096, [d for d, _ in chunks], 4096, verified=True)
    path.unlink()
    store = ChunkStore(tmp_path)
    assert not store.known(chunks[0][0]) and store.usage().bytes == 0


def _scanned_layer(tmp_path: Path, files: int, min_file: int = 0) -> tuple[bytes, dict[bytes, bytes]]:
    """A gzip layer of ``files`` files (most with several chunks, two with the same bytes),
    and the bytes of every chunk of its files of at least ``min_file`` bytes, by digest
    (chunk size 64 KiB)."""
    import io
    import tarfile

    raw = io.BytesIO()
    chunks: dict[bytes, bytes] = {}
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for i in range(files):
            data = (b"same" * 100 if i in (1, 2) else hashlib.sha256(b"%d" % i).digest() * (1000 + 700 * i))
            info = tarfile.TarInfo(f"d/f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            for off in range(0, len(data) if len(data) >= min_file else 0, 64 << 10):
                part = data[off:off + (64 << 10)]
                chunks[hashlib.sha256(part).digest()] = part
    return gzip.compress(raw.getvalue(), 1), chunks


def _scan_into(store: ChunkStore, blob: bytes, layer: str = "sha256:" + "ab" * 32, *, min_file: int = 0,
               hash_thread: bool = True) -> tuple[int, native.ScanResult]:
    """Scan ``blob`` writing a layer file of ``store``; adopt it. Returns (adopted, scan)."""
    pending = store.layer_file_target(layer, min_file)
    assert pending is not None
    sc = native.Scanner(chunk_size=64 << 10, span_size=1 << 20, layer_file=pending.target, hash_thread=hash_thread)
    for k in range(0, len(blob), 100_000):  # chunks cross feeds
        sc.feed(blob[k:k + 100_000])
    r = sc.finish()
    return store.adopt_layer_file(pending, r.stored, r.store_errno), r


@pytest.mark.parametrize("hash_thread", [True, False])
def test_a_scan_writes_every_chunk_it_cuts_into_one_layer_file(tmp_path: Path, hash_thread: bool) -> None:
    """One pass stores the layer in one file: each chunk at its offset in the tar, taken in
    as verified; a chunk file of the same chunk goes (one copy is enough); the C side is
    told where each of the layer's chunks is."""
    blob, chunks = _scanned_layer(tmp_path, 40)
    store = ChunkStore(tmp_path / "store")
    first = next(iter(chunks))
    store.put(first, chunks[first])
    layer = "sha256:" + "cd" * 32
    n, r = _scan_into(store, blob, layer, hash_thread=hash_thread)
    assert r.store_errno == 0 and n == len(chunks)
    tar = gzip.decompress(blob)
    path = store.files_dir / "layers" / ("cd" * 32)
    for offset, length, digest in native.iter_chunk_records(r.stored):
        assert tar[offset:offset + length] == chunks[digest]
    for digest, data in chunks.items():
        assert store.read(digest) == data
    assert not store.path_of(first).exists()
    assert store.local_share(chunks, [len(v) for v in chunks.values()]).verified == len(chunks)
    assert not list(store.tmp_dir.iterdir())
    order = [*chunks, hashlib.sha256(b"not in it").digest()]
    where = store.layer_file_offsets(layer, order)
    assert where is not None and where[0] == str(path)
    offsets = array.array("Q", where[1])
    with open(path, "rb") as f:
        for digest, offset in zip(order[:-1], offsets):
            f.seek(offset)
            assert f.read(len(chunks[digest])) == chunks[digest]
    assert offsets[-1] == (1 << 64) - 1
    assert store.layer_file_offsets("sha256:" + "ef" * 32, order) is None


def test_a_layer_file_outlives_the_process_checked_on_first_read(tmp_path: Path) -> None:
    """A restarted store finds the layer file through its record and serves its chunks,
    each hashed on first read (a damaged one is dropped, not served); the C side is not
    pointed at a file this process did not write."""
    blob, chunks = _scanned_layer(tmp_path, 12)
    layer = "sha256:" + "cd" * 32
    _scan_into(ChunkStore(tmp_path / "store"), blob, layer)
    again = ChunkStore(tmp_path / "store")
    assert all(again.has(d) for d in chunks)
    assert again.layer_file_offsets(layer, list(chunks)) is None
    victim = next(d for d, v in chunks.items() if len(v) > 100)
    assert again.read(victim) == chunks[victim]
    path = again.files_dir / "layers" / ("cd" * 32)
    record = lodging.read_record(str(path))
    assert record is not None
    other = next(e for e in record.extents if e[0] != victim)
    with open(path, "r+b") as f:
        f.seek(other[1])
        f.write(b"X")
    assert again.read(other[0]) is None


def test_a_scan_stores_the_chunks_of_big_enough_files_only(tmp_path: Path) -> None:
    """``min_file``: a small file's chunk is left to be fetched when read."""
    blob, wanted = _scanned_layer(tmp_path, 40, min_file=500_000)
    _, every = _scanned_layer(tmp_path, 40)
    assert 0 < len(wanted) < len(every)
    store = ChunkStore(tmp_path / "store")
    _, r = _scan_into(store, blob, min_file=500_000)
    assert {digest for _, _, digest in r.iter_chunks()} == set(every)
    assert {d for d in every if store.has(d)} == set(wanted)


def test_a_scan_stores_no_more_than_the_room_under_the_limit(tmp_path: Path) -> None:
    blob, chunks = _scanned_layer(tmp_path, 40)
    total = sum(map(len, chunks.values()))
    store = ChunkStore(tmp_path / "store", limit_bytes=total // 3)
    n, r = _scan_into(store, blob)
    assert r.store_errno == errno.EDQUOT and 0 < n < len(chunks)
    stored = sum(length for _, length, _ in native.iter_chunk_records(r.stored))
    assert 0 < stored <= total // 3
    full = ChunkStore(tmp_path / "full", limit_bytes=32)
    digest, data = _chunk(9, 32)
    full.pin("layer", [digest])
    full.put(digest, data)
    assert full.layer_file_target("sha256:" + "ab" * 32) is None


def test_a_scan_that_cannot_write_goes_on_and_says_why(tmp_path: Path) -> None:
    """A layer file that cannot be written (here: opened read-only): the scan still indexes
    the layer, stores nothing and reports the errno; nothing is left behind."""
    blob, chunks = _scanned_layer(tmp_path, 10)
    store = ChunkStore(tmp_path / "store")
    pending = store.layer_file_target("sha256:" + "ab" * 32)
    assert pending is not None
    ro = os.open(pending.tmp, os.O_RDONLY)
    try:
        sc = native.Scanner(chunk_size=64 << 10, layer_file=native.LayerFileTarget(ro, pending.target.budget))
        sc.feed(blob)
        r = sc.finish()
    finally:
        os.close(ro)
    assert r.stored == b"" and r.store_errno == errno.EBADF
    assert {digest for _, _, digest in r.iter_chunks()} == set(chunks)
    assert store.adopt_layer_file(pending, r.stored, r.store_errno) == 0
    assert not list(store.tmp_dir.iterdir()) and not list((store.files_dir / "layers").iterdir())


def test_a_layer_file_whose_scan_did_not_finish_is_deleted(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    pending = store.layer_file_target("sha256:" + "ab" * 32)
    assert pending is not None
    os.write(pending.fd, b"half")
    store.discard_layer_file(pending)
    assert not list(store.tmp_dir.iterdir())


def test_lodging_records_say_where_each_chunk_is() -> None:
    """Explicit extents round-trip; back-to-back records written before them still read;
    an extent outside the file is refused."""
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    rec = lodging.LodgingRecord.at(5000, [(a, 512, 100), (b, 4096, 904)])
    assert lodging.LodgingRecord.decode(rec.encode()) == rec
    old = struct.pack("<8sQII", b"LZLODGE1", 150, 100, 2) + a + b
    assert lodging.LodgingRecord.decode(old).extents == ((a, 0, 100), (b, 100, 50))
    with pytest.raises(ValueError):
        lodging.LodgingRecord.at(1000, [(a, 950, 100)])
    with pytest.raises(ValueError):
        lodging.LodgingRecord.decode(rec.encode()[:-1])


def test_the_verified_mirror_holds_chunk_files_only(tmp_path: Path) -> None:
    """What the C filesystem may read by digest path: a chunk moved into a layer file leaves
    the mirror (its file is gone), and a layer file's chunks never enter it."""
    blob, chunks = _scanned_layer(tmp_path, 12)
    store = ChunkStore(tmp_path / "store")
    first = next(iter(chunks))
    store.put(first, chunks[first], verified=True)
    mirror: set[bytes] = set()
    store.watch_verified(lambda ds: mirror.update(ds[i:i + 32] for i in range(0, len(ds), 32)),
                         lambda ds: mirror.difference_update(ds[i:i + 32] for i in range(0, len(ds), 32)))
    assert mirror == {first}
    _scan_into(store, blob)
    assert mirror == set() and store.local_share(chunks, [len(v) for v in chunks.values()]).verified == len(chunks)
    other, data = _chunk(77)
    store.put(other, data, verified=True)
    assert mirror == {other}
    late: set[bytes] = set()
    store.watch_verified(lambda ds: late.update(ds[i:i + 32] for i in range(0, len(ds), 32)), lambda ds: None)
    assert late == {other}
