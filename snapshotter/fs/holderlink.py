"""The daemon's end of the FUSE holder: ``LazyFS``'s backend when ``[lazy] fuse_holder``.

Attaching starts the holder if none runs on this root (a process of its own session, so
that neither a signal to the daemon's process group nor the daemon's death reaches it),
then says hello; the holder answers with the layers it already serves, which a restarted
daemon adopts slot for slot. Everything after is one-way messages in order, so a miss for
a slot never overtakes the ADD that made it.

The welcome carries the session's ``/dev/fuse`` fd, which the daemon keeps: when the holder
dies (killed, or stopped to be upgraded) the kernel keeps the mount alive on that copy, and
``LazyFS`` brings the fd to the next holder (``on_lost``).
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapshotter import _fuse
from snapshotter.fs import holderwire as wire
from snapshotter.fs import metrics
from snapshotter.fs.mount import SessionOptions
from snapshotter.fsutil import FILE_MODE, private_dirs
from snapshotter.log import get_logger

log = get_logger("lazysnap.fs")

SPAWN_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 60.0  # removing a layer waits for its requests in flight


class HolderError(OSError):
    """The FUSE holder cannot be reached or refused this daemon (one line)."""


class HolderLink:
    """This daemon's attachment to the FUSE holder (a ``lazyfs.FuseBackend``): layer and
    verified-chunk changes go out as frames, reads the holder could not answer come in
    (``on_misses``), answers go back by token. ``stop`` detaches; the holder serves on."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frames: wire.FrameReader,
                 welcome: dict[str, Any], on_misses: Callable[[Any], None],
                 on_accesses: Callable[[Any], None], on_lost: Callable[[HolderLink], None] | None = None) -> None:
        self._reader = reader
        self._frames = frames
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self.pid = int(welcome.get("pid", 0))
        self.held: dict[str, tuple[int, str]] = {
            str(k): (int(v[0]), str(v[1])) for k, v in (welcome.get("layers") or {}).items()}
        self.next_slot = int(welcome.get("next_slot", 1))
        self.adopted = bool(welcome.get("adopted"))  # took over our session: START once layers are back
        self.passthrough = bool(welcome.get("passthrough"))  # absent from a holder that never passes through
        self.direct = bool(welcome.get("direct"))  # the holder sends reads with their unique (MISSES_U)
        self.layer_files = bool(welcome.get("layer_files"))  # the holder reads chunks from layer files
        # our copy of the session's fd, set by LazyFS: fetched reads are answered on it
        # directly (the bytes need not travel back through the holder)
        self.reply_fd: int | None = None
        self._uniques: dict[int, int] = {}  # token → the kernel's unique, for reads in flight
        self._answered: list[int] = []  # tokens answered directly, to tell the holder (batched)
        self.relay = Path(welcome["relay"]) if welcome.get("relay") else None
        self.session_fd: int | None = None  # the session's fd, when the welcome brought it (ours to close)
        self._on_lost = on_lost
        self._stopping = False
        self._on_misses = on_misses
        self._on_accesses = on_accesses
        self._counters: dict[str, int] = {}
        self._done: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._early: list[tuple[int, bytes]] = []  # frames that came with the welcome
        self._task = self._loop.create_task(self._receive(), name="fuse-holder-link")

    @classmethod
    async def attach(cls, socket_path: Path, mountpoint: Path, how: SessionOptions, *,
                     on_misses: Callable[[Any], None], on_accesses: Callable[[Any], None],
                     on_lost: Callable[[HolderLink], None] | None = None, session_fd: int | None = None,
                     relay: Path | None = None, spawn: bool = True) -> HolderLink:
        """Connect to the holder of ``socket_path`` (starting it, holding ``relay``, if none
        answers and ``spawn``) and say hello, bringing ``session_fd`` (the session a dead
        holder left)."""
        started = await ensure_holder(socket_path, mountpoint, how, relay=relay, spawn=spawn)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, str(socket_path))
        except OSError as exc:
            sock.close()
            raise HolderError(errno.ECONNREFUSED, f"cannot reach the FUSE holder at {socket_path}: {exc}") from None
        try:
            async with asyncio.timeout(SPAWN_TIMEOUT_S):
                try:
                    await wire.send_with_fd(sock, wire.control(wire.HELLO, {
                        "version": wire.VERSION, "pid": os.getpid(), "fd": session_fd is not None,
                        "direct": True}), session_fd)
                except OSError:
                    pass  # a holder that refuses us closes at once; its reason is still to be read
                frames, got, received = await wire.first_frames(sock)
        except TimeoutError:
            sock.close()
            raise HolderError(errno.ETIMEDOUT, f"the FUSE holder at {socket_path} did not answer") from None
        except ValueError:
            sock.close()
            raise
        if not got:
            _close(sock, received)
            raise HolderError(errno.ECONNRESET, f"the FUSE holder at {socket_path} closed the connection")
        kind, payload = got[0]
        doc = wire.doc_of(payload)
        if kind == wire.REFUSED:
            _close(sock, received)
            raise HolderError(errno.EBUSY, f"the FUSE holder at {socket_path} refused: {doc.get('reason')}")
        if kind != wire.WELCOME or doc.get("version") != wire.VERSION:
            _close(sock, received)
            raise HolderError(errno.EPROTO, f"the FUSE holder at {socket_path} speaks another protocol "
                                            f"(version {doc.get('version')}, this daemon {wire.VERSION})")
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        link = cls(reader, writer, frames, doc, on_misses, on_accesses, on_lost)
        link.session_fd = received
        link._early = got[1:]  # handled by the receiving task, once the caller holds the link
        metrics.HOLDER_ATTACHES.labels("yes" if started else "no").inc()
        metrics.HOLDER_HANDED_READS.inc(int(doc.get("waiting", 0)))
        log.info("holder_attached", socket=str(socket_path), pid=link.pid, started=started,
                 held_layers=len(link.held), waiting_reads=int(doc.get("waiting", 0)))
        return link

    # -- FuseBackend --------------------------------------------------------------------------
    async def add_layer(self, slot: int, name: str, tree: bytes, digests: bytes, chunks_dir: str,
                        chunk_size: int) -> None:
        """Returns once the holder serves the layer (containerd mounts it right after)."""
        await self._request(lambda rid: wire.add(rid, slot, name, chunks_dir, chunk_size, tree, digests),
                            f"add layer {name}")
        self.held[name] = (slot, await asyncio.to_thread(wire.tree_hash, tree, digests))

    async def remove_layer(self, slot: int, name: str) -> None:
        await self._request(lambda rid: wire.control(wire.REMOVE, {"id": rid, "slot": slot, "name": name}),
                            f"remove layer {name}")

    async def set_backing(self, slot: int, local: int, path: str) -> None:
        await self._request(lambda rid: wire.control(wire.BACKING, {"id": rid, "slot": slot, "local": local,
                                                                    "path": path}), "take a backing file")

    async def set_layer_file(self, slot: int, path: str, offsets: bytes) -> bool:
        if not self.layer_files:
            return False
        await self._request(lambda rid: wire.layer_file(rid, slot, path, offsets), "take a layer file")
        return True

    def start_serving(self) -> None:
        """A holder that took our session over serves from now on (layers are back)."""
        self._send(wire.control(wire.START, {}))

    async def _request(self, make: Callable[[int], bytes], what: str) -> None:
        """Send a frame carrying a request id; wait for the holder's DONE (or REFUSED)."""
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[None] = self._loop.create_future()
        self._done[rid] = fut
        self._send(make(rid))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await fut
        except TimeoutError:
            raise HolderError(errno.ETIMEDOUT, f"the FUSE holder did not {what} within "
                                               f"{REQUEST_TIMEOUT_S:g}s") from None
        finally:
            self._done.pop(rid, None)

    def set_failed(self, slot: int) -> None:
        self._send(wire.control(wire.FAILED, {"slot": slot}))

    def mark_verified(self, digests: bytes) -> None:
        self._send(wire.frame(wire.VERIFIED, digests))

    def forget_verified(self, digests: bytes) -> None:
        self._send(wire.frame(wire.FORGET, digests))

    def reply_data(self, token: int, data: bytes) -> None:
        if not self._reply_directly(token, data):
            self._send(wire.frame(wire.DATA, wire.TOKEN.pack(token) + data))

    def reply_error(self, token: int, err: int) -> None:
        if not self._reply_directly(token, err):
            self._send(wire.frame(wire.ERROR, wire.REPLY_ERROR.pack(token, err)))

    def _reply_directly(self, token: int, what: bytes | int) -> bool:
        """Answer on our copy of the session's fd; the holder forgets the read when told
        (``ANSWERED``, batched per loop turn). False: send the answer through the holder."""
        unique = self._uniques.pop(token, 0)
        if not unique or self.reply_fd is None or self._writer.is_closing():
            return False
        try:
            _fuse.reply(self.reply_fd, unique, what)
        except OSError as exc:
            log.warning("direct_reply_failed", error=str(exc), fallback="through the holder")
            return False
        metrics.HOLDER_DIRECT_REPLIES.inc()
        if not self._answered:
            self._loop.call_soon(self._flush_answered)
        self._answered.append(token)
        return True

    def _flush_answered(self) -> None:
        tokens, self._answered = self._answered, []
        if tokens:
            self._write_unless_closed(wire.frame(wire.ANSWERED, wire.records(wire.TOKEN, [(t,) for t in tokens])))

    def counters(self) -> dict[str, int]:
        """The holder's C counters as of its last report (twice a second)."""
        return dict(self._counters)

    async def stop(self) -> None:
        """Detach: the holder keeps serving, and keeps reads that need a daemon waiting."""
        self._stopping = True
        await asyncio.sleep(0)  # frames other threads queued (verified chunks) go out first
        try:
            await asyncio.wait_for(self._writer.drain(), 5)
        except (OSError, TimeoutError):
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        """Queue a frame; safe from any thread (the chunk store reports verified chunks from
        its workers), in order per thread."""
        if threading.get_ident() == self._thread:
            self._write_unless_closed(data)
        else:
            self._loop.call_soon_threadsafe(self._write_unless_closed, data)

    def _write_unless_closed(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def _receive(self) -> None:
        frames = self._frames
        for kind, payload in self._early:
            self._dispatch(kind, payload)
        self._early = []
        while True:
            try:
                data = await self._reader.read(1 << 20)
            except OSError:  # reset: the holder was killed
                data = b""
            if not data:
                break
            for kind, payload in frames.feed(data):
                self._dispatch(kind, payload)
        self._writer.close()
        if self._stopping:
            return
        if self._on_lost is None:
            log.error("holder_lost", pid=self.pid,
                      note="the FUSE holder went away: its mount is gone, containers on it fail")
            return
        self._on_lost(self)

    def _dispatch(self, kind: int, payload: bytes) -> None:
        if kind == wire.MISSES:
            self._on_misses(wire.unpack_records(wire.MISS, payload))
        elif kind == wire.MISSES_U:
            misses = []
            for token, unique, ino, off, size in wire.unpack_records(wire.MISS_U, payload):
                self._uniques[token] = unique
                misses.append((token, ino, off, size))
            self._on_misses(misses)
        elif kind == wire.ACCESSES:
            self._on_accesses(wire.unpack_records(wire.ACCESS, payload))
        elif kind == wire.COUNTERS:
            self._counters = {str(k): int(v) for k, v in wire.doc_of(payload).items()}
        elif kind in (wire.DONE, wire.REFUSED):
            doc = wire.doc_of(payload)
            fut = self._done.get(int(doc.get("id", -1)))
            if fut is not None and not fut.done():
                if kind == wire.DONE:
                    fut.set_result(None)
                else:
                    what = f"layer {doc['name']}" if "name" in doc else "the request"
                    fut.set_exception(HolderError(int(doc.get("errno") or errno.EINVAL),
                                                  f"the FUSE holder refused {what}: {doc.get('reason')}"))
        else:
            log.warning("holder_unknown_message", kind=kind)


async def ensure_holder(socket_path: Path, mountpoint: Path, how: SessionOptions, *,
                        relay: Path | None = None, spawn: bool = True) -> bool:
    """Start a FUSE holder on ``socket_path``'s root unless one listens; True if started.
    ``relay``: the public gRPC socket it should hold (``fuse-holder --address``). ``spawn``
    False: raise ``HolderError`` instead of starting one."""
    try:
        _, writer = await asyncio.open_unix_connection(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        if not spawn:
            raise HolderError(errno.ECONNREFUSED, f"no FUSE holder listens on {socket_path}") from None
        await _spawn(socket_path, mountpoint, how, relay)
        if os.environ.get("INVOCATION_ID"):  # a systemd unit: its stop kills the whole cgroup
            log.warning("holder_in_daemon_unit", note="the FUSE holder was started inside lazysnap's own "
                        "systemd unit, whose stop or restart kills it: enable lazysnap-fused.service")
        return True
    writer.close()  # a probe: the holder closes a connection that says nothing
    return False


async def _spawn(socket_path: Path, mountpoint: Path, how: SessionOptions, relay: Path | None) -> None:
    """Start ``lazysnap fuse-holder`` in a session of its own and wait until it listens."""
    root = socket_path.parent
    private_dirs(root)
    log_path = root / "fuse-holder.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapshotter", "fuse-holder", "--root", str(root),
             "--mountpoint", str(mountpoint), *how.holder_args(),
             *(["--address", str(relay)] if relay is not None else [])],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    log.info("holder_started", pid=proc.pid, socket=str(socket_path), log=str(log_path))
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while True:
        try:
            _, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.close()
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None:
                raise HolderError(errno.ECHILD, f"the FUSE holder exited with status {proc.returncode} "
                                                f"(see {log_path})") from None
            if time.monotonic() > deadline:
                raise HolderError(errno.ETIMEDOUT, f"the FUSE holder did not listen on {socket_path} "
                                                   f"within {SPAWN_TIMEOUT_S:g}s (see {log_path})") from None
            await asyncio.sleep(0.02)


def _close(sock: socket.socket, fd: int | None) -> None:
    sock.close()
    if fd is not None:
        os.close(fd)
