"""Random access through the index equals Python ``tarfile`` extraction, for generated tar
trees × every compression, with both scanners; bad layers fail loudly, never wrong bytes."""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.index.builder import build_index, clean_path, make_scanner
from snapshotter.native import Scanner
from snapshotter.index.errors import LAYER_ERRORS, ChunkVerificationError, NotRegularFileError
from snapshotter.index.format import IndexFile, serialize_index
from snapshotter.index.model import Chunk, EntryType
from snapshotter.index.reader import LayerReader, chunks_for_range, decode_span, plan_chunks

from tests.pyscan import PyScanner

SCANNERS = ["python", "native"]  # the tests' pure-Python oracle, and the C core
COMPRESSIONS = ["none", "gzip1", "gzip6", "gzip9", "gzip-multi", "zstd", "zstd-multi"]
EXAMPLES = int(os.environ.get("LAZYSNAP_HYPOTHESIS_EXAMPLES", "12"))  # raise for a deep run
SPAN = 32 << 10
CHUNK = 16 << 10

COMPONENT = st.text(st.sampled_from(list("abcXYZ019_-. ") + ["é", "日", "本", "ß", "\u00f8"]), min_size=1, max_size=30)\
    .filter(lambda s: s not in (".", ".."))
NAMES = COMPONENT | st.sampled_from([".wh.gone", ".wh..wh..opq", "n" * 120, "long-" + "é" * 60])


class BytesSource:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def _content(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["empty", "small", "small", "large"]))
    if kind == "empty":
        return b""
    if kind == "small":
        return draw(st.binary(max_size=3000))
    n = draw(st.integers(CHUNK, 300_000))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    half = rnd.randrange(n)
    return rnd.randbytes(half) + bytes(rnd.randrange(256) for _ in range(64)) * ((n - half) // 64 + 1)


class Layer(bytes):
    """Tar bytes with a short repr, so hypothesis failure reports stay readable."""

    names: list[str]

    def __repr__(self) -> str:
        return f"Layer({len(self)} bytes: {self.names!r})"


@st.composite
def tar_layers(draw: st.DrawFn) -> Layer:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    buf = io.BytesIO()
    dirs = [""]
    taken: set[str] = set()
    files: list[str] = []
    names: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for _ in range(draw(st.integers(1, 20))):
            parent = draw(st.sampled_from(dirs))
            path = f"{parent}/{draw(NAMES)}" if parent else draw(NAMES)
            if path in taken:
                continue
            taken.add(path)
            kind = draw(st.sampled_from(["file"] * 6 + ["dir", "dir", "sym", "link", "chr", "blk", "fifo"]))
            if kind == "link" and not files:
                kind = "file"
            stored = draw(st.sampled_from([path, "./" + path, "/" + path]))
            ti = tarfile.TarInfo(stored)
            ti.mode = draw(st.integers(0, 0o7777))
            ti.uid, ti.gid = draw(st.integers(0, 70000)), draw(st.integers(0, 70000))
            ti.mtime = draw(st.integers(0, 2**33))
            if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
                ti.pax_headers = {"SCHILY.xattr.user.k": draw(st.text(max_size=20)),
                                  "SCHILY.xattr.security.capability": "\x01\x02"}
            data = b""
            if kind == "file":
                data = _content(draw)
                ti.size = len(data)
                files.append(stored)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                dirs.append(path)
            elif kind == "sym":
                ti.type = tarfile.SYMTYPE
                ti.linkname = draw(st.sampled_from(["/etc/passwd", "../../../x", "t" * 150, "rel/é"]))
            elif kind == "link":
                ti.type = tarfile.LNKTYPE
                ti.linkname = draw(st.sampled_from(files))
            else:
                ti.type = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
                ti.devmajor, ti.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 255))
            tf.addfile(ti, io.BytesIO(data) if kind == "file" else None)
            names.append(f"{kind}:{stored}")
    layer = Layer(buf.getvalue())
    layer.names = names
    return layer


