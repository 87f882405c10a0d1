"""Node-wide content-addressed chunk store: ``<root>/chunks/ab/cdef…`` keyed by SHA-256.

Why this shape:
- Content addressing makes dedup free: a chunk shared by two layers or two images is one
  file, written once (``put`` of a present chunk only counts a dedup hit).
- A chunk file holds exactly the chunk's bytes, so the read path is one ``os.pread`` on a
  cached fd and the kernel page cache does the rest.
- Writes go to ``<root>/chunks/.tmp`` and are renamed into place, so a reader never sees a half
  chunk under its final name. Integrity on read: the SHA-256 of a chunk file is checked
  the first time this process reads it (then it is trusted for the process lifetime).
  That one check (≈0.7 ms per MiB in OpenSSL, GIL released) covers everything a sidecar
  xxh3 would, plus torn files after a crash, disk corruption and tampering, without a
  second file per chunk; chunks written by this process are verified before the write.
  Because of it the default fsync policy is "none": a crash can only leave a file that
  fails its first check and is refetched.
- Size limit with LRU eviction (in-memory access order) of chunks no layer has pinned.
- A chunk may instead be *lodged* in a file that holds it among others, back to back (a
  FUSE backing file, ``snapshotter.fs.backing``, holds a whole file's chunks; a record
  beside it says which, ``snapshotter.store.lodging``): its own file is then deleted, so
  a file passed through to the kernel is on disk once. Lodged chunks are read from there,
  checked like chunk files on their first read, and leave with that file. A lodging file
  a registered layer uses is *held* (counted against the limit, never evicted); otherwise
  it is one entry of the LRU, evicted or pruned whole like a chunk.
- A *layer file* (``<root>/files/layers/<digest>``) is a lodging file too: the chunks the
  one streaming pass over an unindexed layer cut, written by the scan at their offsets in
  the layer's tar (``layer_file_target``, ``adopt_layer_file``): one sequential writer and
  no directory entry per chunk, and the C filesystem reads a layer's chunks from it
  directly (``layer_file_offsets``). It stays while the layer's pins keep its chunks, then
  is cache like the rest.
"""
from __future__ import annotations

import array
import collections
import errno
import hashlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from snapshotter import native
from snapshotter.fsutil import private_dirs
from snapshotter.store import metrics
from snapshotter.store.lodging import (
    FILES_DIR,
    LodgingRecord,
    delete_record,
    read_record,
    record_path,
    recorded_files,
    write_record,
)
from snapshotter.log import get_logger

log = get_logger("lazysnap.store")

FsyncPolicy = Literal["none", "file", "full"]
_FSYNC_CODES = {"none": 0, "file": 1, "full": 2}
_FD_CACHE = 512
_NOT_IN_FILE = (1 << 64) - 1  # native/fuse/fastfs.h LZFS_NOT_IN_FILE
_counter = itertools.count()


class ChunkCorrupt(Exception):
    """Data offered to the store does not hash to the digest it is stored under."""


@dataclass(slots=True)
class StoreStats:
    chunks: int
    bytes: int
    limit: int | None
    pinned_layers: int
    dedup_hits: int
    evictions: int
    corrupt: int


@dataclass(slots=True, frozen=True)
class StoreUsage:
    """What the store holds and why: pinned chunks belong to a layer some snapshot uses
    (registered in this daemon), or are lodged in the backing file of one of its files; the
    rest is cache that eviction or ``prune`` may reclaim."""

    chunks: int
    bytes: int
    pinned_chunks: int
    pinned_bytes: int
    evictable_chunks: int
    evictable_bytes: int
    pinned_layers: int
    limit: int | None


@dataclass(slots=True, frozen=True)
class PruneResult:
    """Chunks no layer pins: deleted when ``applied``, else what a prune would delete."""

    chunks: int
    bytes: int
    applied: bool
    kept_chunks: int
    kept_bytes: int


@dataclass(slots=True, frozen=True)
class _Lodging:
    """Where a lodged chunk is: in ``path`` at ``offset``, ``size`` bytes."""

    path: str
    offset: int
    size: int


@dataclass(slots=True)
class _LodgingFile:
    digests: list[bytes]  # the chunks lodged in it (a chunk lodged elsewhere first stays there)
    size: int
    held: bool  # a registered layer uses it: not in the LRU


@dataclass(slots=True)
class PendingLayerFile:
    """A layer file being written by a scan (``ChunkStore.layer_file_target``): adopt it
    with ``adopt_layer_file`` once the scan is finished, else ``discard_layer_file``."""

    layer: str
    path: str  # where it goes once adopted
    tmp: str
    fd: int
    target: native.LayerFileTarget


@dataclass(slots=True, frozen=True)
class LocalShare:
    """How much of a set of chunks (one layer's) is in the store: by chunk count, by bytes
    (each occurrence counted, so a layer reaches exactly 100 %), and verified by this process."""

    chunks: int
    bytes: int
    verified: int


