"""Read miss → chunks → checkpoint spans → HTTP ranges → decode + verify → store.

One ``Fetcher`` per daemon (it owns the concurrency budget and the priority order);
one ``LayerFetcher`` per layer (it knows the index and where the blob comes from).

- Single flight per chunk: a chunk being fetched has one future; every reader that needs
  it awaits that future, so a span is fetched once however many readers miss on it.
- Priority: an explicit queue (``PriorityGate``) orders waiting jobs on-demand >
  prefetch > background, and keeps one slot free for on-demand reads so prefetch and
  background work can never starve a blocked reader. A reader that needs a chunk of a
  job already queued at a lower priority awaits that job (single flight) rather than
  promoting it: the prefetcher and the background filler keep few jobs queued for this.
- Failures: the reader blocks while retries run; after ``deadline_s`` it gets EIO. Bytes
  are stored only after ``decode_span`` verified every chunk's SHA-256: no wrong byte
  reaches the store or a reader.
- Decompression runs in a worker thread (the C core releases the GIL).
"""
from __future__ import annotations

import asyncio
import collections
import enum
import errno
import heapq
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapshotter.fetch import metrics
from snapshotter.fetch.quiet import quiet_failure
from snapshotter.index.errors import ChunkVerificationError, CorruptLayerError, TruncatedLayerError
from snapshotter.index.model import Chunk, LayerInfo
from snapshotter.index.reader import SpanPlan
from snapshotter.store import ChunkStore
from snapshotter.log import get_logger
from snapshotter.tasks import TaskSet

log = get_logger("lazysnap.fetch")


class Priority(enum.IntEnum):
    ON_DEMAND = 0
    PREFETCH = 1
    BACKGROUND = 2

    @property
    def purpose(self) -> str:
        return ("on_demand", "prefetch", "background")[self]


class BlobSource(Protocol):
    """Compressed bytes [start, end) of one layer blob."""

    #: its bytes come over the network (counted in ``lazysnap_registry_bytes_fetched``); a
    #: kept local copy of the blob is not
    remote: bool

    async def read_range(self, start: int, end: int) -> bytes: ...

    def stream(self) -> AsyncIterator[bytes]:
        """The whole blob from its start (a layer with no random access is filled this way)."""
        ...

    def distrust(self, start: int, end: int) -> bool:
        """Bytes read from ``[start, end)`` failed verification: avoid whoever served them.
        True if another source is left to try."""
        ...


class SpanCodec(Protocol):
    """The index reader bound to one layer's index (``fetch.sources.IndexCodec``): which
    compressed span serves which chunks, and the chunks decoded from a span."""

    info: LayerInfo

    @property
    def chunk_count(self) -> int: ...

    def digest(self, chunk_id: int) -> bytes: ...

    def chunk(self, chunk_id: int) -> Chunk: ...

    def plan(self, chunk_ids: Sequence[int], max_bytes: int = ...) -> list[SpanPlan]: ...

    def decode(self, plan: SpanPlan, compressed: bytes) -> dict[int, bytes]: ...

    def widen(self, plan: SpanPlan) -> SpanPlan | None:
        """The plan fetching on to the next checkpoint (an end mark proved short), or None."""
        ...

    def span_mates(self, chunk_ids: Sequence[int]) -> list[int]:
        """The chunks an on-demand miss on ``chunk_ids`` makes local in the same fetch."""
        ...

    def readahead_chunks(self, chunk_ids: Sequence[int]) -> list[int]:
        """What a reader missing on ``chunk_ids`` most likely reads next."""
        ...

    async def prepare(self, plan: SpanPlan, on_bytes: Callable[[int], None] | None = None) -> None:
        """Make what decoding ``plan`` needs besides its range local (a checkpoint window
        published apart); ``on_bytes`` counts what that fetched."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class FetchOptions:
    """Knobs of the fetch path (from the daemon config)."""

    max_concurrency: int = 8
    deadline_s: float = 30.0  # a blocked reader gets EIO after this
    attempt_timeout_s: float = 20.0  # one range request + decode
    retry_base_s: float = 0.1
    retry_max_s: float = 2.0
    whole_spans: bool = True  # decode every chunk of a fetched checkpoint span
    fail_fast_s: float = 1.0  # after a deadline failure, re-asks for the same chunks fail at once
    compressed_cache_bytes: int = 32 << 20  # recent ranges: a later miss from the same checkpoint fetches only the rest
    readahead_spans: bool = False  # an on-demand miss also fetches the next span (background priority)


class PriorityGate:
    """A semaphore whose waiters are served by priority, then arrival.

    Non-on-demand work may hold at most ``limit - 1`` slots, so an on-demand read always
    finds a slot within one job's duration.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._busy = 0
        self._busy_low = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def _can(self, prio: int) -> bool:
        if self._busy >= self.limit:
            return False
        return prio == Priority.ON_DEMAND or self._busy_low < max(1, self.limit - 1)

    def _take(self, prio: int) -> None:
        self._busy += 1
        if prio != Priority.ON_DEMAND:
            self._busy_low += 1

    async def acquire(self, prio: int) -> None:
        if not self._waiters and self._can(prio):
            self._take(prio)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (prio, next(self._seq), fut)
        heapq.heappush(self._waiters, entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(prio)  # granted and cancelled at once: give it back
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self, prio: int) -> None:
        self._busy -= 1
        if prio != Priority.ON_DEMAND:
            self._busy_low -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            prio, _, fut = self._waiters[0]
            if fut.done():
                heapq.heappop(self._waiters)
                continue
            if not self._can(prio):
                return
            heapq.heappop(self._waiters)
            self._take(prio)
            fut.set_result(None)


