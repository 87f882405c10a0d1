"""On-disk index format: exact round trip, lazy lookups, and clear errors on bad bytes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from snapshotter.index.errors import IndexBuildError, IndexFormatError, LayerIndexError
from snapshotter.index.format import IndexFile, serialize_index, serialize_split, write_index
from snapshotter.index.layerindex import LayerIndex
from snapshotter.index.model import (
    Checkpoint,
    CheckpointKind,
    Chunk,
    Entry,
    EntryType,
    LayerFormat,
    LayerInfo,
)

NAME = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=20)\
    .filter(lambda s: s not in (".", ".."))
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**63 - 1)


@st.composite
def layer_indexes(draw: st.DrawFn) -> LayerIndex:
    info = LayerInfo(
        format=draw(st.sampled_from(list(LayerFormat))), compressed_size=draw(U64), uncompressed_size=draw(U64),
        blob_digest="sha256:" + draw(st.binary(min_size=32, max_size=32)).hex(),
        diff_id=draw(st.none() | st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())),
        chunk_size=draw(st.integers(1, 2**32 - 1)), span_size=draw(U64), sequential_only=draw(st.booleans()))
    chunks = draw(st.lists(st.builds(Chunk, U64, U32, st.binary(min_size=32, max_size=32)), max_size=30))
    checkpoints = draw(st.lists(st.builds(Checkpoint, st.sampled_from(list(CheckpointKind)), U64, U64,
                                          st.integers(0, 7), st.binary(max_size=2000)), max_size=5))
    dirs = [""]
    entries = [Entry(path="", type=EntryType.DIR, mode=draw(st.integers(0, 0o7777)), uid=draw(U32), gid=0,
                     size=0, mtime_ns=draw(st.integers(-(2**63), 2**63 - 1)))]
    used = {""}
    data_entries: list[str] = []
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(NAME)}" if parent else draw(NAME)
        if path in used:
            continue
        used.add(path)
        t = draw(st.sampled_from([t for t in EntryType if t != EntryType.HARDLINK or data_entries]))
        kw: dict = {}
        if t == EntryType.REG:
            first = draw(st.integers(0, len(chunks)))
            kw = dict(data_offset=draw(U64), first_chunk=first, chunk_count=draw(st.integers(0, len(chunks) - first)),
                      sparse=draw(st.none() | st.lists(st.tuples(U64, U64), max_size=4).map(tuple)))
        elif t in (EntryType.CHAR, EntryType.BLOCK):
            kw = dict(devmajor=draw(U32), devminor=draw(U32))
        elif t == EntryType.SYMLINK:
            kw = dict(linkname=draw(st.text(max_size=300).filter(lambda s: "\0" not in s)))
        elif t == EntryType.HARDLINK:
            kw = dict(linkname=draw(st.sampled_from(data_entries)))
        elif t == EntryType.DIR:
            dirs.append(path)
        if t not in (EntryType.DIR, EntryType.HARDLINK):
            data_entries.append(path)
        xattrs = draw(st.dictionaries(st.text(min_size=1, max_size=20), st.binary(max_size=50), max_size=3))
        entries.append(Entry(path=path, type=t, mode=draw(st.integers(0, 0o7777)), uid=draw(U32), gid=draw(U32),
                             size=draw(U64), mtime_ns=draw(st.integers(-(2**63), 2**63 - 1)), xattrs=xattrs, **kw))
    marks = sorted(set(draw(st.lists(st.tuples(U64, U64), max_size=6))))
    return LayerIndex(info=info, entries=entries, chunks=chunks, checkpoints=checkpoints, marks=marks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_indexes())
def test_round_trip_is_exact(index: LayerIndex) -> None:
    f = IndexFile.from_bytes(serialize_index(index))
    assert f.info == index.info
    back = f.to_layer_index()
    assert sorted(back.entries, key=lambda e: e.path) == sorted(index.entries, key=lambda e: e.path)
    assert back.chunks == index.chunks
    assert back.checkpoints == index.checkpoints
    assert back.marks == index.marks
    assert f.chunk_digests() == [c.digest for c in index.chunks]
    assert f.file_count == sum(e.type == EntryType.REG for e in index.entries)
    for e in index.entries:
        n = f.find(e.path)
        assert n is not None and f.entry_at(n) == e and f.lookup(e.path) == e
        kids = sorted((x for x in index.entries if x.path and x.path.rpartition("/")[0] == e.path),
                      key=lambda x: x.path.rpartition("/")[2].encode("utf-8", "surrogateescape"))
        if e.type == EntryType.DIR:
            assert f.children(e.path) == kids
        assert f.lookup(e.path + "/missing\u00e9") is None
        if e.type == EntryType.HARDLINK:
            assert f.inode(n) == f.find(e.linkname)
        else:
            assert f.inode(n) == n


def _tiny() -> LayerIndex:
    info = LayerInfo(LayerFormat.GZIP, 100, 200, "sha256:" + "ab" * 32, None, 1 << 20, 4 << 20, False)
    return LayerIndex(info, [Entry("", EntryType.DIR, 0o755, 0, 0, 0, 0),
                             Entry("f", EntryType.REG, 0o644, 0, 0, 3, 0, first_chunk=0, chunk_count=1)],
                      [Chunk(512, 3, b"\1" * 32)], [Checkpoint(CheckpointKind.STREAM_START, 0, 0)])


def test_every_single_byte_corruption_is_detected() -> None:
    data = serialize_index(_tiny())
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(IndexFormatError):
            IndexFile.from_bytes(bytes(bad))


@pytest.mark.parametrize("cut", [0, 5, 30, -1, -40])
def test_truncated_index_is_a_clear_error(cut: int) -> None:
    data = serialize_index(_tiny())
    with pytest.raises(IndexFormatError, match="truncated|not a lazysnap index"):
        IndexFile.from_bytes(data[:cut] if cut else b"")


def test_not_an_index() -> None:
    with pytest.raises(IndexFormatError, match="bad magic"):
        IndexFile.from_bytes(b"\x1f\x8b" + bytes(500))


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(IndexFormatError, match="trailing"):
        IndexFile.from_bytes(serialize_index(_tiny()) + b"x")


def test_write_and_mmap_open(tmp_path: Path) -> None:
    p = tmp_path / "x.idx"
    n = write_index(p, _tiny())
    assert n == os.path.getsize(p)
    with IndexFile.open(p) as f:
        assert f.index_bytes == n and f.lookup("f") is not None
        assert f.chunk(0) == Chunk(512, 3, b"\1" * 32)


def test_500k_entries_open_fast_and_lookup_lazily(tmp_path: Path) -> None:
    info = LayerInfo(LayerFormat.GZIP, 1, 1, "sha256:" + "00" * 32, None, 1 << 20, 4 << 20, False)
    entries = [Entry("", EntryType.DIR, 0o755, 0, 0, 0, 0)]
    for d in range(500):
        entries.append(Entry(f"dir{d:03d}", EntryType.DIR, 0o755, 0, 0, 0, 0))
        entries += [Entry(f"dir{d:03d}/file{i:04d}.py", EntryType.REG, 0o644, 0, 0, 10, 0, first_chunk=0)
                    for i in range(1000)]
    p = tmp_path / "big.idx"
    write_index(p, LayerIndex(info, entries, [], []))
    t0 = time.perf_counter()
    f = IndexFile.open(p)
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    for d in range(0, 500, 7):
        assert f.lookup(f"dir{d:03d}/file{(d * 13) % 1000:04d}.py") is not None
    lookups = (time.perf_counter() - t0) / len(range(0, 500, 7))
    assert f.entry_count == 500_501
    assert opened < 0.5, opened
    assert lookups < 0.005, lookups
    assert len(f.children("dir123")) == 1000
    f.close()


def _resealed(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    bad = bytearray(data)
    for pos, val in flips:
        p = 24 + pos % (len(bad) - 24)  # keep magic/version/flags/checksum, damage the rest
        bad[p] = val
    return _resealed_whole(bytes(bad))


def _sample_index() -> bytes:
    chunks = [Chunk(1024 * i, 512, bytes([i]) * 32) for i in range(6)]
    entries = [Entry("", EntryType.DIR, 0o755, 0, 0, 0, 0), Entry("d", EntryType.DIR, 0o755, 0, 0, 0, 0),
               Entry("d/f", EntryType.REG, 0o644, 1, 2, 1024, 5, first_chunk=0, chunk_count=2,
                     xattrs={"user.a": b"1"}),
               Entry("d/s", EntryType.SYMLINK, 0o777, 0, 0, 0, 5, linkname="/etc/passwd"),
               Entry("d/h", EntryType.HARDLINK, 0o644, 0, 0, 0, 5, linkname="d/f"),
               Entry("g", EntryType.REG, 0o644, 0, 0, 2048, 5, first_chunk=2, chunk_count=4, sparse=((0, 5), (100, 7))),
               Entry("c", EntryType.CHAR, 0o600, 0, 0, 0, 5, devmajor=1, devminor=3)]
    info = LayerInfo(LayerFormat.GZIP, 10_000, 20_000, "sha256:" + "cd" * 32, None, 512, 4096, False)
    cks = [Checkpoint(CheckpointKind.STREAM_START, 0, 0), Checkpoint(CheckpointKind.DEFLATE, 4000, 9000, 3, b"w" * 900)]
    return serialize_index(LayerIndex(info, entries, chunks, cks))


_SAMPLE = _sample_index()
_SAMPLE_APART = serialize_split(IndexFile.from_bytes(_SAMPLE).to_layer_index())[0]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.sampled_from([_SAMPLE, _SAMPLE_APART]))
@example([(236, 224)], _SAMPLE_APART)  # a zstd frame header claiming petabytes: MemoryError (CI, 2026-11-27)
def test_hostile_index_with_valid_checksum_fails_cleanly(flips: list[tuple[int, int]], sample: bytes) -> None:
    """An index from a registry may be crafted: reading it raises IndexFormatError or
    yields values, never another exception (IndexError, struct.error, UnicodeError...)."""
    from snapshotter.index.reader import chunks_for_range, plan_chunks

    try:
        f = IndexFile.from_bytes(_resealed(sample, flips))
        for e in f.entries():
            f.lookup(e.path)
            f.children(e.path)
            n = f.find(e.path)
            if n is not None:
                f.inode(n)
            if e.type == EntryType.REG:
                ids = chunks_for_range(f, e, 0, None) if e.size < 1 << 30 else []
                plan_chunks(f, ids)
        if f.windows_apart:
            f.windows_size()
            f.windows_digest
            for i in range(f.checkpoint_count):
                f.window_local(i)
        else:
            f.checkpoints()
    except LayerIndexError:  # IndexFormatError, or a read-planning error naming the problem
        pass


def test_a_window_that_inflates_past_32_kib_is_refused() -> None:
    """A crafted index's window may be a zlib bomb: decoding stops at 32 KiB and names it."""
    idx = IndexFile.from_bytes(_SAMPLE).to_layer_index()
    big = Checkpoint(CheckpointKind.DEFLATE, 4000, 9000, 3, bytes(40_000))
    bad = IndexFile.from_bytes(serialize_index(LayerIndex(idx.info, idx.entries, idx.chunks,
                                                          [idx.checkpoints[0], big])))
    with pytest.raises(IndexFormatError, match="at most 32 KiB"):
        bad.checkpoint(1)


