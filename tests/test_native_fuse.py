"""The C FUSE filesystem (snapshotter._fuse) driven directly: metadata answered in C,
reads of verified chunks answered in C, everything else handed to the caller, which replies.

Also runs under ASan/UBSan (`make sanitize-test`). Reads through the mount run in threads:
the test thread plays the daemon's loop (take / reply).
"""
from __future__ import annotations

import array
import concurrent.futures
import errno
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from snapshotter import _fuse
from snapshotter.fs.compiled import HEADER, NODE, compile_tree
from snapshotter.fs.tree import LayerTree
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.store import ChunkStore

pytestmark = pytest.mark.root

CHUNK = 64 << 10
MTIME = 1_700_000_000


def _file(tf: tarfile.TarFile, name: str, data: bytes, **kw: object) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), MTIME, 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data))


FILES = {f"f{i}.bin": bytes((i * 7 + j) % 251 for j in range(CHUNK * 2 + 1000 * i)) for i in range(6)}


def _session(mnt: Path, threads: int = 2, **kw: object) -> _fuse.Session:
    """A mounted session whose INIT is answered."""
    session = _fuse.Session(str(mnt), "fsname=lazysnap,ro,default_permissions", threads, **kw)
    try:
        session.start()
        deadline = time.monotonic() + 10
        while not session.initialized():
            assert time.monotonic() < deadline
            time.sleep(0.001)
    except BaseException:
        session.close()
        raise
    return session


@pytest.fixture
def fs(tmp_path: Path):
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in FILES.items():
            _file(tf, name, data)
        _file(tf, "small.txt", b"hello\n", uid=7, gid=8)
        d = tarfile.TarInfo("dir")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o750, MTIME
        d.pax_headers = {"SCHILY.xattr.user.k": "value"}
        tf.addfile(d)
        ln = tarfile.TarInfo("dir/link")
        ln.type, ln.linkname = tarfile.SYMTYPE, "../small.txt"
        tf.addfile(ln)
    write_index(tmp_path / "idx", index_file(str(tar), span=1 << 20, chunk_size=CHUNK))
    index = IndexFile.open(tmp_path / "idx")
    store = ChunkStore(tmp_path / "store")
    with open(tar, "rb") as f:  # every chunk on disk (the test decides which are "verified")
        for e in index.entries():
            for k, c in enumerate(index.chunks_of(e)):
                f.seek(e.data_offset + k * CHUNK)
                store.put(c.digest, f.read(c.length))
    tree = LayerTree.build(index.entries())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = _session(mnt)
    try:
        session.add_layer(1, "L", compile_tree(tree), b"".join(index.chunk_digests()), str(store.chunks_dir), CHUNK)
        yield session, mnt, index, store
    finally:
        session.close()
        index.close()


def _serve(session, pool_future, reply, accesses: list | None = None) -> list[tuple[int, int, int, int]]:
    """Play the daemon's loop until the reader in ``pool_future`` is done; access records
    taken meanwhile go to ``accesses``."""
    seen = []
    deadline = time.monotonic() + 20
    while not pool_future.done():
        assert time.monotonic() < deadline, "reader never finished"
        misses, taken = session.take()
        if accesses is not None:
            accesses.extend(taken)
        for m in misses:
            seen.append(m)
            reply(*m)
        time.sleep(0.001)
    return seen


