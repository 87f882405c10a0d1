"""The messages between ``lazysnap serve`` and the FUSE holder (``snapshotter.fs.holder``).

One definition for both sides. A frame is ``FRAME`` (payload length, message type) and the
payload. The socket is ``<root>/fuse.sock`` in the 0700 state directory (mode 0600), so
only root reaches it. Control payloads are JSON objects; bulk ones are packed records.

daemon → holder: ``HELLO`` {version, pid, fd}; ``ADD`` (JSON head {id, slot, name,
chunks_dir, chunk_size}, tree blob, chunk digests); ``REMOVE`` {id, slot, name};
``FAILED`` {slot}; ``VERIFIED`` / ``FORGET`` (digests, 32 bytes each); ``DATA`` (token,
bytes); ``ERROR`` (token, errno); ``START`` {} (the layers of a session the holder took
over are back: serve, and have the kernel send again what the last holder left unanswered);
``BACKING`` {id, slot, local, path} (a file's backing file for passthrough; sent only to a
holder whose welcome says ``passthrough``); ``LAYER_FILE`` (JSON head {id, slot, path},
then one u64 per chunk of the layer: where it is in that file; sent only to a holder whose
welcome says ``layer_files``); ``ANSWERED`` (tokens, ``TOKEN`` records: reads the daemon
answered itself on its copy of the session's fd, for the holder to forget).
holder → daemon: ``WELCOME`` {version, pid, layers: {name: [slot, tree hash]},
next_slot, waiting, adopted, relay, passthrough, direct, layer_files}; ``MISSES`` (``MISS``
records), or
``MISSES_U`` (``MISS_U`` records: with the kernel's unique of each read) to a daemon whose
hello said ``direct`` and whose welcome says ``direct``; ``ACCESSES``
(``ACCESS`` records); ``COUNTERS`` {name: int}; ``DONE`` {id} (an ADD, REMOVE, BACKING or
LAYER_FILE is applied); ``REFUSED`` {reason} (another daemon is attached) or {id, [name],
reason, [errno]} (a request could not be applied).

Additions keep ``VERSION``: a field or message that only a newer peer sends is announced
by the other side first (``passthrough``, ``direct`` and ``layer_files`` in the welcome,
``direct`` in the hello), so daemon and holder of adjacent builds keep talking through an
upgrade of either.

Direct replies: a read that needs a fetch is answered by the daemon writing the reply to its
own copy of the session's fd (the kernel takes a reply from any holder of the connection),
so the bytes do not travel back through the holder; the holder then forgets the read
(``ANSWERED``). A reply the kernel no longer waits for (the holder failed the read after
its wait, or the read was replayed under another unique) is dropped by the kernel.

The session's ``/dev/fuse`` fd is held by both ends (``SCM_RIGHTS``), so that either can die
without the kernel aborting the mounts: it travels with ``HELLO`` when the daemon has it (its
holder died; ``fd`` true) and with ``WELCOME`` otherwise. A holder that took a session over
(``adopted``) serves only after ``START``, once the daemon has added its layers back.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
from typing import Any

VERSION = 2
FRAME = struct.Struct("<IB")  # payload length, message type
MAX_PAYLOAD = 1 << 31  # a tree blob of a 500k-entry layer is tens of MB; a read reply ≤ 1 MiB
MISS = struct.Struct("<QQQI")  # token, ino, offset, size
MISS_U = struct.Struct("<QQQQI")  # token, unique, ino, offset, size
ACCESS = struct.Struct("<QQIQ")  # ino, offset, size, t_ns
TOKEN = struct.Struct("<Q")
REPLY_ERROR = struct.Struct("<Qi")  # token, errno
ADD_HEAD = struct.Struct("<IQ")  # JSON head length, tree blob length (the digests follow)
HEAD_LEN = struct.Struct("<I")  # JSON head length (LAYER_FILE: the offsets follow)

(HELLO, ADD, REMOVE, FAILED, VERIFIED, FORGET, DATA, ERROR,
 WELCOME, MISSES, ACCESSES, COUNTERS, DONE, REFUSED, START, BACKING, MISSES_U, ANSWERED, LAYER_FILE) = range(1, 20)


def frame(kind: int, payload: bytes | bytearray | memoryview) -> bytes:
    return FRAME.pack(len(payload), kind) + bytes(payload)


def control(kind: int, doc: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(doc, separators=(",", ":")).encode())


def doc_of(payload: bytes) -> dict[str, Any]:
    doc = json.loads(payload)
    if not isinstance(doc, dict):
        raise ValueError("control message is not a JSON object")
    return doc


def tree_hash(tree: bytes, digests: bytes) -> str:
    """What identifies a layer's tree to the holder: the same hash means the same inode
    numbering, so a restarted daemon's view of open files agrees with the kernel's."""
    h = hashlib.sha256(tree)
    h.update(digests)
    return h.hexdigest()


def add(request: int, slot: int, name: str, chunks_dir: str, chunk_size: int, tree: bytes,
        digests: bytes) -> bytes:
    head = json.dumps({"id": request, "slot": slot, "name": name, "chunks_dir": chunks_dir,
                       "chunk_size": chunk_size}, separators=(",", ":")).encode()
    return frame(ADD, ADD_HEAD.pack(len(head), len(tree)) + head + tree + digests)


def parse_add(payload: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    head_len, tree_len = ADD_HEAD.unpack_from(payload)
    at = ADD_HEAD.size
    head = doc_of(payload[at:at + head_len])
    at += head_len
    return head, payload[at:at + tree_len], payload[at + tree_len:]


def layer_file(request: int, slot: int, path: str, offsets: bytes) -> bytes:
    head = json.dumps({"id": request, "slot": slot, "path": path}, separators=(",", ":")).encode()
    return frame(LAYER_FILE, HEAD_LEN.pack(len(head)) + head + offsets)


def parse_layer_file(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (head_len,) = HEAD_LEN.unpack_from(payload)
    at = HEAD_LEN.size
    return doc_of(payload[at:at + head_len]), payload[at + head_len:]


def records(rec: struct.Struct, rows: list[tuple[int, ...]]) -> bytes:
    return b"".join(rec.pack(*r) for r in rows)


def unpack_records(rec: struct.Struct, payload: bytes) -> list[tuple[int, ...]]:
    if len(payload) % rec.size:
        raise ValueError(f"{len(payload)} bytes is not a whole number of {rec.size}-byte records")
    return list(rec.iter_unpack(payload))


class FrameReader:
    """Frames out of a byte stream, as they complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= FRAME.size:
            length, kind = FRAME.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise ValueError(f"frame of {length} bytes")
            end = FRAME.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[FRAME.size:end])))
            del self._buf[:end]
        return out


