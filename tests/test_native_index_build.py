"""The index built in C straight from the scan (``native/indexbuild.c``, what
``index_bytes`` serves) against the Python reference (``build_index`` +
``serialize_index``) on random tar streams full of the awkward cases: replaced entries of
every type, implicit parents, unnormalised and escaping paths, xattrs, symlinks, devices,
empty and multi-chunk files, hard links and their chains, and what C leaves to the
reference (directories replaced by files, hard links whose target was replaced). Either both refuse the layer with the same error, or the indexes hold
the same records, strings, extras, chunks, checkpoints and header. A scanner that applies
entries as it scans (``build_index``, keeping none) builds the same sections, or declines
for the same reason, and a declined layer is scanned again for the reference.
"""
from __future__ import annotations

import asyncio
import gzip
import io
import tarfile
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter import native
from snapshotter.index.builder import build_index, index_bytes, index_file_bytes, index_stream_bytes
from snapshotter.index.errors import IndexBuildError
from snapshotter.index.format import IndexFile, serialize_index

CHUNK = 1024
SPAN = 64 << 10

_PARTS = ["a", "b", "c", "dd", "x y", "\u00e9t\u00e9"] * 3 + [".", "..", ""]
_KINDS = ["file", "file", "file", "dir", "dir", "sym", "link", "fifo", "chr"]


@st.composite
def _paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(_PARTS), min_size=1, max_size=4))
    path = "/".join(parts)
    prefix = draw(st.sampled_from(["", "", "./", "/"]))
    suffix = draw(st.sampled_from(["", "", "/"]))
    return prefix + path + suffix


@st.composite
def _members(draw: st.DrawFn) -> tuple[str, str, int, int, int, dict[str, str], str]:
    kind = draw(st.sampled_from(_KINDS))
    path = draw(_paths())
    size = draw(st.sampled_from([0, 1, 100, CHUNK, CHUNK + 1, 3 * CHUNK + 7])) if kind == "file" else 0
    mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0o600]))
    uid = draw(st.sampled_from([0, 1000, 65534]))
    xattrs = draw(st.sampled_from([{}, {}, {"user.a": "1"}, {"security.capability": "cap", "user.b": "x"},
                                   {"user.z": "2", "user.a": "1"}]))
    target = draw(_paths())
    return kind, path, size, mode, uid, xattrs, target


@st.composite
def _layers(draw: st.DrawFn) -> list[tuple[str, str, int, int, int, dict[str, str], str]]:
    """Entries whose hard links and symlinks mostly name an earlier entry."""
    members = draw(st.lists(_members(), min_size=1, max_size=14))
    for i, (kind, path, size, mode, uid, xattrs, target) in enumerate(members):
        earlier = [m[1] for m in members[:i] if kind == "sym" or m[0] != "dir"]
        if kind in ("link", "sym") and earlier and draw(st.integers(0, 3)):
            members[i] = (kind, path, size, mode, uid, xattrs, earlier[draw(st.integers(0, len(earlier) - 1))])
    return members


