"""Profile packs: the format round-trips in any feed pattern, and every way a pack can be
wrong is an error naming the problem (or, for a chunk's bytes, a rejected chunk)."""
from __future__ import annotations

import gzip
import io
import json
import random
import struct
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.fetch.sources import IndexCodec
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.index.reader import FileRangeSource, LayerReader
from snapshotter.prefetch.manager import _store_pack_batch
from snapshotter.prefetch.pack import (MAGIC, MAX_CHUNK_BYTES, SCHEMA, STEP_BYTES, PackError, PackReader,
                                       build_pack)
from snapshotter.store import ChunkStore

M = "sha256:" + "ab" * 32
L1, L2 = "sha256:" + "01" * 32, "sha256:" + "02" * 32


def _read_all(blob: bytes, cuts: list[int], layers: tuple[str, ...] = (L1, L2), max_bytes: int = 1 << 30
              ) -> list[tuple[str, int, bytes]]:
    r = PackReader(M, layers, max_bytes=max_bytes)
    got = []
    pos = 0
    for cut in [*sorted(c % (len(blob) + 1) for c in cuts), len(blob)]:
        batch = r.take(blob[pos:max(pos, cut)])
        while True:
            got += [(c.layer, c.chunk, bytes(batch.data(i))) for i, c in enumerate(batch.chunks)]
            if not r.backlog:
                break
            batch = r.take(b"")
        pos = max(pos, cut)
    r.finish()
    return got


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.tuples(st.sampled_from([L1, L2]), st.integers(0, 10_000), st.binary(min_size=1, max_size=5000)),
                       min_size=1, max_size=20),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=8))
def test_round_trip_in_any_feed_pattern(chunks: list[tuple[str, int, bytes]], cuts: list[int]) -> None:
    blob, n = build_pack(M, chunks)
    assert n == len(chunks)
    assert _read_all(blob, cuts) == chunks


def _raw_pack(table: object, payload: bytes = b"", magic: bytes = MAGIC) -> bytes:
    head = json.dumps(table).encode()
    return zstandard.ZstdCompressor().compress(magic + struct.pack("<I", len(head)) + head + payload)


@pytest.mark.parametrize("blob, message", [
    (b"not zstd at all", "does not decompress"),
    (_raw_pack({}, magic=b"NOTAPACK"), "bad magic"),
    (_raw_pack({"schema": "other"}), "unknown pack schema"),
    (_raw_pack({"schema": SCHEMA, "manifest": "sha256:" + "cd" * 32, "layers": [], "chunks": []}), "not sha256:ab"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": ["sha256:" + "ee" * 32], "chunks": []}),
     "not in the image"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [[1, 0, 4]]}), "out of range"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [[0, 0, 0]]}), "out of range"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [["0", 0, 4]]}), "integers"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1]}), "malformed"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [[0, 0, 4]]}, b"ab"), "missing"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [[0, 0, 2]]}, b"abcd"), "trailing"),
    (_raw_pack({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [[0, 0, 1 << 20]]}), "limit"),
])
def test_bad_packs_are_errors(blob: bytes, message: str) -> None:
    with pytest.raises(PackError, match=message):
        _read_all(blob, [7, 100], max_bytes=1 << 19)


def test_bytes_after_the_pack_are_an_error() -> None:
    blob, _ = build_pack(M, [(L1, 0, b"x" * 100)])
    with pytest.raises(PackError, match="after the end of the pack"):
        _read_all(blob + b"\0", [len(blob)])


def test_a_very_compressible_pack_is_decoded_in_bounded_steps() -> None:
    """Zeros compress ~10,000:1: fed whole, the pack comes out one bounded step per take."""
    chunks = [(L1, i, bytes(MAX_CHUNK_BYTES)) for i in range(3)] + [(L2, 9, b"tail")]
    blob, _ = build_pack(M, chunks)
    assert len(blob) < 100_000
    r = PackReader(M, (L1, L2), max_bytes=1 << 30)
    got: list[tuple[str, int, bool]] = []
    batch = r.take(blob)
    steps = 1
    while True:
        assert sum(len(b) for b in batch.buffers) <= STEP_BYTES + MAX_CHUNK_BYTES  # what one step holds
        got += [(c.layer, c.chunk, batch.data(i) == chunks[len(got) + i][2]) for i, c in enumerate(batch.chunks)]
        if not r.backlog:
            break
        batch = r.take(b"")
        steps += 1
    r.finish()
    assert got == [(layer, c, True) for layer, c, _ in chunks]
    assert steps >= 3 * MAX_CHUNK_BYTES // STEP_BYTES


def test_a_decompression_bomb_is_refused_within_one_step() -> None:
    """A pack claiming little but expanding to gigabytes fails at its limit, having held at
    most one step of output: not the whole expansion of what arrived in one call."""
    head = json.dumps({"schema": SCHEMA, "manifest": M, "layers": [L1], "chunks": [[0, 0, 1 << 20]]}).encode()
    cctx = zstandard.ZstdCompressor(level=19)
    comp = cctx.compressobj()
    bomb = comp.compress(MAGIC + struct.pack("<I", len(head)) + head)
    for _ in range(32):  # 2 GiB of zeros, ~200 KB compressed
        bomb += comp.compress(bytes(64 << 20))
    bomb += comp.flush()
    assert len(bomb) < 1 << 20
    r = PackReader(M, [L1], max_bytes=1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(PackError, match="more than the .* bytes its table lists"):
            while True:
                r.take(bomb if r.out_bytes == 0 else b"")
                assert r.backlog
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * STEP_BYTES


def test_truncated_pack_is_an_error() -> None:
    blob, _ = build_pack(M, [(L1, i, random.Random(i).randbytes(3000)) for i in range(5)])
    with pytest.raises(PackError, match="missing|inside its table|does not decompress"):
        _read_all(blob[:len(blob) // 2], [])


def test_only_chunks_matching_the_index_are_stored(tmp_path: Path) -> None:
    """A pack is untrusted: a chunk whose bytes (or id) do not match this node's index is
    rejected and never stored; the others are stored and read back exactly."""
    files = {f"f{i}": random.Random(i).randbytes(60_000 + 17_000 * i) for i in range(6)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (tmp_path / "blob").write_bytes(gzip.compress(buf.getvalue()))
    write_index(tmp_path / "idx", index_file(str(tmp_path / "blob"), span=32 << 10, chunk_size=16 << 10))
    idx = IndexFile.open(tmp_path / "idx")
    codec = IndexCodec(idx)
    reader = LayerReader(idx, FileRangeSource(tmp_path / "blob"))
    good = reader.read_chunks(range(idx.chunk_count))
    tampered = bytearray(good[1])
    tampered[100] ^= 1
    items = [(0, good[0]), (1, bytes(tampered)), (2, good[3]), (idx.chunk_count + 5, good[4]), (4, good[4])]
    blob, _ = build_pack(M, [(L1, c, data) for c, data in items])
    store = ChunkStore(tmp_path / "root")
    batch = PackReader(M, [L1], max_bytes=1 << 30).take(blob)
    counts = _store_pack_batch(store, {L1: codec}, batch, range(len(batch.chunks)))
    assert counts == {"stored": 2, "already_local": 0, "rejected": 3}
    for c in range(idx.chunk_count):
        data = store.read(codec.digest(c))
        assert data is None if c not in (0, 4) else data == good[c]
    # a second pass finds them local
    assert _store_pack_batch(store, {L1: codec}, PackReader(M, [L1], max_bytes=1 << 30).take(blob), [0]) \
        == {"stored": 0, "already_local": 1, "rejected": 0}
    idx.close()