def test_metadata_answered_in_c(fs) -> None:
    session, mnt, _, _ = fs
    assert os.listdir(mnt) == ["L"]
    root = mnt / "L"
    assert sorted(os.listdir(root)) == sorted([*FILES, "small.txt", "dir"])
    st = os.stat(root / "small.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns) == (0o644, 7, 8, 6, MTIME * 10**9)
    d = os.stat(root / "dir")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o750 and d.st_nlink == 2
    assert os.getxattr(root / "dir", "user.k") == b"value"
    assert os.listxattr(root / "dir") == ["user.k"]
    with pytest.raises(OSError) as exc:
        os.getxattr(root / "small.txt", "user.k")
    assert exc.value.errno == errno.ENODATA
    assert os.readlink(root / "dir/link") == "../small.txt"
    assert not os.path.exists(root / "absent")
    with pytest.raises(OSError) as exc:
        os.open(root / "small.txt", os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    c = session.counters()
    assert c["lookup"] > 0 and c["getxattr"] >= 2 and c["read"] == 0


def test_unverified_reads_go_to_the_caller_verified_ones_are_local(fs) -> None:
    session, mnt, index, _ = fs
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit((mnt / "L/f1.bin").read_bytes)
        want = FILES["f1.bin"]
        seen = _serve(session, fut, lambda tok, ino, off, size: session.reply_data(tok, want[off:off + size]))
        assert fut.result() == want and seen
        assert all(ino >> 32 == 1 for _, ino, _, _ in seen)
        session.mark_verified(b"".join(index.chunk_digests()))
        before = session.counters()
        fut = pool.submit((mnt / "L/f2.bin").read_bytes)
        accesses: list = []  # what the recorder gets for reads answered in C
        assert _serve(session, fut, lambda *m: pytest.fail("a verified read was forwarded"), accesses) == []
        assert fut.result() == FILES["f2.bin"]
    after = session.counters()
    assert after["read_local"] > before["read_local"] and after["chunk_hits"] >= 3
    assert after["read_forwarded"] == before["read_forwarded"]
    accesses += session.take()[1]
    ino = os.stat(mnt / "L/f2.bin").st_ino
    mine = sorted((off, size) for i, off, size, t_ns in accesses if i == ino and t_ns > 0)
    assert mine[0][0] == 0 and sum(size for _, size in mine) == len(FILES["f2.bin"])


def test_reads_of_chunks_in_a_layer_file_are_answered_in_c(fs, tmp_path: Path) -> None:
    """A layer file (here: the layer's tar itself, each chunk at its offset in it) serves
    the layer's chunks from C without any being verified as chunk files; a chunk marked
    not in it, or one the file is too short for, goes to the caller."""
    session, mnt, index, _ = fs
    tar = tmp_path / "layer.tar"
    offsets = array.array("Q")
    for e in index.entries():
        offsets.extend(e.data_offset + k * CHUNK for k in range(len(index.chunks_of(e))))
    assert len(offsets) == index.chunk_count
    f1 = next(e for e in index.entries() if e.path == "f1.bin")
    first = sum(len(index.chunks_of(e)) for e in index.entries() if e.data_offset < f1.data_offset)
    missing = first + 1  # f1.bin's second chunk
    offsets[missing] = (1 << 64) - 1
    with pytest.raises(ValueError):
        session.set_layer_file(1, str(tar), offsets.tobytes()[:-8])
    with pytest.raises(OSError):
        session.set_layer_file(9, str(tar), offsets.tobytes())
    session.set_layer_file(1, str(tar), offsets.tobytes())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit((mnt / "L/f2.bin").read_bytes)
        assert _serve(session, fut, lambda *m: pytest.fail("a read of the layer file was forwarded")) == []
        assert fut.result() == FILES["f2.bin"]
        want = FILES["f1.bin"]
        fut = pool.submit((mnt / "L/f1.bin").read_bytes)
        seen = _serve(session, fut, lambda tok, ino, off, size: session.reply_data(tok, want[off:off + size]))
        assert fut.result() == want
        assert seen and all(off < (missing - first + 1) * CHUNK and off + size > (missing - first) * CHUNK
                            for _, _, off, size in seen)
        short = tmp_path / "short.tar"
        short.write_bytes(tar.read_bytes()[:f1.data_offset])  # everything from f1.bin on is cut off
        session.set_layer_file(1, str(short), offsets.tobytes())
        want = FILES["f3.bin"]
        fut = pool.submit((mnt / "L/f3.bin").read_bytes)
        seen = _serve(session, fut, lambda tok, ino, off, size: session.reply_data(tok, want[off:off + size]))
        assert fut.result() == want and seen


def test_errors_and_evicted_chunks_and_quarantine(fs) -> None:
    session, mnt, index, store = fs
    session.mark_verified(b"".join(index.chunk_digests()))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit((mnt / "L/small.txt").read_bytes)
        fut.result(10)  # verified: served locally
        # a verified chunk whose file vanished (evicted) goes to the caller, then stays there
        e = index.lookup("f3.bin")
        assert e is not None
        os.unlink(store.path_of(index.chunk(e.first_chunk).digest))
        fut = pool.submit((mnt / "L/f3.bin").read_bytes)
        want = FILES["f3.bin"]
        seen = _serve(session, fut, lambda tok, ino, off, size: session.reply_data(tok, want[off:off + size]))
        assert fut.result() == want and seen
        # the caller's error reaches the reader
        session.set_failed(1)
        fut = pool.submit((mnt / "L/f4.bin").read_bytes)
        seen = _serve(session, fut, lambda tok, *_: session.reply_error(tok, errno.EIO))
        with pytest.raises(OSError) as exc:
            fut.result()
        assert exc.value.errno == errno.EIO and seen
    assert session.reply_data(123456, b"x") is False  # unknown token


def test_bad_trees_are_refused(fs, tmp_path: Path) -> None:
    session, _, index, store = fs
    tree = LayerTree.build(index.entries())
    blob = bytearray(compile_tree(tree))
    digests = b"".join(index.chunk_digests())
    with pytest.raises(ValueError, match="slot already in use"):
        session.add_layer(1, "again", bytes(blob), digests, str(store.chunks_dir), CHUNK)
    with pytest.raises(ValueError, match="size does not match"):
        session.add_layer(2, "short", bytes(blob[:-1]), digests, str(store.chunks_dir), CHUNK)
    bad = bytearray(blob)
    parent = HEADER.size + NODE.size + NODE.offset("parent")  # node 1 (root): points past the table
    bad[parent:parent + 4] = (10**6).to_bytes(4, "little")
    with pytest.raises(ValueError, match="out of range"):
        session.add_layer(3, "bad", bytes(bad), digests, str(store.chunks_dir), CHUNK)
    with pytest.raises(ValueError, match="file chunks out of range"):
        session.add_layer(4, "nochunks", bytes(blob), digests[:32], str(store.chunks_dir), CHUNK)
    with pytest.raises(ValueError):
        session.add_layer(5, "a/b", bytes(blob), digests, str(store.chunks_dir), CHUNK)


def test_remove_layer_and_close_with_a_read_pending(fs) -> None:
    session, mnt, index, store = fs
    assert os.path.isdir(mnt / "L")  # the kernel now holds a dentry to invalidate
    assert session.remove_layer(1) is True
    session.invalidate_entry(b"L")
    with pytest.raises(FileNotFoundError):
        session.invalidate_entry(b"L")  # nothing left to forget
    assert not os.path.exists(mnt / "L")
    session.add_layer(2, "M", compile_tree(LayerTree.build(index.entries())), b"".join(index.chunk_digests()),
                      str(store.chunks_dir), CHUNK)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit((mnt / "M/f5.bin").read_bytes)
        deadline = time.monotonic() + 10
        while not session.take()[0]:  # the read is now in flight, never answered
            assert time.monotonic() < deadline
            time.sleep(0.001)
        session.close()
        with pytest.raises(OSError):
            fut.result(10)
    assert not os.path.ismount(mnt)
    with pytest.raises(ValueError, match="closed"):
        session.counters()
    shutil.rmtree(mnt, ignore_errors=True)


def test_remove_layer_under_concurrent_reads(fs) -> None:
    """Readers hammering the layer never see a wrong byte, and removal neither waits forever
    nor frees the layer under a request (the sanitizer build checks the latter)."""
    session, mnt, index, _ = fs
    session.mark_verified(b"".join(index.chunk_digests()))
    stop = time.monotonic() + 0.6
    wrong: list[str] = []
    removed = False

    def reader(name: str) -> int:
        n = 0
        while time.monotonic() < stop:
            try:
                fd = os.open(mnt / "L" / name, os.O_RDONLY)
            except OSError:
                return n  # removed
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the next read reach us
                data = os.pread(fd, len(FILES[name]) + 1, 0)
                # the kernel splits the read: once the layer is gone, the rest fails and
                # the read comes back short, but every byte it did return must be right
                if data != FILES[name][:len(data)] or (len(data) < len(FILES[name]) and not removed):
                    wrong.append(name)
                n += 1
            except OSError:
                return n
            finally:
                os.close(fd)
        return n

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(reader, name) for name in list(FILES)[:4]]
        time.sleep(0.3)
        t0 = time.monotonic()
        removed = True  # from here on a read may come back short
        assert session.remove_layer(1) is True
        assert time.monotonic() - t0 < 5
        reads = sum(f.result(10) for f in futures)
    assert not wrong and reads > 0
    assert session.counters()["read_forwarded"] == 0


def test_mount_as_the_kernel_sees_it(fs) -> None:
    """The protocol is ours (native/fuse/kproto.c): what the kernel agreed to and mounted."""
    session, mnt, index, _ = fs
    session.mark_verified(b"".join(index.chunk_digests()))
    fields = next(line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(mnt))
    sep = fields.index("-")
    assert fields[sep + 1] == "fuse" and fields[sep + 2] == "lazysnap"
    assert {"ro", "nosuid", "nodev"} <= set(fields[5].split(","))
    assert {"default_permissions", "user_id=0", "group_id=0"} <= set(fields[sep + 3].split(","))
    assert "allow_other" not in fields[sep + 3]
    st = os.statvfs(mnt)
    assert st.f_bsize == 4096 and st.f_namemax == 255 and st.f_files == 1 + 10  # root + the layer's nodes
    assert st.f_blocks * 4096 >= sum(len(d) for d in FILES.values())
    with pytest.raises(OSError) as exc:
        os.mkdir(mnt / "L" / "new")
    assert exc.value.errno == errno.EROFS
    # requests we do not implement are refused with ENOSYS and the kernel carries on
    fd = os.open(mnt / "L" / "small.txt", os.O_RDONLY)
    try:
        os.fsync(fd)  # FSYNC: ENOSYS, which the kernel turns into success
    finally:
        os.close(fd)
    assert (mnt / "L" / "small.txt").read_bytes() == b"hello\n"


def test_big_directories_and_long_names_list_whole(tmp_path: Path) -> None:
    """A listing spans many READDIR(PLUS) replies: each entry once, in order, attributes right."""
    tar = tmp_path / "layer.tar"
    names = [f"{i:05d}" + "n" * (i % 240) for i in range(3000)]
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, name in enumerate(names):
            _file(tf, f"d/{name}", b"x" * (i % 7), uid=i % 5)
    write_index(tmp_path / "idx", index_file(str(tar), span=1 << 20, chunk_size=CHUNK))
    index = IndexFile.open(tmp_path / "idx")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = _session(mnt, threads=1)
    try:
        session.add_layer(1, "L", compile_tree(LayerTree.build(index.entries())), b"".join(index.chunk_digests()),
                          str(tmp_path / "chunks"), CHUNK)
        with os.scandir(mnt / "L" / "d") as it:
            listed = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        assert [n for n, _ in listed] == sorted(names)
        by_name = {n: st for n, st in listed}
        for i, name in enumerate(names):
            assert (by_name[name].st_size, by_name[name].st_uid) == (i % 7, i % 5)
        assert session.counters()["readdir"] >= 2
    finally:
        session.close()
        index.close()


def test_unknown_mount_options_are_refused(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(OSError, match="unknown FUSE mount option"):
        _fuse.Session(str(mnt), "ro,bogus=1", 1)
    assert not os.path.ismount(mnt)


def test_a_session_taken_over_answers_what_its_predecessor_left(fs) -> None:
    """The /dev/fuse fd outlives the session that mounted it: another session takes it over
    (as a new FUSE holder does), and the kernel sends it again the read the first one took
    and never answered (FUSE_NOTIFY_RESEND)."""
    first, mnt, index, store = fs
    tree = compile_tree(LayerTree.build(index.entries()))
    digests = b"".join(index.chunk_digests())
    fh = open(mnt / "L" / "small.txt", "rb")  # an open file must keep working across
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit((mnt / "L/f1.bin").read_bytes)
        deadline = time.monotonic() + 10
        while not (taken := first.take()[0]):  # in flight in `first`, never answered by it
            assert time.monotonic() < deadline
            time.sleep(0.001)
        fd = os.dup(first.fuse_fileno())
        first.close(unmount=False)
        assert os.path.ismount(mnt) and not fut.done()
        second = _fuse.Session(str(mnt), "", 2, fuse_fd=fd)
        os.close(fd)  # the session keeps its own copy
        try:
            assert second.initialized()
            second.add_layer(1, "L", tree, digests, str(store.chunks_dir), CHUNK)
            second.start()
            second.resend()
            want = FILES["f1.bin"]
            seen = _serve(second, fut, lambda tok, ino, off, size: second.reply_data(tok, want[off:off + size]))
            assert fut.result() == want
            assert [(ino, off) for _, ino, off, _ in seen][:1] == [(ino, off) for _, ino, off, _ in taken][:1]
            second.mark_verified(digests)
            assert fh.read() == b"hello\n"
            assert sorted(os.listdir(mnt / "L")) == sorted([*FILES, "small.txt", "dir"])
        finally:
            fh.close()
            second.close()
    assert not os.path.ismount(mnt)


def test_passthrough_opens_go_to_the_backing_file(fs, tmp_path: Path) -> None:
    """With passthrough agreed, a file given a backing file is read by the kernel from it:
    the bytes are the file's, and no READ reaches us. A file already open through us is
    not passed through until that open is released (the kernel refuses to mix the two),
    and a backing file of the wrong size is refused."""
    first, _, index, store = fs
    first.close()
    mnt = tmp_path / "pt-mnt"
    mnt.mkdir()
    session = _session(mnt, passthrough=True)
    try:
        assert session.passthrough()
        session.add_layer(1, "L", compile_tree(LayerTree.build(index.entries())), b"".join(index.chunk_digests()),
                          str(store.chunks_dir), CHUNK)
        session.mark_verified(b"".join(index.chunk_digests()))
        path = mnt / "L" / "f2.bin"
        local = os.stat(path).st_ino & 0xFFFFFFFF
        early = open(path, "rb")  # served by us: the kernel caches it
        backing = tmp_path / "backing-f2"
        backing.write_bytes(FILES["f2.bin"][:-1])
        with pytest.raises(OSError, match="size differs"):
            session.set_backing(1, local, str(backing))
        backing.write_bytes(FILES["f2.bin"])
        session.set_backing(1, local, str(backing))
        session.set_backing(1, local, str(backing))  # again: kept as it is
        assert _uncached_pread(path) == FILES["f2.bin"]  # opened while `early` is: through us
        assert session.counters()["open_passthrough"] == 0
        assert early.read() == FILES["f2.bin"]
        early.close()  # its RELEASE reaches us a moment later (the kernel sends it async)
        deadline = time.monotonic() + 10
        while session.counters()["open_passthrough"] == 0:
            assert time.monotonic() < deadline
            _uncached_pread(path)
        before = session.counters()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # now through the backing file
            got = list(pool.map(lambda _: _uncached_pread(path), range(8)))
        assert got == [FILES["f2.bin"]] * 8
        c = session.counters()
        assert c["open_passthrough"] == before["open_passthrough"] + 8 and c["read"] == before["read"]
        assert c["backing_files"] == 1
        # mmap of a passed-through file
        import mmap
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:] == FILES["f2.bin"]
        with pytest.raises(OSError, match="no such regular file"):
            session.set_backing(1, 1, str(backing))  # the layer's root directory
        # overlayfs stacks on the passthrough mount (a container's rootfs)
        ovl = tmp_path / "ovl"
        for d in ("upper", "work", "merged"):
            (ovl / d).mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={mnt / 'L'},upperdir={ovl / 'upper'},workdir={ovl / 'work'}", str(ovl / "merged")],
                       check=True, capture_output=True)
        try:
            opened = session.counters()["open_passthrough"]
            assert _uncached_pread(ovl / "merged" / "f2.bin") == FILES["f2.bin"]
            assert session.counters()["open_passthrough"] == opened + 1
        finally:
            subprocess.run(["umount", str(ovl / "merged")], check=False)
    finally:
        session.close()
    assert not os.path.ismount(mnt)


def test_no_passthrough_unless_agreed(fs, tmp_path: Path) -> None:
    session, mnt, index, _ = fs
    assert not session.passthrough()
    backing = tmp_path / "b"
    backing.write_bytes(FILES["f2.bin"])
    with pytest.raises(OSError, match="did not agree"):
        session.set_backing(1, os.stat(mnt / "L" / "f2.bin").st_ino & 0xFFFFFFFF, str(backing))


def _uncached_pread(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, os.fstat(fd).st_size + 1, 0)
    finally:
        os.close(fd)