class ChunkStore:
    """Thread-safe; shared by every layer of the daemon (and safe across processes)."""

    def __init__(self, root: Path | str, *, limit_bytes: int | None = None,
                 fsync: FsyncPolicy = "none") -> None:
        if fsync not in ("none", "file", "full"):
            raise ValueError(f"fsync policy must be none|file|full, not {fsync!r}")
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.chunks_dir / ".tmp"  # same filesystem: rename is atomic
        self._chunks_s = str(self.chunks_dir)
        self._tmp_s = str(self.tmp_dir)
        self.limit = limit_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self.full = False  # the last chunk write failed for lack of space (see _note_write)
        # LRU entries: a chunk file by its digest, a lodging file no layer holds by its path
        self._lru: collections.OrderedDict[bytes | str, int] = collections.OrderedDict()
        self._total = 0
        self._held = 0  # bytes of held lodging files: count against the limit, never evicted
        self._verified: set[bytes] = set()
        # open fds: a chunk file's by its digest, a lodging file's by its path
        self._fds: collections.OrderedDict[bytes | str, int] = collections.OrderedDict()
        self.files_dir = self.root / FILES_DIR
        self._lodged: dict[bytes, _Lodging] = {}
        self._lodgings: dict[str, _LodgingFile] = {}
        self._fresh_layer_files: dict[str, str] = {}  # layer → the layer file this process wrote
        self._reading = 0  # readers holding a cached fd right now
        self._to_close: list[int] = []
        self._pins: dict[str, frozenset[bytes]] = {}
        self._pin_count: collections.Counter[bytes] = collections.Counter()
        self._staged: dict[bytes, bytes] = {}  # verified bytes on their way to disk (see stage)
        # mirrors of _verified (the C filesystem serves only verified chunks), under _lock
        self._watchers: list[tuple[Callable[[bytes], None], Callable[[bytes], None]]] = []
        self.dedup_hits = 0
        self.evictions = 0
        self.corrupt = 0
        private_dirs(self.tmp_dir)
        self._clean_tmp()
        self._scan()

    # -- layout ---------------------------------------------------------------------------
    def _spath(self, digest: bytes) -> str:
        """``path_of`` as a str: the write/open hot path runs per chunk (26k chunk files in one
        cold start of the inference image), and pathlib costs several µs per join."""
        h = digest.hex()
        return f"{self._chunks_s}/{h[:2]}/{h[2:]}"

    def path_of(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.chunks_dir / h[:2] / h[2:]

    def _scan(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for sub in os.scandir(self.chunks_dir):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in os.scandir(sub.path):
                try:
                    digest = bytes.fromhex(sub.name + f.name)
                    st = f.stat()
                except (ValueError, OSError):
                    continue
                if len(digest) == 32:
                    found.append((st.st_mtime, digest, st.st_size))
        found.sort()
        for _, digest, size in found:
            self._lru[digest] = size
            self._total += size
        doubled: list[bytes | str] = []
        for path, _ in sorted(recorded_files(str(self.files_dir)), key=lambda t: t[1]):
            record = read_record(path)
            if record is not None:  # unchecked: each chunk is hashed on its first read
                doubled += self._lodge_locked(path, record, verified=False, held=False)
        self._unlink(doubled)  # a crash between a record and its chunks' deletion
        metrics.STORED_BYTES.set(self._total)
        log.info("store_open", root=self.root, chunks=len(self._lru), bytes=self._total, limit=self.limit,
                 lodging_files=len(self._lodgings), fsync=self.fsync)

    def _clean_tmp(self) -> None:
        """Drop temp files of dead writers (a crash mid-write leaves them here, never in chunks/)."""
        for f in os.scandir(self.tmp_dir):
            try:
                pid = int(f.name.split(".")[1])
            except (IndexError, ValueError):
                pid = -1
            if pid > 0 and pid != os.getpid() and _alive(pid):
                continue
            try:
                os.unlink(f.path)
            except FileNotFoundError:
                pass

    # -- queries --------------------------------------------------------------------------
    def has(self, digest: bytes) -> bool:
        with self._lock:
            if digest in self._lru or digest in self._staged or digest in self._lodged:
                return True
        return self._on_disk(digest)

    def known(self, digest: bytes) -> bool:
        """``has`` without asking the disk about chunks another process may have written:
        for hot filters where a false "no" only costs a redundant decode (a dedup hit),
        while a stat per absent chunk on the FUSE loop cost more than the decode saved."""
        with self._lock:
            return digest in self._lru or digest in self._staged or digest in self._lodged

    def _on_disk(self, digest: bytes) -> bool:
        # another process may have written it
        try:
            size = os.stat(self._spath(digest)).st_size
        except FileNotFoundError:
            return False
        self._adopt(digest, size)
        return True

    def _adopt(self, digest: bytes, size: int) -> None:
        with self._lock:
            if self._count_locked(digest, size):
                metrics.STORED_BYTES.set(self._total)

    def _count_locked(self, digest: bytes, size: int) -> bool:
        """Count a chunk file in the store's size and LRU; True if it was not counted yet."""
        if digest in self._lru:
            return False
        self._lru[digest] = size
        self._total += size
        return True

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._lru), self._total, self.limit, len(self._pins),
                              self.dedup_hits, self.evictions, self.corrupt)

    # -- write ----------------------------------------------------------------------------
    def put(self, digest: bytes, data: bytes | memoryview, *, verified: bool = False) -> bool:
        """Store ``data`` under ``digest``. Returns False (a dedup hit) if already present.

        ``verified=True`` skips re-hashing when the caller has just checked the SHA-256
        (the index reader's ``decode_span`` does).
        """
        if not verified and hashlib.sha256(data).digest() != digest:
            raise ChunkCorrupt(f"chunk data does not match sha256:{digest.hex()}")
        return self.put_many([(digest, data)]) == 1

    def put_many(self, items: list[tuple[bytes, bytes | memoryview]]) -> int:
        """Store chunks whose SHA-256 the caller has just checked; returns how many were new.

        The one write path of the store (``put`` is a batch of one): each file is written to
        ``.tmp`` and renamed into place by one C call with the GIL released (a decoded span
        of small files holds hundreds of chunks; five syscalls each, each re-taking the GIL,
        cost more than the decode on a busy daemon). Raises OSError for the first chunk
        that could not be written, after recording the others."""
        with self._lock:
            todo = [(d, b) for d, b in items if d not in self._lru and d not in self._lodged]
            present = len(items) - len(todo)
            self.dedup_hits += present
        if todo:
            tag = f"{os.getpid()}.{threading.get_ident()}.{next(_counter)}"
            status = native.write_chunks(self._chunks_s, self._tmp_s, tag, todo, _FSYNC_CODES[self.fsync])
        else:
            status = []
        new = 0
        failed: OSError | None = None
        with self._lock:
            for (digest, data), st in zip(todo, status):
                if st < 0:
                    failed = failed or OSError(-st, f"cannot store chunk {digest.hex()}: {os.strerror(-st)}")
                    continue
                self._count_locked(digest, len(data))
                if st == 1:  # our verified bytes are in place: new, even if a reader that
                    # found the file after its rename registered it first
                    self._mark_verified(digest)
                    new += 1
                else:  # st == 0: a file from before (another process, an earlier run): like
                    # put, it is checked on its first read, not trusted now
                    present += 1
                    self.dedup_hits += 1
            metrics.STORED_BYTES.set(self._total)
        if present:
            metrics.DEDUP_HITS.inc(present)
        if new:
            self._evict_if_needed()
        if todo:
            self._note_write(failed)
        if failed is not None:
            raise failed
        return new

    def layer_file_target(self, layer: str, min_file: int = 0) -> PendingLayerFile | None:
        """A layer file for the scan of ``layer`` to write the chunks it cuts of files of at
        least ``min_file`` bytes into, with the room left under the limit as its budget;
        None when there is no room. Raises OSError when it cannot be created."""
        with self._lock:
            room = (1 << 62) if self.limit is None else self.limit - self._total - self._held
        if room <= 0:
            return None
        private_dirs(self.files_dir / "layers")
        name = layer.removeprefix("sha256:")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad layer digest {layer!r}")
        tmp = f"{self._tmp_s}/layer-{name[:24]}.{os.getpid()}.{next(_counter)}"  # _clean_tmp's pattern
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        return PendingLayerFile(layer, str(self.files_dir / "layers" / name), tmp, fd,
                                native.LayerFileTarget(fd, room, min_file))

    def discard_layer_file(self, pending: PendingLayerFile) -> None:
        """A layer file whose scan did not finish: deleted."""
        if pending.fd >= 0:
            os.close(pending.fd)
            pending.fd = -1
        try:
            os.unlink(pending.tmp)
        except FileNotFoundError:
            pass

    def adopt_layer_file(self, pending: PendingLayerFile, stored: bytes, errno_: int) -> int:
        """Take in the layer file a finished scan wrote (``ScanResult.stored``: where each
        chunk is), verified, since the scan hashed the very bytes it wrote; its chunks' own
        files become redundant. Replaces an earlier layer file of the layer. Returns how
        many chunks it holds: 0 when the file cannot be kept (then deleted, and said)."""
        try:
            extents: dict[bytes, tuple[bytes, int, int]] = {}
            for offset, length, digest in native.iter_chunk_records(stored):
                extents.setdefault(digest, (digest, offset, length))
            if not extents:
                self.discard_layer_file(pending)
                self._note_stop(0, errno_, pending.path)
                return 0
            if self.fsync != "none":
                os.fsync(pending.fd)
            size = os.fstat(pending.fd).st_size
            record = LodgingRecord.at(size, extents.values())
            self.drop_lodging(pending.path)  # a layer streamed again: the new file replaces the old
            os.replace(pending.tmp, pending.path)
            write_record(pending.path, record)
        except OSError as exc:
            self.discard_layer_file(pending)
            if not os.path.exists(record_path(pending.path)):
                self._unlink([pending.path])  # moved in, then its record could not be written
            self._note_write(exc)
            log.warning("layer_file_dropped", layer=pending.layer, error=str(exc),
                        note="the layer's chunks are fetched when read")
            return 0
        except BaseException:
            self.discard_layer_file(pending)
            raise
        os.close(pending.fd)
        pending.fd = -1
        with self._lock:
            victims = self._lodge_locked(pending.path, record, verified=True, held=False)
            self._fresh_layer_files[pending.layer] = pending.path
            metrics.STORED_BYTES.set(self._total)
        self._unlink(victims)
        self._note_stop(len(extents), errno_, pending.path)
        return len(extents)

    def layer_file_offsets(self, layer: str, digests: Sequence[bytes]) -> tuple[str, bytes] | None:
        """Where the C filesystem finds ``layer``'s chunks (``digests``, in the layer's order)
        in the layer file this process wrote for it: its path and one u64 per chunk (native
        order; 2**64-1 for a chunk not in it); None without one. A layer file from an
        earlier process is read through the store, each chunk checked on first read."""
        with self._lock:
            path = self._fresh_layer_files.get(layer)
            if path is None or path not in self._lodgings:
                return None
        record = read_record(path)
        if record is None:
            return None
        where = {d: offset for d, offset, _ in record.extents}
        return path, array.array("Q", (where.get(d, _NOT_IN_FILE) for d in digests)).tobytes()

    def _note_stop(self, stored: int, errno_: int, path: str) -> None:
        """Why a scan stopped storing what it cut (its ``store_errno``), if it did."""
        if errno_ == errno.EDQUOT:
            log.info("scan_store_stopped", reason="store_limit", stored_chunks=stored, limit_bytes=self.limit or 0,
                     note="the rest of the layer's chunks are fetched when read")
        elif errno_:
            self._note_write(OSError(errno_, os.strerror(errno_)))
            log.warning("scan_store_stopped", reason=errno.errorcode.get(errno_, str(errno_)), stored_chunks=stored,
                        path=path, note="the rest of the layer's chunks are fetched when read")

    def _note_write(self, failed: OSError | None) -> None:
        """A full disk is one episode: one error line (path, free space, the limit) when the
        first write fails for lack of space, one line when writes succeed again; the span
        fetches that fail in between say nothing more (``full`` tells readers why)."""
        if failed is not None and failed.errno in (errno.ENOSPC, errno.EDQUOT):
            metrics.WRITE_ERRORS.labels(errno.errorcode[failed.errno]).inc()
            with self._lock:
                if self.full:
                    return
                self.full = True
            log.error("store_full", path=self._chunks_s, free_bytes=_free_bytes(self._chunks_s),
                      stored_bytes=self._total, limit_bytes=self.limit or 0, error=os.strerror(failed.errno),
                      note="chunks are served from memory while they are read, then fetched again; free "
                           "space or lower [lazy] store_limit_bytes")
        elif failed is None and self.full:
            with self._lock:
                was, self.full = self.full, False
            if was:
                log.info("store_writable", path=self._chunks_s, free_bytes=_free_bytes(self._chunks_s))

    # -- write-behind -----------------------------------------------------------------------
    def stage(self, chunks: dict[bytes, bytes]) -> None:
        """Serve verified chunks from memory until ``put`` has written them (then ``unstage``).

        Why: a reader blocked on a miss needs one chunk, but the span it arrived in may hold
        hundreds; writing them all (open/write/rename each) before answering added ~35 ms
        per miss on the inference image. Callers stage only bytes whose SHA-256 they checked.
        """
        with self._lock:
            self._staged.update(chunks)

    def unstage(self, digests: Iterable[bytes]) -> None:
        with self._lock:
            for d in digests:
                self._staged.pop(d, None)

    def _staged_slice(self, digest: bytes, offset: int, length: int | None) -> bytes | None:
        with self._lock:
            data = self._staged.get(digest)
        if data is None:
            return None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    # -- read -----------------------------------------------------------------------------
    def _fd(self, digest: bytes) -> tuple[int, int, int] | None:
        """Where to read the chunk: a cached fd, the chunk's offset in it and its size. The
        fd is counted as in use until ``_done`` (see ``_retire``)."""
        with self._lock:
            lodging = self._lodged.get(digest)
            fd = self._fds.get(digest) if lodging is None else None
            if fd is not None:
                self._fds.move_to_end(digest)
                size = self._lru.get(digest)
                if size is not None:
                    self._lru.move_to_end(digest)
                self._reading += 1
        if lodging is not None:
            return self._lodged_fd(digest, lodging)
        if fd is not None:
            return fd, 0, os.fstat(fd).st_size if size is None else size
        try:
            fd = os.open(self._spath(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                if digest in self._lru:
                    self._total -= self._lru.pop(digest)
                # gone (removed behind our back): no longer verified on disk, so a refetch
                # marks it again and the watchers (the C filesystem) learn it back
                self._unmark_verified(digest)
            return None
        if digest not in self._verified and not self._verify_fd(digest, fd):
            os.close(fd)
            return None
        fstat_size = os.fstat(fd).st_size
        with self._lock:
            self._reading += 1
            old = self._fds.get(digest)
            if old is not None:  # raced with another reader; ours was never shared
                os.close(fd)
                return old, 0, self._lru.get(digest, fstat_size)
            self._fds[digest] = fd
            if digest not in self._lru:
                self._lru[digest] = fstat_size
                self._total += fstat_size
            self._lru.move_to_end(digest)
            size = self._lru[digest]
            self._trim_fds()
        return fd, 0, size

    def _trim_fds(self) -> None:
        while len(self._fds) > _FD_CACHE:
            _, victim = self._fds.popitem(last=False)
            self._retire(victim)

    def _lodged_fd(self, digest: bytes, lodging: _Lodging) -> tuple[int, int, int] | None:
        """``_fd`` for a lodged chunk: its lodging file's fd, the chunk checked on first use."""
        with self._lock:
            fd = self._fds.get(lodging.path)
            if fd is not None:
                self._fds.move_to_end(lodging.path)
                self._reading += 1
        if fd is None:
            try:
                opened = os.open(lodging.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                self.drop_lodging(lodging.path)  # removed behind our back
                return None
            with self._lock:
                fd = self._fds.get(lodging.path)
                if fd is None:
                    self._fds[lodging.path] = fd = opened
                    opened = -1
                    self._trim_fds()
                self._reading += 1
            if opened >= 0:  # raced with another reader; ours was never shared
                os.close(opened)
        if digest not in self._verified and not self._verify_lodged(digest, fd, lodging):
            self._done()
            return None
        return fd, lodging.offset, lodging.size

    def _verify_lodged(self, digest: bytes, fd: int, lodging: _Lodging) -> bool:
        data = os.pread(fd, lodging.size, lodging.offset)
        if len(data) == lodging.size and hashlib.sha256(data).digest() == digest:
            with self._lock:
                if self._lodged.get(digest) is lodging:
                    self._mark_verified(digest)
            return True
        log.error("chunk_corrupt", digest=digest.hex(), path=lodging.path, offset=lodging.offset,
                  action="drop_and_refetch")
        metrics.CORRUPT.inc()
        with self._lock:
            self.corrupt += 1
            if self._lodged.get(digest) is lodging:
                self._unmark_verified(digest)
                del self._lodged[digest]
        return False

    def _retire(self, fd: int) -> None:
        """Close a cached fd once no reader is between ``_fd`` and ``_done`` (lock held).

        Closing it under a reader's pread could let the number be reused by another open
        and the reader get bytes of a different file: the one thing this store must never do.
        """
        self._to_close.append(fd)
        if self._reading == 0:
            for f in self._to_close:
                os.close(f)
            self._to_close.clear()

    def _done(self) -> None:
        with self._lock:
            self._reading -= 1
            if self._reading == 0 and self._to_close:
                for f in self._to_close:
                    os.close(f)
                self._to_close.clear()

    def _verify_fd(self, digest: bytes, fd: int) -> bool:
        h = hashlib.sha256()
        off = 0
        while True:
            block = os.pread(fd, 1 << 20, off)
            if not block:
                break
            h.update(block)
            off += len(block)
        if h.digest() == digest:
            with self._lock:
                self._mark_verified(digest)
            return True
        log.error("chunk_corrupt", digest=digest.hex(), path=self.path_of(digest), action="drop_and_refetch")
        metrics.CORRUPT.inc()
        with self._lock:
            self.corrupt += 1
        self._drop(digest)
        return False

    def read(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes of a chunk (or a slice), or None on a miss (absent or failed verification)."""
        if self._staged:
            staged = self._staged_slice(digest, offset, length)
            if staged is not None:
                metrics.CACHE_HITS.inc()
                return staged
        loc = self._fd(digest)
        if loc is None:
            metrics.CACHE_MISSES.inc()
            return None
        metrics.CACHE_HITS.inc()
        fd, base, size = loc
        try:
            left = max(0, size - offset)
            return os.pread(fd, left if length is None else min(length, left), base + offset)
        finally:
            self._done()

    def read_cached(self, digest: bytes, offset: int, length: int) -> bytes | None | bool:
        """Like ``read`` but never waits for the disk: the bytes if they are all in the page
        cache, None on a miss, False if the read would block (call ``read`` in a thread).

        Keeps page-cache hits inline on the FUSE loop while cold chunk reads run in worker
        threads, so several of them (kernel readahead) proceed in parallel.
        """
        base = 0
        with self._lock:
            fd = self._fds.get(digest)
            if fd is None:
                data = self._staged.get(digest)
                if data is not None:
                    metrics.CACHE_HITS.inc()
                    return data[offset:offset + length]
                if digest not in self._verified:
                    return False  # first use: open + verify reads the whole chunk from disk
            else:
                self._reading += 1
                self._fds.move_to_end(digest)
        if fd is None:
            # hashed already (written by this process): opening costs no read, so do it
            # here; a worker-thread hop per freshly fetched chunk was ~1 ms on a busy node
            loc = self._fd(digest)
            if loc is None:
                return False  # gone (evicted): the plain path reports the miss
            fd, base, size = loc
            length = max(0, min(length, size - offset))
        try:
            buf = bytearray(length)
            try:
                n = os.preadv(fd, [buf], base + offset, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    return False
                raise
            if n != length:
                return False  # partly cached or short: the plain path decides
            metrics.CACHE_HITS.inc()
            return bytes(buf)
        finally:
            self._done()

    def hint(self, digest: bytes) -> None:
        """Start kernel readahead of a chunk file that is about to be read (no verification,
        no blocking): sequential readers then find the next chunk in the page cache."""
        lodging = self._lodged.get(digest)
        path, offset, size = (self._spath(digest), 0, 0) if lodging is None else (
            lodging.path, lodging.offset, lodging.size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def readinto(self, digest: bytes, buf: memoryview, offset: int = 0) -> int | None:
        """Fill ``buf`` from the chunk at ``offset``; returns the byte count or None on a miss."""
        if self._staged:
            staged = self._staged_slice(digest, offset, len(buf))
            if staged is not None:
                buf[:len(staged)] = staged
                metrics.CACHE_HITS.inc()
                return len(staged)
        loc = self._fd(digest)
        if loc is None:
            metrics.CACHE_MISSES.inc()
            return None
        metrics.CACHE_HITS.inc()
        fd, base, size = loc
        try:
            return os.preadv(fd, [buf[:max(0, size - offset)]], base + offset)
        finally:
            self._done()

    # -- lodging ----------------------------------------------------------------------------
    def lodge(self, path: Path | str, size: int, digests: Sequence[bytes], chunk_size: int, *,
              verified: bool) -> None:
        """The chunks of a file of ``size`` bytes are in ``path`` back to back (each
        ``chunk_size`` bytes but the last), which a registered layer uses (held): read them
        from there and delete their own files. ``verified``: the caller has just hashed each
        of them in ``path``; otherwise each is checked on its first read. Lodging a file
        lodged already holds it again. Raises OSError if the record cannot be written."""
        key = str(path)
        record = LodgingRecord.of(size, chunk_size, digests)
        if self._relodge(key, verified):
            return
        if os.stat(key, follow_symlinks=False).st_size != size:
            raise OSError(errno.EINVAL, f"{key} is not a file of {size} bytes")
        write_record(key, record)
        with self._lock:
            victims = [] if key in self._lodgings else self._lodge_locked(key, record, verified, held=True)
            metrics.STORED_BYTES.set(self._total)
        self._relodge(key, verified)
        self._unlink(victims)

    def _relodge(self, key: str, verified: bool) -> bool:
        with self._lock:
            entry = self._lodgings.get(key)
            if entry is None:
                return False
            if verified:
                for d in entry.digests:
                    self._mark_verified(d)
            self._hold_locked(key, entry)
            return True

    def _lodge_locked(self, key: str, record: LodgingRecord, verified: bool, held: bool) -> list[bytes | str]:
        """Register a lodging file; returns the chunk files it makes redundant."""
        victims: list[bytes | str] = []
        mine: list[bytes] = []
        for digest, offset, size in record.extents:
            if digest in self._lodged:
                continue
            if digest in self._verified:  # its chunk file goes: C stops reading it by path
                self._mirror_dropped(digest)
            self._lodged[digest] = _Lodging(key, offset, size)
            mine.append(digest)
            if self._forget_file_locked(digest):
                victims.append(digest)
            if verified:
                self._verified.add(digest)
            else:
                self._verified.discard(digest)
        self._lodgings[key] = _LodgingFile(mine, record.size, held)
        if held:
            self._held += record.size
        else:
            self._lru[key] = record.size
            self._total += record.size
        return victims

    def _hold_locked(self, key: str, entry: _LodgingFile) -> None:
        if not entry.held:
            self._total -= self._lru.pop(key, 0)
            entry.held = True
            self._held += entry.size

    def spare(self, path: Path | str) -> bool:
        """No registered layer uses the lodging file any more: it is cache, the LRU's most
        recent entry. False if it is not a lodging file."""
        key = str(path)
        with self._lock:
            entry = self._lodgings.get(key)
            if entry is None:
                return False
            if entry.held:
                entry.held = False
                self._held -= entry.size
                self._lru[key] = entry.size
                self._total += entry.size
                metrics.STORED_BYTES.set(self._total)
        self._evict_if_needed()
        return True

    def drop_lodging(self, path: Path | str) -> None:
        """Delete a lodging file, its record and its chunks from the store (found damaged)."""
        key = str(path)
        with self._lock:
            entry = self._unlodge_locked(key)
            if entry is not None and entry.held:
                self._held -= entry.size
            elif key in self._lru:
                self._total -= self._lru.pop(key)
        self._unlink([key])

    def _unlodge_locked(self, key: str) -> _LodgingFile | None:
        """Take a lodging file's chunks out of the store (no accounting, no file deleted)."""
        entry = self._lodgings.pop(key, None)
        for digest in entry.digests if entry is not None else ():
            lodged = self._lodged.get(digest)
            if lodged is not None and lodged.path == key:
                self._unmark_verified(digest)
                del self._lodged[digest]
        fd = self._fds.pop(key, None)
        if fd is not None:
            self._retire(fd)
        return entry

    @property
    def held_bytes(self) -> int:
        return self._held

    def _entry_pinned(self, key: bytes | str) -> bool:
        counts = self._pin_count
        if isinstance(key, str):
            entry = self._lodgings.get(key)
            return entry is not None and any(d in counts for d in entry.digests)
        return key in counts

    def _entry_chunks(self, key: bytes | str) -> int:
        if isinstance(key, str):
            entry = self._lodgings.get(key)
            return len(entry.digests) if entry is not None else 0
        return 1

    # -- pinning and eviction -------------------------------------------------------------
    def pin(self, layer: str, digests: Iterable[bytes]) -> None:
        """Keep a layer's chunks (present or future) out of eviction until ``unpin``."""
        ds = frozenset(digests)
        with self._lock:
            self._unpin_locked(layer)
            self._pins[layer] = ds
            self._pin_count.update(ds)

    def unpin(self, layer: str) -> None:
        with self._lock:
            self._unpin_locked(layer)
        self._evict_if_needed()

    def _unpin_locked(self, layer: str) -> None:
        """Drop a layer's pins, removing the counts that reach zero (no whole-counter copy:
        pinning runs on the provider's loop, once per layer with tens of thousands of chunks)."""
        counts = self._pin_count
        for d in self._pins.pop(layer, frozenset()):
            n = counts[d] - 1
            if n > 0:
                counts[d] = n
            else:
                del counts[d]

    def is_pinned(self, digest: bytes) -> bool:
        with self._lock:
            return self._pin_count.get(digest, 0) > 0

    def _evict_if_needed(self) -> None:
        if self.limit is None:
            return
        victims: list[bytes | str] = []
        with self._lock:
            if self._total + self._held <= self.limit:
                return
            target = int(self.limit * 0.9) - self._held  # low watermark: evict in batches, not per put
            for key, size in self._lru.items():
                if self._total <= target:
                    break
                if self._entry_pinned(key):
                    continue
                victims.append(key)
                self._total -= size
            self._forget_locked(victims)
            self.evictions += len(victims)
            metrics.STORED_BYTES.set(self._total)
            over = self._total + self._held > self.limit
        self._unlink(victims)
        metrics.EVICTIONS.inc(len(victims))
        if victims:
            log.info("store_evict", chunks=len(victims), bytes_now=self._total, limit=self.limit)
        if over:
            log.warning("store_over_limit", bytes=self._total, limit=self.limit, reason="remaining_chunks_pinned")

    def _forget_locked(self, victims: Iterable[bytes | str]) -> None:
        """Take LRU entries (already subtracted from ``_total``) out of the index, the
        verified set and the fd cache; the files go in ``_unlink`` after the lock is released."""
        for digest in victims:
            del self._lru[digest]
            if isinstance(digest, str):
                self._unlodge_locked(digest)
                continue
            self._unmark_verified(digest)
            fd = self._fds.pop(digest, None)
            if fd is not None:
                self._retire(fd)

    def _unlink(self, victims: Iterable[bytes | str]) -> None:
        for key in victims:
            if isinstance(key, str):
                delete_record(key)  # the record first: never one without its file
            try:
                os.unlink(key if isinstance(key, str) else self._spath(key))
            except FileNotFoundError:
                pass

    # -- usage and prune ------------------------------------------------------------------
    def usage(self) -> StoreUsage:
        with self._lock:
            chunks = pinned_n = pinned_b = 0
            for key, size in self._lru.items():
                n = self._entry_chunks(key)
                chunks += n
                if self._entry_pinned(key):
                    pinned_n += n
                    pinned_b += size
            for entry in self._lodgings.values():  # held: a registered layer uses them
                if entry.held:
                    chunks += len(entry.digests)
                    pinned_n += len(entry.digests)
                    pinned_b += entry.size
            total = self._total + self._held
            return StoreUsage(chunks, total, pinned_n, pinned_b, chunks - pinned_n, total - pinned_b,
                              len(self._pins), self.limit)

    def local_share(self, digests: Iterable[bytes], sizes: Iterable[int]) -> LocalShare:
        """How much of these chunks is stored (in-memory index only: no stat per absent chunk)."""
        n = nbytes = verified = 0
        with self._lock:
            lru, staged, ver, lodged = self._lru, self._staged, self._verified, self._lodged
            for digest, size in zip(digests, sizes):
                if digest in lru or digest in staged or digest in lodged:
                    n += 1
                    nbytes += size
                    if digest in ver:
                        verified += 1
        return LocalShare(n, nbytes, verified)

    def prune(self, *, apply: bool) -> PruneResult:
        """Every chunk no layer pins: counted (dry run) or deleted (``apply``)."""
        with self._lock:
            victims = [key for key in self._lru if not self._entry_pinned(key)]
            freed = sum(self._lru[key] for key in victims)
            n = sum(self._entry_chunks(key) for key in victims)
            if apply:
                self._total -= freed
                self._forget_locked(victims)
                metrics.STORED_BYTES.set(self._total)
            everything = sum(self._entry_chunks(key) for key in self._lru)
            kept = (everything - (0 if apply else n), self._total - (0 if apply else freed))
        if apply:
            self._unlink(victims)
            if victims:
                metrics.PRUNED.inc(len(victims))
                log.info("store_prune", chunks=n, bytes=freed, bytes_now=kept[1])
        return PruneResult(n, freed, apply, kept[0], kept[1])

    def unpin_and_drop(self, layer: str) -> PruneResult:
        """``unpin`` a layer and delete its chunks that no other layer pins (the
        ``drop-unreferenced`` store policy: a removed image leaves the store at once)."""
        with self._lock:
            mine = self._pins.get(layer, frozenset())
            self._unpin_locked(layer)
            victims: list[bytes | str] = [d for d in mine if d in self._lru and d not in self._pin_count]
            files = {self._lodged[d].path for d in mine if d in self._lodged}
            victims += [f for f in files if f in self._lru and not self._entry_pinned(f)]  # spare ones
            freed = sum(self._lru[key] for key in victims)
            n = sum(self._entry_chunks(key) for key in victims)
            self._total -= freed
            self._forget_locked(victims)
            metrics.STORED_BYTES.set(self._total)
            kept = (sum(self._entry_chunks(key) for key in self._lru), self._total)
        self._unlink(victims)
        if victims:
            metrics.PRUNED.inc(n)
            log.info("store_drop_layer", layer=layer, chunks=n, bytes=freed, bytes_now=kept[1])
        return PruneResult(n, freed, True, kept[0], kept[1])

    def _forget_file_locked(self, digest: bytes) -> bool:
        """Take a chunk's own file out of the LRU and the fd cache; whether it was stored."""
        size = self._lru.pop(digest, None)
        if size is not None:
            self._total -= size
        fd = self._fds.pop(digest, None)
        if fd is not None:
            self._retire(fd)
        return size is not None

    def _drop(self, digest: bytes) -> None:
        with self._lock:
            self._forget_file_locked(digest)
            self._unmark_verified(digest)
        try:
            os.unlink(self.path_of(digest))
        except FileNotFoundError:
            pass

    # -- verified set and its watchers (called with _lock held) ---------------------------
    def _mark_verified(self, digest: bytes) -> None:
        if digest not in self._verified:
            self._verified.add(digest)
            if digest not in self._lodged:  # the mirror holds chunk files only (see watch_verified)
                for added, _ in self._watchers:
                    added(digest)

    def _unmark_verified(self, digest: bytes) -> None:
        if digest in self._verified:
            self._verified.discard(digest)
            if digest not in self._lodged:  # a lodged chunk left the mirror when it was lodged
                self._mirror_dropped(digest)

    def _mirror_dropped(self, digest: bytes) -> None:
        for _, dropped in self._watchers:
            dropped(digest)

    def watch_verified(self, added: Callable[[bytes], None], dropped: Callable[[bytes], None]) -> None:
        """Mirror the chunk files this process has verified (what the C filesystem may read by
        digest path): ``added`` gets the current set at once (digests joined), then each new
        one; ``dropped`` each one that leaves (evicted, found damaged, moved into a lodging
        file, whose chunks C reads only where it is told: a layer's layer file, a file's
        backing file). Callbacks run under the store's lock: keep them short."""
        with self._lock:
            self._watchers.append((added, dropped))
            files = b"".join(d for d in self._verified if d not in self._lodged)
            if files:
                added(files)

    def unwatch_verified(self, added: Callable[[bytes], None]) -> None:
        with self._lock:
            self._watchers = [w for w in self._watchers if w[0] != added]

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._to_close]:
                os.close(fd)
            self._fds.clear()
            self._to_close.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
