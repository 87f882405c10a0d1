"""ONE FUSE filesystem for the whole daemon; each layer is ``<mnt>/<layer digest hex>``.

Binding: our own C filesystem (``snapshotter._fuse``, native/fuse/), which speaks the
kernel's FUSE protocol itself (native/fuse/kproto.c). Its worker threads answer every
request whose answer is already known - lookups, attributes, listings, xattrs, and reads
of chunks this process has verified on disk -
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from snapshotter import _fuse
from snapshotter.fs import metrics
from snapshotter.fs.backing import BackingFiles, Candidate, candidates
from snapshotter.fs.compiled import CompiledTree, compile_tree
from snapshotter.fs.data import LayerData
from snapshotter.fs.mount import (HOLDER_LOCK, MOUNT_OPTIONS, STACKED_FILESYSTEMS, SessionOptions, filesystem_type,
                                  release_layer, unmount_stale, wait_initialized)
from snapshotter.fs.tree import LayerTree
from snapshotter.fsutil import private_dirs
from snapshotter.log import get_logger
from snapshotter.store import ChunkStore
from snapshotter.tasks import TaskSet

if TYPE_CHECKING:
    from snapshotter.fs.holderlink import HolderLink

log = get_logger("lazysnap.fs")

_SLOT_SHIFT = 32
_LOCAL_MASK = (1 << _SLOT_SHIFT) - 1

Misses = list[tuple[int, int, int, int]]  # (token, ino, offset, size)
Accesses = list[tuple[int, int, int, int]]  # (ino, offset, size, t_ns)


class FuseBackend(Protocol):
    """Who owns the FUSE session: this process (``LocalSession``) or the FUSE holder
    (``holderlink.HolderLink``). Reads the C side cannot answer arrive through the
    ``on_misses`` / ``on_accesses`` callbacks given when it starts."""

    held: dict[str, tuple[int, str]]  # layers the session already serves: name → (slot, tree hash)
    next_slot: int
    passthrough: bool  # the kernel agreed to FUSE passthrough for this session

    async def add_layer(self, slot: int, name: str, tree: bytes, digests: bytes, chunks_dir: str,
                        chunk_size: int) -> None: ...

    async def remove_layer(self, slot: int, name: str) -> None: ...

    async def set_backing(self, slot: int, local: int, path: str) -> None: ...

    async def set_layer_file(self, slot: int, path: str, offsets: bytes) -> bool:
        """The layer's chunks are in ``path`` at ``offsets`` (``ChunkStore.layer_file_offsets``);
        False if this session cannot read them there (its reads of them come to Python)."""
        ...

    def set_failed(self, slot: int) -> None: ...

    def mark_verified(self, digests: bytes) -> None: ...

    def forget_verified(self, digests: bytes) -> None: ...

    def reply_data(self, token: int, data: bytes) -> None: ...

    def reply_error(self, token: int, err: int) -> None: ...

    def counters(self) -> dict[str, int]: ...

    async def stop(self) -> None: ...


class LocalSession:
    """The FUSE session in this process: mounted at start, unmounted when the daemon stops
    (running containers then lose their lower layers; see ``holder`` for the alternative)."""

    def __init__(self, session: _fuse.Session, mountpoint: Path) -> None:
        self._session = session
        self.mountpoint = mountpoint
        self.held: dict[str, tuple[int, str]] = {}
        self.next_slot = 1
        self.passthrough = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def mount(cls, mountpoint: Path, options: str, how: SessionOptions,
                    on_misses: Callable[[Misses], None], on_accesses: Callable[[Accesses], None]) -> LocalSession:
        unmount_stale(mountpoint)  # before mkdir: a dead mount fails it with ENOTCONN
        private_dirs(mountpoint)
        session = _fuse.Session(str(mountpoint), options, how.threads, passthrough=how.passthrough)
        self = cls(session, mountpoint)
        self._loop = asyncio.get_running_loop()
        session.start()

        def take() -> None:
            misses, accesses = session.take()
            if misses:
                on_misses(misses)
            if accesses:
                on_accesses(accesses)

        self._loop.add_reader(session.fileno(), take)
        await wait_initialized(session, mountpoint, how.read_ahead_kb)
        self.passthrough = session.passthrough()
        return self

    async def add_layer(self, slot: int, name: str, tree: bytes, digests: bytes, chunks_dir: str,
                        chunk_size: int) -> None:
        self._session.add_layer(slot, name, tree, digests, chunks_dir, chunk_size)

    async def remove_layer(self, slot: int, name: str) -> None:
        await release_layer(self._session, slot, name)

    async def set_backing(self, slot: int, local: int, path: str) -> None:
        await asyncio.to_thread(self._session.set_backing, slot, local, path)

    async def set_layer_file(self, slot: int, path: str, offsets: bytes) -> bool:
        await asyncio.to_thread(self._session.set_layer_file, slot, path, offsets)
        return True

    def set_failed(self, slot: int) -> None:
        self._session.set_failed(slot)

    def mark_verified(self, digests: bytes) -> None:
        self._session.mark_verified(digests)

    def forget_verified(self, digests: bytes) -> None:
        self._session.forget_verified(digests)

    def reply_data(self, token: int, data: bytes) -> None:
        self._session.reply_data(token, data)

    def reply_error(self, token: int, err: int) -> None:
        self._session.reply_error(token, err)

    def counters(self) -> dict[str, int]:
        return self._session.counters()

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._session.fileno())
        # joins the workers, fails reads still queued with EIO, unmounts
        await asyncio.to_thread(self._session.close)


@dataclass(slots=True)
class LayerBacking:
    """A layer's files that may pass through: those still waiting for their chunks (or for
    room), and those with a backing file (local inode → its name in ``BackingFiles``)."""

    digests: bytes  # every chunk's SHA-256, joined (index order)
    pending: list[Candidate]
    backed: dict[int, str]

    def chunk_digests(self, c: Candidate) -> list[bytes]:
        d = self.digests
        return [d[i * 32:(i + 1) * 32] for i in range(c.first_chunk, c.first_chunk + c.chunk_count)]


@dataclass(slots=True)
class MountedLayer:
    name: str
    slot: int
    tree: LayerTree | CompiledTree  # Python's view: which entry holds a file's data
    data: LayerData
    backing: LayerBacking | None = None  # with passthrough


class LazyFS:
    """The daemon's filesystem. ``add_layer``/``remove_layer`` may be called while mounted;
    every method runs on the loop that called ``start``.

    ``holder``: the socket of a FUSE holder (``snapshotter.fs.holder``) that owns the
    session instead of this process, started if none runs, so that containers keep their
    layers when the daemon stops or dies; None: the session lives and dies with us.

    ``passthrough``: files of at least ``passthrough_min_bytes`` whose chunks are all local
    get a backing file (``snapshotter.fs.backing``) that the kernel reads directly from their
    next open on (FUSE passthrough, Linux >= 6.9); off when the kernel or ``--root``'s
    filesystem cannot, with one log line and ``lazysnap_fuse_passthrough`` 0."""

    def __init__(self, mountpoint: Path | str, *, allow_other: bool = False,
                 read_ahead_kb: int = 1024, threads: int = 8, holder: Path | None = None,
                 holder_external: bool = False, passthrough: bool = False,
                 passthrough_min_bytes: int = 1 << 20) -> None:
        self.mountpoint = Path(mountpoint)
        self.allow_other = allow_other
        self.session_options = SessionOptions(threads, read_ahead_kb, passthrough)
        self.passthrough_min_bytes = passthrough_min_bytes
        self.holder = holder
        self.holder_external = holder_external  # a supervisor runs the holder: never start one
        self._layers: dict[str, MountedLayer] = {}
        self._slots: dict[int, MountedLayer] = {}
        self._next_slot = 1
        self._backend: FuseBackend | None = None
        self._store: ChunkStore | None = None
        self._serving = TaskSet("fuse")  # forwarded reads being answered
        self._slot_added = asyncio.Event()  # set (and replaced) whenever a layer is added
        self._chunk_hits = 0
        self._session_fd: int | None = None  # with a holder: our copy of its /dev/fuse fd
        self._relay: Path | None = None  # the public socket the holder holds, for the next one
        self._rehoming: asyncio.Task[None] | None = None
        self._backing: BackingFiles | None = None  # with passthrough, once a layer brings the store
        self._passthrough_off: str | None = None  # why files are not passed through (asked for)
        self._backing_wake = asyncio.Event()
        self._backing_dirty = False  # chunks were verified since the last look (any thread sets it)
        self._backing_task: asyncio.Task[None] | None = None
        # awaited before each round of backing files: copying whole files is disk and CPU
        # work that should not compete with an image's start (the prefetch manager's Pause)
        self.backing_gate: Callable[[], Awaitable[object]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Mount (or attach to the holder's mount) and take queued reads on the running loop."""
        if self._backend is not None:
            return
        opts = MOUNT_OPTIONS + (",allow_other" if self.allow_other else "")
        if self.holder is not None:
            link = await self._attach(None, time.monotonic())
            self._session_fd, self._relay = link.session_fd, link.relay
            link.reply_fd = self._session_fd
            backend: FuseBackend = link
        else:
            _refuse_if_held(self.mountpoint)
            backend = await LocalSession.mount(self.mountpoint, opts, self.session_options,
                                               self._on_misses, self._on_accesses)
        self._backend = backend
        self._loop = asyncio.get_running_loop()
        self._next_slot = max(self._next_slot, backend.next_slot)
        metrics.FUSE.attach(id(self), backend.counters)
        if self.session_options.passthrough:
            self._check_passthrough(backend)
        log.info("fuse_mounted", mountpoint=self.mountpoint, threads=self.session_options.threads,
                 holder=str(self.holder) if self.holder else "none", held_layers=len(backend.held),
                 passthrough=self.session_options.passthrough and self._passthrough_off is None)

    async def stop(self) -> None:
        backend = self._backend
        if backend is None:
            return
        self._backend = None
        if self._rehoming is not None:
            self._rehoming.cancel()
            await asyncio.gather(self._rehoming, return_exceptions=True)
        if self._backing_task is not None:
            self._backing_task.cancel()
            await asyncio.gather(self._backing_task, return_exceptions=True)
            self._backing_task = None
        if self._store is not None:
            self._store.unwatch_verified(backend.mark_verified)
            self._store.unwatch_verified(self._chunks_verified)
            self._store = None
        await self._serving.aclose()
        self._count_hits(backend)
        metrics.FUSE.detach(id(self), backend.counters())
        if self.holder is None and self._layers:
            log.warning("fuse_unmounting", mountpoint=self.mountpoint, layers=len(self._layers),
                        note="containers running on these layers lose them; [lazy] fuse_holder keeps them")
        await backend.stop()
        if self._session_fd is not None:
            os.close(self._session_fd)
            self._session_fd = None
        log.info("fuse_unmounted" if self.holder is None else "fuse_detached", mountpoint=self.mountpoint)

    async def _attach(self, session_fd: int | None, t0: float) -> HolderLink:
        """Attach to the holder, bringing ``session_fd``. A supervised holder (``holder_external``,
        or a daemon under systemd, whose holder unit restarts it within RestartSec=1) is
        waited for rather than started: a holder started here would race the supervisor's for
        the root, or die with our cgroup or pod. Retries until ``HOLDER_WAIT_S``."""
        from snapshotter.fs.holderlink import HolderError, HolderLink

        assert self.holder is not None
        supervised = self.holder_external or bool(os.environ.get("INVOCATION_ID"))
        while True:
            spawn = not self.holder_external and (not supervised or time.monotonic() - t0 > SUPERVISOR_GRACE_S)
            try:
                return await HolderLink.attach(
                    self.holder, self.mountpoint, self.session_options, on_misses=self._on_misses,
                    on_accesses=self._on_accesses, on_lost=self._holder_lost,
                    session_fd=session_fd, relay=self._relay, spawn=spawn)
            except HolderError as exc:
                if exc.errno not in _NOT_YET or time.monotonic() - t0 > HOLDER_WAIT_S:
                    raise
                log.warning("holder_wait", error=str(exc), started_here=spawn)
                await asyncio.sleep(HOLDER_RETRY_S)

    # -- a holder that died ----------------------------------------------------------------------
    async def _rehomed(self) -> None:
        """Wait while the layers are being added back to a new holder: a layer added
        meanwhile would take a slot above those still to come, which the holder refuses."""
        while (task := self._rehoming) is not None:
            await asyncio.wait({task})

    def _holder_lost(self, link: HolderLink) -> None:
        if self._backend is not link or self._rehoming is not None:
            return
        log.error("holder_lost", pid=link.pid, layers=len(self._layers),
                  session_kept=self._session_fd is not None)
        self._rehoming = asyncio.get_running_loop().create_task(self._rehome(), name="fuse-holder-rehome")

    async def _rehome(self) -> None:
        """Bring our copy of the session to the next holder (started if none runs), add every
        layer back under its slot, mirror the verified chunks again, then let it serve: the
        kernel sends it again what the dead holder had read and not answered. Reads wait in
        the kernel meanwhile; containers see a pause, not an error."""
        from snapshotter.fs.holderlink import HolderError

        old = self._backend
        t0 = time.monotonic()
        try:
            try:
                link = await self._attach(self._session_fd, t0)
            except HolderError as exc:
                log.error("holder_rehome_failed", error=str(exc), waited_s=HOLDER_WAIT_S)
                return
            if link.session_fd is not None:  # it mounted anew: ours was not taken over
                if self._session_fd is not None:
                    os.close(self._session_fd)
                self._session_fd = link.session_fd
            self._relay = link.relay or self._relay
            link.reply_fd = self._session_fd
            if old is not None:
                metrics.FUSE.detach(id(self), old.counters())
                if self._store is not None:
                    self._store.unwatch_verified(old.mark_verified)
            self._backend = link
            metrics.FUSE.attach(id(self), link.counters)
            for layer in sorted(self._layers.values(), key=lambda m: m.slot):
                compiled, digests = await asyncio.to_thread(_compiled_and_digests, layer)
                await link.add_layer(layer.slot, layer.name, compiled, digests, str(layer.data.store.chunks_dir),
                                     layer.data.chunk_size)
                if layer.data.failed is not None:
                    link.set_failed(layer.slot)
                await self._give_layer_file(link, layer)
            if self._store is not None:
                self._store.watch_verified(link.mark_verified, link.forget_verified)
            if self._backing is not None and self._passthrough_off is None:
                await self._back_again(link)
            if link.adopted:
                link.start_serving()
            metrics.HOLDER_REHOMES.labels("taken_over" if link.adopted else "new_mount").inc()
            log.info("holder_rehomed", pid=link.pid, layers=len(self._layers), taken_over=link.adopted,
                     seconds=round(time.monotonic() - t0, 3))
        finally:
            self._rehoming = None

    # -- layers ---------------------------------------------------------------------------------
    @staticmethod
    async def _give_layer_file(backend: FuseBackend, layer: MountedLayer) -> None:
        """Let the C side read the layer's chunks from its layer file; without it they are
        read through the store (forwarded reads), so a refusal costs speed, not bytes."""
        given = layer.data.layer_file
        if given is None or layer.data.failed is not None:
            return
        try:
            if await backend.set_layer_file(layer.slot, *given):
                log.info("layer_file_served", layer=layer.name, path=given[0])
        except OSError as exc:
            log.warning("layer_file_refused", layer=layer.name, error=str(exc),
                        note="its chunks are read through the store")

    async def add_layer(self, name: str, tree: LayerTree | CompiledTree, data: LayerData, *,
                        compiled: bytes | None = None, digests: bytes | None = None) -> Path:
        """Expose a layer as ``<mnt>/<name>``; returns that directory.

        ``compiled`` (``compile_tree(tree)``) and ``digests`` (every chunk's SHA-256, joined)
        may be made beforehand in a worker thread: for a 23k-entry layer they cost tens of
        milliseconds that would otherwise hold the loop serving reads. A layer the FUSE
        holder already serves (this daemon restarted) keeps its slot, so the inode numbers
        the kernel holds for open files stay valid; held with another tree, it is
        quarantined rather than served under numbers that could mean other files."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad layer directory name {name!r}")
        await self._rehomed()
        if name in self._layers:
            return self.mountpoint / name
        backend = self._live()
        self._watch(data.store)
        if compiled is None:
            compiled = tree.blob if isinstance(tree, CompiledTree) else compile_tree(tree)
        if digests is None:
            digests = _digests(data)
        held = backend.held.get(name)
        if held is not None:
            from snapshotter.fs.holderwire import tree_hash

            slot = held[0]
            if held[1] != await asyncio.to_thread(tree_hash, compiled, digests):  # tens of MB: off the loop
                data.failed = "the FUSE holder serves this layer with another tree (index rebuilt?)"
                log.error("layer_tree_mismatch", layer=name, slot=slot)
        else:
            slot = self._next_slot
            self._next_slot += 1
            await backend.add_layer(slot, name, compiled, digests, str(data.store.chunks_dir), data.chunk_size)
        if name in self._layers:  # added meanwhile by another caller
            return self.mountpoint / name
        layer = MountedLayer(name, slot, tree, data)
        self._layers[name] = layer
        self._slots[slot] = layer
        self._slot_added.set()
        self._slot_added = asyncio.Event()
        if data.failed is not None:
            backend.set_failed(slot)
        await self._give_layer_file(backend, layer)
        log.info("layer_registered", layer=name, slot=slot, inodes=tree.inodes, files=tree.files,
                 held=held is not None)
        if self._backing is not None and self._passthrough_off is None and data.failed is None:
            found = await asyncio.to_thread(candidates, compiled, self.passthrough_min_bytes)
            if found and self._layers.get(name) is layer:
                layer.backing = LayerBacking(digests, found, {})
                self._wake_backing()
        return self.mountpoint / name

    async def remove_layer(self, name: str) -> None:
        """Unregister a layer and make the kernel forget ``<mnt>/<name>`` before returning."""
        await self._rehomed()
        layer = self._layers.pop(name, None)
        if layer is None:
            return
        del self._slots[layer.slot]
        backend = self._backend
        if backend is not None:
            await backend.remove_layer(layer.slot, name)  # closes its backing ids
            backend.held.pop(name, None)
        if layer.backing is not None and self._backing is not None:
            await asyncio.to_thread(self._backing.release, list(layer.backing.backed.values()))
        log.info("layer_unregistered", layer=name)

    async def release_held(self, keep: set[str]) -> None:
        """Release the layers the FUSE holder still serves for a previous daemon that this
        one has not added back and that are not in ``keep`` (no snapshot uses them: removed
        while no daemon ran). A layer in ``keep`` whose restore failed stays: the holder goes
        on answering its local reads for the containers that use it."""
        backend = self._backend
        if backend is None:
            return
        await self._rehomed()
        for name, (slot, _) in sorted(backend.held.items()):
            if name in self._layers or name in keep:
                continue
            await backend.remove_layer(slot, name)
            backend.held.pop(name, None)
            log.info("held_layer_released", layer=name, slot=slot, reason="no snapshot uses it")

    def quarantine(self, name: str, reason: str) -> None:
        """Every further read of the layer fails with EIO (and is logged with ``reason``)."""
        layer = self._layers.get(name)
        if layer is None:
            return
        layer.data.failed = reason
        if self._backend is not None:
            self._backend.set_failed(layer.slot)

    def layer(self, name: str) -> MountedLayer | None:
        return self._layers.get(name)

    def counters(self) -> dict[str, int]:
        """The C workers' counters: requests by operation, reads answered locally or forwarded."""
        return self._live().counters()

    def _live(self) -> FuseBackend:
        if self._backend is None:
            raise RuntimeError("the filesystem is not mounted")
        return self._backend

    def _watch(self, store: ChunkStore) -> None:
        """The C side serves a chunk only once this process has verified it on disk."""
        if self._store is store:
            return
        backend = self._live()
        if self._store is not None:
            raise ValueError("every layer of one filesystem must use the same chunk store")
        store.watch_verified(backend.mark_verified, backend.forget_verified)
        self._store = store
        if self.session_options.passthrough and self._passthrough_off is None:
            self._backing = BackingFiles(store)
            store.watch_verified(self._chunks_verified, _ignore)
            self._backing_task = asyncio.get_running_loop().create_task(self._back_files(), name="fuse-backing")

    # -- passthrough ------------------------------------------------------------------------------
    def passthrough_files(self, name: str) -> int | None:
        """How many files of layer ``name`` pass through to a backing file (None: passthrough
        is off, or unavailable on this node)."""
        if self._backing is None or self._passthrough_off is not None:
            return None
        layer = self._layers.get(name)
        return len(layer.backing.backed) if layer is not None and layer.backing is not None else 0

    @property
    def passthrough_unavailable(self) -> str | None:
        """Why files are not passed through although ``passthrough`` was asked for."""
        return self._passthrough_off

    def _check_passthrough(self, backend: FuseBackend) -> None:
        """Say once, with the reason, when passthrough was asked for and cannot be."""
        fstype = filesystem_type(self.mountpoint.parent)
        if not backend.passthrough and self.holder is not None:
            self._passthrough_off = ("the FUSE holder's session does not pass files through: the holder was started "
                                     "without --passthrough (a supervisor's unit needs it too), took the session over "
                                     "from a dead holder, or the kernel did not agree (Linux >= 6.9, CAP_SYS_ADMIN)")
        elif not backend.passthrough:
            self._passthrough_off = ("the kernel did not agree to FUSE passthrough for this session (Linux >= 6.9 "
                                     "and CAP_SYS_ADMIN)")
        elif fstype in STACKED_FILESYSTEMS:
            self._passthrough_off = (f"{self.mountpoint.parent} is on {fstype}, which stacks on another filesystem: "
                                     f"the kernel accepts backing files only from ext4, xfs and the like")
        metrics.PASSTHROUGH.set(0 if self._passthrough_off else 1)
        if self._passthrough_off:
            log.warning("passthrough_unavailable", reason=self._passthrough_off, fallback="reads served by lazysnap")

    def _stop_passthrough(self, reason: str) -> None:
        if self._passthrough_off is None:
            self._passthrough_off = reason
            metrics.PASSTHROUGH.set(0)
            log.warning("passthrough_unavailable", reason=reason, fallback="reads served by lazysnap")

    def _chunks_verified(self, digests: bytes) -> None:
        """Store watcher (any thread, under the store's lock): have the backing task look."""
        if not self._backing_dirty and self._loop is not None:
            self._backing_dirty = True
            self._loop.call_soon_threadsafe(self._backing_wake.set)

    def _wake_backing(self) -> None:
        self._backing_dirty = True
        self._backing_wake.set()

    async def _back_files(self) -> None:
        """Give backing files to the files whose chunks are all local, biggest first, one
        at a time (it is disk work; reads go on meanwhile), after each burst of new chunks."""
        assert self._backing is not None
        await asyncio.to_thread(self._backing.prepare)
        while self._passthrough_off is None:
            await self._backing_wake.wait()
            await asyncio.sleep(BACKING_SETTLE_S)  # chunks come in bursts: one look per burst
            if self.backing_gate is not None:
                await self.backing_gate()
            self._backing_wake.clear()
            self._backing_dirty = False
            try:
                for layer in list(self._layers.values()):
                    if layer.backing is not None and layer.backing.pending and self._passthrough_off is None:
                        await self._back_layer(layer, layer.backing)
            except Exception as exc:  # noqa: BLE001 - never leave reads to a dead task silently
                log.error("backing_failed", error=repr(exc))
                self._stop_passthrough(f"backing files failed: {exc!r}")

    async def _back_layer(self, layer: MountedLayer, lb: LayerBacking) -> None:
        files = self._backing
        assert files is not None
        store = layer.data.store
        waiting: list[Candidate] = []
        for i, c in enumerate(lb.pending):
            if self._layers.get(layer.name) is not layer or layer.data.failed is not None:
                return
            digests = lb.chunk_digests(c)
            if not files.room_for(c.size) or not all(store.known(d) for d in digests):
                waiting.append(c)
                continue
            try:
                path = await asyncio.to_thread(files.make, c.size, digests, layer.data.chunk_size)
            except OSError as exc:  # out of space: try again after the next chunks
                log.warning("backing_file_not_made", layer=layer.name, size=c.size, error=str(exc))
                waiting.extend(lb.pending[i:])
                break
            if path is None:
                waiting.append(c)
                continue
            name = path.parent.name + path.name
            try:
                await self._live().set_backing(layer.slot, c.local, str(path))
            except OSError as exc:
                await asyncio.to_thread(files.release, [name])
                if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ELOOP, errno.EOPNOTSUPP):
                    self._stop_passthrough(str(exc))
                    return
                log.warning("backing_refused", layer=layer.name, local=c.local, error=str(exc))
                continue
            if self._layers.get(layer.name) is not layer:  # removed meanwhile: its ids are closed
                await asyncio.to_thread(files.release, [name])
                return
            lb.backed[c.local] = name
            try:  # the kernel and the C workers read it now: the chunks' own files can go
                await asyncio.to_thread(store.lodge, path, c.size, digests, layer.data.chunk_size, verified=True)
            except OSError as exc:  # they stay where they are (on disk twice until evicted)
                log.warning("backing_not_lodged", layer=layer.name, size=c.size, error=str(exc))
        lb.pending = waiting

    async def _back_again(self, backend: FuseBackend) -> None:
        """A new holder serves the session: register the backing files again (a holder that
        took the session over cannot pass files through: they are served as before)."""
        if not backend.passthrough:
            self._stop_passthrough("the new FUSE holder took the session over without passthrough")
            return
        files = self._backing
        assert files is not None
        for layer in list(self._layers.values()):
            for local, name in list((layer.backing.backed if layer.backing else {}).items()):
                try:
                    await backend.set_backing(layer.slot, local, str(files.path_of(name)))
                except OSError as exc:
                    log.warning("backing_refused", layer=layer.name, local=local, error=str(exc))

    # -- what the C workers hand over -------------------------------------------------------------
    def _on_misses(self, misses: Misses) -> None:
        backend = self._backend
        if backend is None:
            return
        for token, ino, off, size in misses:
            self._serving.spawn(self._serve(backend, token, ino, off, size), name="fuse-read")

    def _on_accesses(self, accesses: Accesses) -> None:
        self._note(accesses)
        if self._backend is not None:
            self._count_hits(self._backend)

    async def _layer_of(self, slot: int) -> MountedLayer | None:
        """The layer of ``slot``; for a slot the holder serves but this (restarted) daemon
        has not registered yet, wait for it up to ``HELD_WAIT_S``."""
        layer = self._slots.get(slot)
        if layer is not None or self._backend is None or not any(s == slot for s, _ in self._backend.held.values()):
            return layer
        try:
            async with asyncio.timeout(HELD_WAIT_S):
                while (layer := self._slots.get(slot)) is None:
                    await self._slot_added.wait()
        except TimeoutError:
            log.error("held_layer_not_restored", slot=slot, waited_s=HELD_WAIT_S)
        return layer

    async def _serve(self, backend: FuseBackend, token: int, ino: int, off: int, size: int) -> None:
        """A read the C side could not answer from verified local chunks."""
        layer = await self._layer_of(ino >> _SLOT_SHIFT)
        entry = layer.tree.entry(ino & _LOCAL_MASK) if layer is not None else None
        if layer is None or entry is None:  # C forwards reads of regular files only
            backend.reply_error(token, errno.ENOENT)
            return
        try:
            data = await layer.data.read(entry, off, size)
        except asyncio.CancelledError:
            if self.holder is None:
                backend.reply_error(token, errno.EIO)
            raise  # with a holder: the read waits for the next daemon
        except OSError as exc:
            log.error("read_failed", layer=layer.name, path=entry.path, off=off, size=size, error=exc)
            backend.reply_error(token, exc.errno or errno.EIO)
            return
        except Exception as exc:  # noqa: BLE001 - a reader must get an answer, never hang
            log.error("read_failed", layer=layer.name, off=off, size=size, error=repr(exc))
            backend.reply_error(token, errno.EIO)
            return
        backend.reply_data(token, data)

    def _note(self, accesses: Accesses) -> None:
        for ino, off, size, t_ns in accesses:
            layer = self._slots.get(ino >> _SLOT_SHIFT)
            if layer is None or layer.data.on_access is None:
                continue
            entry = layer.tree.entry(ino & _LOCAL_MASK)
            if entry is not None:
                layer.data.note_access(entry, off, size, t_ns / 1e9)

    def _count_hits(self, backend: FuseBackend) -> None:
        hits = backend.counters().get("chunk_hits", 0)
        if hits > self._chunk_hits:
            metrics.CACHE_HITS.inc(hits - self._chunk_hits)
            self._chunk_hits = hits


