"""Background fill: make every chunk of a layer local at low priority, then verify the layer.

Bandwidth is bounded by a daemon-wide token bucket and concurrency by a worker count;
all of it pauses while an image is starting (``Pause``), so a start never competes with
bulk transfer. A layer whose chunks are all local is verified (its blob digest, and that
the blob indexes to the index in use) and a completion marker is written atomically
under ``<root>/complete/`` so a restarted daemon knows; chunks were already verified
one by one (SHA-256) when stored, so a kill loses nothing that was verified.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.fetch import FetchError, Priority
from snapshotter.fsutil import write_atomic
from snapshotter.log import get_logger
from snapshotter.prefetch import metrics

log = get_logger("lazysnap.prefetch")

# Uncompressed bytes one background span may decode (on-demand plans go to 16 MiB): a plan
# in flight holds ~2.5x this, and the fill runs beside starting containers. With 16 MiB
# plans, filling the previous image version took a node to ~300 MB RSS.
FILL_PLAN_BYTES = 4 << 20


class TokenBucket:
    """At most ``rate`` bytes per second on average (0: unlimited), bursts of one second.

    GCRA form: ``_tat`` is when the bytes taken so far would have been sent at ``rate``;
    a caller waits until that is at most one second ahead of now.
    """

    def __init__(self, rate: int, burst_s: float = 1.0) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self._tat = 0.0

    async def take(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        now = time.monotonic()
        self._tat = max(self._tat, now) + n / self.rate
        wait = self._tat - now - self.burst_s
        if wait > 0:
            await asyncio.sleep(wait)


class Pause:
    """Background work waits while ``held`` > 0 (an image is starting) and until start-up
    reads have been quiet for ``idle_s`` (``last_activity``: monotonic time of the newest)."""

    def __init__(self, last_activity: Callable[[], float] = lambda: 0.0, idle_s: float = 0.0) -> None:
        self._held = 0
        self._free = asyncio.Event()
        self._free.set()
        self.last_activity = last_activity
        self.idle_s = idle_s

    def hold(self) -> None:
        self._held += 1
        self._free.clear()

    def release(self) -> None:
        self._held = max(0, self._held - 1)
        if self._held == 0:
            self._free.set()

    async def wait(self) -> None:
        while True:
            await self._free.wait()
            quiet = time.monotonic() - self.last_activity()
            if quiet >= self.idle_s:
                return
            await asyncio.sleep(self.idle_s - quiet)


@dataclass(slots=True)
class FillProgress:
    """How far one layer's background fill is (``lazysnap status``): updated by
    ``fill_layer`` as spans land. ``state``: waiting (paused behind a start), filling,
    verifying (all chunks local, the blob being checked), done, incomplete, failed, cancelled."""

    state: str = "waiting"
    chunks_total: int = 0
    chunks_done: int = 0
    bytes_fetched: int = 0  # compressed bytes of the spans fetched
    started: float | None = None  # time.time() of the first span
    finished: float | None = None

    def rate(self, now: float) -> float:
        """Compressed bytes per second since the first span (to the end, once finished)."""
        if self.started is None:
            return 0.0
        elapsed = (self.finished or now) - self.started
        return self.bytes_fetched / elapsed if elapsed > 0 else 0.0


def marker_path(root: Path, digest: str) -> Path:
    return Path(root) / "complete" / digest.replace(":", "-")


def is_complete(root: Path, digest: str) -> bool:
    return marker_path(root, digest).is_file()


def mark_complete(root: Path, digest: str, how: str) -> None:
    record = {"layer": digest, "verified": how, "time": int(time.time())}
    write_atomic(marker_path(root, digest), json.dumps(record).encode())


async def fill_layer(layer: Any, store: Any, bucket: TokenBucket, pause: Pause, concurrency: int,
                     slots: asyncio.Semaphore | None = None, progress: FillProgress | None = None) -> bool:
    """Fetch every missing chunk of ``layer`` at BACKGROUND priority; True if none is missing after.

    ``slots`` bounds the spans in flight over every layer being filled (each holds its
    compressed range and up to 16 MiB decoded): per-layer workers alone let the fill of a
    three-layer image take the daemon past 360 MB RSS.
    """
    slots = slots or asyncio.Semaphore(concurrency)
    progress = progress or FillProgress()
    lf = layer.fetcher
    codec = lf.codec
    label = layer.digest
    total = codec.chunk_count
    missing = await asyncio.to_thread(lf.missing_chunks)
    metrics.BACKGROUND_TOTAL.labels(label).set(total)
    metrics.BACKGROUND_LOCAL.labels(label).set(total - len(missing))
    progress.chunks_total, progress.chunks_done = total, total - len(missing)
    if not missing:
        return True
    log.info("background_fill_start", layer=label, missing=len(missing), chunks=total,
             sequential_only=lf.sequential_only)
    if lf.sequential_only:
        await pause.wait()
        progress.state, progress.started = "filling", time.time()
        before = lf.bytes_fetched
        await lf.ensure(missing, Priority.BACKGROUND)
        progress.bytes_fetched += lf.bytes_fetched - before
    else:
        plans = await asyncio.to_thread(codec.plan, missing, FILL_PLAN_BYTES)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for p in plans:
            queue.put_nowait(p)
        done = total - len(missing)

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                plan = queue.get_nowait()
                await pause.wait()
                start, end = plan.c_start, plan.c_end
                await bucket.take(end - start)
                await pause.wait()
                still = [c for c in plan.chunk_ids if not store.has(codec.digest(c))]
                if still:
                    metrics.BACKGROUND_BYTES.inc(end - start)
                    if progress.started is None:
                        progress.state, progress.started = "filling", time.time()
                    try:
                        async with slots:
                            await lf.ensure(still, Priority.BACKGROUND)
                    except FetchError as exc:
                        log.warning("background_span_failed", layer=label, range=f"{start}-{end}", error=str(exc))
                        continue
                    progress.bytes_fetched += end - start
                done += len(plan.chunk_ids)
                progress.chunks_done = min(done, total)
                metrics.BACKGROUND_LOCAL.labels(label).set(min(done, total))

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    left = await asyncio.to_thread(lf.missing_chunks)
    metrics.BACKGROUND_LOCAL.labels(label).set(total - len(left))
    progress.chunks_done, progress.finished = total - len(left), time.time()
    if left:
        log.warning("background_fill_incomplete", layer=label, missing=len(left))
        return False
    log.info("background_fill_done", layer=label, chunks=total)
    return True
