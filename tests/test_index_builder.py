"""Tar semantics of the index builder: normalisation, hostile entries, replacement, links."""
from __future__ import annotations

import io
import tarfile

import pytest

from snapshotter.index.builder import build_index, clean_path
from snapshotter.index.errors import IndexBuildError
from snapshotter.index.format import IndexFile, serialize_index
from snapshotter.index.model import EntryType
from tests.pyscan import PyScanner


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """members: (kind, name, data-or-linkname); kind in file/dir/sym/link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(payload, bytes)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE}[kind]
            if kind in ("sym", "link"):
                assert isinstance(payload, str)
                ti.linkname = payload
            tf.addfile(ti)
    return buf.getvalue()


def _index(raw: bytes) -> IndexFile:
    sc = PyScanner(chunk_size=4096)
    sc.feed(raw)
    return IndexFile.from_bytes(serialize_index(build_index(sc.finish(), chunk_size=4096)))


@pytest.mark.parametrize("raw,clean", [
    ("./a/b", "a/b"), ("/abs/x", "abs/x"), ("a//b/./c/", "a/b/c"), ("a/../b", "b"), ("./", ""),
    ("//", ""), ("a/b/..", "a"),
])
def test_clean_path(raw: str, clean: str) -> None:
    assert clean_path(raw) == clean


@pytest.mark.parametrize("raw", ["../x", "a/../../x", "/../etc/passwd", "./a/../.."])
def test_escaping_paths_are_rejected(raw: str) -> None:
    with pytest.raises(IndexBuildError, match="escapes the layer root"):
        clean_path(raw)


def test_escaping_entry_rejects_layer() -> None:
    with pytest.raises(IndexBuildError, match="escapes"):
        _index(_tar(("file", "ok", b"1"), ("file", "../evil", b"2")))


def test_absolute_entry_is_made_relative() -> None:
    idx = _index(_tar(("file", "/abs/file", b"data")))
    e = idx.lookup("abs/file")
    assert e is not None and e.type == EntryType.REG and e.size == 4
    assert idx.lookup("abs") is not None and idx.lookup("abs").type == EntryType.DIR  # type: ignore[union-attr]


def test_symlink_target_is_data_never_followed() -> None:
    idx = _index(_tar(("sym", "etc/passwd-link", "/etc/passwd"), ("sym", "up", "../../../../x")))
    e = idx.lookup("etc/passwd-link")
    assert e is not None and e.type == EntryType.SYMLINK and e.linkname == "/etc/passwd"
    up = idx.lookup("up")
    assert up is not None and up.linkname == "../../../../x"


def test_synthesized_parents_are_root_owned_0755() -> None:
    idx = _index(_tar(("file", "a/b/c/file", b"x")))
    for p in ("", "a", "a/b", "a/b/c"):
        e = idx.lookup(p)
        assert e is not None and e.type == EntryType.DIR and e.mode == 0o755 and e.uid == 0 and e.gid == 0
    assert [c.path for c in idx.children("a/b")] == ["a/b/c"]


def test_later_duplicate_replaces_earlier() -> None:
    idx = _index(_tar(("file", "f", b"old"), ("file", "./f", b"newer")))
    e = idx.lookup("f")
    assert e is not None and e.size == 5
    assert idx.entry_count == 2  # root + f
    assert idx.chunk_count == 1  # the replaced file's chunk is dropped


def test_file_replacing_directory_drops_its_subtree() -> None:
    idx = _index(_tar(("file", "d/x", b"1"), ("file", "d/y/z", b"2"), ("file", "d", b"now a file")))
    e = idx.lookup("d")
    assert e is not None and e.type == EntryType.REG
    assert idx.lookup("d/x") is None and idx.lookup("d/y/z") is None
    assert idx.entry_count == 2


def test_directory_replacing_directory_keeps_children() -> None:
    idx = _index(_tar(("file", "d/x", b"1"), ("dir", "d", b"")))
    assert idx.lookup("d/x") is not None


def test_entry_below_a_file_is_an_error() -> None:
    with pytest.raises(IndexBuildError, match="not a directory"):
        _index(_tar(("file", "f", b"1"), ("file", "f/g", b"2")))


def test_hard_link_shares_inode_and_target() -> None:
    idx = _index(_tar(("file", "a/target", b"content"), ("link", "b/link", "a/target")))
    link = idx.find("b/link")
    target = idx.find("a/target")
    assert link is not None and target is not None
    assert idx.inode(link) == idx.inode(target) == target
    e = idx.entry_at(link)
    assert e.type == EntryType.HARDLINK and e.linkname == "a/target"


@pytest.mark.parametrize("target,match", [("missing", "missing entry"), ("../../etc/shadow", "escapes"),
                                          ("d", "directory")])
def test_bad_hard_links_are_errors(target: str, match: str) -> None:
    with pytest.raises(IndexBuildError, match=match):
        _index(_tar(("dir", "d", b""), ("link", "l", target)))


def test_hard_link_keeps_content_of_replaced_target() -> None:
    idx = _index(_tar(("file", "t", b"first"), ("link", "l1", "t"), ("link", "l2", "t"), ("file", "t", b"second!")))
    l1 = idx.lookup("l1")
    assert l1 is not None and l1.type == EntryType.REG and l1.size == 5  # heir of the old data
    l2 = idx.lookup("l2")
    assert l2 is not None and l2.type == EntryType.HARDLINK and l2.linkname == "l1"
    t = idx.lookup("t")
    assert t is not None and t.size == 7


def test_hard_link_chain_resolves_to_data_entry() -> None:
    idx = _index(_tar(("file", "t", b"x"), ("link", "l1", "t"), ("link", "l2", "l1")))
    l2 = idx.lookup("l2")
    assert l2 is not None and l2.linkname == "t"


def test_root_entry_attributes_from_tar() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("./")
        ti.type, ti.mode, ti.uid = tarfile.DIRTYPE, 0o700, 7
        tf.addfile(ti)
    root = _index(buf.getvalue()).entry_at(0)
    assert root.path == "" and root.mode == 0o700 and root.uid == 7


def test_whiteouts_are_kept_as_files() -> None:
    idx = _index(_tar(("file", "d/.wh.gone", b""), ("file", "d/.wh..wh..opq", b"")))
    assert [c.path for c in idx.children("d")] == ["d/.wh..wh..opq", "d/.wh.gone"]


async def test_index_stream_bytes_matches_index_file_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import gzip

    from snapshotter.index.builder import index_file_bytes, index_stream_bytes

    raw = _tar(("file", "a/b", b"x" * 100_000), ("sym", "l", "a/b"), ("file", "c", bytes(range(256)) * 900))
    blob = gzip.compress(raw)
    path = tmp_path / "l.tar.gz"
    path.write_bytes(blob)

    async def slices():  # type: ignore[no-untyped-def]
        for i in range(0, len(blob), 1000):
            await asyncio.sleep(0)
            yield blob[i:i + 1000]

    streamed = await index_stream_bytes(slices(), span=32 << 10, chunk_size=8192)
    assert streamed == index_file_bytes(str(path), span=32 << 10, chunk_size=8192)
    with pytest.raises(IndexBuildError, match="does not match"):
        await index_stream_bytes(slices(), expected_digest="sha256:" + "0" * 64)


def test_chunk_size_is_checked_or_inferred() -> None:
    raw = _tar(("file", "big", bytes(range(256)) * 100), ("file", "small", b"abc"), ("file", "empty", b""))
    sc = PyScanner(chunk_size=4096)
    sc.feed(raw)
    scan = sc.finish()
    assert build_index(scan).info.chunk_size == 4096  # inferred from the multi-chunk file
    assert build_index(scan, chunk_size=4096).info.chunk_size == 4096
    with pytest.raises(IndexBuildError, match="chunk size 8192"):
        build_index(scan, chunk_size=8192)
