"""Checkpoint windows of an index published with its windows apart, fetched on first use.

The index names the windows blob and each window's extent and SHA-256
(``format.serialize_split``). A span decodes from one checkpoint, so before its decode the
fetcher asks for that checkpoint's window here, concurrently with the span's own range.
Windows land in a sparse local copy of the windows blob, ``<index>.win`` next to the index
file; a window counts as local only while it matches its digest, so a crash mid-write or a
corrupted range is fetched again, never used.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from snapshotter.fetch.quiet import quiet_failure
from snapshotter.fsutil import FILE_MODE
from snapshotter.index.errors import IndexFormatError
from snapshotter.log import get_logger

log = get_logger("lazysnap.fetch")

MERGE_GAP = 4 << 10  # windows closer than this in the blob are fetched with one range


def windows_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".win")


class WindowCache:
    """The windows of one apart index: local copy, single-flight range fetches, checks."""

    def __init__(self, index: Any, path: Path, source: Any) -> None:
        self.index = index
        self.path = path
        self.source = source  # ranges of the windows blob (RegistryBlobSource or a file)
        self.bytes_fetched = 0
        self._have: set[int] = set()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        size = index.windows_size()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse: windows are written where they belong
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        index.attach_windows(path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def local(self, checkpoint: int) -> bool:
        if checkpoint in self._have:
            return True
        if self.index.window_local(checkpoint):
            self._have.add(checkpoint)
            return True
        return False

    async def ensure(self, checkpoints: Iterable[int], on_bytes: Any = None) -> None:
        """Return once every window of ``checkpoints`` is local and intact; raises what the
        fetch raised (the caller's retry loop and deadline apply). ``on_bytes(n)`` counts
        registry bytes under the caller's priority."""
        need = sorted({c for c in checkpoints if c >= 0 and not self.local(c)})
        if not need:
            return
        waits = [self._inflight[c] for c in need if c in self._inflight]
        new = [c for c in need if c not in self._inflight]
        if new:
            loop = asyncio.get_running_loop()
            futs = {c: loop.create_future() for c in new}
            for c, fut in futs.items():
                fut.add_done_callback(quiet_failure)
                self._inflight[c] = fut
            waits += futs.values()
            task = asyncio.ensure_future(self._fetch(futs, on_bytes))
            task.add_done_callback(quiet_failure)
        for fut in waits:
            await asyncio.shield(fut)

    async def _fetch(self, futs: dict[int, asyncio.Future[None]], on_bytes: Any) -> None:
        try:
            for lo, hi, members in self._ranges(sorted(futs)):
                try:
                    data = await self.source.read_range(lo, hi)
                    if len(data) != hi - lo:
                        raise IndexFormatError(f"windows blob range {lo}-{hi}: got {len(data)} bytes")
                    self.bytes_fetched += len(data)
                    if on_bytes is not None:
                        on_bytes(len(data))
                    for c in members:
                        self._store(c, data, lo)
                        futs[c].set_result(None)
                except Exception as exc:  # noqa: BLE001 - every waiter of this range gets it
                    for c in members:
                        if not futs[c].done():
                            futs[c].set_exception(exc)
        finally:
            for c, fut in futs.items():
                if not fut.done():
                    fut.set_exception(IndexFormatError("window fetch cancelled"))
                if self._inflight.get(c) is fut:
                    del self._inflight[c]

    def _ranges(self, checkpoints: list[int]) -> list[tuple[int, int, list[int]]]:
        spans: list[tuple[int, int, list[int]]] = []
        extents = sorted((self.index.window_extent(c)[:2], c) for c in checkpoints)
        for (off, n), c in extents:
            if spans and off - spans[-1][1] <= MERGE_GAP:
                lo, hi, members = spans[-1]
                spans[-1] = (lo, max(hi, off + n), members + [c])
            else:
                spans.append((off, off + n, [c]))
        return spans

    def _store(self, checkpoint: int, data: bytes, base: int) -> None:
        off, n, digest = self.index.window_extent(checkpoint)
        piece = data[off - base:off - base + n]
        if hashlib.sha256(piece).digest() != digest:
            log.error("window_digest_mismatch", layer=self.index.info.blob_digest, checkpoint=checkpoint)
            raise IndexFormatError(f"layer {self.index.info.blob_digest}: window of checkpoint {checkpoint} "
                                   "does not match its digest in the index")
        if self._fd < 0:
            raise IndexFormatError(f"layer {self.index.info.blob_digest}: windows closed")
        os.pwrite(self._fd, piece, off)
        self._have.add(checkpoint)
