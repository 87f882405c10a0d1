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

The holder itself can die or be replaced too: the attached daemon holds a copy of the
session's ``/dev/fuse`` fd (sent with the welcome), so the kernel keeps the mount alive
without any holder; the daemon starts the next holder and hands it the fd, the next holder
takes the session over (no new mount: the kernel's inode numbers and containers' open files
stay valid), the daemon adds its layers back under the same slots, and the holder has the
kernel send again every request the dead one had read and not answered
(``FUSE_NOTIFY_RESEND``). A holder stopped with a daemon attached therefore leaves the
mount and its unanswered reads to the daemon rather than failing them. Only when both die
does the kernel abort the mount.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter import _fuse
from snapshotter.fs import holderwire as wire
from snapshotter.fs.mount import (DAEMON_SOCKET, HOLDER_LOCK, HOLDER_SOCKET, MOUNT_OPTIONS, SessionOptions, detach,
                                  mount_device, release_layer, unmount_stale, wait_initialized)
from snapshotter.fsutil import FILE_MODE, prepare_socket, private_dirs
from snapshotter.log import get_logger
from snapshotter.tasks import TaskSet

log = get_logger("lazysnap.holder")

WAIT_S = 30.0  # a read that needs a daemon waits this long for one, then fails with EIO
TICK_S = 0.5  # counters to the daemon; waiting reads checked against WAIT_S


@dataclass(slots=True)
class _Waiting:
    ino: int
    off: int
    size: int
    since: float  # when it arrived, or when the daemon it was handed to went away
    arrived: float
    waited: bool  # there was no daemon to answer it at some point


