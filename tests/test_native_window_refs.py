"""Sparse checkpoint windows (native/window_refs.c): a window keeps only the bytes the
deflate data after its checkpoint refers to, and decoding from it gives the same bytes."""
from __future__ import annotations

import io
import os
import random
import re
import tarfile
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter import native
from snapshotter.index.model import CheckpointKind

SETTINGS = settings(max_examples=int(os.environ.get("LAZYSNAP_NATIVE_EXAMPLES", "25")), deadline=None)
STRATEGIES = [zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE, zlib.Z_FIXED]


def payloads() -> st.SearchStrategy[bytes]:
    """Text-like, repetitive, random and mixed bytes: each block type and match shape."""
    words = st.lists(st.sampled_from([b"import ", b"torch", b"def ", b"self", b"\n    ", b"return ",
                                      b"0x1f", b"\x00\x00\x00\x01", b"lib", b".so"]), max_size=4000)
    return st.one_of(
        words.map(b"".join),
        st.binary(max_size=40_000),
        st.tuples(st.binary(min_size=1, max_size=300), st.integers(1, 400)).map(lambda t: t[0] * t[1]),
        st.lists(st.one_of(words.map(b"".join), st.binary(max_size=5000)), max_size=6).map(b"".join),
    )


def deflate(data: bytes, level: int, strategy: int, zdict: bytes = b"") -> bytes:
    co = zlib.compressobj(level, zlib.DEFLATED, -15, 8, strategy, *((zdict,) if zdict else ()))
    return co.compress(data) + co.flush()


def masked(window: bytes, used: bytes) -> bytes:
    return bytes(b if u else 0 for b, u in zip(window, used))


@SETTINGS
@given(window=payloads(), data=payloads(), level=st.integers(0, 9), strategy=st.sampled_from(STRATEGIES))
def test_the_referenced_bytes_are_enough_to_decode(window: bytes, data: bytes, level: int,
                                                   strategy: int) -> None:
    window = window[-32768:]
    stream = deflate(data, level, strategy, window)
    used = native.window_refs(stream, 0, len(window))
    assert isinstance(used, bytes) and len(used) == len(window)
    assert set(used) <= {0, 1}
    d = zlib.decompressobj(-15, zdict=masked(window, used)) if window else zlib.decompressobj(-15)
    assert d.decompress(stream) + d.flush() == data


def test_only_what_is_copied_is_kept() -> None:
    rnd = random.Random(5)
    window = rnd.randbytes(32768)
    assert native.window_refs(deflate(rnd.randbytes(50_000), 6, zlib.Z_DEFAULT_STRATEGY, window), 0,
                              32768) == bytes(32768)  # unrelated data copies nothing
    data = window[1000:1400] + rnd.randbytes(100) + window[30000:30300]
    used = native.window_refs(deflate(data, 9, zlib.Z_DEFAULT_STRATEGY, window), 0, 32768)
    assert isinstance(used, bytes)
    kept = [m.span() for m in re.finditer(rb"\x01+", used)]
    assert kept == [(1000, 1400), (30000, 30300)]


def test_a_start_bit_inside_the_first_byte() -> None:
    """Checkpoints start at any bit of a byte: shift a stream left by k bits behind junk."""
    rnd = random.Random(9)
    window = rnd.randbytes(4096) * 2
    data = window[100:3000] * 3
    stream = deflate(data, 6, zlib.Z_DEFAULT_STRATEGY, window)
    want = native.window_refs(stream, 0, len(window))
    for k in range(1, 8):
        shifted = (int.from_bytes(stream, "little") << k | 0b1010101 & ((1 << k) - 1)).to_bytes(len(stream) + 1, "little")
        assert native.window_refs(shifted, k, len(window)) == want


@SETTINGS
@given(junk=st.binary(max_size=3000), bits=st.integers(0, 7), wlen=st.integers(0, 32768))
def test_hostile_bytes_never_crash(junk: bytes, bits: int, wlen: int) -> None:
    got = native.window_refs(junk, bits, wlen)
    assert got in ("short", "invalid") or (isinstance(got, bytes) and len(got) == wlen)


def test_a_cut_stream_is_short_and_a_distance_past_the_window_invalid() -> None:
    rnd = random.Random(3)
    window = rnd.randbytes(32768)
    stream = deflate(window[20000:25000] * 8, 6, zlib.Z_DEFAULT_STRATEGY, window)
    assert native.window_refs(stream[:20], 0, 32768) == "short"
    # the data copies from ~12 KiB back: with a 100-byte window that is beyond it
    assert native.window_refs(stream, 0, 100) == "invalid"
    assert native.window_refs(b"\x07", 0, 10) == "invalid"  # block type 3


def _layer(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    return co.compress(buf.getvalue()) + co.flush()


def test_scanner_windows_shrink_and_still_decode() -> None:
    """On real files (this interpreter's standard library and shared objects) the packed
    sparse windows are much smaller than whole ones, and every checkpoint decodes the
    rest of the layer exactly."""
    stdlib = Path(os.__file__).parent
    files = sorted(stdlib.glob("*.py"))[:120] + sorted((stdlib / "lib-dynload").glob("*.so"))[:10]
    layer = _layer([(p.name, p.read_bytes()) for p in files])
    raw = zlib.decompress(layer, 31)
    full = native.scan_stream(io.BytesIO(layer), span_size=64 << 10, sparse_windows=False)
    sparse = native.scan_stream(io.BytesIO(layer), span_size=64 << 10)
    assert [(c.kind, c.compressed_offset, c.bits) for c in full.checkpoints] == \
        [(c.kind, c.compressed_offset, c.bits) for c in sparse.checkpoints]
    windows = [(f.window, s.window) for f, s in zip(full.checkpoints, sparse.checkpoints)
               if f.kind == CheckpointKind.DEFLATE]
    assert len(windows) >= 10
    packed_full = sum(len(zlib.compress(f, 9)) for f, _ in windows)
    packed_sparse = sum(len(zlib.compress(s, 9)) for _, s in windows)
    assert packed_sparse < packed_full / 2, (packed_sparse, packed_full)
    for c in sparse.checkpoints:
        got = native.decompress_range("gzip", c.kind, c.bits, c.window, layer[c.compressed_offset:], 0,
                                      len(raw) - c.uncompressed_offset)
        assert got == raw[c.uncompressed_offset:]
