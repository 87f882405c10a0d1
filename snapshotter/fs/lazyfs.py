"""ONE FUSE filesystem for the whole daemon; each layer is ``<mnt>/<layer digest hex>``.

Binding: our own C filesystem (``snapshotter._fuse``, native/fuse/) on libfuse's low-level
API. Its worker threads answer every request whose answer is already known - lookups,
attributes, listings, xattrs, and reads of chunks this process has verified on disk -
without Python or the GIL: measured with every chunk local, a container start costs ~8,400
FUSE requests, and answered by pyfuse3 on asyncio each took ~150 us. A read that needs a
fetch (or a sparse file, or a quarantined layer) is queued for this asyncio loop, which
runs the fetch and replies. Reads the C side answers are reported back as access records
for the start-up recorder. Layers are immutable: long entry/attribute timeouts, negative
entries cached, ``keep_cache`` and cached directory listings.

Who can read it: only root. The mount is at ``<root>/mnt`` under the 0700 state directory,
and it is mounted without ``allow_other``, so the kernel refuses every request from a
process whose credentials are not the mounter's. Containers still read everything:
overlayfs reaches its lower layers with the credentials of whoever mounted the overlay
(containerd, root), whatever user the container runs as, and ``default_permissions`` has
the kernel check the image's own modes at the overlay. ``allow_other`` would add nothing
a container needs and would let any local user with a path to the mount (another mount
namespace, a bind mount, a wider root) read every image (tests/test_local_access.py).

Inode numbers: FUSE root = 1; layer slot s (1, 2, …) owns ``s << 32 | local``; slots are
never reused while the process lives, so a stale kernel inode can never alias a new layer.
"""
from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from snapshotter import _fuse
from snapshotter.fs import metrics
from snapshotter.fs.compiled import CompiledTree, compile_tree
from snapshotter.fs.data import LayerData
from snapshotter.fs.tree import LayerTree
from snapshotter.fsutil import private_dirs
from snapshotter.log import get_logger
from snapshotter.store import ChunkStore

log = get_logger("lazysnap.fs")

_SLOT_SHIFT = 32
_LOCAL_MASK = (1 << _SLOT_SHIFT) - 1
MOUNT_OPTIONS = "fsname=lazysnap,subtype=lazysnap,ro,default_permissions"
INIT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class MountedLayer:
    name: str
    slot: int
    tree: LayerTree | CompiledTree  # Python's view: which entry holds a file's data
    data: LayerData


