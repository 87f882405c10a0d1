"""The FUSE holder: the process that owns the daemon's FUSE session, so containers outlive
``lazysnap serve``.

Every lazily served root filesystem is an overlay whose lower layers live on one FUSE
mount; when the process holding its ``/dev/fuse`` connection dies, the kernel aborts the
connection and every container on it fails (``ENOTCONN``) for the rest of its life. The
holder is that process, and it has almost nothing to do, so it has almost no reason to
die or to be upgraded: it mounts the filesystem, runs the C workers (``snapshotter._fuse``:
metadata of registered layers and reads of verified local chunks are answered there
already, without Python), and relays to the attached daemon only what needs policy -
reads of chunks that are not local yet - and the daemon's answers back.

While no daemon is attached (killed, restarting, being upgraded), local reads go on being
answered, reads that need a fetch wait (``WAIT_S`` at most, then EIO), and a read the
previous daemon took but never answered is handed to the next one: nothing a container
asked is lost. One daemon at a time: a second is refused. The holder keeps each layer's
tree; a restarted daemon gets the list at hello and reuses the slots, so the inode numbers
the kernel holds for open files keep their meaning (``LazyFS.add_layer``).

What it does not survive yet is itself: a holder upgrade needs the ``/dev/fuse`` fd handed
to its successor and ``FUSE_NOTIFY_RESEND`` (docs/design/restart.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter import _fuse
from snapshotter.fs import holderwire as wire
from snapshotter.fs.mount import (DAEMON_SOCKET, HOLDER_LOCK, HOLDER_SOCKET, MOUNT_OPTIONS, release_layer,
                                  unmount_stale, wait_initialized)
from snapshotter.fsutil import FILE_MODE, prepare_socket, private_dirs
from snapshotter.log import get_logger

log = get_logger("lazysnap.holder")

WAIT_S = 30.0  # a read that needs a daemon waits this long for one, then fails with EIO
TICK_S = 0.5  # counters to the daemon; waiting reads checked against WAIT_S


@dataclass(slots=True)
class _Waiting:
    ino: int
    off: int
    size: int
    since: float  # when it arrived, or when the daemon it was handed to went away


@dataclass(slots=True)
class Holder:
    root: Path
    mountpoint: Path
    threads: int
    read_ahead_kb: int
    wait_s: float = WAIT_S
    session: _fuse.Session | None = None
    layers: dict[str, tuple[int, str]] = field(default_factory=dict)  # name → (slot, tree hash)
    slots: dict[int, str] = field(default_factory=dict)
    waiting: dict[int, _Waiting] = field(default_factory=dict)  # token → read not answered yet
    daemon: asyncio.StreamWriter | None = None
    next_slot: int = 1

    @property
    def socket_path(self) -> Path:
        return self.root / HOLDER_SOCKET

    # -- session --------------------------------------------------------------------------------
    async def mount(self) -> None:
        unmount_stale(self.mountpoint)
        private_dirs(self.mountpoint)
        self.session = session = _fuse.Session(str(self.mountpoint), MOUNT_OPTIONS, self.threads)
        session.start()
        asyncio.get_running_loop().add_reader(session.fileno(), self._take)
        await wait_initialized(session, self.mountpoint, self.read_ahead_kb)
        log.info("holder_mounted", mountpoint=str(self.mountpoint), pid=os.getpid())

    def _take(self) -> None:
        assert self.session is not None
        misses, accesses = self.session.take()
        now = time.monotonic()
        for token, ino, off, size in misses:
            self.waiting[token] = _Waiting(ino, off, size, now)
        if self.daemon is not None:
            if misses:
                self._send(wire.frame(wire.MISSES, wire.records(wire.MISS, misses)))
            if accesses:
                self._send(wire.frame(wire.ACCESSES, wire.records(wire.ACCESS, accesses)))

    def _reply(self, token: int, data: bytes | None, err: int = 0) -> None:
        if self.waiting.pop(token, None) is None or self.session is None:
            return  # answered already (EIO after WAIT_S) or unknown
        if data is not None:
            self.session.reply_data(token, data)
        else:
            self.session.reply_error(token, err)

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.session is None:
                continue
            if self.daemon is not None:
                self._send(wire.control(wire.COUNTERS, self.session.counters()))
                continue
            now = time.monotonic()
            late = [t for t, w in self.waiting.items() if now - w.since > self.wait_s]
            for token in late:
                self._reply(token, None, errno.EIO)
            if late:
                log.error("reads_failed_without_daemon", reads=len(late), waited_s=self.wait_s)

    # -- the daemon -----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.daemon is not None and not self.daemon.is_closing():
            self.daemon.write(data)

    async def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: a daemon's hello, then its messages until it goes away. A
        connection that says nothing (a probe: does a holder run here?) is closed quietly."""
        frames = wire.FrameReader()
        got: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(10):
                while not got:
                    data = await reader.read(1 << 20)
                    if not data:
                        writer.close()
                        return
                    got = frames.feed(data)
        except (OSError, TimeoutError, ValueError):
            writer.close()
            return
        if self.daemon is not None:  # its hello is read: closing on unread bytes would reset
            writer.write(wire.control(wire.REFUSED, {"reason": "another lazysnap serve is attached to "
                                                               "this root's FUSE holder"}))
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        self.daemon = writer
        try:
            if not self._hello(*got[0]):
                return
            for kind, payload in got[1:]:
                await self._dispatch(kind, payload)
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                for kind, payload in frames.feed(data):
                    await self._dispatch(kind, payload)
        except (OSError, ValueError) as exc:
            log.error("daemon_link_broken", error=f"{type(exc).__name__}: {exc}")
        finally:
            if self.daemon is writer:
                self.daemon = None
                now = time.monotonic()
                for w in self.waiting.values():
                    w.since = now  # handed to a daemon that is gone: wait for the next one
                log.warning("daemon_detached", waiting_reads=len(self.waiting), layers=len(self.layers))
            writer.close()

    def _hello(self, kind: int, payload: bytes) -> bool:
        doc = wire.doc_of(payload) if kind == wire.HELLO else {}
        if doc.get("version") != wire.VERSION:
            self._send(wire.control(wire.REFUSED, {"reason": f"protocol version {doc.get('version')}, "
                                                             f"this holder speaks {wire.VERSION}"}))
            return False
        self._send(wire.control(wire.WELCOME, {
            "version": wire.VERSION, "pid": os.getpid(), "next_slot": self.next_slot,
            "layers": {name: [slot, h] for name, (slot, h) in self.layers.items()}, "waiting": len(self.waiting)}))
        # reads a previous daemon took and never answered, and those that came meanwhile
        waiting = [(t, w.ino, w.off, w.size) for t, w in self.waiting.items()]
        if waiting:
            self._send(wire.frame(wire.MISSES, wire.records(wire.MISS, waiting)))
        log.info("daemon_attached", pid=doc.get("pid"), layers=len(self.layers), waiting_reads=len(waiting))
        return True

    async def _dispatch(self, kind: int, payload: bytes) -> None:
        session = self.session
        assert session is not None
        if kind == wire.DATA:
            (token,) = wire.TOKEN.unpack_from(payload)
            self._reply(token, payload[wire.TOKEN.size:])
        elif kind == wire.ERROR:
            token, err = wire.REPLY_ERROR.unpack(payload)
            self._reply(token, None, err)
        elif kind == wire.VERIFIED:
            session.mark_verified(payload)
        elif kind == wire.FORGET:
            session.forget_verified(payload)
        elif kind == wire.ADD:
            head, tree, digests = wire.parse_add(payload)
            self._add(head, tree, digests)
        elif kind == wire.FAILED:
            session.set_failed(int(wire.doc_of(payload)["slot"]))
        elif kind == wire.REMOVE:
            doc = wire.doc_of(payload)
            await self._remove(int(doc["slot"]), str(doc["name"]))
            self._send(wire.control(wire.DONE, {"id": doc.get("id")}))
        else:
            log.warning("daemon_unknown_message", kind=kind)

    def _add(self, head: dict[str, object], tree: bytes, digests: bytes) -> None:
        assert self.session is not None
        name, slot, rid = str(head["name"]), int(head["slot"]), head.get("id")  # type: ignore[call-overload]
        h = wire.tree_hash(tree, digests)
        if name in self.layers or slot in self.slots or slot < self.next_slot:
            if self.layers.get(name) == (slot, h):
                self._send(wire.control(wire.DONE, {"id": rid}))
            else:
                self._send(wire.control(wire.REFUSED, {"id": rid, "name": name,
                                                       "reason": f"slot {slot} or the layer is held already"}))
            return
        try:
            self.session.add_layer(slot, name, tree, digests, str(head["chunks_dir"]),
                                   int(head["chunk_size"]))  # type: ignore[call-overload]
        except (OSError, ValueError) as exc:
            log.error("layer_refused", layer=name, slot=slot, error=str(exc))
            self._send(wire.control(wire.REFUSED, {"id": rid, "name": name, "reason": str(exc)}))
            return
        self.layers[name] = (slot, h)
        self.slots[slot] = name
        self.next_slot = slot + 1
        self._send(wire.control(wire.DONE, {"id": rid}))
        log.info("layer_held", layer=name, slot=slot)

    async def _remove(self, slot: int, name: str) -> None:
        assert self.session is not None
        if self.slots.pop(slot, None) is None:
            return
        self.layers.pop(name, None)
        await release_layer(self.session, slot, name)
        log.info("layer_released", layer=name, slot=slot)

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            asyncio.get_running_loop().remove_reader(session.fileno())
            await asyncio.to_thread(session.close)  # fails waiting reads with EIO, unmounts
        log.info("holder_stopped", mountpoint=str(self.mountpoint))