def test_names_and_link_targets_longer_than_linux_allows_are_not_indexed() -> None:
    idx = IndexFile.from_bytes(_SAMPLE).to_layer_index()
    long_name = Entry("d/" + "n" * 4097, EntryType.REG, 0o644, 0, 0, 0, 5)
    long_link = Entry("d/l", EntryType.SYMLINK, 0o777, 0, 0, 0, 5, linkname="/" + "x" * 4096)
    for extra in (long_name, long_link):
        with pytest.raises(IndexBuildError, match="longer than"):
            serialize_index(LayerIndex(idx.info, [*idx.entries, extra], idx.chunks, idx.checkpoints))
    ok = Entry("d/l", EntryType.SYMLINK, 0o777, 0, 0, 0, 5, linkname="/" + "x" * 4095)
    serialize_index(LayerIndex(idx.info, [*idx.entries, ok], idx.chunks, idx.checkpoints))


def test_xattrs_and_sparse_maps_larger_than_linux_allows_are_not_indexed_nor_read() -> None:
    """An extended attribute no Linux applier could set and a sparse map of more segments
    than the tar reader takes are refused when an index is written, and a crafted index
    claiming them is refused when the entry is read, before the values are copied out."""
    import struct

    from snapshotter.index.model import MAX_SPARSE_SEGMENTS, MAX_XATTR_VALUE

    idx = IndexFile.from_bytes(_SAMPLE).to_layer_index()

    def with_entry(e: Entry) -> bytes:
        return serialize_index(LayerIndex(idx.info, [*idx.entries, e], idx.chunks, idx.checkpoints))

    for bad in (Entry("x", EntryType.REG, 0o644, 0, 0, 0, 5, xattrs={"user.a": bytes(MAX_XATTR_VALUE + 1)}),
                Entry("x", EntryType.REG, 0o644, 0, 0, 0, 5, xattrs={"user." + "a" * 251: b"1"}),
                Entry("x", EntryType.REG, 0o644, 0, 0, 0, 5, xattrs={f"user.{i}": bytes(60_000) for i in range(18)}),
                Entry("x", EntryType.REG, 0o644, 0, 0, 2 * MAX_SPARSE_SEGMENTS + 2, 5,
                      sparse=tuple((2 * i, 1) for i in range(MAX_SPARSE_SEGMENTS + 1)))):
        with pytest.raises(IndexBuildError):
            with_entry(bad)
    two = with_entry(Entry("x", EntryType.REG, 0o644, 0, 0, 0, 5,
                           xattrs={"user.a": bytes(MAX_XATTR_VALUE), "user.b": bytes(MAX_XATTR_VALUE)}))
    assert IndexFile.from_bytes(two).lookup("x").xattrs["user.b"] == bytes(MAX_XATTR_VALUE)
    at = two.index(struct.pack("<HI", 6, MAX_XATTR_VALUE) + b"user.a")
    crafted = bytearray(two)
    crafted[at:at + 6] = struct.pack("<HI", 6, MAX_XATTR_VALUE + 1)  # still inside the section
    with pytest.raises(IndexFormatError, match="larger than Linux allows"):
        IndexFile.from_bytes(_resealed_whole(bytes(crafted))).lookup("x")
    sparse = with_entry(Entry("x", EntryType.REG, 0o644, 0, 0, 100, 5, sparse=((0, 5), (50, 5), (90, 10))))
    at = sparse.index(struct.pack("<HII", 0, 3, 1))
    crafted = bytearray(sparse)
    crafted[at:at + 10] = struct.pack("<HII", 0, MAX_SPARSE_SEGMENTS + 1, 1)
    with pytest.raises(IndexFormatError, match="sparse segments"):
        IndexFile.from_bytes(_resealed_whole(bytes(crafted))).lookup("x")


