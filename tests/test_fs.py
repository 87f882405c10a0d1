"""The FUSE filesystem mounted for real over a real index built from a real tar.

The layer is fetched lazily from a local blob file through the real fetch scheduler
(``FileBlobSource``): every byte read through the mount went through plan_chunks →
decode_span → SHA-256 → chunk store. Compared with ``tarfile`` extraction.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from snapshotter.fetch import Fetcher, FetchOptions
from snapshotter.fetch.sources import FileBlobSource, IndexCodec
from snapshotter.fs import LayerData, LayerTree
from snapshotter.fs.thread import FuseThread
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.store import ChunkStore

pytestmark = pytest.mark.root

MTIME = 1_700_000_123


def _add(tf: tarfile.TarFile, name: str, *, type: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
         uid: int = 0, gid: int = 0, linkname: str = "", mtime: float = MTIME, devmajor: int = 0,
         devminor: int = 0, pax: dict[str, str] | None = None) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    ti.linkname = linkname
    ti.devmajor, ti.devminor = devmajor, devminor
    if pax:
        ti.pax_headers = pax
    ti.size = len(data) if type in (tarfile.REGTYPE,) else 0
    tf.addfile(ti, io.BytesIO(data) if ti.size else None)


def make_layer_tar(path: Path) -> None:
    """Every entry kind the fs must present, plus files spanning many chunks."""
    rnd = hashlib.sha256(b"seed").digest()
    big = b"".join(hashlib.sha256(rnd + i.to_bytes(4, "big")).digest() for i in range(200_000))  # 6.4 MB
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "./", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "etc", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "etc/hostname", data=b"lazy\n", mode=0o644, uid=12, gid=34)
        _add(tf, "etc/secret", data=b"s" * 100, mode=0o600, uid=1000, gid=1000)
        _add(tf, "bin", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755)
        _add(tf, "bin/tool-hard", type=tarfile.LNKTYPE, linkname="bin/tool")
        _add(tf, "bin/link", type=tarfile.SYMTYPE, linkname="tool", mode=0o777)
        _add(tf, "data", type=tarfile.DIRTYPE, mode=0o2775, uid=5, gid=6, mtime=MTIME + 0.5)
        _add(tf, "data/big.bin", data=big, mode=0o640)
        _add(tf, "data/empty", data=b"")
        _add(tf, "data/xattr", data=b"x", pax={"SCHILY.xattr.user.comment": "hello",
                                               "SCHILY.xattr.security.capability": "\x01\x00"})
        _add(tf, "data/nsec", data=b"n", pax={"mtime": "1700000000.123456789"})
        _add(tf, "dev", type=tarfile.DIRTYPE)
        _add(tf, "dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tf, "dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660)
        _add(tf, "dev/fifo", type=tarfile.FIFOTYPE, mode=0o644)
        _add(tf, "implicit/parent/file.txt", data=b"no parent dirs in tar")
        _add(tf, "gone/.wh.removed", data=b"")
        _add(tf, "opaque", type=tarfile.DIRTYPE)
        _add(tf, "opaque/.wh..wh..opq", data=b"")
        _add(tf, "opaque/kept", data=b"k")
        for i in range(300):
            _add(tf, f"many/f{i:04d}", data=(b"%d\n" % i) * (i + 1))


@pytest.fixture
def layer(tmp_path: Path):
    tar = tmp_path / "layer.tar"
    make_layer_tar(tar)
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(gzip.compress(tar.read_bytes(), 6))
    idx_path = tmp_path / "layer.idx"
    # small spans/chunks: many checkpoints, files crossing chunk boundaries
    write_index(idx_path, index_file(str(blob), span=256 << 10, chunk_size=256 << 10))
    return tar, blob, IndexFile.open(idx_path)


@pytest.fixture
def mounted(tmp_path: Path, layer):
    tar, blob, index = layer
    store = ChunkStore(tmp_path / "root")
    fetcher = Fetcher(store, FetchOptions(max_concurrency=2, deadline_s=10))
    lf = fetcher.layer("L", IndexCodec(index), FileBlobSource(blob))
    ft = FuseThread(tmp_path / "root" / "mnt")
    try:
        tree = LayerTree.build(index.entries())
        d = ft.run(lambda: ft.fs.add_layer("abc123", tree, LayerData(index, store, lf)))
        yield tar, d, ft, store, lf
    finally:
        ft.stop()
        index.close()


def _expected(tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tf.getmembers()}


def test_tree_matches_tar(mounted) -> None:
    tar, d, _, _, lf = mounted
    want = _expected(tar)
    seen: dict[str, os.stat_result] = {}
    for dp, dns, fns in os.walk(d):
        for n in dns + fns:
            p = os.path.join(dp, n)
            seen[os.path.relpath(p, d)] = os.lstat(p)
    # like containerd's applier, a hard link's header re-stamps the inode it shares
    # (owners, mode, mtime): the last header naming an inode gives its metadata
    stamp = {m.linkname: m for m in want.values() if m.islnk()}
    with tarfile.open(tar) as tf:
        for name, m in want.items():
            if name in ("", ".") or "/.wh." in "/" + name:
                continue
            st = seen.pop(name)
            if m.islnk():
                target = want[m.linkname]
                assert st.st_ino == seen.get(m.linkname, os.lstat(os.path.join(d, m.linkname))).st_ino
                assert st.st_nlink == 2
                m = target
            meta = stamp.get(m.name.removeprefix("./").rstrip("/"), m)
            assert stat.S_IMODE(st.st_mode) == meta.mode, name
            assert (st.st_uid, st.st_gid) == (meta.uid, meta.gid), name
            assert st.st_mtime_ns // 10**9 == int(meta.mtime), name
            if m.isreg():
                assert stat.S_ISREG(st.st_mode)
                assert st.st_size == m.size
                with open(os.path.join(d, name), "rb") as f:
                    assert f.read() == tf.extractfile(m).read(), name
            elif m.isdir():
                assert stat.S_ISDIR(st.st_mode)
            elif m.issym():
                assert os.readlink(os.path.join(d, name)) == m.linkname
            elif m.ischr() or m.isblk():
                assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (m.devmajor, m.devminor)
                assert stat.S_ISCHR(st.st_mode) == m.ischr()
            elif m.isfifo():
                assert stat.S_ISFIFO(st.st_mode)
    # what is left: implicit parents and whiteouts (checked below)
    assert set(seen) == {"implicit", "implicit/parent", "gone", "gone/removed", "many"}
    assert stat.S_ISDIR(seen["implicit"].st_mode)
    assert lf.bytes_fetched > 0


def test_second_read_is_answered_in_c_and_counted(mounted) -> None:
    """The first read of a file fetches through the daemon's loop; once its chunks are
    verified on disk, a read that misses the page cache is answered by the C workers."""
    from snapshotter.store.metrics import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    _, d, ft, store, lf = mounted
    path = d / "data/big.bin"
    entry = next(e for e in lf.codec.index.entries() if e.path == "data/big.bin")
    wanted = {lf.codec.digest(entry.first_chunk + k) for k in range(entry.chunk_count)}
    written: set[bytes] = set()
    done = threading.Event()

    def added(joined: bytes) -> None:  # runs under the store's lock
        written.update(joined[i:i + 32] for i in range(0, len(joined), 32))
        if wanted <= written:
            done.set()

    store.watch_verified(added, lambda _d: None)
    first = path.read_bytes()
    # the first read was answered from the fetched span in memory; its chunk files are
    # written (and only then offered to the C side) just after
    assert done.wait(10)
    store.unwatch_verified(added)
    before = ft.fs.counters()
    local_before = sample("lazysnap_fuse_reads_total", path="local")
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the next read reaches us
        assert f.read() == first
    after = ft.fs.counters()
    assert after["read_local"] > before["read_local"]
    assert after["read_forwarded"] == before["read_forwarded"]
    assert sample("lazysnap_fuse_reads_total", path="local") > local_before
    assert sample("lazysnap_fuse_requests_total", op="lookup") > 0


def test_nanosecond_mtime_xattrs_and_whiteouts(mounted) -> None:
    _, d, _, _, _ = mounted
    assert os.lstat(d / "data/nsec").st_mtime_ns == 1_700_000_000_123_456_789
    assert os.getxattr(d / "data/xattr", "user.comment") == b"hello"
    assert "user.comment" in os.listxattr(d / "data/xattr")
    with pytest.raises(OSError) as exc:
        os.getxattr(d / "etc/hostname", "user.nothing")
    assert exc.value.errno == errno.ENODATA
    assert os.listxattr(d / "etc/hostname") == []
    wh = os.lstat(d / "gone/removed")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert not os.path.lexists(d / "gone/.wh.removed")
    assert os.getxattr(d / "opaque", "trusted.overlay.opaque") == b"y"
    assert os.listdir(d / "opaque") == ["kept"]
    st = os.statvfs(d)
    assert st.f_namemax == 255 and st.f_bsize > 0


def test_partial_and_unaligned_reads(mounted) -> None:
    tar, d, _, _, _ = mounted
    with tarfile.open(tar) as tf:
        big = tf.extractfile("data/big.bin").read()
    fd = os.open(d / "data/big.bin", os.O_RDONLY)
    try:
        for off, n in [(0, 1), (262_143, 2), (262_144 * 3 - 7, 600_000), (len(big) - 5, 100), (len(big), 10)]:
            assert os.pread(fd, n, off) == big[off:off + n]
    finally:
        os.close(fd)


def test_read_only(mounted) -> None:
    _, d, _, _, _ = mounted
    with pytest.raises(OSError) as exc:
        open(d / "etc/hostname", "w")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        os.mkdir(d / "newdir")


def test_absent_names_are_cached_negative_entries(mounted) -> None:
    """Absent names answer ENOENT every time (the fs replies with a cached negative entry,
    which the kernel must never turn into a file), and present siblings stay visible."""
    _, d, ft, _, _ = mounted
    with pytest.raises(FileNotFoundError):
        os.stat(d / "etc" / "no-such-file")
    lookups = ft.fs.counters()["lookup"]
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            os.stat(d / "etc" / "no-such-file")
        with pytest.raises(FileNotFoundError):
            open(d / "etc" / "no-such-file", "rb")
    assert ft.fs.counters()["lookup"] == lookups  # later probes answered by the kernel
    assert (d / "etc/hostname").read_bytes() == b"lazy\n"
    assert "no-such-file" not in os.listdir(d / "etc")


def test_layer_registry_and_root(mounted, layer) -> None:
    _, d, ft, store, lf = mounted
    assert os.listdir(d.parent) == ["abc123"]
    with pytest.raises(FileNotFoundError):
        os.stat(d.parent / "nope")
    ft.run(lambda: ft.fs.remove_layer("abc123"))
    assert os.listdir(d.parent) == []
    assert not os.path.exists(d)


def test_overlayfs_lowerdir(mounted, tmp_path: Path) -> None:
    """The FUSE dir works as an overlayfs lower: whiteouts hide, opaque dirs hide lower."""
    _, d, _, _, _ = mounted
    base = tmp_path / "base"
    (base / "gone").mkdir(parents=True)
    (base / "gone/removed").write_text("must be hidden")
    (base / "gone/still").write_text("visible")
    (base / "opaque").mkdir()
    (base / "opaque/hidden").write_text("hidden by opaque")
    (base / "onlybase").write_text("base")
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for p in (upper, work, merged):
        p.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={d}:{base},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "gone")) == ["still"]
        assert sorted(os.listdir(merged / "opaque")) == ["kept"]
        assert (merged / "onlybase").read_text() == "base"
        assert (merged / "etc/hostname").read_text() == "lazy\n"
        assert os.readlink(merged / "bin/link") == "tool"
        # copy-up from the FUSE lower works
        with open(merged / "etc/hostname", "a") as f:
            f.write("more\n")
        assert (upper / "etc/hostname").read_text() == "lazy\nmore\n"
        assert (d / "etc/hostname").read_text() == "lazy\n"
    finally:
        subprocess.run(["umount", str(merged)], check=False)


def test_sparse_file_holes_read_as_zeros(tmp_path: Path) -> None:
    """A GNU sparse tar entry (tar --sparse): data segments from chunks, holes as zeros."""
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(40 << 20)
        for off in (0, 5 << 20, (40 << 20) - 4096):
            f.seek(off)
            f.write(hashlib.sha256(str(off).encode()).digest() * 128)
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(src), "sparse.img"], check=True)
    blob = tmp_path / "sparse.tar.gz"
    blob.write_bytes(gzip.compress(tar.read_bytes(), 6))
    write_index(tmp_path / "idx", index_file(str(blob), chunk_size=64 << 10))
    index = IndexFile.open(tmp_path / "idx")
    entry = index.lookup("sparse.img")
    assert entry is not None and entry.sparse, "the index should record the sparse map"
    store = ChunkStore(tmp_path / "root")
    lf = Fetcher(store).layer("S", IndexCodec(index), FileBlobSource(blob))
    ft = FuseThread(tmp_path / "root" / "mnt")
    try:
        d = ft.run(lambda: ft.fs.add_layer("sparse", LayerTree.build(index.entries()), LayerData(index, store, lf)))
        want = sparse.read_bytes()
        assert (d / "sparse.img").read_bytes() == want
        fd = os.open(d / "sparse.img", os.O_RDONLY)
        try:
            for off, n in [((5 << 20) - 10, 100), ((40 << 20) - 5000, 5000), (1 << 20, 10)]:
                assert os.pread(fd, n, off) == want[off:off + n]
        finally:
            os.close(fd)
    finally:
        ft.stop()
        index.close()


def test_hostile_tar_is_served_as_containerd_applies_it(tmp_path: Path) -> None:
    """Entries a hostile image may carry, through a real FUSE mount: absolute and dotted
    names land inside the layer, a later duplicate wins, symlinks (looping or pointing out
    of the layer) are data and never followed by lazysnap, a hard link keeps the bytes it
    was made for; a name escaping the root and an oversized header refuse the layer with
    one clear error (the node then pulls it as containerd would, which refuses it too)."""
    from snapshotter.index.errors import LayerIndexError

    tar = tmp_path / "hostile.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "/abs/f", data=b"absolute")
        _add(tf, "./x/./y/../z", data=b"dotted")
        _add(tf, "dup", data=b"first")
        _add(tf, "keep", type=tarfile.LNKTYPE, linkname="dup")
        _add(tf, "dup", data=b"second!")
        _add(tf, "loop/a", type=tarfile.SYMTYPE, linkname="b", mode=0o777)
        _add(tf, "loop/b", type=tarfile.SYMTYPE, linkname="a", mode=0o777)
        _add(tf, "out", type=tarfile.SYMTYPE, linkname="../../../../../etc/shadow", mode=0o777)
        _add(tf, "self", type=tarfile.SYMTYPE, linkname="self", mode=0o777)
    blob = tmp_path / "hostile.tar.gz"
    blob.write_bytes(gzip.compress(tar.read_bytes(), 6))
    write_index(tmp_path / "idx", index_file(str(blob)))
    index = IndexFile.open(tmp_path / "idx")
    store = ChunkStore(tmp_path / "root")
    lf = Fetcher(store).layer("H", IndexCodec(index), FileBlobSource(blob))
    ft = FuseThread(tmp_path / "root" / "mnt")
    try:
        d = ft.run(lambda: ft.fs.add_layer("hostile", LayerTree.build(index.entries()), LayerData(index, store, lf)))
        assert (d / "abs/f").read_bytes() == b"absolute"
        assert (d / "x/z").read_bytes() == b"dotted" and not (d / "x/y").exists()
        assert (d / "dup").read_bytes() == b"second!"
        assert (d / "keep").read_bytes() == b"first"  # the bytes the link was made for
        assert os.readlink(d / "loop/a") == "b" and os.readlink(d / "loop/b") == "a"
        assert os.readlink(d / "out") == "../../../../../etc/shadow"
        for name in ("loop/a", "self"):
            with pytest.raises(OSError) as exc:
                (d / name).read_bytes()
            assert exc.value.errno == errno.ELOOP
        assert sorted(os.listdir(d)) == ["abs", "dup", "keep", "loop", "out", "self", "x"]
    finally:
        ft.stop()
        index.close()

    def refused(*entries: tuple[str, dict[str, str] | None]) -> str:
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, pax in entries:
                _add(tf, name, data=b"x", pax=pax)
        with pytest.raises(LayerIndexError) as exc:
            index_file(str(bad))
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "escapes the layer root" in refused(("ok", None), ("../../etc/cron.d/evil", None))
    assert "exceeds 1 MiB" in refused(("big-header", {"comment": "c" * (2 << 20)}))
