"""The state directory is private to root: created so, tightened in place, refused if it cannot be."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter import native
from snapshotter.fsutil import create_private, private_dirs, write_atomic
from snapshotter.service import rootdir
from snapshotter.service.rootdir import RootError, secure_root
from snapshotter.service.store import MetaStore
from snapshotter.store import ChunkStore

REPO = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _old_style_root(root: Path) -> dict[Path, bytes]:
    """What an older version left: 0755 directories, 0644 files, plus a snapshot's own tree."""
    files = {
        root / "chunks" / "ab" / "cdef": b"chunk bytes",
        root / "blobs" / "sha256-00": b"a whole layer",
        root / "indexes" / "sha256-00.idx": b"an index",
        root / "metadata.db": b"sqlite",
        root / "snapshots" / "7" / "fs" / "etc" / "passwd": b"root:x:0:0\n",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        d.chmod(0o755)
    (root / "snapshots" / "7" / "work").mkdir(mode=0o711)
    (root / "snapshots" / "7" / "work").chmod(0o711)
    os.symlink("/etc/hostname", root / "blobs" / "link")
    return files


def test_new_root_is_private_parents_included(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "root"
    secure_root(root)
    assert _mode(root) == 0o700
    assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b") == 0o700


def test_old_root_is_tightened_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazysnap.service")
    root = tmp_path / "root"
    files = _old_style_root(root)
    secure_root(root)
    assert _mode(root) == 0o700
    for path, data in files.items():
        assert path.read_bytes() == data  # nothing lost
    for rel in ["chunks", "chunks/ab", "blobs", "indexes", "snapshots", "snapshots/7"]:
        assert _mode(root / rel) == 0o700, rel
    for rel in ["chunks/ab/cdef", "blobs/sha256-00", "indexes/sha256-00.idx", "metadata.db"]:
        assert _mode(root / rel) == 0o600, rel
    # a container's root directory and overlayfs's work keep containerd's modes, and the
    # container's own files the image's
    assert _mode(root / "snapshots/7/fs") == 0o755
    assert _mode(root / "snapshots/7/fs/etc/passwd") == 0o644
    assert _mode(root / "snapshots/7/work") == 0o711
    assert os.path.islink(root / "blobs" / "link")
    assert "root_tightened" in caplog.text
    caplog.clear()
    secure_root(root)  # already private: no walk, no log line
    assert "root_tightened" not in caplog.text


@pytest.mark.root
def test_tightening_does_not_enter_a_mount(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "mnt").mkdir(parents=True)
    root.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "lzs-test", str(root / "mnt")], check=True)
    try:
        (root / "mnt" / "f").write_bytes(b"x")
        (root / "mnt" / "f").chmod(0o644)
        secure_root(root)
        assert _mode(root) == 0o700
        assert _mode(root / "mnt" / "f") == 0o644
    finally:
        subprocess.run(["umount", "-l", str(root / "mnt")], check=False)


@pytest.mark.root
def test_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    os.chown(root, 65534, 65534)
    with pytest.raises(RootError, match=r"owned by uid 65534"):
        secure_root(root)
    assert _mode(root) == 0o755  # left as it was


@pytest.mark.root
def test_read_only_root_is_refused(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lzs-test", str(mnt)], check=True)
    try:
        (mnt / "root").mkdir(mode=0o755)
        (mnt / "root").chmod(0o755)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(RootError, match=r"cannot make the state directory .*root private \(mode 0755\)"):
            secure_root(mnt / "root")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_filesystem_that_ignores_modes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vfat mounted with umask=022 accepts chmod and keeps 0755 (this kernel has no vfat
    to mount, so the filesystem's answer is faked at the one syscall that differs)."""
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    monkeypatch.setattr(rootdir.os, "chmod", lambda *a, **k: None)
    with pytest.raises(RootError, match=r"stays mode 0755 .*ignores permissions"):
        secure_root(root)


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(RootError, match="cannot create the state directory|not a directory"):
        secure_root(tmp_path / "f")


def test_serve_refuses_a_bad_root_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "snapshotter", "serve", "--root", str(tmp_path / "f" / "root"),
                           "--address", str(tmp_path / "s.sock")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if "level=" not in ln]
    assert len(errors) == 1 and "state directory" in errors[0], done.stderr


def test_everything_written_under_the_root_is_private(tmp_path: Path) -> None:
    """Each writer creates 0700 directories and 0600 files whatever the umask (the C chunk
    writer, write_atomic, blob downloads, the metadata database and its WAL)."""
    old = os.umask(0o022)
    try:
        root = tmp_path / "root"
        store = ChunkStore(root)
        data = b"some chunk content"
        digest = native.sha256(data)
        store.put_many([(digest, data)])
        chunk = Path(store.path_of(digest))
        assert _mode(chunk) == 0o600 and _mode(chunk.parent) == 0o700
        assert _mode(root / "chunks") == 0o700 and _mode(store.tmp_dir) == 0o700
        write_atomic(root / "indexes" / "x.idx", b"idx")
        assert _mode(root / "indexes") == 0o700 and _mode(root / "indexes" / "x.idx") == 0o600
        private_dirs(root / "blobs" / "deep")
        with create_private(root / "blobs" / "deep" / "part") as f:
            f.write(b"blob")
        assert _mode(root / "blobs") == 0o700 and _mode(root / "blobs" / "deep" / "part") == 0o600
        db = MetaStore(root / "meta" / "metadata.db")
        try:
            db._conn.execute("CREATE TABLE t (x)")
            db._conn.execute("INSERT INTO t VALUES (1)")
            for p in (root / "meta").iterdir():
                assert _mode(p) == 0o600, p
        finally:
            db.close()
        assert _mode(root / "meta") == 0o700
    finally:
        os.umask(old)
