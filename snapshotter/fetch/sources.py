"""Where a layer's compressed bytes come from, and the index reader bound to one index."""
from __future__ import annotations

import asyncio
import bisect
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from snapshotter.index import reader
from snapshotter.index.model import Chunk, LayerInfo
from snapshotter.log import get_logger

log = get_logger("lazysnap.fetch")


class RegistryBlobSource:
    """Ranges of a blob from the registry (``RegistryClient.read_range_from``: auth,
    redirects, mirrors and retries live there).

    Remembers which host served the recent ranges, so that a range whose bytes fail
    verification is fetched next from a host that has not served bad bytes of this blob
    (a corrupt mirror cache must not cost the reader an EIO while the upstream is good).
    """

    SERVED_KEPT = 256  # recent (start, end, host) remembered for ``distrust``
    remote = True

    def __init__(self, client: Any, ref: str, digest: str, *, purpose: str = "range") -> None:
        self.client = client
        self.ref = ref
        self.digest = digest
        self.purpose = purpose
        self.distrusted: set[str] = set()
        self._served: deque[tuple[int, int, str]] = deque(maxlen=self.SERVED_KEPT)

    async def read_range(self, start: int, end: int) -> bytes:
        host, data = await self.client.read_range_from(self.ref, self.digest, start, end,
                                                       purpose=self.purpose, avoid=self.distrusted)
        self._served.append((start, end, host))
        return data

    def distrust(self, start: int, end: int) -> bool:
        """Bytes in ``[start, end)`` failed verification: stop asking the hosts that served
        them for this blob. True while a host not distrusted is left to ask."""
        bad = {h for a, b, h in self._served if a < end and start < b and h}
        new = bad - self.distrusted
        if new:
            self.distrusted |= new
            log.warning("host_distrusted", digest=self.digest, hosts=",".join(sorted(new)),
                        range=f"{start}-{end}")
        return any(h not in self.distrusted for h in self.client.pull_hosts(self.ref))

    def stream(self) -> AsyncIterator[bytes]:
        """The whole blob from the start (resumes on interruption; digest checked at the end)."""
        return self.client.stream_blob(self.ref, self.digest, purpose="layer")


class FileBlobSource:
    """Ranges of a local blob file (tests, and layers already downloaded whole)."""

    remote = False

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    async def read_range(self, start: int, end: int) -> bytes:
        def pread() -> bytes:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.pread(fd, end - start, start)
            finally:
                os.close(fd)

        return await asyncio.to_thread(pread)

    def distrust(self, start: int, end: int) -> bool:
        """A local file is the only source: nothing else to ask."""
        return False

    async def stream(self) -> AsyncIterator[bytes]:
        with open(self.path, "rb") as f:
            while block := await asyncio.to_thread(f.read, 1 << 20):
                yield block


