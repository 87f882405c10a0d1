"""The state directory is private to root, as containerd's own snapshotters are.

``<root>`` holds image content in three forms: chunk files (``chunks/``), whole layer
blobs (``blobs/``) and, through the FUSE mount at ``<root>/mnt``, every file of every
lazily served layer. A pulled image is no more readable than containerd makes it
(``/var/lib/containerd`` and its overlayfs snapshotter are ``0700``), so a lazily served
one must not be either: ``<root>`` is ``0700`` and everything lazysnap writes under it is
created ``0700`` (directories) or ``0600`` (files), never widened afterwards.

Two exceptions are containerd's, not ours: ``snapshots/<id>/fs`` is a container's root
directory (``0755``, owned like its parent layer's root) and ``work`` is overlayfs's
(``0711``); both are reached only through the closed ``<root>``, as in containerd.

A root left by an older version (``0755`` directories, ``0644`` chunks) is tightened in
place at start, one log line, no chunk lost. A root that cannot be made private - another
owner, a read-only filesystem, a filesystem that ignores modes (vfat) - is refused with
one line naming the path: serving from it would show every local user the images.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from snapshotter.fsutil import DIR_MODE, FILE_MODE, private_dirs
from snapshotter.log import get_logger

__all__ = ["UMASK", "RootError", "secure_root"]

log = get_logger("lazysnap.service")

UMASK = 0o077  # the daemon's: whatever a library creates under <root> is private too
_CONTAINER_DIRS = frozenset({"fs", "work"})  # snapshots/<id>/{fs,work}: containerd's layout, left alone


class RootError(Exception):
    """``<root>`` cannot be made private to root."""


def secure_root(root: Path) -> None:
    """Create ``root`` private (``0700``), or make an existing one private."""
    try:
        private_dirs(root)
        st = os.stat(root)
    except OSError as exc:
        raise RootError(f"cannot create the state directory {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RootError(f"the state directory {root} is not a directory")
    if st.st_uid != os.geteuid():
        raise RootError(f"the state directory {root} is owned by uid {st.st_uid}, not {os.geteuid()}: "
                        "refusing to keep image content where another user controls it")
    if stat.S_IMODE(st.st_mode) & 0o077 == 0:
        return
    was = stat.S_IMODE(st.st_mode)
    try:
        os.chmod(root, DIR_MODE)
    except OSError as exc:
        raise RootError(f"cannot make the state directory {root} private (mode {was:04o}): {exc.strerror}") from None
    if stat.S_IMODE(os.stat(root).st_mode) & 0o077:
        raise RootError(f"the state directory {root} stays mode {stat.S_IMODE(os.stat(root).st_mode):04o} after "
                        "chmod 0700: its filesystem ignores permissions, so every local user could read the "
                        "images; use a directory on ext4, xfs or btrfs")
    files, dirs = _tighten_tree(root)
    log.info("root_tightened", root=str(root), was=f"{was:04o}", now=f"{DIR_MODE:04o}", dirs=dirs, files=files)


def _tighten_tree(root: Path) -> tuple[int, int]:
    """Make what an older version left under ``root`` private: directories ``0700``, files
    ``0600``; never descends into a mount (the FUSE mount of the lazy layers) or into a
    snapshot's ``fs``/``work`` (a container's files, whose modes are the image's)."""
    files = dirs = 0
    snapshots = root / "snapshots"
    for top, subdirs, names in os.walk(root):
        here = Path(top)
        keep = []
        for name in subdirs:
            path = here / name
            if os.path.ismount(path) or (here.parent == snapshots and name in _CONTAINER_DIRS):
                continue
            keep.append(name)
            dirs += _chmod(path, DIR_MODE)
        subdirs[:] = keep
        for name in names:
            files += _chmod(here / name, FILE_MODE)
    return files, dirs


def _chmod(path: Path, mode: int) -> int:
    """1 if ``path`` was readable by others and is now ``mode``; symlinks and sockets keep theirs."""
    try:
        st = os.lstat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or stat.S_IMODE(st.st_mode) & 0o077 == 0:
            return 0
        os.chmod(path, mode)
    except FileNotFoundError:
        return 0
    return 1