def _tar(members: list[tuple[str, str, int, int, int, dict[str, str], str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, (kind, path, size, mode, uid, xattrs, target) in enumerate(members):
            ti = tarfile.TarInfo(path)
            ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, uid, 1_700_000_000 + i
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
            data = None
            if kind == "file":
                ti.size = size
                data = io.BytesIO(bytes((i + k) % 251 for k in range(size)))
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, target
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, target
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(ti, data)
    return buf.getvalue()


def _scan(blob: bytes, **finish: int) -> native.ScanResult:
    sc = native.Scanner(span_size=SPAN, chunk_size=CHUNK)
    sc.feed(blob)
    return sc.finish(**finish)


def _as_scanned(blob: bytes, slice_size: int = 700) -> native.ScanResult:
    """Built as the scan goes, fed in slices so entries complete across feeds."""
    sc = native.Scanner(span_size=SPAN, chunk_size=CHUNK, build_index=True)
    for at in range(0, len(blob), slice_size):
        sc.feed(blob[at:at + slice_size])
    return sc.finish()


def _c_bytes(blob: bytes) -> bytes:
    sc = native.Scanner(span_size=SPAN, chunk_size=CHUNK)
    sc.feed(blob)
    return index_bytes(sc, span=SPAN, chunk_size=CHUNK)


def _reference(blob: bytes) -> bytes:
    return serialize_index(build_index(_scan(blob), span_size=SPAN, chunk_size=CHUNK))


def _same(a: bytes, b: bytes) -> None:
    """Equal indexes up to the zstd library's choice of compressed bytes."""
    with IndexFile.from_bytes(a) as x, IndexFile.from_bytes(b) as y:
        assert x.info == y.info
        assert (x.entry_count, x.file_count, x.chunk_count) == (y.entry_count, y.file_count, y.chunk_count)
        assert x.entry_blocks() == y.entry_blocks()
        assert bytes(x.extras_section()) == bytes(y.extras_section())
        assert x.chunk_digests() == y.chunk_digests() and x.chunk_extents() == y.chunk_extents()
        assert x.checkpoints() == y.checkpoints() and x.mark_offsets() == y.mark_offsets()
        assert list(x.entries()) == list(y.entries())


def _check(blob: bytes) -> None:
    kept, scanned = _scan(blob, index_chunk_size=CHUNK), _as_scanned(blob)
    assert not scanned.entries_kept and scanned.entries == [] and scanned.chunks == b""
    assert scanned.index_declined == kept.index_declined and scanned.index == kept.index
    try:
        want = _reference(blob)
    except IndexBuildError as exc:
        with pytest.raises(IndexBuildError) as got:
            _c_bytes(blob)
        assert str(got.value) == str(exc)
        assert kept.index is None
        return
    _same(_c_bytes(blob), want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layers(), st.booleans())
def test_c_index_equals_the_reference(members: list, gz: bool) -> None:
    blob = _tar(members)
    _check(gzip.compress(blob, 1) if gz else blob)


@st.composite
def _linked(draw: st.DrawFn) -> list[tuple[str, str, int, int, int, dict[str, str], str]]:
    """Files, hard links to them and to each other (chains), replaced files and links."""
    names = [f"d/f{k}" for k in range(3)] + [f"d/l{k}" for k in range(3)]
    out: list[tuple[str, str, int, int, int, dict[str, str], str]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["file", "file", "link", "link", "link", "sym"]))
        path = draw(st.sampled_from(names))
        xattrs = draw(st.sampled_from([{}, {}, {"user.a": "1"}]))
        made = [m[1] for m in out]
        target = draw(st.sampled_from(made)) if made and draw(st.integers(0, 5)) else draw(st.sampled_from(names))
        out.append((kind, path, draw(st.sampled_from([0, 5, CHUNK + 1])) if kind == "file" else 0,
                    draw(st.sampled_from([0o644, 0o755])), draw(st.sampled_from([0, 7])), xattrs, target))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_linked())
def test_c_hard_links_equal_the_reference(members: list) -> None:
    _check(_tar(members))


def _plain_layer() -> bytes:
    return _tar([
        ("dir", "./", 0, 0o755, 0, {}, ""),
        ("dir", "usr/lib", 0, 0o755, 0, {"user.a": "1"}, ""),
        ("file", "usr/lib/big.so", 5 * CHUNK + 3, 0o755, 0, {"security.capability": "c"}, ""),
        ("file", "usr/lib/empty", 0, 0o644, 0, {}, ""),
        ("file", "usr/lib/big.so", 2 * CHUNK, 0o644, 0, {}, ""),  # replaced: its first chunks go
        ("sym", "usr/lib/link", 0, 0o777, 0, {}, "big.so"),
        ("dir", "usr/lib/", 0, 0o700, 5, {}, ""),  # a directory entry again: attributes only
        ("file", "etc/./passwd", 10, 0o644, 0, {}, ""),  # parent synthesized, path cleaned
        ("fifo", "run/fifo", 0, 0o600, 0, {}, ""),
        ("chr", "dev/null", 0, 0o666, 0, {}, ""),
        ("link", "usr/bin/same.so", 0, 0o700, 3, {"user.l": "1"}, "usr/lib/big.so"),  # header applies to the inode
        ("link", "usr/bin/chain", 0, 0o600, 4, {}, "./usr/bin/same.so"),
    ])


def test_an_ordinary_layer_is_built_in_c() -> None:
    blob = gzip.compress(_plain_layer())
    scan = _scan(blob, index_chunk_size=CHUNK)
    assert scan.index_declined is None and scan.index is not None
    assert scan.entries == [] and scan.chunks == b""  # no per-entry Python objects
    _same(_c_bytes(blob), _reference(blob))


@pytest.mark.parametrize(("extra", "why"), [
    (("link", "hard", 0, 0o644, 0, {}, "usr/lib/nothing"), "a hard link to a missing entry"),
    (("link", "hard", 0, 0o644, 0, {}, "usr/lib"), "a hard link to a directory"),
    (("file", "usr/lib", 1, 0o644, 0, {}, ""), "a directory replaced by a non-directory"),
    (("dir", "usr/lib", 0, 0o755, 0, {"user.b": "2"}, ""), "directory xattrs to merge"),
    (("file", "../up", 1, 0o644, 0, {}, ""), "a path escaping the layer root"),
    (("file", "etc/passwd/x", 1, 0o644, 0, {}, ""), "a path below a non-directory"),
])
def test_what_c_leaves_to_the_reference(extra: tuple, why: str) -> None:
    blob = _tar([*_tarlist(), extra])
    scan = _scan(blob, index_chunk_size=CHUNK)
    assert scan.index is None and scan.index_declined == why
    _check(blob)


def test_a_hard_link_whose_target_is_replaced_is_left_to_the_reference() -> None:
    blob = _tar([*_tarlist(), ("link", "hard", 0, 0o644, 0, {}, "etc/passwd"),
                 ("file", "etc/passwd", 3, 0o644, 0, {}, "")])
    assert _scan(blob, index_chunk_size=CHUNK).index_declined == "a hard link whose target was replaced"
    _check(blob)


async def _blocks(blob: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(blob), 1000):
        yield blob[at:at + 1000]


def test_a_layer_declined_as_scanned_is_scanned_again_for_the_reference(tmp_path) -> None:
    blob = gzip.compress(_tar([*_tarlist(), ("file", "usr/lib", 1, 0o644, 0, {}, "")]))
    assert _as_scanned(blob).index_declined == "a directory replaced by a non-directory"
    again: list[int] = []

    def second() -> AsyncIterator[bytes]:
        again.append(1)
        return _blocks(blob)

    want = _reference(blob)
    _same(asyncio.run(index_stream_bytes(_blocks(blob), span=SPAN, chunk_size=CHUNK, again=second)), want)
    assert again == [1]
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(blob)
    _same(index_file_bytes(str(path), span=SPAN, chunk_size=CHUNK), want)


def test_a_layer_built_as_scanned_is_read_once() -> None:
    blob = gzip.compress(_plain_layer())

    def second() -> AsyncIterator[bytes]:
        raise AssertionError("read again")

    _same(asyncio.run(index_stream_bytes(_blocks(blob), span=SPAN, chunk_size=CHUNK, again=second)),
          _reference(blob))


def test_a_link_through_a_link_whose_target_was_replaced_is_left_to_the_reference() -> None:
    """The last link names d/f0, a link to data no path holds any more (d/f1 was replaced):
    the reference follows it to that data and promotes d/f0 to hold it."""
    blob = _tar([("file", "d/f1", 0, 0o644, 0, {}, ""), ("file", "d/f0", 0, 0o644, 0, {}, ""),
                 ("link", "d/f0", 0, 0o644, 0, {}, "d/f1"), ("file", "d/f1", 0, 0o644, 0, {}, ""),
                 ("link", "d/f0", 0, 0o644, 0, {}, "d/f0")])
    assert _scan(blob, index_chunk_size=CHUNK).index_declined == "a hard link whose target was replaced"
    _check(blob)


def _tarlist() -> list[tuple[str, str, int, int, int, dict[str, str], str]]:
    return [("dir", "usr/lib", 0, 0o755, 0, {"user.a": "1"}, ""), ("file", "usr/lib/empty", 0, 0o644, 0, {}, ""),
            ("file", "etc/passwd", 10, 0o644, 0, {}, "")]


def test_index_file_bytes_is_the_reference_on_a_file(tmp_path) -> None:
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(_plain_layer()))
    from snapshotter.index.builder import index_file

    _same(index_file_bytes(str(path), span=SPAN, chunk_size=CHUNK),
          serialize_index(index_file(str(path), span=SPAN, chunk_size=CHUNK)))