@dataclass(slots=True)
class Holder:
    root: Path
    mountpoint: Path
    how: SessionOptions
    wait_s: float = WAIT_S
    session: _fuse.Session | None = None
    layers: dict[str, tuple[int, str]] = field(default_factory=dict)  # name → (slot, tree hash)
    slots: dict[int, str] = field(default_factory=dict)
    waiting: dict[int, _Waiting] = field(default_factory=dict)  # token → read not answered yet
    daemon: asyncio.StreamWriter | None = None
    next_slot: int = 1
    relay: Path | None = None  # the public gRPC socket this holder holds (told to the daemon)
    adopted: bool = False  # took over a session; serves once the daemon says START
    direct: bool = False  # the attached daemon answers reads itself (``MISSES_U``, ``ANSWERED``)
    waited_reads: int = 0  # reads answered after waiting for a daemon, and their total wait
    waited_s: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set: run_holder stops

    @property
    def socket_path(self) -> Path:
        return self.root / HOLDER_SOCKET

    # -- session --------------------------------------------------------------------------------
    async def mount(self) -> None:
        """Mount, unless something is mounted there already: that may be a live session
        whose holder died and whose fd the daemon keeps, to be handed to us at hello (never
        stat it: with no server reading, the stat would wait forever)."""
        if mount_device(self.mountpoint) is not None:
            log.info("holder_awaiting_session", mountpoint=str(self.mountpoint),
                     note="a mount exists: the daemon brings its fd, or it is replaced at hello")
            return
        await self._mount_new()

    async def _mount_new(self) -> None:
        if mount_device(self.mountpoint) is not None:
            detach(self.mountpoint)  # no daemon brought its session: nobody can serve it again
        unmount_stale(self.mountpoint)
        private_dirs(self.mountpoint)
        self.session = session = _fuse.Session(str(self.mountpoint), MOUNT_OPTIONS, self.how.threads,
                                               passthrough=self.how.passthrough)
        session.start()
        asyncio.get_running_loop().add_reader(session.fileno(), self._take)
        await wait_initialized(session, self.mountpoint, self.how.read_ahead_kb)
        log.info("holder_mounted", mountpoint=str(self.mountpoint), pid=os.getpid(),
                 passthrough=session.passthrough())

    def _adopt(self, fd: int) -> None:
        """Take over the session of ``fd`` (the daemon kept it when the last holder died);
        workers start at ``START``, once its layers are back."""
        try:
            self.session = _fuse.Session(str(self.mountpoint), "", self.how.threads, fuse_fd=fd)
        finally:
            os.close(fd)  # the session has its own copy
        self.adopted = True
        log.info("holder_adopting", mountpoint=str(self.mountpoint), pid=os.getpid())

    def _serve_adopted(self) -> None:
        session = self.session
        if not self.adopted or session is None:
            return
        self.adopted = False
        session.start()
        asyncio.get_running_loop().add_reader(session.fileno(), self._take)
        try:
            session.resend()
            resent = True
        except OSError as exc:  # Linux < 6.9: what the last holder read stays unanswered
            log.error("resend_unsupported", error=str(exc))
            resent = False
        log.info("holder_took_over", mountpoint=str(self.mountpoint), layers=len(self.layers), resent=resent)

    def _take(self) -> None:
        assert self.session is not None
        misses, accesses = self.session.take()
        now = time.monotonic()
        for token, ino, off, size in misses:
            self.waiting[token] = _Waiting(ino, off, size, now, now, self.daemon is None)
        if self.daemon is not None:
            if misses:
                self._send_misses(misses)
            if accesses:
                self._send(wire.frame(wire.ACCESSES, wire.records(wire.ACCESS, accesses)))

    def _send_misses(self, misses: list[tuple[int, int, int, int]]) -> None:
        session = self.session
        if self.direct and session is not None:
            with_unique = [(t, session.unique(t), ino, off, size) for t, ino, off, size in misses]
            self._send(wire.frame(wire.MISSES_U, wire.records(wire.MISS_U, with_unique)))
        else:
            self._send(wire.frame(wire.MISSES, wire.records(wire.MISS, misses)))

    def _reply(self, token: int, data: bytes | None, err: int = 0) -> None:
        """Answer a read (``data``, or ``err``), or with neither forget one the daemon answered."""
        w = self.waiting.pop(token, None)
        if w is None or self.session is None:
            return  # answered already (EIO after WAIT_S) or unknown
        if w.waited:
            self.waited_reads += 1
            self.waited_s += time.monotonic() - w.arrived
        if data is not None:
            self.session.reply_data(token, data)
        elif err:
            self.session.reply_error(token, err)
        else:
            self.session.forget(token)

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.session is None:
                continue
            if self.daemon is not None:
                self._send(wire.control(wire.COUNTERS, {**self.session.counters(), "waited_reads": self.waited_reads,
                                                        "waited_ms": int(self.waited_s * 1000)}))
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

    async def attach(self, conn: socket.socket) -> None:
        """One connection: a daemon's hello (with the session's fd if it has one), then its
        messages until it goes away. A connection that says nothing (a probe: does a holder
        run here?) is closed quietly."""
        try:
            async with asyncio.timeout(10):
                frames, got, fd = await wire.first_frames(conn)
        except (TimeoutError, ValueError):
            frames, got, fd = wire.FrameReader(), [], None
        if not got:
            if fd is not None:
                os.close(fd)
            conn.close()
            return
        if self.daemon is not None:  # its hello is read: closing on unread bytes would reset
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(OSError):
                await wire.send_with_fd(conn, wire.control(wire.REFUSED, {
                    "reason": "another lazysnap serve is attached to this root's FUSE holder"}), None)
            conn.close()
            return
        try:
            welcome, send_fd, accepted = await self._hello(*got[0], fd)
            await wire.send_with_fd(conn, welcome, send_fd)
            if not accepted:
                conn.close()
                return
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except (OSError, ValueError) as exc:
            log.error("daemon_hello_failed", error=f"{type(exc).__name__}: {exc}")
            conn.close()
            return
        if self.daemon is not None:  # another daemon got in while this hello was answered
            writer.close()
            return
        self.daemon = writer
        self.direct = bool(wire.doc_of(got[0][1]).get("direct"))  # its hello was a HELLO: _hello checked
        try:
            self._hand_waiting()
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
                self.direct = False
                now = time.monotonic()
                for w in self.waiting.values():
                    w.since = now  # handed to a daemon that is gone: wait for the next one
                    w.waited = True
                log.warning("daemon_detached", waiting_reads=len(self.waiting), layers=len(self.layers))
                if self.adopted:
                    # it died before its layers were all back: the kernel's inode numbers mean
                    # layers only it knew, and a new daemon could number them otherwise; end
                    # the session cleanly (EIO, unmount) rather than risk serving other bytes
                    log.error("adopted_session_abandoned", mountpoint=str(self.mountpoint))
                    self.stop.set()
            writer.close()

    async def _hello(self, kind: int, payload: bytes, fd: int | None) -> tuple[bytes, int | None, bool]:
        """The answer to a daemon's hello, the fd to send with it (None: the daemon has it)
        and whether the daemon is accepted. ``fd``: the session the daemon kept (its holder died),
        taken over if this holder has none yet."""
        doc = wire.doc_of(payload) if kind == wire.HELLO else {}
        if doc.get("version") != wire.VERSION:
            if fd is not None:
                os.close(fd)
            return wire.control(wire.REFUSED, {"reason": f"protocol version {doc.get('version')}, "
                                                         f"this holder speaks {wire.VERSION}"}), None, False
        adopting = self.session is None and fd is not None
        if adopting:
            assert fd is not None
            self._adopt(fd)
        elif fd is not None:
            os.close(fd)  # this holder mounted its own: the daemon's was another (dead) session
        elif self.session is None:
            await self._mount_new()
        assert self.session is not None
        welcome = wire.control(wire.WELCOME, {
            "version": wire.VERSION, "pid": os.getpid(), "next_slot": self.next_slot,
            "layers": {name: [slot, h] for name, (slot, h) in self.layers.items()}, "waiting": len(self.waiting),
            "adopted": self.adopted, "relay": str(self.relay) if self.relay is not None else None,
            "passthrough": self.session.passthrough(), "direct": bool(doc.get("direct")), "layer_files": True})
        log.info("daemon_attached", pid=doc.get("pid"), layers=len(self.layers), waiting_reads=len(self.waiting),
                 brought_session=fd is not None)
        return welcome, None if adopting else self.session.fuse_fileno(), True

    def _hand_waiting(self) -> None:
        """Reads a previous daemon took and never answered, and those that came meanwhile."""
        waiting = [(t, w.ino, w.off, w.size) for t, w in self.waiting.items()]
        if waiting:
            self._send_misses(waiting)

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
        elif kind == wire.START:
            self._serve_adopted()
        elif kind == wire.BACKING:
            self._set_backing(wire.doc_of(payload))
        elif kind == wire.LAYER_FILE:
            self._set_layer_file(*wire.parse_layer_file(payload))
        elif kind == wire.ANSWERED:
            for (token,) in wire.unpack_records(wire.TOKEN, payload):
                self._reply(token, None)
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

    def _answer(self, rid: object, apply: Callable[[], None]) -> None:
        """Apply a request the daemon waits on: DONE, or REFUSED with the reason and errno."""
        try:
            apply()
        except OSError as exc:
            self._send(wire.control(wire.REFUSED, {"id": rid, "reason": exc.strerror or str(exc),
                                                   "errno": exc.errno or errno.EIO}))
            return
        except ValueError as exc:
            self._send(wire.control(wire.REFUSED, {"id": rid, "reason": str(exc), "errno": errno.EINVAL}))
            return
        self._send(wire.control(wire.DONE, {"id": rid}))

    def _set_backing(self, doc: dict[str, object]) -> None:
        session = self.session
        assert session is not None
        slot, local, path = doc["slot"], doc["local"], str(doc["path"])
        self._answer(doc.get("id"), lambda: session.set_backing(int(slot), int(local), path))  # type: ignore[call-overload]

    def _set_layer_file(self, doc: dict[str, object], offsets: bytes) -> None:
        session = self.session
        assert session is not None
        slot, path = doc["slot"], str(doc["path"])
        self._answer(doc.get("id"), lambda: session.set_layer_file(int(slot), path, offsets))  # type: ignore[call-overload]

    async def _remove(self, slot: int, name: str) -> None:
        assert self.session is not None
        if self.slots.pop(slot, None) is None:
            return
        self.layers.pop(name, None)
        await release_layer(self.session, slot, name)
        log.info("layer_released", layer=name, slot=slot)

    async def close(self) -> None:
        """Stop. With a daemon attached, it holds the session too: leave the mount and the
        unanswered reads to it and the next holder. Alone: fail waiting reads, unmount."""
        session, self.session = self.session, None
        handed = self.daemon is not None and not self.daemon.is_closing()
        if session is not None:
            asyncio.get_running_loop().remove_reader(session.fileno())
            await asyncio.to_thread(session.close, unmount=not handed)
        log.info("holder_stopped", mountpoint=str(self.mountpoint), left_to_daemon=handed)


