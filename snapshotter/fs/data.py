"""File bytes of one layer: file range → chunk ids → store, fetching misses first.

The hit path is deliberately small: integer arithmetic, one ``os.pread`` per chunk
touched (the chunk store keeps fds open), one bytes join. With 1 MiB reads and 1 MiB
chunks that is one or two preads per FUSE request.
"""
from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from typing import Protocol

from snapshotter.index.model import Chunk, Entry
from snapshotter.store import ChunkStore
from snapshotter.log import get_logger

log = get_logger("lazysnap.fs")


class ChunkFetcher(Protocol):
    """Makes chunks of one layer local (in the store) or raises OSError (EIO)."""

    async def ensure(self, chunk_ids: Sequence[int]) -> None: ...


class IndexView(Protocol):
    """What the filesystem needs from a layer index (``snapshotter.index.format.IndexFile``)."""

    @property
    def info(self): ...  # LayerInfo

    def entries(self): ...

    def chunk(self, i: int) -> Chunk: ...


READAHEAD_CHUNKS = 2  # chunk files hinted ahead of a sequential reader (measured: bench/fuse_reads.py)
# (entry, offset, size, chunk ids, monotonic time of the read or None for "now")
AccessHook = Callable[[Entry, int, int, Sequence[int], "float | None"], None]


class LayerData:
    """Reads regular-file bytes of one layer."""

    def __init__(self, index: IndexView, store: ChunkStore, fetcher: ChunkFetcher | None,
                 *, on_access: AccessHook | None = None) -> None:
        self.index = index
        self.store = store
        self.fetcher = fetcher
        self.chunk_size: int = index.info.chunk_size
        self.on_access = on_access
        self.failed: str | None = None  # set when the layer is quarantined
        #: the layer file the C side reads this layer's chunks from (path, a u64 offset per
        #: chunk: ``ChunkStore.layer_file_offsets``), when this process wrote one
        self.layer_file: tuple[str, bytes] | None = None

    async def read(self, e: Entry, off: int, size: int) -> bytes:
        if self.failed is not None:
            raise OSError(errno.EIO, f"layer quarantined: {self.failed}")
        if off >= e.size or size <= 0:
            return b""
        size = min(size, e.size - off)
        if e.sparse:
            return await self._read_sparse(e, off, size)
        return await self._read_stored(e, off, size)

    async def _read_sparse(self, e: Entry, off: int, size: int) -> bytes:
        """Logical → stored coordinates: data segments are stored back to back, holes are zeros."""
        out = bytearray(size)
        stored_base = 0
        end = off + size
        assert e.sparse is not None
        for seg_off, seg_len in e.sparse:
            lo, hi = max(off, seg_off), min(end, seg_off + seg_len)
            if lo < hi:
                data = await self._read_stored(e, stored_base + (lo - seg_off), hi - lo)
                out[lo - off:hi - off] = data
            stored_base += seg_len
            if seg_off >= end:
                break
        return bytes(out)

    def chunk_ids(self, e: Entry, off: int, size: int) -> list[int]:
        """Chunk ids under stored bytes [off, off+size) of a file (size > 0)."""
        cs = self.chunk_size
        last = min((off + size - 1) // cs, e.chunk_count - 1)
        return [e.first_chunk + k for k in range(off // cs, last + 1)]

    def note_access(self, e: Entry, off: int, size: int, at: float) -> None:
        """A read the C filesystem answered from local chunks (at = its monotonic time)."""
        if self.on_access is not None and size > 0 and off < e.size and e.chunk_count:
            size = min(size, e.size - off)
            self.on_access(e, off, size, self.chunk_ids(e, off, size), at)

    async def _read_stored(self, e: Entry, off: int, size: int) -> bytes:
        cs = self.chunk_size
        first = off // cs
        last = min((off + size - 1) // cs, e.chunk_count - 1)
        ids = self.chunk_ids(e, off, size)
        if self.on_access is not None:
            self.on_access(e, off, size, ids, None)
        for attempt in range(4):
            parts: list[bytes] = []
            missing: list[int] = []
            pos = off
            end = off + size
            for k, cid in zip(range(first, last + 1), ids):
                c_lo = k * cs
                lo = pos - c_lo
                n = min(end, c_lo + cs) - pos
                digest = self.index.chunk(cid).digest
                data = self.store.read_cached(digest, lo, n)
                if isinstance(data, bool):  # False: the read would block
                    data = await asyncio.to_thread(self.store.read, digest, lo, n)
                if data is None:
                    missing.append(cid)
                else:
                    if len(data) != n:
                        raise OSError(errno.EIO, f"short chunk {cid} in {e.path}")
                    parts.append(data)
                pos += n
            if not missing:
                if (off + size - 1) % cs >= cs // 2:
                    # past the middle of a chunk: let the kernel read the next chunk files ahead
                    for nxt in range(last + 1, min(last + 1 + READAHEAD_CHUNKS, e.chunk_count)):
                        self.store.hint(self.index.chunk(e.first_chunk + nxt).digest)
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self.fetcher is None:
                raise OSError(errno.EIO, f"chunk missing and layer has no fetcher: {e.path}")
            await self.fetcher.ensure(missing)
        if self.store.full:
            raise OSError(errno.EIO, f"chunks of {e.path} cannot be kept: the chunk store at {self.store.chunks_dir} "
                                     "is out of space")
        raise OSError(errno.EIO, f"chunks of {e.path} keep disappearing from the store (limit too small?)")