# -- the handshake, on the raw socket: a stream reader would drop the fd that comes with it ----
async def send_with_fd(sock: socket.socket, data: bytes, fd: int | None) -> None:
    """Send ``data`` on a non-blocking socket, with ``fd`` attached to its first byte."""
    loop = asyncio.get_running_loop()
    if fd is None:
        await loop.sock_sendall(sock, data)
        return
    while True:
        try:
            sent = socket.send_fds(sock, [data], [fd])
            break
        except BlockingIOError:
            await _ready(loop, sock, write=True)
    if sent < len(data):
        await loop.sock_sendall(sock, data[sent:])


async def first_frames(sock: socket.socket) -> tuple[FrameReader, list[tuple[int, bytes]], int | None]:
    """Read a non-blocking socket up to its first whole frame (a hello or its answer) and
    keep the fd that came with it. No frames: the peer closed or reset first. ValueError:
    not this protocol. The fd is closed if the read fails or is cancelled (a timeout)."""
    frames = FrameReader()
    got: list[tuple[int, bytes]] = []
    fd: int | None = None
    try:
        while not got:
            try:
                data, came = await recv_with_fd(sock)
            except OSError:
                data, came = b"", None
            if came is not None:
                if fd is not None:
                    os.close(fd)
                fd = came
            if not data:
                break
            got = frames.feed(data)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return frames, got, fd


async def recv_with_fd(sock: socket.socket) -> tuple[bytes, int | None]:
    """The next bytes of a non-blocking socket and the fd that came with them, if any
    (not inherited by children; extra fds are closed)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
            break
        except BlockingIOError:
            await _ready(loop, sock, write=False)
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        return data, None
    os.set_inheritable(fds[0], False)
    return data, fds[0]


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
