"""GNU sparse files (old GNU 'S' headers and PAX 0.0 / 0.1 / 1.0), written by GNU tar.

Python's tarfile cannot write sparse members, so GNU tar makes them; tarfile reads them
back as the reference.  The scanner records the sparse map, and the stored data (the
concatenated data segments) is chunked and hashed like any file.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from snapshotter import native

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")

VARIANTS = [
    ["--format=gnu"],
    ["--format=posix", "--sparse-version=0.0"],
    ["--format=posix", "--sparse-version=0.1"],
    ["--format=posix", "--sparse-version=1.0"],
]


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "plain.txt").write_bytes(b"plain file\n" * 100)
    with open(root / "sparse.img", "wb") as f:
        # data islands with holes between them; more than 4 segments forces the old GNU
        # format to use extension blocks
        for i in range(7):
            f.seek(i * 300_000 + 5000)
            f.write(os.urandom(1000 + i * 777))
        f.truncate(2_500_000)
    with open(root / "hole_at_end.img", "wb") as f:
        f.write(b"head" * 1000)
        f.truncate(1 << 20)
    (root / "after.txt").write_bytes(b"after the sparse files\n")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[-1])
def test_gnu_sparse_variants(tmp_path: Path, variant: list[str]) -> None:
    make_tree(tmp_path / "t")
    out = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", *variant, "-cf", str(out), "-C", str(tmp_path / "t"),
                    "plain.txt", "sparse.img", "hole_at_end.img", "after.txt"], check=True)
    raw = out.read_bytes()
    for blob in (raw, gzip.compress(raw, 6)):
        sc = native.Scanner(span_size=8192, chunk_size=4096)
        sc.feed(blob)
        res = sc.finish()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            members = tf.getmembers()
            assert [e.path.decode() for e in res.entries] == [m.name for m in members]
            chunks = list(res.iter_chunks())
            for m, e in zip(members, res.entries):
                full = tf.extractfile(m).read()
                assert e.size == m.size == len(full)
                stored = raw[e.data_offset:e.data_offset + e.stored_size]
                for k in range(e.chunk_count):
                    off, ln, digest = chunks[e.first_chunk + k]
                    assert digest == hashlib.sha256(raw[off:off + ln]).digest()
                if m.name in ("plain.txt", "after.txt"):
                    assert e.sparse is None and stored == full
                    continue
                assert e.sparse is not None
                segs = [(o, n) for o, n in e.sparse if n]
                assert segs == [(o, n) for o, n in (m.sparse or []) if n]
                assert sum(n for _, n in segs) == e.stored_size
                # the stored data is the concatenation of the data segments
                assert stored == b"".join(full[o:o + n] for o, n in segs)
                # and everything outside the segments is a hole
                rebuilt = bytearray(e.size)
                pos = 0
                for o, n in segs:
                    rebuilt[o:o + n] = stored[pos:pos + n]
                    pos += n
                assert bytes(rebuilt) == full


def _pax_sparse10(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("GNUSparseFile.0/f")
        ti.size = len(payload)
        ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                          "GNU.sparse.name": "f", "GNU.sparse.realsize": "100000"}
        tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("payload,match", [
    (b"99999999999\n" + bytes(500), "sparse 1.0 map"),        # absurd segment count
    (b"3\n0\n10\n", "sparse 1.0 map"),                          # map runs past the data
    (b"400000\n" + b"1\n1\n" * 400000, "sparse 1.0 map"),       # more segments than the index takes
    (b"60000\n" + b"1000000000000000\n1\n" * 60000, "over 1 MiB"),  # hostile 1.1 MB map
])
def test_hostile_sparse10_maps(payload: bytes, match: str) -> None:
    for hash_thread in (False, True):
        sc = native.Scanner(hash_thread=hash_thread)
        with pytest.raises(native.CorruptLayerError, match=match):
            sc.feed(_pax_sparse10(payload))
            sc.finish()


def test_sparse10_map_in_pieces() -> None:
    segs = [(i * 1000, 10) for i in range(60)]  # a map longer than one 512-byte block
    mp = f"{len(segs)}\n".encode() + b"".join(f"{o}\n{n}\n".encode() for o, n in segs)
    mp = mp.ljust(-(-len(mp) // 512) * 512, b"\0")
    data = os.urandom(600)
    raw = _pax_sparse10(mp + data)
    sc = native.Scanner(chunk_size=128)
    for i in range(0, len(raw), 7):
        sc.feed(raw[i:i + 7])
    e = sc.finish().entries[0]
    assert e.path == b"f" and e.sparse == segs and e.size == 100000
    assert raw[e.data_offset:e.data_offset + e.stored_size] == data
