"""Property tests of the C core (snapshotter._core via snapshotter.native).

Random tar trees written by Python's tarfile in GNU/PAX/USTAR formats, compressed as
plain tar, gzip (levels 1/6/9, multi-member) and zstd (single and multi frame), are
scanned in random slice sizes; everything the scanner reports is checked against
tarfile, hashlib and full decompression, and every checkpoint must resume exactly.
"""
from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import os
import random
import re
import tarfile
import threading
import zlib

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter import native
from snapshotter.index.model import CheckpointKind, EntryType

# LAZYSNAP_NATIVE_EXAMPLES=500 for a deeper local run; the default keeps the suite quick.
SETTINGS = settings(max_examples=int(os.environ.get("LAZYSNAP_NATIVE_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- tree generation

NAME_CHARS = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz0123456789_-.") + ["é", "ß", "日", "ü"])


@st.composite
def contents(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["empty", "small", "random", "repeat", "mixed"]))
    size = draw(st.sampled_from([0, 1, 511, 512, 513, 4096, 70_000, 300_000]))
    seed = draw(st.integers(0, 2**32 - 1))
    rnd = random.Random(seed)
    if kind == "empty" or size == 0:
        return b""
    if kind == "small":
        return rnd.randbytes(min(size, 100))
    if kind == "random":  # incompressible: deflate emits stored blocks
        return rnd.randbytes(size)
    if kind == "repeat":  # highly compressible
        return (b"lazysnap-" * (size // 9 + 1))[:size]
    words = [rnd.randbytes(rnd.randint(1, 12)) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words)
    return bytes(out[:size])


@st.composite
def trees(draw: st.DrawFn, fmt: int) -> list[dict]:
    n = draw(st.integers(1, 14))
    entries: list[dict] = []
    used: set[str] = set()
    for i in range(n):
        long_name = fmt != tarfile.USTAR_FORMAT and draw(st.booleans())
        seg = draw(st.text(NAME_CHARS, min_size=1, max_size=30))
        depth = draw(st.integers(0, 3))
        name = "/".join([f"d{j}" for j in range(depth)] + [f"{i}_{seg}"])
        if long_name:
            name = "long_" + "x" * draw(st.integers(90, 160)) + "/" + name
        if fmt == tarfile.USTAR_FORMAT:
            name = name.encode("utf-8")[:90].decode("utf-8", "ignore") or f"f{i}"
        if name in used:
            continue
        used.add(name)
        regs = [e["name"] for e in entries if e["kind"] == "reg"]
        kinds = ["reg", "reg", "reg", "dir", "sym", "fifo", "chr", "blk"]
        if regs:
            kinds.append("hard")
        kind = draw(st.sampled_from(kinds))
        e = {"name": name, "kind": kind, "mode": draw(st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0o600])),
             "uid": draw(st.sampled_from([0, 1000, 65534])), "gid": draw(st.sampled_from([0, 100])),
             "mtime": draw(st.sampled_from([0, 1_700_000_000, 1_700_000_000.5]))}
        if kind == "reg":
            e["data"] = draw(contents())
        elif kind == "sym":
            e["link"] = draw(st.sampled_from(["target", "../up/there", "/abs/" + "t" * 120]))
            if fmt == tarfile.USTAR_FORMAT:
                e["link"] = e["link"][:90]
        elif kind == "hard":
            e["link"] = draw(st.sampled_from(regs))
        elif kind in ("chr", "blk"):
            e["dev"] = (draw(st.integers(0, 255)), draw(st.integers(0, 255)))
        if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
            e["xattrs"] = {"user.k": "v" * draw(st.integers(0, 40)), "security.selinux": "ctx"}
        if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
            e["uname"] = "üser"
        entries.append(e)
    return entries


def write_tar(tree: list[dict], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in tree:
            ti = tarfile.TarInfo(e["name"])
            ti.mode, ti.uid, ti.gid = e["mode"], e["uid"], e["gid"]
            ti.mtime = e["mtime"] if fmt == tarfile.PAX_FORMAT else int(e["mtime"])
            ti.uname = e.get("uname", "")
            if "xattrs" in e:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e["xattrs"].items()}
            kind = e["kind"]
            data = None
            if kind == "reg":
                data = e["data"]
                ti.size = len(data)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e["link"]
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, e["link"]
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                ti.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = e["dev"]
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(raw: bytes, how: str, rnd: random.Random) -> bytes:
    if how == "tar":
        return raw
    if how in ("gzip1", "gzip6", "gzip9"):
        level = int(how[4:])
        co = zlib.compressobj(level, zlib.DEFLATED, 31)
        return co.compress(raw) + co.flush()
    if how == "gzip-multi":
        cuts = sorted(rnd.randrange(len(raw) + 1) for _ in range(rnd.randint(1, 4)))
        parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
        return b"".join(gzip.compress(p, compresslevel=rnd.choice([1, 6, 9])) for p in parts)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if how == "zstd-multi":
        step = rnd.choice([5000, 20000, 65536])
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
        return b"".join(cctx.compress(raw[i:i + step]) for i in range(0, len(raw), step)) or cctx.compress(b"")
    raise AssertionError(how)


def decompress_all(blob: bytes, fmt: str) -> bytes:
    if fmt == "gzip":
        return gzip.decompress(blob)
    if fmt == "zstd":
        return _zstd_all(blob)
    return blob


def _zstd_all(blob: bytes) -> bytes:
    out = io.BytesIO()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True) as r:
        while chunk := r.read(1 << 20):
            out.write(chunk)
    return out.getvalue()


def scan(blob: bytes, rnd: random.Random, **kw) -> native.ScanResult:
    sc = native.Scanner(**kw)
    pos = 0
    while pos < len(blob):
        n = rnd.choice([1, 2, 3, 7, 100, 511, 4096, 65536, 1 << 20])
        sc.feed(memoryview(blob)[pos:pos + n])
        pos += n
    return sc.finish()


# ---------------------------------------------------------------- checks

TYPE_OF = {tarfile.REGTYPE: EntryType.REG, tarfile.AREGTYPE: EntryType.REG,
           tarfile.LNKTYPE: EntryType.HARDLINK, tarfile.SYMTYPE: EntryType.SYMLINK,
           tarfile.CHRTYPE: EntryType.CHAR, tarfile.BLKTYPE: EntryType.BLOCK,
           tarfile.DIRTYPE: EntryType.DIR, tarfile.FIFOTYPE: EntryType.FIFO}


def check_entries(res: native.ScanResult, raw: bytes, chunk_size: int) -> None:
    members = tarfile.open(fileobj=io.BytesIO(raw)).getmembers()
    assert len(res.entries) == len(members)
    chunks = list(res.iter_chunks())
    next_chunk = 0
    for m, e in zip(members, res.entries):
        assert e.path.decode("utf-8", "surrogateescape").rstrip("/") == m.name
        assert e.type == TYPE_OF[m.type]
        assert e.mode == m.mode & 0o7777
        assert (e.uid, e.gid) == (m.uid, m.gid)
        assert e.mtime_ns == round(m.mtime * 1_000_000_000)
        assert e.linkname.decode() == m.linkname
        if m.ischr() or m.isblk():
            assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
        xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                  for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert (e.xattrs or {}) == xattrs
        if not m.isreg():
            assert e.chunk_count == 0
            continue
        assert e.size == m.size and e.stored_size == m.size and e.data_offset == m.offset_data
        assert e.first_chunk == next_chunk
        assert e.chunk_count == -(-m.size // chunk_size)
        next_chunk += e.chunk_count
        for k in range(e.chunk_count):
            off, ln, digest = chunks[e.first_chunk + k]
            assert off == m.offset_data + k * chunk_size
            assert ln == min(chunk_size, m.size - k * chunk_size)
            assert digest == hashlib.sha256(raw[off:off + ln]).digest()
    assert next_chunk == len(chunks)


def check_checkpoints(res: native.ScanResult, blob: bytes, raw: bytes, rnd: random.Random,
                      sparse: bool = True) -> None:
    cps = res.checkpoints
    assert cps[0].kind == CheckpointKind.STREAM_START and cps[0].compressed_offset == 0
    assert [c.uncompressed_offset for c in cps] == sorted(c.uncompressed_offset for c in cps)
    if res.format == "gzip":
        boundaries = set(native.zlib_block_boundaries(blob))
        for c in cps:
            if c.kind == CheckpointKind.DEFLATE:
                assert c.compressed_offset * 8 + c.bits in boundaries  # zlib agrees: a block boundary
                want = raw[max(0, c.uncompressed_offset - 32768):c.uncompressed_offset]
                assert len(c.window) == len(want)
                if sparse:  # bytes nothing refers to are zeroed; the resumes below prove the rest do
                    for m in re.finditer(rb"[^\x00]+", c.window):
                        assert want[m.start():m.end()] == m.group()
                else:
                    assert c.window == want
            else:
                assert c.kind in (CheckpointKind.STREAM_START, CheckpointKind.GZIP_MEMBER)
                assert blob[c.compressed_offset:c.compressed_offset + 2] == b"\x1f\x8b"
    elif res.format == "zstd":
        assert all(c.kind in (CheckpointKind.STREAM_START, CheckpointKind.ZSTD_FRAME) for c in cps)
        assert res.sequential_only == (len(cps) == 1)
    else:
        assert len(cps) == 1
    # every checkpoint resumes exactly, to the end and for a short read
    for c in cps:
        view = memoryview(blob)[c.compressed_offset:]
        rest = len(raw) - c.uncompressed_offset
        assert native.decompress_range(res.format, c.kind, c.bits, c.window, view, 0, rest) == \
            raw[c.uncompressed_offset:]
    # random reads through the nearest checkpoint
    starts = [c.uncompressed_offset for c in cps]
    for _ in range(8):
        if not raw:
            break
        off = rnd.randrange(len(raw))
        ln = rnd.randint(0, min(70_000, len(raw) - off))
        c = cps[bisect.bisect_right(starts, off) - 1]
        got = native.decompress_range(res.format, c.kind, c.bits, c.window,
                                      blob[c.compressed_offset:], off - c.uncompressed_offset, ln)
        assert got == raw[off:off + ln]


COMPRESSIONS = ["tar", "gzip1", "gzip6", "gzip9", "gzip-multi", "zstd", "zstd-multi"]
FORMATS = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(FORMATS), how=st.sampled_from(COMPRESSIONS),
       seed=st.integers(0, 2**32 - 1))
def test_scan_matches_tarfile(data: st.DataObject, fmt: int, how: str, seed: int) -> None:
    rnd = random.Random(seed)
    tree = data.draw(trees(fmt))
    raw = write_tar(tree, fmt)
    blob = compress(raw, how, rnd)
    span = rnd.choice([4096, 8192, 16384, 65536])
    chunk_size = rnd.choice([4096, 65536, 1 << 20])
    sparse = rnd.random() < 0.7
    res = scan(blob, rnd, span_size=span, chunk_size=chunk_size, diff_id=True,
               hash_thread=rnd.random() < 0.5, sparse_windows=sparse)
    assert res.format == ("gzip" if how.startswith("gzip") else "zstd" if how.startswith("zstd") else "tar")
    assert res.compressed_size == len(blob) and res.uncompressed_size == len(raw)
    assert res.blob_digest == hashlib.sha256(blob).digest()
    assert res.diff_id == hashlib.sha256(raw).digest()
    check_entries(res, raw, chunk_size)
    check_checkpoints(res, blob, raw, rnd, sparse)
    # other slice sizes and the other threading mode give the same result
    again = scan(blob, random.Random(seed + 1), span_size=span, chunk_size=chunk_size,
                 diff_id=False, hash_thread=not rnd.random() < 0.5, sparse_windows=sparse)
    assert again.entries == res.entries and again.chunks == res.chunks
    assert again.checkpoints == res.checkpoints and again.diff_id is None


def big_layer(rnd: random.Random, n_files: int = 60) -> bytes:
    """A few MB of mixed compressible / incompressible files: many spans at 64 KiB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n_files):
            kind = i % 3
            size = rnd.choice([0, 1000, 50_000, 200_000, 700_000])
            if kind == 0:
                data = rnd.randbytes(size)
            elif kind == 1:
                data = (f"line {i} ".encode() * (size // 7 + 1))[:size]
            else:
                words = [rnd.randbytes(8) for _ in range(200)]
                data = b"".join(rnd.choice(words) for _ in range(size // 8 + 1))[:size]
            ti = tarfile.TarInfo(f"dir{i % 7}/file{i}.bin")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("how", ["gzip1", "gzip6", "gzip9", "gzip-multi", "zstd-multi", "zstd"])
def test_many_checkpoints_big_layer(how: str) -> None:
    rnd = random.Random(hash(how) & 0xFFFF)
    raw = big_layer(rnd)
    blob = compress(raw, how, rnd)
    res = scan(blob, rnd, span_size=16384, chunk_size=65536)
    if how.startswith("gzip"):
        assert sum(c.kind == CheckpointKind.DEFLATE for c in res.checkpoints) >= len(blob) // 16384 // 3
    assert res.sequential_only == (how == "zstd")
    check_entries(res, raw, 65536)
    check_checkpoints(res, blob, raw, rnd)


@pytest.mark.parametrize("how", ["tar", "gzip6", "zstd-multi"])
def test_batched_hashing_matches_hashlib(how: str) -> None:
    """One-thread scans queue chunk, blob and diff-ID hashing and run it in SIMD lanes:
    with small chunks a batch holds hundreds of messages of every length, fed in slices
    from 1 byte to the whole blob; every digest must equal hashlib's, with and without
    SIMD and with the hash thread."""
    rnd = random.Random(11)
    raw = big_layer(rnd, 40)
    blob = compress(raw, how, rnd)
    for hash_thread, simd in ((False, True), (False, False), (True, True)):
        for feed in (1 << 30, None):
            sc = native.Scanner(chunk_size=4096, diff_id=True, hash_thread=hash_thread, simd=simd)
            if feed:
                sc.feed(blob)
                res = sc.finish()
            else:
                res = scan(blob, rnd, chunk_size=4096, diff_id=True, hash_thread=hash_thread, simd=simd)
            check_entries(res, raw, 4096)
            assert res.blob_digest == hashlib.sha256(blob).digest()
            assert res.diff_id == hashlib.sha256(raw).digest()


def test_concurrent_scanners_in_threads() -> None:
    rnd = random.Random(7)
    layers = [compress(big_layer(random.Random(i), 20), h, rnd)
              for i, h in enumerate(["gzip6", "zstd-multi", "tar", "gzip1"])]
    expected = [scan(b, random.Random(0), span_size=65536) for b in layers]
    results: list[native.ScanResult | None] = [None] * len(layers)

    def work(i: int) -> None:
        results[i] = native.scan_stream(io.BytesIO(layers[i]), span_size=65536, read_size=100_000)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(layers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exp, got in zip(expected, results):
        assert got is not None
        assert got.entries == exp.entries and got.chunks == exp.chunks
        assert got.checkpoints == exp.checkpoints and got.blob_digest == exp.blob_digest


def test_verify_chunks_and_sha256() -> None:
    raw = big_layer(random.Random(3), 10)
    res = scan(raw, random.Random(1), chunk_size=65536)
    assert native.verify_chunks(raw, 0, res.chunks) == -1
    assert native.sha256(raw) == hashlib.sha256(raw).digest()
    off, ln, _ = next(res.iter_chunks())
    bad = bytearray(raw)
    bad[off + ln // 2] ^= 1
    assert native.verify_chunks(bad, 0, res.chunks) == 0
    # a slice of the stream, records shifted to it
    recs = res.chunks[48 * 2:48 * 4]
    first = native.CHUNK_RECORD.unpack_from(recs)[0]
    assert native.verify_chunks(raw[first:], first, recs) == -1
    with pytest.raises(ValueError):
        native.verify_chunks(raw[first + 1:], first + 1, recs)


def test_trailing_data_after_tar_end_is_ignored() -> None:
    raw = write_tar([{"name": "a", "kind": "reg", "mode": 0o644, "uid": 0, "gid": 0,
                      "mtime": 0, "data": b"hello"}], tarfile.GNU_FORMAT)
    res = scan(raw + b"garbage" * 100, random.Random(0))
    assert [e.path for e in res.entries] == [b"a"]
    # and EOF without end-of-archive blocks is tolerated, as tarfile does
    res = scan(raw[:1024], random.Random(0))
    assert [e.path for e in res.entries] == [b"a"]


def test_gzip_zero_padding_tolerated_garbage_rejected() -> None:
    raw = write_tar([{"name": "a", "kind": "reg", "mode": 0o644, "uid": 0, "gid": 0,
                      "mtime": 0, "data": b"x" * 3000}], tarfile.GNU_FORMAT)
    blob = gzip.compress(raw)
    assert scan(blob + bytes(100), random.Random(0)).uncompressed_size == len(raw)
    with pytest.raises(native.CorruptLayerError, match="offset"):
        scan(blob + b"junk", random.Random(0))


# ---------------------------------------------------------------- corrupt and truncated input

def _layer_for_damage(how: str) -> tuple[bytes, bytes]:
    rnd = random.Random(11)
    raw = big_layer(rnd, 12)
    return raw, compress(raw, how, rnd)


# hash_thread: with it the scanner uses small blocks, without it 16 MiB blocks, batched
# hashing and (zstd) one-pass frames staged across feeds: both must fail the same way.
@pytest.mark.parametrize("hash_thread", [True, False])
@pytest.mark.parametrize("how", ["tar", "gzip6", "gzip-multi", "zstd", "zstd-multi"])
def test_truncated_layers_raise_or_are_consistent(how: str, hash_thread: bool) -> None:
    raw, blob = _layer_for_damage(how)
    full = scan(blob, random.Random(0), span_size=16384, chunk_size=65536)
    rnd = random.Random(5)
    cuts = [1, 2, 3, 10, 511, 512, 1000] + [rnd.randrange(1, len(blob)) for _ in range(25)]
    for cut in cuts:
        try:
            res = scan(blob[:cut], rnd, span_size=16384, chunk_size=65536, hash_thread=hash_thread)
        except native.LayerError:
            continue
        # No error: the cut fell on a boundary where the prefix is itself a valid layer.
        # Then nothing reported may differ from the full layer.
        assert res.entries == full.entries[:len(res.entries)]
        assert full.chunks.startswith(res.chunks)


@pytest.mark.parametrize("hash_thread", [True, False])
@pytest.mark.parametrize("how", ["tar", "gzip6", "gzip-multi", "zstd-multi"])
def test_flipped_bytes_never_give_wrong_bytes(how: str, hash_thread: bool) -> None:
    raw, blob = _layer_for_damage(how)
    full = scan(blob, random.Random(0), span_size=16384, chunk_size=65536)
    rnd = random.Random(9)
    for _ in range(25):
        pos = rnd.randrange(len(blob))
        bad = bytearray(blob)
        bad[pos] ^= 1 << rnd.randrange(8)
        try:
            res = scan(bytes(bad), rnd, span_size=16384, chunk_size=65536, hash_thread=hash_thread)
        except native.LayerError:
            res = None
        if res is not None:
            assert res.blob_digest != full.blob_digest  # the manifest digest catches it
            # whatever it reports is true of the bytes it decoded
            out = decompress_all(bytes(bad), res.format)
            assert native.verify_chunks(out, 0, res.chunks) == -1
        # reading through the clean index: an error, or bytes whose chunk hash fails
        for c in full.checkpoints[::3]:
            try:
                got = native.decompress_range(full.format, c.kind, c.bits, c.window,
                                              bytes(bad[c.compressed_offset:]), 0,
                                              len(raw) - c.uncompressed_offset)
            except native.LayerError:
                continue
            mine = [r for r in full.iter_chunks() if r[0] >= c.uncompressed_offset]
            recs = b"".join(native.CHUNK_RECORD.pack(*r) for r in mine)
            if native.verify_chunks(got, c.uncompressed_offset, recs) == -1:
                # every file byte the index vouches for is right (headers/padding may differ)
                base = c.uncompressed_offset
                for off, ln, _ in mine:
                    assert got[off - base:off - base + ln] == raw[off:off + ln]


def _header(name: bytes, size_field: bytes, typeflag: bytes = b"0", fix_checksum: bool = True) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = size_field
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    if fix_checksum:
        h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@pytest.mark.parametrize("blob,match", [
    (_header(b"big", b"%011o\0" % (2 << 20), b"x") + bytes(2 << 20), "exceeds 1 MiB"),
    (_header(b"long", b"%011o\0" % (3 << 20), b"L") + bytes(3 << 20), "exceeds 1 MiB"),
    (_header(b"neg", b"\xff" * 12), "size"),
    (_header(b"huge", b"\x80" + b"\x7f" + b"\xff" * 10), "size"),
    (_header(b"bad", b"%011o\0" % 5, fix_checksum=False)[:148] + b"0000000\0"
     + _header(b"bad", b"%011o\0" % 5)[156:] + b"hello".ljust(512, b"\0"), "checksum"),
    (_header(b"pax", b"%011o\0" % 11, b"x") + b"99 path=x\n".ljust(512, b"\0"), "PAX"),
    (_header(b"oct", b"12345678z90\0"), "size"),
])
def test_hostile_headers_are_corrupt(blob: bytes, match: str) -> None:
    for how in ("tar", "gzip6"):
        data = compress(blob + bytes(1024), how, random.Random(0))
        with pytest.raises(native.CorruptLayerError, match=match) as exc:
            scan(data, random.Random(0))
        assert "offset" in str(exc.value)


def test_truncated_inside_entry_names_it() -> None:
    raw = write_tar([{"name": "some/file", "kind": "reg", "mode": 0o644, "uid": 0, "gid": 0,
                      "mtime": 0, "data": b"z" * 5000}], tarfile.GNU_FORMAT)
    with pytest.raises(native.TruncatedLayerError, match="some/file"):
        scan(raw[:3000], random.Random(0))
    with pytest.raises(native.TruncatedLayerError, match="gzip"):
        scan(gzip.compress(raw)[:-5], random.Random(0))
    with pytest.raises(native.TruncatedLayerError, match="zstd"):
        scan(zstandard.ZstdCompressor().compress(raw)[:-5], random.Random(0))


def test_c_and_python_layer_errors_are_one_hierarchy() -> None:
    """What the C core raises for bad bytes is caught by the index package's classes (and
    stays a ValueError): callers need one ``except``, not two look-alike families."""
    from snapshotter.index import errors

    assert issubclass(native.LayerError, errors.LayerDataError) and issubclass(native.LayerError, ValueError)
    assert issubclass(native.CorruptLayerError, errors.CorruptLayerError)
    assert issubclass(native.TruncatedLayerError, errors.TruncatedLayerError)
    assert not issubclass(native.TruncatedLayerError, errors.CorruptLayerError)
    raw = write_tar([{"name": "f", "kind": "reg", "mode": 0o644, "uid": 0, "gid": 0, "mtime": 0,
                      "data": b"z" * 5000}], tarfile.GNU_FORMAT)
    with pytest.raises(errors.TruncatedLayerError, match="f"):
        scan(raw[:3000], random.Random(0))
    with pytest.raises(errors.LAYER_ERRORS):
        scan(gzip.compress(raw)[:-5], random.Random(0))


def test_decompress_range_errors() -> None:
    raw = big_layer(random.Random(4), 8)
    blob = gzip.compress(raw)
    with pytest.raises(native.TruncatedLayerError):
        native.decompress_range("gzip", 0, 0, b"", blob[: len(blob) // 2], 0, len(raw))
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    try:  # bad deflate data is an error; otherwise the chunk hashes catch it
        got = native.decompress_range("gzip", 0, 0, b"", bytes(bad), 0, len(raw))
    except native.CorruptLayerError:
        pass
    else:
        assert got != raw
        assert native.verify_chunks(got, 0, scan(raw, random.Random(0)).chunks) != -1
    with pytest.raises(ValueError):
        native.decompress_range("bogus", 0, 0, b"", blob, 0, 1)
    with pytest.raises(native.TruncatedLayerError):
        native.decompress_range("tar", 0, 0, b"", raw[:100], 50, 51)
    assert native.decompress_range("tar", 0, 0, b"", raw, 10, 5) == raw[10:15]


def test_scanner_misuse() -> None:
    sc = native.Scanner()
    sc.feed(b"")
    sc.finish()
    with pytest.raises(ValueError):
        sc.feed(b"x")
    with pytest.raises(ValueError):
        native.Scanner(chunk_size=0)
    with pytest.raises(ValueError):
        native.Scanner(format="rar")


def test_libarchive_xattrs_decoded() -> None:
    import base64

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 3
        ti.pax_headers = {"LIBARCHIVE.xattr.user.%41b": base64.b64encode(b"val\x00ue").decode(),
                          "SCHILY.xattr.user.x": "1"}
        tf.addfile(ti, io.BytesIO(b"abc"))
    res = scan(buf.getvalue(), random.Random(0))
    assert res.entries[0].xattrs == {"user.Ab": b"val\x00ue", "user.x": b"1"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_headers_never_crash(fmt: int) -> None:
    """Random byte damage in the header area: a LayerError or a self-consistent result."""
    tree = [{"name": "long_" + "y" * 150 + "/f", "kind": "reg", "mode": 0o644, "uid": 0, "gid": 0,
             "mtime": 1.5, "data": b"q" * 700, "xattrs": {"user.a": "b"}},
            {"name": "s", "kind": "sym", "mode": 0o777, "uid": 0, "gid": 0, "mtime": 0, "link": "f"}]
    if fmt == tarfile.USTAR_FORMAT:
        tree[0]["name"] = "short/f"
    if fmt != tarfile.PAX_FORMAT:
        del tree[0]["xattrs"]
    raw = write_tar(tree, fmt)
    rnd = random.Random(fmt)
    for _ in range(300):
        bad = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            bad[rnd.randrange(min(len(bad), 3072))] = rnd.randrange(256)
        try:
            res = scan(bytes(bad), rnd, chunk_size=256)
        except native.LayerError:
            continue
        assert native.verify_chunks(bytes(bad), 0, res.chunks) == -1
        for e in res.entries:
            assert e.data_offset + e.stored_size <= len(bad)


@pytest.mark.parametrize("pos", [-1, -4, -5, -8])  # ISIZE bytes, CRC32 bytes
def test_gzip_trailer_checked_per_member(pos: int) -> None:
    raw = write_tar([{"name": "a", "kind": "reg", "mode": 0o644, "uid": 0, "gid": 0,
                      "mtime": 0, "data": b"hello" * 100}], tarfile.GNU_FORMAT)
    first = bytearray(gzip.compress(raw[:1024]))
    first[pos] ^= 0x10
    blob = bytes(first) + gzip.compress(raw[1024:])  # the bad trailer is the first member's
    with pytest.raises(native.CorruptLayerError, match="CRC32/ISIZE"):
        scan(blob, random.Random(0))


def test_unknown_format_is_named() -> None:
    import bz2

    with pytest.raises(native.CorruptLayerError, match="unknown layer format"):
        scan(bz2.compress(random.Random(1).randbytes(5000)), random.Random(0))


def test_write_chunks_statuses_and_bad_arguments(tmp_path) -> None:
    import errno

    from snapshotter import native as _native

    tmp = tmp_path / ".tmp"
    tmp.mkdir()
    items = [(hashlib.sha256(x).digest(), x) for x in (b"a" * 100, b"", b"c" * 70000)]
    assert _native.write_chunks(str(tmp_path), str(tmp), "t", items, 2) == [1, 1, 1]
    for d, x in items:
        assert (tmp_path / d.hex()[:2] / d.hex()[2:]).read_bytes() == x
    assert _native.write_chunks(str(tmp_path), str(tmp), "t", items, 0) == [0, 0, 0]
    assert _native.write_chunks(str(tmp_path / "no" / "dir"), str(tmp), "t", items[:1], 0) == [-errno.ENOENT]
    assert not list(tmp.iterdir())
    with pytest.raises(ValueError):
        _native.write_chunks(str(tmp_path), str(tmp), "t", [(b"short", b"x")], 0)
    with pytest.raises(ValueError):
        _native.write_chunks(str(tmp_path), str(tmp), "t", items, 3)
    with pytest.raises(TypeError):
        _native.write_chunks(str(tmp_path), str(tmp), "t", [(items[0][0], 5)], 0)


# -- ZstdStream: bounded zstd stream decoding (native/zstream.c) ------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300_000) | st.builds(lambda n: bytes(n), st.integers(0, 3 << 20)),
       feeds=st.lists(st.integers(1, 70_000), min_size=1, max_size=12),
       caps=st.lists(st.integers(0, 1 << 20), min_size=1, max_size=8),
       tail=st.binary(max_size=20))
def test_zstd_stream_any_feed_and_output_bound(data: bytes, feeds: list[int], caps: list[int], tail: bytes) -> None:
    """Whatever the input pieces and output caps: the same bytes as zstd, never more than the
    cap per call, the frame's end reported, and what follows it left unconsumed."""
    frame = zstandard.ZstdCompressor(level=3).compress(data)
    z = native.ZstdStream()
    src = frame + tail
    out = bytearray()
    pos = fed = i = 0
    eof = False
    while not eof:
        fed = min(len(src), fed + feeds[i % len(feeds)])
        cap = caps[i % len(caps)] or 1
        i += 1
        got, used, eof = z.decompress(src[pos:fed], cap)
        assert len(got) <= cap and 0 <= used <= fed - pos
        out += got
        pos += used
        assert i <= 2 * (len(src) + len(data)) + 2  # every call consumes or produces something
    assert bytes(out) == data
    assert pos <= len(frame) and src[pos:].endswith(tail)
    assert z.decompress(src[pos:], 1 << 20) == (b"", 0, True)  # nothing after the frame is read