def _resealed_whole(data: bytes) -> bytes:
    """``data`` with its checksum made valid again (a crafted index, as a registry may hold)."""
    from snapshotter.index.format import _CHECKSUM_AT, _checksum

    bad = bytearray(data)
    bad[_CHECKSUM_AT:_CHECKSUM_AT + 8] = _checksum(bad).to_bytes(8, "little")
    return bytes(bad)


def test_an_entry_block_claiming_more_than_its_records_can_hold_is_refused() -> None:
    """A crafted frame header may claim any size and zstd allocates it before decoding: a
    block is refused unless its size fits 256 records with PATH_MAX names and targets
    (~2 MiB), so a hostile index costs a few MB at most."""
    from snapshotter.index.format import MAX_ENTRY_BLOCK

    assert MAX_ENTRY_BLOCK < 3 << 20
    f = IndexFile.from_bytes(_SAMPLE)
    with pytest.raises(IndexFormatError, match="claims"):
        f._frame_fits(0, zstandard.ZstdCompressor().compress(bytes(MAX_ENTRY_BLOCK + 1)))
    f._frame_fits(0, zstandard.ZstdCompressor().compress(bytes(MAX_ENTRY_BLOCK)))


# -- windows apart (what `lazysnap index --push` publishes) -------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_indexes(), st.data())
def test_windows_apart_round_trip(index: LayerIndex, data: st.DataObject) -> None:
    """The index without its windows reads like the whole one; a window is served only from
    an attached copy whose bytes match its digest, however little of the copy is filled."""
    import hashlib
    import tempfile

    from snapshotter.index.errors import WindowMissingError

    head, blob = serialize_split(index)
    f = IndexFile.from_bytes(head)
    whole = IndexFile.from_bytes(serialize_index(index))
    assert f.windows_apart and not whole.windows_apart
    assert f.windows_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert f.windows_size() == len(blob)
    assert list(f.entries()) == list(whole.entries())
    assert f.chunk_digests() == whole.chunk_digests()
    assert f.checkpoint_offsets() == whole.checkpoint_offsets() and f.mark_offsets() == whole.mark_offsets()
    with_window = [i for i, c in enumerate(index.checkpoints) if c.window]
    for i, c in enumerate(index.checkpoints):
        if c.window:
            with pytest.raises(WindowMissingError):
                f.checkpoint(i)
        else:
            assert f.checkpoint(i) == c
    filled = data.draw(st.sets(st.sampled_from(with_window)) if with_window else st.just(set()))
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "w"
        with open(copy, "wb") as out:
            out.truncate(len(blob))
            for i in filled:
                off, n, digest = f.window_extent(i)
                assert hashlib.sha256(blob[off:off + n]).digest() == digest
                out.seek(off)
                out.write(blob[off:off + n])
        f.attach_windows(copy)
        for i, c in enumerate(index.checkpoints):
            # identical windows share bytes in the blob: filling one fills its twins
            if not c.window or i in filled or f.window_local(i):
                assert f.window_local(i) and f.checkpoint(i) == c
            else:
                with pytest.raises(WindowMissingError):
                    f.checkpoint(i)
        f.close()


