"""Fill the store from a layer with no random access by streaming it once from the start.

A single-frame zstd layer has no checkpoint but the start, so every span would decode
from offset 0: quadratic, and a whole-layer span would hold the layer in memory. Instead
the blob is streamed once through a decompressor; chunks are cut at their known
uncompressed offsets, verified (SHA-256) and stored as they pass, in bounded memory.
"""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from snapshotter.index.model import LayerFormat
from snapshotter.index.decompress import StreamDecompressor


class StreamCorrupt(Exception):
    """The stream did not produce a chunk's bytes (bad data, truncated, or a lying index)."""


def _verify_and_put(put: Callable[[int, bytes], Any], cid: int, off: int, data: bytes, digest: bytes) -> None:
    """Off the event loop: hashing a chunk is CPU work."""
    if hashlib.sha256(data).digest() != digest:
        raise StreamCorrupt(f"chunk {cid} at {off} failed SHA-256 verification")
    put(cid, data)


async def stream_fill(blocks: AsyncIterator[bytes], fmt: LayerFormat, chunks: list[tuple[int, int, int, bytes]],
                      put: Callable[[int, bytes], Any], run: Callable[..., Any]) -> int:
    """Cut ``chunks`` ((uncompressed offset, length, chunk id, sha256)) out of the stream.

    ``put(chunk_id, data)`` stores a verified chunk; ``run(fn, *args)`` runs CPU work off
    the event loop (``asyncio.to_thread``). Returns the number of chunks stored.
    """
    order = sorted(chunks)
    stream = StreamDecompressor(fmt.value)

    def feed(block: bytes) -> bytes:
        return b"".join(stream.feed(block))

    pos = 0  # uncompressed offset of buf[0]
    buf = bytearray()
    i = 0
    stored = 0
    async for block in blocks:
        out = await run(feed, block)
        buf += out
        while i < len(order):
            off, length, cid, digest = order[i]
            if off + length > pos + len(buf):
                break
            start = off - pos
            if start < 0:
                raise StreamCorrupt(f"chunk {cid} overlaps an earlier chunk")
            await run(_verify_and_put, put, cid, off, bytes(buf[start:start + length]), digest)
            stored += 1
            i += 1
        # drop bytes no later chunk needs
        keep_from = order[i][0] - pos if i < len(order) else len(buf)
        if keep_from > 0:
            del buf[:keep_from]
            pos += keep_from
        if i == len(order):
            break
    if i < len(order):
        raise StreamCorrupt(f"stream ended before chunk {order[i][2]} at offset {order[i][0]}")
    return stored