class FetchError(OSError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class CorruptRangeError(FetchError):
    """The same range failed verification twice: the source serves bytes that are not the
    layer's. Readers get EIO at once instead of waiting out the deadline on refetches."""


# what a range whose bytes are not the layer's raises while it is decoded and verified (the
# C core's CorruptLayerError derives from index.errors.CorruptLayerError)
CORRUPT_ERRORS: tuple[type[Exception], ...] = (ChunkVerificationError, CorruptLayerError)
CORRUPT_TRIES = 2  # fetches of one range that fail verification before reads fail at once


@dataclass(slots=True)
class _Job:
    chunk_ids: list[int]
    priority: Priority
    futures: dict[int, asyncio.Future[None]] = field(default_factory=dict)


class Fetcher:
    """The daemon-wide scheduler."""

    def __init__(self, store: ChunkStore, options: FetchOptions | None = None) -> None:
        self.store = store
        self.options = options or FetchOptions()
        self.gate = PriorityGate(self.options.max_concurrency)
        self.ranges = RangeCache(self.options.compressed_cache_bytes)

    def layer(self, key: str, codec: SpanCodec, source: BlobSource, *,
              sequential_only: bool = False) -> LayerFetcher:
        return LayerFetcher(self, key, codec, source, sequential_only=sequential_only)


class LayerFetcher:
    """Makes chunks of one layer local. Implements ``snapshotter.fs.ChunkFetcher``."""

    def __init__(self, fetcher: Fetcher, key: str, codec: SpanCodec, source: BlobSource, *,
                 sequential_only: bool = False) -> None:
        self.fetcher = fetcher
        self.key = key
        self.codec = codec
        self.source = source
        self.sequential_only = sequential_only
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._tasks = TaskSet(f"fetch {key}")  # spans being fetched, prefetches, a layer's stream
        self.failed: str | None = None
        self.on_complete: Callable[[], None] | None = None
        self.bytes_fetched = 0
        self._failed_at: dict[int, float] = {}
        self._corrupt: dict[tuple[int, int], int] = {}  # range -> verification failures in a row
        self._fetching: list[tuple[int, int, asyncio.Future[None]]] = []
        self._stream_task: asyncio.Task[None] | None = None
        self._scan_pos = 0

    # -- public -----------------------------------------------------------------------------
    async def ensure(self, chunk_ids: Sequence[int], priority: Priority = Priority.ON_DEMAND) -> None:
        """Return when every chunk is in the store; raise FetchError (EIO) at the deadline."""
        if self.failed is not None:
            raise FetchError(f"layer {self.key} quarantined: {self.failed}")
        deadline = time.monotonic() + self.fetcher.options.deadline_s
        started = time.monotonic()
        wanted = list(dict.fromkeys(chunk_ids))
        if self._failed_at and priority == Priority.ON_DEMAND:
            # The kernel retries a failed readahead page with a synchronous read at once;
            # without this the reader would wait two deadlines for one read().
            window = self.fetcher.options.fail_fast_s
            recent = [c for c in wanted if started - self._failed_at.get(c, -1e9) < window]
            if recent and not all(self.fetcher.store.has(self.codec.digest(c)) for c in recent):
                raise FetchError(f"layer {self.key}: chunk {recent[0]} failed less than {window}s ago")
        last_error: BaseException | None = None
        attempt = 0
        while True:
            missing = [c for c in wanted if not self.fetcher.store.has(self.codec.digest(c))]
            if not missing:
                if priority == Priority.ON_DEMAND and last_error is None:
                    metrics.FETCH_SECONDS.labels(priority.purpose).observe(time.monotonic() - started)
                return
            if self.sequential_only:
                futs = self._launch_stream(missing, priority)
            elif self.fetcher.options.whole_spans and priority != Priority.PREFETCH:
                # A profile names exactly the chunks a start reads: decoding, hashing and
                # storing their span mates too made prefetch ~3x the work (measured: 24k
                # chunk files instead of ~1.2k for the inference image); on-demand misses
                # keep the mates because the next sequential read needs them.
                store = self.fetcher.store
                asked = set(missing)
                missing = [c for c in self.codec.span_mates(missing)
                           if c in asked or not store.known(self.codec.digest(c))]
            if not self.sequential_only:
                futs = self._launch(missing, priority)
                if priority == Priority.ON_DEMAND and self.fetcher.options.readahead_spans:
                    self._readahead(missing)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(futs, timeout=remaining)
            errors = [f.exception() for f in done if f.exception() is not None]
            if pending:
                last_error = TimeoutError(f"fetch still running after {self.fetcher.options.deadline_s}s")
                break
            if errors:
                last_error = next((e for e in errors if isinstance(e, CorruptRangeError)), errors[0])
                if self.failed is not None or isinstance(last_error, CorruptRangeError):
                    break
                attempt += 1
                await asyncio.sleep(self._backoff(attempt, deadline))
                if time.monotonic() >= deadline:
                    break
        metrics.FETCH_FAILURES.labels(priority.purpose).inc()
        now = time.monotonic()
        if len(self._failed_at) > 100_000:
            self._failed_at.clear()
        for c in wanted:
            self._failed_at[c] = now
        log.error("fetch_failed", layer=self.key, chunks=len(wanted), priority=priority.purpose,
                  deadline_s=self.fetcher.options.deadline_s, error=repr(last_error))
        raise FetchError(f"cannot fetch {len(wanted)} chunk(s) of layer {self.key}: {last_error}")

    def _backoff(self, attempt: int, deadline: float) -> float:
        """Exponential from ``retry_base_s`` up to ``retry_max_s``, with jitter so the readers
        of a recovering registry do not come back in step; never past the deadline."""
        opts = self.fetcher.options
        delay = min(opts.retry_max_s, opts.retry_base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        return min(delay, max(0.0, deadline - time.monotonic()))

    def _verification_failed(self, start: int, end: int, exc: Exception) -> Exception:
        """Count a range that decoded to bytes that are not the layer's. It is fetched again,
        from another host while one that has not served bad bytes is left; failing from the
        last source twice in a row is a CorruptRangeError (refetching it again would only
        wait out the deadline)."""
        n = self._corrupt.get((start, end), 0) + 1
        if self.source.distrust(start, end) or n < CORRUPT_TRIES:
            self._corrupt[(start, end)] = n
            metrics.CORRUPT_RANGES.labels("retried").inc()
            return exc
        self._corrupt.pop((start, end), None)  # a later read tries again: the source may heal
        metrics.CORRUPT_RANGES.labels("failed").inc()
        log.error("range_corrupt", layer=self.key, range=f"{start}-{end}", fetches=n, error=str(exc)[:200])
        return CorruptRangeError(f"range {start}-{end} of layer {self.key} failed verification {n} times in a row: "
                                 f"the registry serves bytes that are not the layer's ({exc})")

    def prefetch(self, chunk_ids: Sequence[int], priority: Priority = Priority.PREFETCH) -> asyncio.Task[None]:
        """Fire-and-forget ``ensure`` at a lower priority (for the profile prefetcher)."""
        return self._tasks.spawn(self._quiet(chunk_ids, priority), name=f"prefetch {self.key}", report=False)

    async def fetch_all(self, priority: Priority = Priority.BACKGROUND) -> None:
        await self.ensure(range(self.codec.chunk_count), priority)

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.codec.chunk_count) if not self.fetcher.store.has(self.codec.digest(c))]

    def quarantine(self, reason: str) -> None:
        self.failed = reason
        for fut in self._inflight.values():
            if not fut.done():
                fut.set_exception(FetchError(reason))
        log.error("layer_quarantined", layer=self.key, reason=reason)

    def close(self) -> None:
        self._tasks.cancel()
        self.codec.close()

    # -- internals --------------------------------------------------------------------------
    def _readahead(self, chunk_ids: list[int]) -> None:
        """Fetch the next checkpoint span after a miss while the reader consumes this one.

        A cold start misses span after span, serially (each miss waits for its range, the
        inflate from the checkpoint and the hashes); the next span is the likeliest next
        miss (a package's files are adjacent in the tar, big files are read forward), so
        fetching it at background priority overlaps its latency with the reader's work.
        """
        known = self.fetcher.store.known
        ahead = [c for c in self.codec.readahead_chunks(chunk_ids)
                 if c not in self._inflight and not known(self.codec.digest(c))]
        if not ahead:
            return
        metrics.READAHEAD_SPANS.inc()
        self.prefetch(ahead, Priority.BACKGROUND)

    async def _quiet(self, chunk_ids: Sequence[int], priority: Priority) -> None:
        try:
            await self.ensure(chunk_ids, priority)
        except FetchError:
            pass

    def _launch(self, missing: list[int], priority: Priority) -> list[asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = []
        new: list[int] = []
        for c in missing:
            fut = self._inflight.get(c)
            if fut is None:
                new.append(c)
            else:
                futs.append(fut)
        if new:
            for plan in self.codec.plan(new):
                job_futs = {}
                for c in plan.chunk_ids:
                    if c in self._inflight:
                        continue
                    fut = loop.create_future()
                    fut.add_done_callback(quiet_failure)
                    self._inflight[c] = fut
                    job_futs[c] = fut
                if not job_futs:
                    continue
                job = _Job(list(job_futs), priority, job_futs)
                self._tasks.spawn(self._run(plan, job), name=f"fetch {self.key}")
        futs += [self._inflight[c] for c in new if c in self._inflight]
        return futs

    def _launch_stream(self, missing: list[int], priority: Priority) -> list[asyncio.Future[None]]:
        """No random access: one stream from the start fills every missing chunk."""
        loop = asyncio.get_running_loop()
        futs = []
        for c in missing:
            fut = self._inflight.get(c)
            if fut is None:
                fut = self._inflight[c] = loop.create_future()
                fut.add_done_callback(quiet_failure)
            futs.append(fut)
        if self._stream_task is None or self._stream_task.done():
            log.info("layer_streamed", layer=self.key, reason="sequential_only",
                     note="no random access (single-frame zstd or no checkpoints): streaming the layer "
                          "once from the start into the store")
            self._stream_task = self._tasks.spawn(self._stream(priority), name=f"stream {self.key}")
        return futs

    async def _stream(self, priority: Priority) -> None:
        from snapshotter.fetch.streamfill import stream_fill

        loop = asyncio.get_running_loop()
        store = self.fetcher.store
        gate = self.fetcher.gate
        await gate.acquire(priority)
        try:
            wanted = []
            for c in range(self.codec.chunk_count):
                ch = self.codec.chunk(c)
                if not store.has(ch.digest):
                    wanted.append((ch.uncompressed_offset, ch.length, c, ch.digest))

            def put(cid: int, data: bytes) -> None:
                store.put(self.codec.digest(cid), data, verified=True)
                loop.call_soon_threadsafe(self._arrived, cid)

            counted = _Counted(self.source.stream(), self, priority)
            n = await stream_fill(counted, self.codec.info.format, wanted, put, asyncio.to_thread)
            log.info("layer_stream_done", layer=self.key, chunks=n, bytes=counted.bytes)
        except asyncio.CancelledError:
            self._fail_inflight(FetchError("stream cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - readers get it (EIO) and retry until their deadline
            log.warning("layer_stream_error", layer=self.key, error=repr(exc))
            metrics.SPAN_ERRORS.labels(type(exc).__name__).inc()
            self._fail_inflight(exc)
        finally:
            gate.release(priority)
        for c in [c for c in self._inflight if store.has(self.codec.digest(c))]:
            self._arrived(c)
        if self.on_complete is not None and not self.missing_chunks_quick():
            self.on_complete()

    def _arrived(self, cid: int) -> None:
        fut = self._inflight.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail_inflight(self, exc: BaseException) -> None:
        for c, fut in list(self._inflight.items()):
            if not fut.done():
                fut.set_exception(exc)
            del self._inflight[c]

    async def _run(self, plan: SpanPlan, job: _Job) -> None:
        start, end = plan.c_start, plan.c_end
        gate = self.fetcher.gate
        try:
            await gate.acquire(job.priority)
            try:
                t0 = time.monotonic()
                ranges = self.fetcher.ranges
                compressed = await self._read_with_window(plan, start, end, job.priority)
                try:
                    try:
                        chunks = await asyncio.to_thread(self.codec.decode, plan, compressed)
                    except TruncatedLayerError:
                        # an end mark proved short (a hostile or buggy index): fetch on
                        # to the next checkpoint once; a second shortfall is a real error
                        wider = self.codec.widen(plan)
                        if wider is None:
                            raise
                        log.warning("end_mark_short", layer=self.key, range=f"{start}-{end}")
                        plan = wider
                        start, end = plan.c_start, plan.c_end
                        compressed = await self._read_compressed(start, end, job.priority)
                        chunks = await asyncio.to_thread(self.codec.decode, plan, compressed)
                except Exception:
                    ranges.drop_layer(self.key)  # bad bytes must be refetched, not reused
                    raise
                store = self.fetcher.store
                # answer the readers from memory first, then write (see ChunkStore.stage)
                staged = {self.codec.digest(c): data for c, data in chunks.items()}
                store.stage(staged)
                try:
                    for c, fut in job.futures.items():
                        if c in chunks and not fut.done():
                            fut.set_result(None)
                    await asyncio.to_thread(_store_all, store, self.codec, chunks)
                finally:
                    store.unstage(staged)
                metrics.SPAN_SECONDS.labels(job.priority.purpose).observe(time.monotonic() - t0)
                self._corrupt.pop((start, end), None)
            finally:
                gate.release(job.priority)
            for c, fut in job.futures.items():
                if not fut.done():
                    if c in chunks or store.has(self.codec.digest(c)):
                        fut.set_result(None)
                    else:
                        fut.set_exception(FetchError(f"span {start}-{end} did not yield chunk {c}"))
            if self.on_complete is not None and not self.missing_chunks_quick():
                self.on_complete()
        except asyncio.CancelledError:
            for fut in job.futures.values():
                if not fut.done():
                    fut.set_exception(FetchError("fetch cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: retried by ensure() until its deadline
            if not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):  # the store says it once
                log.warning("span_fetch_error", layer=self.key, range=f"{start}-{end}",
                            priority=job.priority.purpose, error=repr(exc))
            metrics.SPAN_ERRORS.labels(type(exc).__name__).inc()
            if isinstance(exc, CORRUPT_ERRORS):
                exc = self._verification_failed(start, end, exc)
            for fut in job.futures.values():
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            for c, fut in job.futures.items():
                if self._inflight.get(c) is fut:
                    del self._inflight[c]

    async def _read_with_window(self, plan: SpanPlan, start: int, end: int, priority: Priority) -> bytes:
        """The span's range and, for an index with its windows apart, its checkpoint's
        window: two requests in flight at once, so a missing window costs its bytes and one
        more request, not a serial round trip."""
        def count(n: int) -> None:
            self.bytes_fetched += n
            metrics.REGISTRY_BYTES.labels(priority.purpose).inc(n)

        got = await asyncio.gather(self._read_compressed(start, end, priority), self.codec.prepare(plan, count),
                                   return_exceptions=True)
        for r in got:
            if isinstance(r, BaseException):
                raise r
        return got[0]  # type: ignore[return-value]

    async def _read_compressed(self, start: int, end: int, priority: Priority) -> bytes:
        """Bytes [start, end) of the blob: cached prefix + one range request for the rest.

        Overlapping range requests of one layer are single-flight: a job whose range starts
        inside a range being fetched waits for it and reuses its bytes.
        """
        ranges = self.fetcher.ranges
        opts = self.fetcher.options
        while True:
            prefix = ranges.get(self.key, start, end)
            if len(prefix) == end - start:
                return prefix
            at = start + len(prefix)
            busy = next((f for a, b, f in self._fetching if a <= at < b), None)
            if busy is None:
                break
            try:
                await asyncio.shield(busy)
            except Exception:  # noqa: BLE001 - the other job failed: fetch ourselves
                break
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(quiet_failure)
        slot = (at, end, fut)
        self._fetching.append(slot)
        try:
            rest = await asyncio.wait_for(self.source.read_range(at, end), opts.attempt_timeout_s)
            if len(rest) != end - at:
                raise FetchError(f"short range {at}-{end}: got {len(rest)} bytes")
            self.bytes_fetched += len(rest)
            if self.source.remote:
                metrics.REGISTRY_BYTES.labels(priority.purpose).inc(len(rest))
            ranges.put(self.key, at, rest)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else FetchError("cancelled"))
            raise
        finally:
            self._fetching.remove(slot)
        return prefix + rest if prefix else rest

    def missing_chunks_quick(self) -> bool:
        """True if some chunk is still missing. Resumes from the first chunk found missing
        last time, so checking after every span costs O(chunks) over the layer's life."""
        store = self.fetcher.store
        n = self.codec.chunk_count
        while self._scan_pos < n and store.has(self.codec.digest(self._scan_pos)):
            self._scan_pos += 1
        return self._scan_pos < n


class _Counted:
    """An async byte stream that counts what it yields as registry bytes."""

    def __init__(self, it: Any, owner: LayerFetcher, priority: Priority) -> None:
        self._it = it.__aiter__()
        self._owner = owner
        self._purpose = priority.purpose
        self.bytes = 0

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        block = await self._it.__anext__()
        self.bytes += len(block)
        self._owner.bytes_fetched += len(block)
        metrics.REGISTRY_BYTES.labels(self._purpose).inc(len(block))
        return block


class RangeCache:
    """Recently fetched compressed ranges (bounded, LRU), shared by all layers.

    A chunk crossing a checkpoint is decoded from the checkpoint before it, so the range
    for it overlaps the previous span's range; keeping recent ranges lets a sequential
    reader fetch each compressed byte about once instead of twice.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: str, start: int, end: int) -> bytes:
        """The longest cached prefix of [start, end), chaining adjacent segments."""
        parts: list[bytes] = []
        pos = start
        while pos < end:
            hit: tuple[str, int] | None = None
            for (k, a), data in self._items.items():
                if k == key and a <= pos < a + len(data):
                    hit = (k, a)
                    break
            if hit is None:
                break
            data = self._items[hit]
            self._items.move_to_end(hit)
            piece = data[pos - hit[1]:min(end, hit[1] + len(data)) - hit[1]]
            parts.append(piece)
            pos += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def put(self, key: str, start: int, data: bytes) -> None:
        if self.limit <= 0 or len(data) > self.limit:
            return
        old = self._items.pop((key, start), None)
        if old is not None:
            self._bytes -= len(old)
        self._items[(key, start)] = data
        self._bytes += len(data)
        while self._bytes > self.limit:
            _, victim = self._items.popitem(last=False)
            self._bytes -= len(victim)

    def drop_layer(self, key: str) -> None:
        for k in [k for k in self._items if k[0] == key]:
            self._bytes -= len(self._items.pop(k))


def _store_all(store: ChunkStore, codec: SpanCodec, chunks: dict[int, bytes]) -> None:
    store.put_many([(codec.digest(c), data) for c, data in chunks.items()])  # verified by decode_span


