"""The messages between ``lazysnap serve`` and the FUSE holder (``snapshotter.fs.holder``).

One definition for both sides. A frame is ``FRAME`` (payload length, message type) and the
payload. The socket is ``<root>/fuse.sock`` in the 0700 state directory (mode 0600), so
only root reaches it. Control payloads are JSON objects; bulk ones are packed records.

daemon → holder: ``HELLO`` {version, pid}; ``ADD`` (JSON head {id, slot, name,
chunks_dir, chunk_size}, tree blob, chunk digests); ``REMOVE`` {id, slot, name};
``FAILED`` {slot}; ``VERIFIED`` / ``FORGET`` (digests, 32 bytes each); ``DATA`` (token,
bytes); ``ERROR`` (token, errno).
holder → daemon: ``WELCOME`` {version, pid, layers: {name: [slot, tree hash]},
next_slot, waiting}; ``MISSES`` (``MISS`` records); ``ACCESSES`` (``ACCESS`` records);
``COUNTERS`` {name: int}; ``DONE`` {id} (an ADD or REMOVE is applied); ``REFUSED`` {reason}
(another daemon is attached) or {id, name, reason} (an ADD could not be applied).
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

VERSION = 1
FRAME = struct.Struct("<IB")  # payload length, message type
MAX_PAYLOAD = 1 << 31  # a tree blob of a 500k-entry layer is tens of MB; a read reply ≤ 1 MiB
MISS = struct.Struct("<QQQI")  # token, ino, offset, size
ACCESS = struct.Struct("<QQIQ")  # ino, offset, size, t_ns
TOKEN = struct.Struct("<Q")
REPLY_ERROR = struct.Struct("<Qi")  # token, errno
ADD_HEAD = struct.Struct("<IQ")  # JSON head length, tree blob length (the digests follow)

(HELLO, ADD, REMOVE, FAILED, VERIFIED, FORGET, DATA, ERROR,
 WELCOME, MISSES, ACCESSES, COUNTERS, DONE, REFUSED) = range(1, 15)


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