async def run_holder(root: Path, mountpoint: Path, how: SessionOptions, *,
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
    holder = Holder(root, mountpoint, how, wait_s, relay=relay)
    stop = holder.stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await holder.mount()
    sock = holder.socket_path
    sock.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(str(sock))
    os.chmod(sock, FILE_MODE)
    listener.listen(16)
    listener.setblocking(False)
    accepting = loop.create_task(_accept(listener, holder), name="fuse-holder-accept")
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
        # everything a successor takes (socket paths, pid file, lock) is given up before the
        # daemon's link is cut: the daemon starts the successor as soon as it sees that
        await holder.close()
        listener.close()
        sock.unlink(missing_ok=True)
        if grpc_relay is not None and relay is not None:
            await grpc_relay.stop()
            relay.unlink(missing_ok=True)
        (root / "fuse-holder.pid").unlink(missing_ok=True)
        os.close(lock_fd)
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
    return 0


async def _accept(listener: socket.socket, holder: Holder) -> None:
    """Accept connections on the holder's socket; each is handled in a task of its own
    (cancelled with this one)."""
    loop = asyncio.get_running_loop()
    conns = TaskSet("fuse-holder")
    try:
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            conns.spawn(holder.attach(conn), name="fuse-holder-conn")
    finally:
        await conns.aclose()
