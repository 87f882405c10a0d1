"""Backing files for FUSE passthrough: a file's verified bytes, whole, in one local file.

With passthrough (Linux >= 6.9, ``native/fuse/fastfs.c``) the kernel serves reads, splice
and mmap of an open file straight from a backing file, so after start-up a model's weights
and shared objects read at the disk's speed instead of crossing the FUSE server. What the
kernel then serves is never checked again, so a backing file holds exactly the file's bytes
from the layer: it is written only from chunks, each hashed while copied and compared with
the index's digest (a chunk file damaged or replaced after its first check is caught here,
and the file is not made). A file already on disk (a previous daemon made it) is hashed the
same way before it is used again.

Files are named by content (the SHA-256 of the size and the chunk digests), so a file that
several layers or images share is made once. They live in ``<root>/files/`` beside the
chunks (the same filesystem; it must stack on nothing for the kernel to accept them), are
made within ``store_limit_bytes``. Once the kernel has a file, its chunks are lodged in
it (``ChunkStore.lodge``): their own files are deleted and the store reads them from the
backing file, so a passed-through file is on disk once, and counted once against the
limit. When no registered layer uses a file any more it becomes cache (``ChunkStore.spare``),
evicted or pruned whole like a chunk; the kernel keeps the bytes of one still open.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshotter._fuse import NODE_PYDATA
from snapshotter.fs import metrics
from snapshotter.fs.compiled import HEADER, NODE
from snapshotter.fsutil import FILE_MODE, private_dirs
from snapshotter.log import get_logger
from snapshotter.store import ChunkStore
from snapshotter.store.lodging import SUFFIX, record_path

log = get_logger("lazysnap.fs")


@dataclass(slots=True, frozen=True)
class Candidate:
    """A regular file of a layer that could pass through once its chunks are all local."""

    local: int  # inode number inside the layer
    size: int
    first_chunk: int
    chunk_count: int


def candidates(blob: bytes, min_bytes: int) -> list[Candidate]:
    """The regular files of a compiled tree (``snapshotter.fs.compiled``) of at least
    ``min_bytes``, biggest first: the files worth a backing file. Sparse files are left
    out (their bytes are not their chunks back to back)."""
    nodes = HEADER.get(blob, 0, "n_nodes")
    out: list[Candidate] = []
    view = memoryview(blob)
    unpack = NODE.unpack_from
    size_, mode_, first_, count_, flags_ = (NODE.position(f) for f in
                                            ("size", "mode", "first_chunk", "chunk_count", "flags"))
    for local in range(1, nodes):
        node = unpack(view, HEADER.size + local * NODE.size)  # one unpack a node: blobs of 500k nodes
        if node[size_] < min_bytes or not stat.S_ISREG(node[mode_]):
            continue
        if node[flags_] & NODE_PYDATA or node[count_] == 0:
            continue
        out.append(Candidate(local, node[size_], node[first_], node[count_]))
    out.sort(key=lambda c: c.size, reverse=True)
    return out


class BackingFiles:
    """The backing files of one daemon; ``make`` runs in worker threads, the rest anywhere."""

    def __init__(self, store: ChunkStore) -> None:
        self.dir = store.files_dir
        self.tmp = self.dir / ".tmp"
        self.store = store
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}  # file name → registered layers using it
        self._sizes: dict[str, int] = {}
        self._total = 0
        private_dirs(self.tmp)

    def prepare(self) -> None:
        """At a daemon's start, before its first ``make`` (worker thread: it walks
        ``files/``): empty ``.tmp`` and delete files without a lodging record."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        private_dirs(self.tmp)
        self._delete_unrecorded()

    @staticmethod
    def name_of(size: int, digests: Sequence[bytes]) -> str:
        h = hashlib.sha256(size.to_bytes(8, "little"))
        for d in digests:
            h.update(d)
        return h.hexdigest()

    def path_of(self, name: str) -> Path:
        return self.dir / name[:2] / name[2:]

    @property
    def total_bytes(self) -> int:
        return self._total

    def room_for(self, size: int) -> bool:
        """Backing files fit in the store's limit (none: no bound here; the disk's free space
        is checked as the file is written): a file's chunks move into it, so making one
        needs room for that one file while it is copied, and then frees as much."""
        limit = self.store.limit
        return limit is None or self._total + size <= limit

    def make(self, size: int, digests: Sequence[bytes], chunk_size: int) -> Path | None:
        """The backing file of a file of ``size`` bytes made of the chunks ``digests`` (each
        ``chunk_size`` bytes but the last), or None if a chunk is not local or not what its
        digest says. Raises OSError (e.g. ENOSPC) when the file cannot be written. Worker thread."""
        name = self.name_of(size, digests)
        path = self.path_of(name)
        if self._usable(name, path, size, digests, chunk_size):
            self._claim(name, size)
            return path
        if not all(self.store.known(d) for d in digests):
            return None
        private_dirs(path.parent)
        fd, tmp = self._create()
        try:
            for k, digest in enumerate(digests):
                want = min(chunk_size, size - k * chunk_size)
                data = self.store.read(digest)
                if data is None:  # evicted since: made once it is back
                    os.unlink(tmp)
                    return None
                if len(data) != want or hashlib.sha256(data).digest() != digest:
                    log.error("backing_chunk_mismatch", chunk=digest.hex(), file=name,
                              action="not passed through")
                    os.unlink(tmp)
                    return None
                _write_all(fd, data, k * chunk_size)
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        os.chmod(tmp, 0o400)
        os.rename(tmp, path)
        metrics.BACKING_MADE.inc(size)
        self._claim(name, size)
        return path

    def release(self, names: Sequence[str]) -> None:
        """A layer using these files is gone: the ones no other layer uses become cache
        (deleted if their chunks were never lodged in them)."""
        gone: list[str] = []
        with self._lock:
            for name in names:
                users = self._users.get(name, 0) - 1
                if users > 0:
                    self._users[name] = users
                    continue
                self._users.pop(name, None)
                self._total -= self._sizes.pop(name, 0)
                gone.append(name)
            total = self._total
        metrics.BACKING_BYTES.set(total)
        for name in gone:
            if not self.store.spare(self.path_of(name)):
                self.path_of(name).unlink(missing_ok=True)

    # -- internals ----------------------------------------------------------------------------
    def _claim(self, name: str, size: int) -> None:
        with self._lock:
            self._users[name] = self._users.get(name, 0) + 1
            if name not in self._sizes:
                self._sizes[name] = size
                self._total += size
            total = self._total
        metrics.BACKING_BYTES.set(total)

    def _delete_unrecorded(self) -> None:
        """Files without a lodging record: made by a daemon that died before the kernel had
        them (or before it wrote the record). Nothing tracks them; the kernel keeps its own
        reference to one it has."""
        for sub in self.dir.iterdir():
            if sub.name.startswith(".") or not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(SUFFIX):
                    continue
                if f.name.startswith(".tmp-") or not Path(record_path(str(f))).exists():
                    f.unlink(missing_ok=True)

    def _usable(self, name: str, path: Path, size: int, digests: Sequence[bytes], chunk_size: int) -> bool:
        """``path`` exists and holds exactly these chunks (hashed again: it may be a previous
        daemon's, written before a crash)."""
        with self._lock:
            if self._users.get(name, 0) > 0:
                return True  # made and checked by us, in use
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size != size:
                ok = False
            else:
                ok = all(hashlib.sha256(os.pread(fd, chunk_size, k * chunk_size)).digest() == d
                         for k, d in enumerate(digests))
        finally:
            os.close(fd)
        if not ok:
            log.error("backing_file_damaged", path=str(path), action="made again")
            self.store.drop_lodging(path)
        return ok

    def _create(self) -> tuple[int, str]:
        while True:
            tmp = f"{self.tmp}/{os.urandom(8).hex()}"
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE), tmp
            except FileExistsError:
                continue


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write of a backing file")
        view = view[n:]
        offset += n
