"""Small filesystem helpers shared by every package that persists state.

Everything lazysnap keeps under its root holds image content (or describes it), so it is
created private to root from the first byte: directories ``DIR_MODE``, files
``FILE_MODE`` (``snapshotter.service.rootdir`` says why and keeps the root itself so).
"""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dirs(path: str | os.PathLike[str]) -> None:
    """``mkdir -p`` whose every new directory is ``DIR_MODE`` (``Path.mkdir(parents=True)``
    creates the parents with the default mode)."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


def create_private(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for writing (created ``FILE_MODE``, truncated)."""
    return open(path, "wb", opener=_private_opener)  # noqa: SIM115 - the caller owns it


def write_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file and rename in the same directory.

    A crash leaves either the old file or the new one, never half of either; with
    ``fsync`` the new content is on disk before the rename makes it visible.
    """
    path = Path(path)
    private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prepare_socket(address: str) -> None:
    """Parent dir 0700 if we create it; refuse a live socket; remove a stale one."""
    path = Path(address)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{address} exists and is not a socket")
        if listening(address):
            raise OSError(f"{address} is in use by another process")
        os.unlink(path)  # stale: nobody listens


def listening(address: str) -> bool:
    """True if a process accepts connections on the unix socket ``address``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()