class LazyFS:
    """The daemon's filesystem. ``add_layer``/``remove_layer`` may be called while mounted;
    every method runs on the loop that called ``start``."""

    def __init__(self, mountpoint: Path | str, *, allow_other: bool = False,
                 read_ahead_kb: int = 1024, threads: int = 8) -> None:
        self.read_ahead_kb = read_ahead_kb
        self.mountpoint = Path(mountpoint)
        self.allow_other = allow_other
        self.threads = threads
        self._layers: dict[str, MountedLayer] = {}
        self._slots: dict[int, MountedLayer] = {}
        self._next_slot = 1
        self._session: _fuse.Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: ChunkStore | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._chunk_hits = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Mount, start the C workers and take queued reads on the running loop."""
        if self._session is not None:
            return
        _lazy_unmount_stale(self.mountpoint)  # before mkdir: a dead mount fails it with ENOTCONN
        private_dirs(self.mountpoint)
        opts = MOUNT_OPTIONS + (",allow_other" if self.allow_other else "")
        session = _fuse.Session(str(self.mountpoint), opts, self.threads)
        self._loop = asyncio.get_running_loop()
        self._session = session
        session.start()
        self._loop.add_reader(session.fileno(), self._take)
        metrics.FUSE.attach(id(self), session.counters)
        deadline = time.monotonic() + INIT_TIMEOUT_S
        while not session.initialized():  # the kernel sends INIT right after the mount
            if time.monotonic() > deadline:
                log.warning("fuse_init_slow", mountpoint=self.mountpoint, seconds=INIT_TIMEOUT_S)
                break
            await asyncio.sleep(0.001)
        # INIT's reply caps readahead at 128 KiB; raise it now that the bdi exists
        await asyncio.to_thread(_set_readahead, self.mountpoint, self.read_ahead_kb)
        log.info("fuse_mounted", mountpoint=self.mountpoint, threads=self.threads)

    async def stop(self) -> None:
        session = self._session
        if session is None:
            return
        self._session = None
        assert self._loop is not None
        self._loop.remove_reader(session.fileno())
        if self._store is not None:
            self._store.unwatch_verified(session.mark_verified)
            self._store = None
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        self._count_hits(session)
        metrics.FUSE.detach(id(self), session.counters())
        # joins the workers, fails reads still queued with EIO, unmounts
        await asyncio.to_thread(session.close)
        log.info("fuse_unmounted", mountpoint=self.mountpoint)

    # -- layers ---------------------------------------------------------------------------------
    def add_layer(self, name: str, tree: LayerTree | CompiledTree, data: LayerData, *, compiled: bytes | None = None,
                  digests: bytes | None = None) -> Path:
        """Expose a layer as ``<mnt>/<name>``; returns that directory.

        ``compiled`` (``compile_tree(tree)``) and ``digests`` (every chunk's SHA-256, joined)
        may be made beforehand in a worker thread: for a 23k-entry layer they cost tens of
        milliseconds that would otherwise hold the loop serving reads."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad layer directory name {name!r}")
        if name in self._layers:
            return self.mountpoint / name
        session = self._live()
        self._watch(data.store)
        slot = self._next_slot
        self._next_slot += 1
        if compiled is None:
            compiled = tree.blob if isinstance(tree, CompiledTree) else compile_tree(tree)
        session.add_layer(slot, name, compiled,
                          digests if digests is not None else _digests(data), str(data.store.chunks_dir),
                          data.chunk_size)
        layer = MountedLayer(name, slot, tree, data)
        self._layers[name] = layer
        self._slots[slot] = layer
        if data.failed is not None:
            session.set_failed(slot)
        log.info("layer_registered", layer=name, slot=slot, inodes=tree.inodes, files=tree.files)
        return self.mountpoint / name

    async def remove_layer(self, name: str) -> None:
        """Unregister a layer and make the kernel forget ``<mnt>/<name>`` before returning."""
        layer = self._layers.pop(name, None)
        if layer is None:
            return
        del self._slots[layer.slot]
        session = self._session
        if session is not None:
            await asyncio.to_thread(session.remove_layer, layer.slot)  # waits for its requests
            try:
                await asyncio.to_thread(session.invalidate_entry, name.encode())
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("invalidate_failed", layer=name, error=str(exc))
        log.info("layer_unregistered", layer=name)

    def quarantine(self, name: str, reason: str) -> None:
        """Every further read of the layer fails with EIO (and is logged with ``reason``)."""
        layer = self._layers.get(name)
        if layer is None:
            return
        layer.data.failed = reason
        if self._session is not None:
            self._session.set_failed(layer.slot)

    def layer(self, name: str) -> MountedLayer | None:
        return self._layers.get(name)

    def counters(self) -> dict[str, int]:
        """The C workers' counters: requests by operation, reads answered locally or forwarded."""
        return self._live().counters()

    def _live(self) -> _fuse.Session:
        if self._session is None:
            raise RuntimeError("the filesystem is not mounted")
        return self._session

    def _watch(self, store: ChunkStore) -> None:
        """The C side serves a chunk only once this process has verified it on disk."""
        if self._store is store:
            return
        session = self._live()
        if self._store is not None:
            raise ValueError("every layer of one filesystem must use the same chunk store")
        store.watch_verified(session.mark_verified, session.forget_verified)
        self._store = store

    # -- what the C workers hand over -------------------------------------------------------------
    def _take(self) -> None:
        session = self._session
        if session is None:
            return
        misses, accesses = session.take()
        for token, ino, off, size in misses:
            task = asyncio.get_running_loop().create_task(self._serve(session, token, ino, off, size))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        if accesses:
            self._note(accesses)
            self._count_hits(session)

    async def _serve(self, session: _fuse.Session, token: int, ino: int, off: int, size: int) -> None:
        """A read the C side could not answer from verified local chunks."""
        layer = self._slots.get(ino >> _SLOT_SHIFT)
        entry = layer.tree.entry(ino & _LOCAL_MASK) if layer is not None else None
        if layer is None or entry is None:  # C forwards reads of regular files only
            session.reply_error(token, errno.ENOENT)
            return
        try:
            data = await layer.data.read(entry, off, size)
        except asyncio.CancelledError:
            session.reply_error(token, errno.EIO)
            raise
        except OSError as exc:
            log.error("read_failed", layer=layer.name, path=entry.path, off=off, size=size, error=exc)
            session.reply_error(token, exc.errno or errno.EIO)
            return
        except Exception as exc:  # noqa: BLE001 - a reader must get an answer, never hang
            log.error("read_failed", layer=layer.name, off=off, size=size, error=repr(exc))
            session.reply_error(token, errno.EIO)
            return
        session.reply_data(token, data)

    def _note(self, accesses: list[tuple[int, int, int, int]]) -> None:
        for ino, off, size, t_ns in accesses:
            layer = self._slots.get(ino >> _SLOT_SHIFT)
            if layer is None or layer.data.on_access is None:
                continue
            entry = layer.tree.entry(ino & _LOCAL_MASK)
            if entry is not None:
                layer.data.note_access(entry, off, size, t_ns / 1e9)

    def _count_hits(self, session: _fuse.Session) -> None:
        hits = session.counters()["chunk_hits"]
        if hits > self._chunk_hits:
            metrics.CACHE_HITS.inc(hits - self._chunk_hits)
            self._chunk_hits = hits


def _digests(data: LayerData) -> bytes:
    index = data.index
    bulk = getattr(index, "chunk_digests", None)
    if bulk is not None:
        return b"".join(bulk())
    return b"".join(index.chunk(i).digest for i in range(index.info.chunk_count))


def _set_readahead(mountpoint: Path, kb: int) -> None:
    """Raise the mount's readahead window so sequential reads reach us as 1 MiB requests.

    The kernel starts FUSE mounts at 128 KiB; measured on a warm store, 1 MiB requests
    cut the per-request Python cost by 8x (see bench/fuse_reads.py).
    """
    # never stat the mountpoint here: we run on the loop that must answer that stat
    try:
        dev = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == os.path.abspath(mountpoint):
                    dev = fields[2]
        if dev is None:
            raise OSError(errno.ENOENT, "mount not found in mountinfo")
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.warning("readahead_not_set", mountpoint=mountpoint, error=exc)


def _lazy_unmount_stale(mountpoint: Path) -> None:
    """A previous daemon that died leaves a dead FUSE mount ('Transport endpoint is not connected')."""
    try:
        os.stat(mountpoint)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
    import subprocess

    log.warning("stale_mount", mountpoint=mountpoint, action="lazy_unmount")
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)
