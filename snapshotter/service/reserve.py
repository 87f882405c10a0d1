"""Space held back for the metadata database, so that a full disk cannot stop it changing.

The chunk store, containers' writable layers and the metadata database share the root's
filesystem. When chunks or a container fill it, SQLite cannot grow its write-ahead log and
every metadata write fails with "database or disk is full" - including the Remove that
would have freed the space (measured: a removed snapshot's 61 MB stayed until containerd's
garbage collector retried). So the daemon keeps a few MiB of real blocks in a reserve file
beside the database; a write that fails for lack of space gives them back and is run once
more, and the reserve is taken again when the filesystem has room.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from snapshotter.fsutil import FILE_MODE
from snapshotter.log import get_logger
from snapshotter.metrics import METADATA_RESERVE_RELEASES

log = get_logger("lazysnap.service")

RESERVE_BYTES = 8 << 20  # many times the WAL pages a Remove or Commit writes
REFILL_HEADROOM = 4  # retake the reserve only with this many times its size free


def is_disk_full(exc: BaseException | None) -> bool:
    """True if ``exc`` (or what caused it) is SQLite's or the kernel's "no space left"."""
    while exc is not None:
        if isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__
    return False


class SpaceReserve:
    """A file of ``RESERVE_BYTES`` allocated blocks at ``path``, released on demand."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size
        self.held = False
        self.released = False  # given back since it was last held

    def take(self) -> bool:
        """Hold the reserve; after a release, only once the filesystem has room for it
        several times over (so that taking it back does not make the disk full again at
        once). True if held."""
        if self.held:
            return True
        try:
            st = os.statvfs(self.path.parent)
            need = (REFILL_HEADROOM if self.released else 1) * self.size
            if st.f_bavail * st.f_frsize < need and not self.path.exists():
                return False
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks: a sparse file frees nothing
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("metadata_reserve_failed", path=str(self.path), error=exc.strerror or str(exc))
            try:  # a reserve only partly allocated would hold space without being counted on
                self.path.unlink()
            except OSError:
                pass
            return False
        self.held = True
        if self.released:
            self.released = False
            log.info("metadata_reserve_restored", path=str(self.path), bytes=self.size)
        return True

    def release(self) -> bool:
        """Give the reserve's blocks back to the filesystem; True if there was one to give."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            self.held = False
            return False
        self.held = False
        self.released = True
        METADATA_RESERVE_RELEASES.inc()
        st = os.statvfs(self.path.parent)
        log.warning("metadata_disk_full", path=str(self.path.parent), free_bytes=st.f_bavail * st.f_frsize,
                    released_bytes=self.size)
        return True