def test_windows_apart_damage_is_a_clear_error(tmp_path: Path) -> None:
    """A flag a version-3 reader never wrote, a wrong-sized digest section, a crafted window
    extent, or a window copy with one wrong byte: each fails as an index error."""
    import struct

    from snapshotter.index.errors import WindowMissingError
    from snapshotter.index.format import CHECKPOINT, _CHECKSUM_AT, _checksum

    head, blob = serialize_split(_tiny_windowed())
    v3 = bytearray(head)
    v3[8:10] = (3).to_bytes(2, "little")
    v3[_CHECKSUM_AT:_CHECKSUM_AT + 8] = _checksum(v3).to_bytes(8, "little")
    with pytest.raises(IndexFormatError, match="flags"):
        IndexFile.from_bytes(bytes(v3))
    f = IndexFile.from_bytes(head)
    rec = f._ck_off + CHECKPOINT.size  # the second checkpoint: the one with a window
    crafted = bytearray(head)
    struct.pack_into("<Q", crafted, rec + 24, 1 << 60)
    crafted[_CHECKSUM_AT:_CHECKSUM_AT + 8] = _checksum(crafted).to_bytes(8, "little")
    with pytest.raises(IndexFormatError, match="implausible"):
        IndexFile.from_bytes(bytes(crafted)).windows_size()
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 1
    (tmp_path / "w").write_bytes(bytes(bad))
    f.attach_windows(tmp_path / "w")
    assert not f.window_local(1)
    with pytest.raises(WindowMissingError):
        f.checkpoint(1)
    (tmp_path / "w").write_bytes(blob)
    assert f.window_local(1) and f.checkpoint(1).window == b"w" * 900
    f.close()


def _tiny_windowed() -> LayerIndex:
    info = LayerInfo(LayerFormat.GZIP, 10_000, 20_000, "sha256:" + "ef" * 32, None, 512, 4096, False)
    root = Entry("", EntryType.DIR, 0o755, 0, 0, 0, 0)
    cks = [Checkpoint(CheckpointKind.STREAM_START, 0, 0), Checkpoint(CheckpointKind.DEFLATE, 4000, 9000, 3, b"w" * 900)]
    return LayerIndex(info, [root], [], cks)