HELD_WAIT_S = 60.0  # a restarted daemon restores every layer it serves at start
BACKING_SETTLE_S = 1.0
HOLDER_WAIT_S = 60.0  # a holder (a dead one's successor, a supervised one) must answer by then
HOLDER_RETRY_S = 0.5
SUPERVISOR_GRACE_S = 5.0  # a supervisor's restart of the holder, before we start one
# no holder listens (yet), or the one we started exited (another was still leaving the root)
_NOT_YET = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECHILD, errno.ETIMEDOUT)


def _compiled_and_digests(layer: MountedLayer) -> tuple[bytes, bytes]:
    tree = layer.tree
    return (tree.blob if isinstance(tree, CompiledTree) else compile_tree(tree)), _digests(layer.data)


def _ignore(_: bytes) -> None:
    pass


def _refuse_if_held(mountpoint: Path) -> None:
    """A FUSE holder serving this root owns ``mountpoint``: mounting over it would hide its
    layers from the containers using them."""
    import fcntl

    try:
        fd = os.open(mountpoint.parent / HOLDER_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, f"a FUSE holder serves {mountpoint} (lazysnap fuse-holder): "
                                   f"set [lazy] fuse_holder = true, or stop the holder") from None
    finally:
        os.close(fd)


def _digests(data: LayerData) -> bytes:
    index = data.index
    bulk = getattr(index, "chunk_digests", None)
    if bulk is not None:
        return b"".join(bulk())
    return b"".join(index.chunk(i).digest for i in range(index.info.chunk_count))