async def run_holder(root: Path, mountpoint: Path, *, threads: int, read_ahead_kb: int,
                     wait_s: float = WAIT_S, relay: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT. One holder per root (``fuse-holder.lock``). ``relay``:
    the daemon's public gRPC socket, held here and forwarded to ``<root>/daemon.sock``
    (``snapshotter.service.relay``)."""
    private_dirs(root)
    os.umask(0o077)
    lock_fd = os.open(mountpoint.parent / HOLDER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.error("holder_running", root=str(root), note="another FUSE holder serves this root")
        return 1
    holder = Holder(root, mountpoint, threads, read_ahead_kb, wait_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await holder.mount()
    sock = holder.socket_path
    sock.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(holder.attach, path=str(sock))
    os.chmod(sock, FILE_MODE)
    grpc_relay = None
    if relay is not None:
        from snapshotter.service.relay import GrpcRelay

        prepare_socket(str(relay))
        grpc_relay = GrpcRelay(str(root / DAEMON_SOCKET), wait_s)
        await grpc_relay.start(str(relay))
        os.chmod(relay, 0o660)  # as the daemon's own socket
        log.info("relaying", address=str(relay), to=str(root / DAEMON_SOCKET))
    (root / "fuse-holder.pid").write_text(f"{os.getpid()}\n")
    ticker = loop.create_task(holder.tick())
    try:
        await stop.wait()
    finally:
        ticker.cancel()
        server.close()
        sock.unlink(missing_ok=True)
        if grpc_relay is not None and relay is not None:
            await grpc_relay.stop()
            relay.unlink(missing_ok=True)
        await holder.close()
        (root / "fuse-holder.pid").unlink(missing_ok=True)
        os.close(lock_fd)
    return 0