def test_zstd_stream_corrupt_input_is_an_error() -> None:
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(random.Random(1).randbytes(100_000)))
    frame[len(frame) // 2] ^= 0xFF
    z = native.ZstdStream()
    with pytest.raises(native.CorruptLayerError, match="zstd"):
        while True:
            out, used, eof = z.decompress(bytes(frame), 1 << 16)
            frame = frame[used:]
            assert not eof
    with pytest.raises(ValueError):
        native.ZstdStream().decompress(b"", -1)


def test_the_c_core_and_python_share_one_binary_contract() -> None:
    """Record layouts and enums the C core writes and Python reads agree (snapshotter.native
    also refuses to import a core that disagrees)."""
    from snapshotter import _core
    from snapshotter.index.model import (CHUNK_RECORD, ENTRY_BLOCK_RECORDS, ENTRY_RECORD, INDEX_CHUNK_RECORD,
                                         CheckpointKind, EntryType)

    assert (_core.CHUNK_RECORD_SIZE, _core.INDEX_ENTRY_RECORD_SIZE, _core.INDEX_CHUNK_RECORD_SIZE,
            _core.INDEX_BLOCK_RECORDS) == (CHUNK_RECORD.size, ENTRY_RECORD.size, INDEX_CHUNK_RECORD.size,
                                           ENTRY_BLOCK_RECORDS)
    assert _core.ENTRY_TYPES == {t.name: t.value for t in EntryType}
    from snapshotter import _fuse
    from snapshotter.fs import compiled

    assert _fuse.INDEX_ENTRY_RECORD_SIZE == ENTRY_RECORD.size
    from snapshotter.index.model import ENTRY_FIELDS

    assert tuple(f[0] for f in _core.INDEX_ENTRY_LAYOUT) == ENTRY_FIELDS  # C writes and reads what Python declares
    assert _core.INDEX_ENTRY_LAYOUT[9] == ("mtime_ns", 30, 8, 1)
    for name, record in (("header", compiled.HEADER), ("node", compiled.NODE), ("child", compiled.CHILD),
                         ("xattr", compiled.XATTR)):  # Python packs what C declares, field by field
        size, fields = _fuse.TREE_LAYOUT[name]
        assert record.size == size and record.fields == tuple(f[0] for f in fields)
        assert [record.offset(f[0]) for f in fields] == [f[1] for f in fields]
    assert compiled.NODE.offset("mtime_ns") == 8 and compiled.NODE.size == 88  # the blob format, version 1
    assert _core.CHECKPOINT_KINDS == {k.name: k.value for k in CheckpointKind}