class IndexCodec:
    """``snapshotter.index.reader`` bound to one index: the ``SpanCodec`` of the fetcher."""

    def __init__(self, index: Any, windows: Any = None) -> None:
        self.index = index
        self.windows = windows  # a WindowCache when the index's windows are apart
        self.info: LayerInfo = index.info
        n = getattr(index, "chunk_count", None)
        self._count = int(n) if n is not None else len(index.chunks)
        self._offsets: list[int] | None = None
        self._ck_offsets: list[int] | None = None
        self._mark_offsets: list[int] | None = None
        self._digests: dict[int, bytes] = {}

    @property
    def chunk_count(self) -> int:
        return self._count

    def digest(self, chunk_id: int) -> bytes:
        # called per chunk in every has() scan of the fetch path, on the FUSE loop:
        # cache instead of unpacking a Chunk record from the index each time
        d = self._digests.get(chunk_id)
        if d is None:
            d = self._digests[chunk_id] = self.index.chunk(chunk_id).digest
        return d

    def chunk(self, chunk_id: int) -> Chunk:
        return self.index.chunk(chunk_id)

    def plan(self, chunk_ids: Sequence[int], max_bytes: int = reader.MAX_PLAN_BYTES) -> list[reader.SpanPlan]:
        return reader.plan_chunks(self.index, list(chunk_ids), max_plan_bytes=max_bytes)

    def close(self) -> None:
        if self.windows is not None:
            self.windows.close()

    async def prepare(self, plan: reader.SpanPlan, on_bytes: Callable[[int], None] | None = None) -> None:
        """Make the plan's checkpoint window local (apart windows only; a no-op otherwise)."""
        if self.windows is not None and plan.checkpoint >= 0:
            await self.windows.ensure((plan.checkpoint,), on_bytes)

    def decode(self, plan: reader.SpanPlan, compressed: bytes) -> dict[int, bytes]:
        return reader.decode_span(self.index, plan, compressed)

    def widen(self, plan: reader.SpanPlan) -> reader.SpanPlan | None:
        """The plan fetching on to the next checkpoint, or None if it already does."""
        return reader.widen(plan) if plan.widenable else None

    def span_mates(self, chunk_ids: Sequence[int]) -> list[int]:
        """The chunks an on-demand miss on ``chunk_ids`` makes local in the same fetch.

        A miss on a small file (its one chunk is shorter than the chunk size) takes the
        whole checkpoint span: the files of a package sit next to each other in the tar and
        a start reads many of them, so one range and one decode serve the misses that
        would follow (measured on the inference image: cutting these ranges at the end
        mark made the start ~1 s slower for ~20 MB less). A miss inside a big file (a
        full-size chunk: mmap'd libraries read a page here and there) fetches only up to
        the end mark after it. Either way every chunk lying wholly inside the decoded
        range is stored: it costs no registry bytes and saves a later round trip.
        """
        if self.info.format.value == "tar" or not chunk_ids:
            return list(chunk_ids)
        self._layout()
        cks = self._ck_offsets
        assert cks is not None
        out: set[int] = set(chunk_ids)
        for c in chunk_ids:
            start, end = self._starts[c], self._ends[c]
            lo, hi = self._reach(start, end)
            if end - start < self.info.chunk_size:  # a small file's only (or last) chunk
                e = bisect.bisect_left(cks, end)
                hi = cks[e] if e < len(cks) else float("inf")
            out.update(self._starting_in(lo, hi, whole=True))
        return sorted(out)

    def readahead_chunks(self, chunk_ids: Sequence[int]) -> list[int]:
        """What a reader missing on ``chunk_ids`` most likely reads next (a package's files
        are adjacent in the tar, big files are read forward): the checkpoint span after the
        one those misses decode from. It starts at its own checkpoint, so fetching it
        decodes nothing twice; the rest of the current span is left to later misses (each
        one fetches only up to its end mark). Empty at the end of the layer or for plain tar."""
        if self.info.format.value == "tar" or not chunk_ids:
            return []
        self._layout()
        cks = self._ck_offsets
        assert cks is not None
        e = bisect.bisect_left(cks, max(self._ends[c] for c in chunk_ids))
        if e >= len(cks):
            return []
        return self._starting_in(cks[e], cks[e + 1] if e + 1 < len(cks) else float("inf"))

    def _reach(self, start: int, end: int) -> tuple[float, float]:
        """For uncompressed bytes [start, end): the checkpoint decoding starts at and where
        the fetched range's output stops (end mark or next checkpoint; inf past the end)."""
        cks, marks = self._ck_offsets, self._mark_offsets
        assert cks is not None and marks is not None
        k = bisect.bisect_right(cks, start) - 1
        lo = cks[k] if k >= 0 else 0
        e = bisect.bisect_left(cks, end, lo=k + 1)
        hi: float = cks[e] if e < len(cks) else float("inf")
        m = bisect.bisect_left(marks, end)
        if m < len(marks):
            hi = min(hi, marks[m])
        return lo, hi

    def _starting_in(self, lo: float, hi: float, *, whole: bool = False) -> list[int]:
        """Chunks starting in [lo, hi), in layer order; with ``whole``, only those also ending by ``hi``."""
        offs = self._offsets
        assert offs is not None
        out = []
        i = bisect.bisect_left(offs, lo)
        while i < self._count and offs[i] < hi:
            cid = self._order[i]
            if not whole or self._ends[cid] <= hi:
                out.append(cid)
            i += 1
        return out

    def _layout(self) -> None:
        """Chunk, checkpoint and end-mark offsets, built on first use (one bulk unpack of the
        chunk table: this runs on the filesystem's loop at a layer's first miss)."""
        if self._offsets is None:
            starts, lengths = self.index.chunk_extents()
            self._starts = starts  # chunk id -> uncompressed offset
            self._ends = [o + n for o, n in zip(starts, lengths)]
            self._order = sorted(range(self._count), key=starts.__getitem__)
            self._ck_offsets = list(self.index.checkpoint_offsets()[0])
            marks = getattr(self.index, "mark_offsets", None)
            self._mark_offsets = list(marks()[0]) if marks is not None else []
            self._offsets = [starts[i] for i in self._order]