def compress(raw: bytes, how: str, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    cuts = sorted(rnd.randrange(len(raw) + 1) for _ in range(rnd.randrange(1, 4)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    if how == "none":
        return raw
    if how.startswith("gzip") and how[4:].isdigit():
        return gzip.compress(raw, compresslevel=int(how[4:]), mtime=0)
    if how == "gzip-multi":
        return b"".join(gzip.compress(p, compresslevel=6, mtime=0) for p in pieces)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if how == "zstd-multi":
        return b"".join(zstandard.ZstdCompressor(level=3).compress(p) for p in pieces)
    raise ValueError(how)


def scanner_of(kind: str, *, span: int = SPAN, chunk: int = CHUNK, diff_id: bool = False) -> PyScanner | Scanner:
    if kind == "python":
        return PyScanner(span_size=span, chunk_size=chunk, diff_id=diff_id)
    return make_scanner(span=span, chunk_size=chunk, diff_id=diff_id)


def index_blob(blob: bytes, scanner: str, *, span: int = SPAN, chunk: int = CHUNK) -> IndexFile:
    sc = scanner_of(scanner, span=span, chunk=chunk, diff_id=True)
    for i in range(0, len(blob), 50_000):
        sc.feed(blob[i:i + 50_000])
    return IndexFile.from_bytes(serialize_index(build_index(sc.finish(), span_size=span, chunk_size=chunk)))


def oracle(raw: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if (m.isreg() or m.islnk()) else None
            out[clean_path(m.name)] = (m, f.read() if f else None)
    return out


def check_against_tarfile(idx: IndexFile, raw: bytes, blob: bytes, data: Any | None) -> None:
    reader = LayerReader(idx, BytesSource(blob))
    expected = oracle(raw)
    assert idx.entry_count >= len(expected) + 1
    # containerd's applier re-stamps a hard link's inode with the link header (owners, mode,
    # mtime; xattrs added): the data entry shows the last link header naming it
    def xattrs_of(m: tarfile.TarInfo) -> dict[str, bytes]:
        return {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}

    stamp: dict[str, tarfile.TarInfo] = {}
    extra: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf.getmembers():
            if m.islnk():
                target = clean_path(m.linkname)
                while target in expected and expected[target][0].islnk():
                    target = clean_path(expected[target][0].linkname)
                stamp[target] = m
                extra.setdefault(target, {}).update(xattrs_of(m))
    for path, (m, content) in expected.items():
        e = idx.lookup(path)
        assert e is not None, path
        meta = m if m.islnk() else stamp.get(path, m)
        mode = m.mode if m.issym() else meta.mode
        assert e.mode == mode & 0o7777 and e.uid == meta.uid and e.gid == meta.gid
        assert e.mtime_ns == int(meta.mtime) * 1_000_000_000
        assert e.xattrs == (xattrs_of(m) if m.islnk() else {**xattrs_of(m), **extra.get(path, {})})
        if m.issym():
            assert e.type == EntryType.SYMLINK and e.linkname == m.linkname
            with pytest.raises(NotRegularFileError, match="symlink"):
                reader.read_file(path)
        elif m.ischr() or m.isblk():
            assert e.type in (EntryType.CHAR, EntryType.BLOCK) and (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
        elif m.isfifo():
            assert e.type == EntryType.FIFO
        elif m.isdir():
            assert e.type == EntryType.DIR
        else:
            assert content is not None
            if m.islnk():
                assert e.type == EntryType.HARDLINK and e.linkname == clean_path(m.linkname)
            else:
                assert e.type == EntryType.REG and e.size == len(content)
            assert reader.read_file(path) == content
            if data is not None and content:
                for _ in range(3):
                    off = data.draw(st.integers(0, len(content) + 10))
                    length = data.draw(st.integers(0, len(content) + 10))
                    assert reader.read_file(path, off, length) == content[off:off + length]


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("how", COMPRESSIONS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=tar_layers(), seed=st.integers(0, 1000), data=st.data())
def test_random_access_equals_tarfile(scanner: str, how: str, raw: bytes, seed: int, data: Any) -> None:
    blob = compress(raw, how, seed)
    idx = index_blob(blob, scanner)
    assert idx.info.compressed_size == len(blob)
    assert idx.info.uncompressed_size >= len(raw) - 10240
    check_against_tarfile(idx, raw, blob, data)


def _big_layer() -> bytes:
    rnd = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(12):
            data = rnd.randbytes(rnd.randrange(1, 200_000)) + b"text " * rnd.randrange(0, 40_000)
            ti = tarfile.TarInfo(f"d{i % 3}/f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("how", ["none", "gzip6", "gzip-multi", "zstd-multi"])
def test_diff_id_and_plans(scanner: str, how: str) -> None:
    import hashlib

    raw = _big_layer()
    blob = compress(raw, how, 3)
    idx = index_blob(blob, scanner)
    assert idx.info.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert idx.info.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    # every plan's range lies in the blob, and decoding it yields every chunk verified
    for plan in plan_chunks(idx, range(idx.chunk_count)):
        assert 0 <= plan.c_start < plan.c_end <= len(blob)
        got = decode_span(idx, plan, blob[plan.c_start:plan.c_end])
        assert sorted(got) == list(plan.chunk_ids)


def test_native_checkpoints_bound_reads() -> None:
    raw = _big_layer()
    blob = compress(raw, "gzip6")
    idx = index_blob(blob, "native")
    _us, cs = idx.checkpoint_offsets()
    assert idx.checkpoint_count >= 4
    widest = max(b - a for a, b in zip(cs, [*cs[1:], len(blob)]))
    reader = LayerReader(idx, BytesSource(blob))
    for path in ("d1/f10", "d2/f5", "d0/f0"):
        e = idx.lookup(path)
        assert e is not None
        before = reader.stats.compressed_bytes_read
        assert reader.read_file(e, e.size // 2, 4096) == oracle(raw)[path][1][e.size // 2:e.size // 2 + 4096]
        # one chunk, from the nearest checkpoint: at most the spans it touches, not the blob
        assert reader.stats.compressed_bytes_read - before <= 2 * widest + CHUNK + 1
    assert reader.stats.compressed_bytes_read < len(blob) // 2
    # a sequential read of everything fetches and inflates each span about once
    seq = LayerReader(idx, BytesSource(blob), cache_chunks=0)
    got = seq.read_chunks(range(idx.chunk_count))
    assert len(got) == idx.chunk_count
    assert seq.stats.compressed_bytes_read <= len(blob) + seq.stats.spans_decoded
    assert seq.stats.spans_decoded <= 1 + sum(p.length for p in plan_chunks(idx, range(idx.chunk_count))) // (64 << 20)


@pytest.mark.parametrize("how", ["gzip6", "gzip-multi", "zstd-multi"])
def test_end_marks_shorten_reads_and_a_short_mark_only_costs_bytes(how: str) -> None:
    raw = _big_layer()
    blob = compress(raw, how, 5)
    li = index_blob(blob, "native").to_layer_index()
    assert li.marks and all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(li.marks, li.marks[1:]))
    files = {p: c for p, (m, c) in oracle(raw).items() if c}

    def read_all(index: IndexFile) -> int:
        reader = LayerReader(index, BytesSource(blob), cache_chunks=0)
        for path, content in files.items():
            e = index.lookup(path)
            assert e is not None
            for off in (0, len(content) // 3, len(content) - 1):
                assert reader.read_file(e, off, 4096) == content[off:off + 4096]
        return reader.stats.compressed_bytes_read

    idx = IndexFile.from_bytes(serialize_index(li))
    for cid in range(idx.chunk_count):  # the marks alone suffice: no plan needs widening
        (plan,) = plan_chunks(idx, [cid])
        assert plan.c_end <= plan.c_limit or plan.c_limit == -1
        assert cid in decode_span(idx, plan, blob[plan.c_start:plan.c_end])
    with_marks = read_all(idx)
    without = read_all(IndexFile.from_bytes(serialize_index(dataclasses.replace(li, marks=[]))))
    assert with_marks < without
    # marks that claim far too little (an index from a careless or hostile publisher):
    # every read still returns the right bytes, fetched up to the checkpoint after a retry
    lying = [(u, max(0, c // 8)) for u, c in li.marks]
    assert read_all(IndexFile.from_bytes(serialize_index(dataclasses.replace(li, marks=lying)))) >= without


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("how", ["none", "gzip6", "zstd"])
def test_truncated_layer_is_an_error(scanner: str, how: str) -> None:
    raw = _big_layer()
    blob = compress(raw, how)
    rnd = random.Random(1)
    for _ in range(8):
        cut = rnd.randrange(1, len(blob) - 1)
        if how == "none" and cut % 512 == 0:
            cut += 1
        with pytest.raises(LAYER_ERRORS):
            index_blob(blob[:cut], scanner)


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("how", ["none", "gzip6", "gzip-multi", "zstd-multi"])
def test_corrupt_layer_never_yields_wrong_bytes(scanner: str, how: str) -> None:
    raw = _big_layer()
    blob = compress(raw, how, 5)
    idx = index_blob(blob, scanner)
    expected = oracle(raw)
    rnd = random.Random(2)
    failures = 0
    for _ in range(6):
        bad = bytearray(blob)
        for _ in range(3):
            bad[rnd.randrange(len(bad))] ^= 1 << rnd.randrange(8)
        reader = LayerReader(idx, BytesSource(bytes(bad)))
        for path, (_m, content) in expected.items():
            try:
                got = reader.read_file(path)
            except (ChunkVerificationError, *LAYER_ERRORS):
                failures += 1
                continue
            assert got == content, path
    assert failures > 0


def test_tampered_chunk_digest_raises_naming_chunk_and_layer() -> None:
    raw = _big_layer()
    sc = scanner_of("python")
    sc.feed(raw)
    li = build_index(sc.finish(), chunk_size=CHUNK)
    c = li.chunks[3]
    li.chunks[3] = dataclasses.replace(c, digest=bytes(32))
    idx = IndexFile.from_bytes(serialize_index(li))
    owner = next(e for e in li.entries if e.first_chunk <= 3 < e.first_chunk + e.chunk_count)
    with pytest.raises(ChunkVerificationError, match=f"chunk 3 of layer {li.info.blob_digest}"):
        LayerReader(idx, BytesSource(raw)).read_file(owner.path)
    assert isinstance(idx.chunk(3), Chunk)


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("tar_format", ["gnu", "pax", "oldgnu"])
def test_gnu_sparse_files(tmp_path: Path, scanner: str, tar_format: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(3 << 20)
        for off in (0, 700_000, 2_000_000, (3 << 20) - 10):
            f.seek(off)
            f.write(os.urandom(10) + b"data" * 9000)
    (src / "plain").write_bytes(b"plain file")
    out = tmp_path / "l.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-C", str(src), "-cf", str(out), "."], check=True)
    raw = out.read_bytes()
    for how in ("none", "gzip6"):
        blob = compress(raw, how)
        idx = index_blob(blob, scanner)
        e = idx.lookup("sparse.img")
        assert e is not None and e.sparse is not None and e.size == sparse.stat().st_size
        reader = LayerReader(idx, BytesSource(blob))
        content = sparse.read_bytes()
        assert reader.read_file("sparse.img") == content
        for off in (0, 100, 699_990, 1_000_000, 2_036_000, (3 << 20) - 20):
            assert reader.read_file("sparse.img", off, 70_000) == content[off:off + 70_000]
        assert reader.read_file("plain") == b"plain file"
        # a read inside a hole needs no chunks at all
        assert chunks_for_range(idx, e, 1_500_000, 1000) == []


@pytest.mark.parametrize("how", ["none", "gzip6", "gzip-multi", "zstd-multi"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=tar_layers(), seed=st.integers(0, 1000))
def test_native_matches_python_scanner(how: str, raw: bytes, seed: int) -> None:
    """Two independent scanners (C and pure Python) must agree on every entry and chunk."""
    blob = compress(raw, how, seed)
    py = index_blob(blob, "python").to_layer_index()
    c = index_blob(blob, "native").to_layer_index()
    assert c.entries == py.entries
    assert c.chunks == py.chunks
    assert (c.info.blob_digest, c.info.diff_id, c.info.uncompressed_size) == \
        (py.info.blob_digest, py.info.diff_id, py.info.uncompressed_size)


def _pax_layer(**pax: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 3
        ti.pax_headers = pax
        tf.addfile(ti, io.BytesIO(b"abc"))
    return buf.getvalue()


@pytest.mark.parametrize("scanner", SCANNERS)
def test_pax_fractional_mtime_is_exact(scanner: str) -> None:
    idx = index_blob(_pax_layer(mtime="1700000000.123456789"), scanner)
    e = idx.lookup("f")
    assert e is not None and e.mtime_ns == 1_700_000_000_123_456_789


@pytest.mark.parametrize("scanner", SCANNERS)
def test_pax_large_ids_and_binary_xattrs(scanner: str) -> None:
    raw = _pax_layer(uid="4000000000", gid="12", **{"SCHILY.xattr.user.bin": "\udcff\udc80x"})
    e = index_blob(raw, scanner).lookup("f")
    assert e is not None and e.uid == 4_000_000_000 and e.gid == 12
    assert e.xattrs == {"user.bin": b"\xff\x80x"}
    from snapshotter.index.errors import IndexBuildError

    with pytest.raises(IndexBuildError, match="out of range"):
        index_blob(_pax_layer(uid=str(1 << 40)), scanner)


def test_base256_numbers() -> None:
    from tests.pyscan import _parse_number

    assert _parse_number(b"\x80" + (10 << 30).to_bytes(11, "big"), "size", 0) == 10 << 30
    assert _parse_number(b"\xff" * 12, "mtime", 0) == -1
    assert _parse_number(b"0000644 \0", "mode", 0) == 0o644


@pytest.mark.parametrize("scanner", SCANNERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(flips=st.lists(st.tuples(st.integers(0, 6200), st.sampled_from([0, 1, 0x20, 0x2F, 0x30, 0x37, 0x39, 0x3D, 0x78,
                                                                       0x80, 0xFF])), min_size=1, max_size=6),
       how=st.sampled_from(["none", "gzip6"]))
def test_mangled_layers_fail_cleanly(scanner: str, flips: list[tuple[int, int]], how: str) -> None:
    """Damaged headers, PAX records and streams raise a layer or build error, nothing else;
    when indexing still succeeds, reads return verified bytes or a clean error."""
    from snapshotter.index.errors import IndexBuildError

    raw = bytearray(_MANGLE_BASE)
    for pos, val in flips:
        raw[pos % len(raw)] = val
    for start in _MANGLE_HEADERS:  # re-seal damaged headers so the parser looks inside them
        block = raw[start:start + 512]
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        raw[start:start + 512] = block
    blob = compress(bytes(raw), how) if how != "none" else bytes(raw)
    try:
        idx = index_blob(blob, scanner)
    except (IndexBuildError, *LAYER_ERRORS):
        return
    reader = LayerReader(idx, BytesSource(blob))
    for e in idx.entries():
        if e.type == EntryType.REG:
            try:
                data = reader.read_file(e)
            except (ChunkVerificationError, *LAYER_ERRORS):
                continue
            assert len(data) == e.size


def _mangle_base() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, name in enumerate(["a/" + "n" * 120, "b/é", "c"]):
            ti = tarfile.TarInfo(name)
            data = bytes([i]) * 700
            ti.size = len(data)
            ti.pax_headers = {"SCHILY.xattr.user.x": "v", "mtime": "1.5"}
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("l")
        ti.type, ti.linkname = tarfile.LNKTYPE, "c"
        tf.addfile(ti)
    return buf.getvalue()


_MANGLE_BASE = _mangle_base()
_MANGLE_HEADERS = [i for i in range(0, len(_MANGLE_BASE), 512)
                   if _MANGLE_BASE[i:i + 512] != bytes(512) and _MANGLE_BASE[i + 257:i + 262] == b"ustar"]


def _nul_in_xattr_key_layer() -> bytes:
    raw = bytearray(_MANGLE_BASE)
    pos = raw.rfind(b"SCHILY.xattr.user.x")
    raw[pos + len(b"SCHILY.xattr.use")] = 0  # PAX key "SCHILY.xattr.use\0.x"
    return bytes(raw)


@pytest.mark.parametrize("scanner", SCANNERS)
def test_nul_in_pax_xattr_key_fails_cleanly(scanner: str, tmp_path: Path) -> None:
    """Found by the mangling test: the scan runs in a child process so a crash in C is a
    test failure, not the end of the test session."""
    layer = tmp_path / "nul.tar"
    layer.write_bytes(_nul_in_xattr_key_layer())
    code = ("import sys\n"
            "from snapshotter.index.builder import build_index\n"
            "from snapshotter.index.errors import LAYER_ERRORS, IndexBuildError\n"
            "from snapshotter.index.builder import make_scanner\n"
            "from tests.pyscan import PyScanner\n"
            f"sc = PyScanner() if {scanner!r} == 'python' else make_scanner()\n"
            "try:\n    sc.feed(open(sys.argv[1], 'rb').read())\n    build_index(sc.finish())\n"
            "except (IndexBuildError, *LAYER_ERRORS) as e:\n    print('error', e)\nelse:\n    print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code, str(layer)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-500:]}"
    assert p.stdout.startswith(("ok", "error"))
