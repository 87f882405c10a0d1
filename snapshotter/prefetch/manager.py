"""Profiles at work in the daemon: record, look up, prefetch, fill in the background.

The layer provider owns one ``ProfileManager`` and tells it three things: an image's first
Prepare (``image_started``), a layer registered in the filesystem (``layer_ready``, which
also returns the access hook for its ``LayerData``) and a layer released
(``layer_released``). Everything runs on the provider's event loop.

On ``image_started``: background work pauses, start-up windows open (hit/miss metrics),
the profile is looked up (local, then registry). A published profile's pack, if any, is
streamed first (``pack.py``: chunks arrive in first-access order over all layers, each
verified against its layer's index). Then, layer by layer as each one becomes ready, the
profile chunks still missing are fetched at PREFETCH priority in first-access order, a
few batches at a time (each batch becomes one or a few checkpoint-span requests). Then the
pause lifts and every layer of the image is filled at BACKGROUND priority and verified.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from snapshotter import heap
from snapshotter.fetch import FetchError, Priority, SpanCodec
from snapshotter.fetch import metrics as fetch_metrics
from snapshotter.log import get_logger
from snapshotter.native import CHUNK_RECORD, verify_chunks
from snapshotter.prefetch import background, metrics
from snapshotter.prefetch.lookup import Found, find
from snapshotter.prefetch.pack import PackBatch, PackError, PackReader
from snapshotter.prefetch.options import PrefetchOptions
from snapshotter.prefetch.profile import Profile, ProfileError, dumps, load, merge, save
from snapshotter.prefetch.publish import build_pack, publish_profile
from snapshotter.prefetch.recorder import AccessRecorder
from snapshotter.registry.signatures import Voucher
from snapshotter.tasks import TaskSet

log = get_logger("lazysnap.prefetch")
LAYER_WAIT_S = 600.0
PACK_QUEUE_BLOCKS = 8  # received pack blocks (1 MiB each) not yet decoded, at most
# blocks decoded per batch: a batch is held until written (~3.6x its compressed size) while
# the next one decodes; unbounded batches took the daemon from ~190 to 370 MB peak RSS
PACK_BATCH_BLOCKS = 4


class LayerHost(Protocol):
    """What the manager needs of the layer provider (``snapshotter.layers.LazyLayerProvider``)."""

    client: Any  # RegistryClient: resolve, referrers, get_manifest, fetch_blob

    def layer(self, digest: str) -> Any:
        """The registered layer (``.digest .fetcher .index .verified``) or None."""
        ...

    def prepare_failed(self, digest: str) -> bool:
        """The layer's Prepare ended without providing it: it will never be registered."""
        ...

    async def check_complete(self, layer: Any) -> bool:
        """The completeness check (once per layer): stream the blob (digest checked),
        re-index it, compare; quarantine on mismatch. True if the layer is verified."""
        ...


class ProfileManager:
    """One per daemon, owned by the layer provider (``host``)."""

    def __init__(self, root: Path, host: LayerHost, store: Any, options: PrefetchOptions | None = None, *,
                 voucher: Voucher, signer: Any | None = None,
                 places: Callable[[str], list[str]] = lambda ref: [ref]) -> None:
        self.root = Path(root)
        self.host = host
        self.store = store
        self.voucher = voucher  # who may vouch for a published profile
        self.signer = signer  # signs the recorded profiles this node publishes
        self.places = places  # where profiles of an image are looked for, in turn; published to the last
        self.options = (options or PrefetchOptions()).validate()
        self.recorder = AccessRecorder(store.has)
        self.pause = background.Pause(lambda: self.recorder.last_startup_read, self.options.idle_before_background_s)
        self.bucket = background.TokenBucket(self.options.background_bytes_per_s)
        # spans in flight for background fill, daemon-wide (each holds up to ~40 MB)
        self.background_slots = asyncio.Semaphore(self.options.background_concurrency)
        self._ready: dict[str, asyncio.Event] = {}
        # indexes of registered layers, for the pack's worker thread. Not earlier (when the
        # index opens): decoding the pack beside the tree builds slowed the pull (2 cores)
        # and did not finish the pack sooner
        self._codecs: dict[str, Any] = {}
        self._images: dict[str, asyncio.Task[None]] = {}
        self._fills: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, background.FillProgress] = {}  # by layer, for status
        self._layer_tasks: dict[str, set[asyncio.Task[Any]]] = {}
        self._background = TaskSet("prefetch")  # images' prefetches, layers' fills, first starts recorded

    # -- provider events ------------------------------------------------------------------------
    def image_started(self, ref: str, manifest: str | None, layers: Sequence[str]) -> None:
        """First Prepare of an image: start its prefetch (then its background fill)."""
        key = manifest or ref
        task = self._images.get(key)
        if task is not None and not task.done():
            return
        self._images[key] = self._background.spawn(self._run_image(ref, manifest, list(layers)),
                                                   name=f"prefetch-{key[:24]}")

    def layer_ready(self, digest: str) -> None:
        """The layer is registered (its ``LayerData`` got ``recorder.hook`` as access hook)."""
        layer = self.host.layer(digest)
        if layer is not None:
            self._codecs[digest] = layer.fetcher.codec
        self._event(digest).set()

    def layer_restored(self, digest: str) -> None:
        """After a restart: finish filling a layer that is not complete yet."""
        self.layer_ready(digest)
        if self.options.background and not self.is_complete(digest):
            self._start_fill(digest)

    def layer_released(self, digest: str) -> None:
        """No snapshot uses the layer: stop prefetching and filling it."""
        for task in self._layer_tasks.pop(digest, set()):
            task.cancel()
        fill = self._fills.pop(digest, None)
        if fill is not None:
            fill.cancel()
        self._progress.pop(digest, None)
        self._ready.pop(digest, None)
        self._codecs.pop(digest, None)
        for gauge in (metrics.BACKGROUND_LOCAL, metrics.BACKGROUND_TOTAL):
            try:
                gauge.remove(digest)
            except KeyError:
                pass

    def is_complete(self, digest: str) -> bool:
        return background.is_complete(self.root, digest)

    def fill_progress(self, digest: str) -> background.FillProgress | None:
        """The layer's background fill, if one was started in this daemon."""
        return self._progress.get(digest)

    async def close(self) -> None:
        tracked = [t for s in self._layer_tasks.values() for t in s]
        for t in tracked:
            t.cancel()
        await self._background.aclose()
        await asyncio.gather(*tracked, return_exceptions=True)
        self.recorder.close_windows()

    # -- one image ------------------------------------------------------------------------------
    async def _run_image(self, ref: str, manifest: str | None, layers: list[str]) -> None:
        opts = self.options
        self.pause.hold()
        released = False
        try:
            self.recorder.open_windows(layers, opts.startup_window_s)
            found = None
            recording = None
            if opts.prefetch or opts.record_first_start:
                if manifest is None:
                    try:
                        manifest = (await self.host.client.resolve(ref)).manifest_digest
                    except Exception as exc:  # noqa: BLE001 - no manifest digest: no profile
                        log.warning("prefetch_skipped", image=ref, reason="resolve_failed", error=str(exc)[:300])
                if manifest is not None and opts.record_first_start:
                    # from now: the container's first reads may come while the lookup runs
                    recording = self.recorder.start(manifest, layers).id
            if opts.prefetch or recording is not None:
                if manifest is not None:
                    try:
                        found = await find(self.root, self.host.client, self.places(ref), manifest, self.voucher,
                                           registry=opts.registry_lookup)
                        if found is not None and recording is not None:
                            self.recorder.stop(recording)  # it has a profile: nothing to record
                            recording = None
                        if found is not None and opts.prefetch:
                            if found.pack is not None and opts.pack:
                                await self._prefetch_pack(ref, found, layers)
                            await self._prefetch(ref, found.profile, layers)
                    except Exception as exc:  # noqa: BLE001 - a prefetch problem never fails a start
                        log.warning("prefetch_failed", image=ref, manifest=manifest,
                                    error=f"{type(exc).__name__}: {exc}"[:300])
            if recording is not None:
                self._finish_recording(ref, manifest, recording)
            # background work waits for the whole image: a layer still streaming to build its
            # index (an image without a published one) needs every core, and so does the
            # container's start right after the last layer is ready
            await asyncio.gather(*(self._wait_layer(d) for d in layers))
            asyncio.get_running_loop().call_later(opts.pause_after_start_s, self.pause.release)
            released = True
            if opts.background:
                for d in layers:
                    self._start_fill(d)
        finally:
            if not released:
                self.pause.release()

    async def _prefetch(self, ref: str, profile: Profile, layers: list[str]) -> None:
        wanted = [lp for lp in profile.layers if lp.digest in layers and lp.accesses]
        ignored = [lp.digest for lp in profile.layers if lp.digest not in layers]
        if ignored:
            log.warning("profile_layers_ignored", image=ref, layers=",".join(ignored), reason="not_in_image")
        t0 = time.monotonic()
        window = asyncio.Semaphore(self.options.prefetch_window)
        results = await asyncio.gather(*(self._track(lp.digest, self._prefetch_layer(lp, window)) for lp in wanted),
                                       return_exceptions=True)
        fetched = sum(r[0] for r in results if isinstance(r, tuple))
        nbytes = sum(r[1] for r in results if isinstance(r, tuple))
        seconds = time.monotonic() - t0
        metrics.PREFETCH_SECONDS.observe(seconds)
        log.info("prefetch_done", image=ref, manifest=profile.manifest, layers=len(wanted), chunks=profile.chunks,
                 fetched_chunks=fetched, fetched_bytes=nbytes, seconds=round(seconds, 3))

    async def _prefetch_pack(self, ref: str, found: Found, layers: list[str]) -> None:
        """Stream the profile's pack; chunks are stored as they arrive, each verified.
        Any problem ends the pack early (logged); the span prefetch then fetches the rest.

        Three stages overlap: the network side queues blocks; a worker thread decodes all
        that arrived meanwhile (one call); another verifies the previous batch against the
        layers' indexes in one SHA-256 pass per buffer and writes it. Few GIL round trips
        and thread hops per megabyte (one call per 1 MiB block, each waiting for its
        layer's registration, streamed at ~26 MB/s on loopback)."""
        pack = found.pack
        assert pack is not None
        limit = self.options.max_pack_bytes
        t0 = time.monotonic()
        counts = {"stored": 0, "already_local": 0, "rejected": 0}
        blocks: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(PACK_QUEUE_BLOCKS)
        receiver: asyncio.Task[None] | None = None
        storing: asyncio.Task[None] | None = None  # the previous batch, being verified and written
        try:
            if pack.size > limit:
                raise PackError(f"pack of {pack.size} bytes is over the {limit}-byte limit")
            reader = PackReader(found.profile.manifest, layers, max_bytes=limit)
            loop = asyncio.get_running_loop()
            receiver = loop.create_task(self._receive_pack(found.ref or ref, pack.digest, blocks, slots))
            end = False
            while not end:
                got = [await blocks.get()]
                while not blocks.empty() and len(got) < PACK_BATCH_BLOCKS and got[-1] is not None:
                    got.append(blocks.get_nowait())
                end = got[-1] is None
                data = [b for b in got if b is not None]
                for _ in data:
                    slots.release()
                if not data:
                    continue
                batch = await asyncio.to_thread(_decode, reader, data)
                while True:
                    if storing is not None:
                        await storing
                    storing = loop.create_task(self._store_pack(batch, counts))
                    if not reader.backlog:
                        break
                    # a very compressible stretch: decode it step by step, each one stored
                    # before the next is made, so memory stays bounded
                    batch = await asyncio.to_thread(reader.take, b"")
            if storing is not None:
                await storing
            await receiver  # the stream's own errors (digest mismatch, network) come first
            reader.finish()
            result = "done"
        except PackError as exc:
            result = "rejected"
            log.warning("pack_rejected", image=ref, pack=pack.digest, reason=str(exc)[:300])
        except Exception as exc:  # noqa: BLE001 - the span prefetch that follows covers what is missing
            result = "failed"
            log.warning("pack_failed", image=ref, pack=pack.digest, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            for task in (receiver, storing):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        metrics.PACKS.labels(result).inc()
        for state, n in counts.items():
            metrics.PACK_CHUNKS.labels(state).inc(n)
        log.info("pack_done", image=ref, pack=pack.digest, result=result, bytes=pack.size,
                 seconds=round(time.monotonic() - t0, 3), **counts)

    async def _store_pack(self, batch: PackBatch, counts: dict[str, int]) -> None:
        """Verify and store one decoded batch; chunks of layers not registered yet wait for them."""
        codecs = dict(self._codecs)  # a copy for the worker thread
        ready: list[int] = []
        waiting: dict[str, list[int]] = {}
        for i, c in enumerate(batch.chunks):
            if c.layer in codecs:
                ready.append(i)
            else:
                waiting.setdefault(c.layer, []).append(i)
        if ready:
            _add(counts, await asyncio.to_thread(_store_pack_batch, self.store, codecs, batch, ready))
        for digest, todo in waiting.items():
            layer = await self._wait_layer(digest)
            if layer is None:
                counts["rejected"] += len(todo)
                continue
            _add(counts, await asyncio.to_thread(_store_pack_batch, self.store, {digest: layer.fetcher.codec},
                                                 batch, todo))

    async def _receive_pack(self, ref: str, digest: str, blocks: asyncio.Queue[bytes | None],
                            slots: asyncio.Semaphore) -> None:
        """Queue the pack's blocks (at most ``PACK_QUEUE_BLOCKS`` waiting), then None."""
        try:
            async for block in self.host.client.stream_blob(ref, digest, purpose="prefetch"):
                fetch_metrics.REGISTRY_BYTES.labels(Priority.PREFETCH.purpose).inc(len(block))
                await slots.acquire()
                blocks.put_nowait(block)
        finally:
            blocks.put_nowait(None)

    async def _prefetch_layer(self, lp: Any, window: asyncio.Semaphore) -> tuple[int, int]:
        layer = await self._wait_layer(lp.digest)
        if layer is None:
            return 0, 0
        codec = layer.fetcher.codec
        if codec.chunk_count != lp.chunk_count:
            log.warning("profile_layer_rejected", layer=lp.digest, reason="index_differs",
                        profile_chunks=lp.chunk_count, index_chunks=codec.chunk_count)
            return 0, 0
        batches = await asyncio.to_thread(span_batches, codec, lp.accesses)
        fetched = [0, 0]

        async def run(batch: list[Any], missing: list[int]) -> None:
            try:
                await layer.fetcher.ensure(missing, Priority.PREFETCH)
                metrics.PREFETCH_CHUNKS.labels("fetched").inc(len(missing))
                wanted = set(missing)
                n = sum(a.size for a in batch if a.chunk in wanted)
                metrics.PREFETCH_BYTES.inc(n)
                fetched[0] += len(missing)
                fetched[1] += n
            except FetchError as exc:
                metrics.PREFETCH_CHUNKS.labels("failed").inc(len(missing))
                log.warning("prefetch_batch_failed", layer=lp.digest, chunks=len(missing), error=str(exc)[:300])
            finally:
                window.release()

        tasks = []
        for batch in batches:
            missing = [a.chunk for a in batch if not self.store.has(codec.digest(a.chunk))]
            metrics.PREFETCH_CHUNKS.labels("already_local").inc(len(batch) - len(missing))
            if not missing:
                continue
            await window.acquire()
            tasks.append(asyncio.get_running_loop().create_task(run(batch, missing)))
        await asyncio.gather(*tasks)
        return fetched[0], fetched[1]

    # -- background fill --------------------------------------------------------------------------
    def _start_fill(self, digest: str) -> None:
        task = self._fills.get(digest)
        if task is not None and not task.done():
            return
        progress = self._progress[digest] = background.FillProgress()
        self._fills[digest] = self._background.spawn(self._fill(digest, progress), name=f"fill-{digest[:19]}")

    async def _fill(self, digest: str, progress: background.FillProgress) -> None:
        layer = await self._wait_layer(digest)
        if layer is None:
            progress.state = "failed"
            return
        try:
            await self.pause.wait()
            ok = await background.fill_layer(layer, self.store, self.bucket, self.pause,
                                             self.options.background_concurrency, self.background_slots,
                                             progress)
            if not ok:
                progress.state = "incomplete"
                return
            if self.is_complete(digest) and layer.verified:
                progress.state = "done"
                return
            progress.state = "verifying"
            if not layer.verified:
                await self.host.check_complete(layer)
            if layer.verified:
                await asyncio.to_thread(background.mark_complete, self.root, digest, "blob-digest+index")
                metrics.LAYERS_COMPLETE.labels("verified").inc()
                progress.state = "done"
                log.info("layer_complete", layer=digest, verified=True)
            else:
                metrics.LAYERS_COMPLETE.labels("failed").inc()
                progress.state = "failed"
                log.error("layer_complete", layer=digest, verified=False)
            # the fill and the check streamed the whole layer through buffers that glibc
            # would keep: on a node that had filled the previous image version, the next
            # start peaked at 295 MB RSS without this, 241 MB with it
            await asyncio.to_thread(heap.trim)
        except asyncio.CancelledError:
            progress.state = "cancelled"
            log.info("background_fill_cancelled", layer=digest)
            raise
        except Exception as exc:  # noqa: BLE001 - background work must never take the daemon down
            progress.state = "failed"
            metrics.LAYERS_COMPLETE.labels("failed").inc()
            log.warning("background_fill_failed", layer=digest, error=f"{type(exc).__name__}: {exc}"[:300])

    # -- helpers ------------------------------------------------------------------------------------
    def _event(self, digest: str) -> asyncio.Event:
        ev = self._ready.get(digest)
        if ev is None:
            ev = self._ready[digest] = asyncio.Event()
        return ev

    async def _wait_layer(self, digest: str) -> Any:
        """The provided layer once registered; None if it is not provided lazily (fallback)."""
        ev = self._event(digest)
        deadline = time.monotonic() + LAYER_WAIT_S
        while not ev.is_set():
            if self.host.prepare_failed(digest):
                return None
            if time.monotonic() > deadline:
                return None
            try:
                await asyncio.wait_for(ev.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return self.host.layer(digest)

    async def _track(self, digest: str, coro: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._layer_tasks.setdefault(digest, set()).add(task)
        try:
            return await coro
        finally:
            self._layer_tasks.get(digest, set()).discard(task)

    def _finish_recording(self, ref: str, manifest: str | None, recording: str) -> None:
        """An image with no profile: its start's reads, recorded since its first Prepare,
        become its local profile ``record_first_start_s`` later."""
        seconds = self.options.record_first_start_s
        log.info("profile_recording_started", image=ref, manifest=manifest, recording=recording, seconds=seconds,
                 reason="no profile for this image")

        async def finish() -> None:
            await asyncio.sleep(seconds)
            try:
                profile, _ = await self.stop_recording(recording)
                if self.options.publish_recorded_profiles and self.signer is not None:
                    await self._publish(ref, profile)
            except Exception as exc:  # noqa: BLE001 - a profile that cannot be saved never fails a start
                log.warning("profile_recording_failed", image=ref, manifest=manifest, error=str(exc)[:300])

        self._background.spawn(finish(), name=f"record-{recording}")

    async def _publish(self, ref: str, profile: Profile) -> None:
        """Push a recorded profile, with the pack of its chunks, signed (as ``profile push``)."""
        resolved = await self.host.client.resolve(ref)
        if resolved.manifest_digest != profile.manifest:
            log.warning("profile_not_published", image=ref, manifest=profile.manifest,
                        reason="the reference now names another manifest")
            return
        pack = await asyncio.to_thread(build_pack, self.root, self.store, profile)
        to = self.places(ref)[-1]
        done = await publish_profile(self.host.client, to, resolved.manifest_descriptor, profile, pack, self.signer)
        log.info("profile_published", image=ref, manifest=profile.manifest, artifact=done.artifact.digest,
                 pack_chunks=done.pack_chunks, bytes=done.pushed_bytes, signed=done.signed)

    # -- control service (recordings) ------------------------------------------------------------------
    async def start_recording(self, ref: str, manifest: str, layers: Iterable[str]) -> tuple[str, str]:
        """Start recording an image's layers; (recording id, manifest digest)."""
        layers = list(layers)
        if not manifest or not layers:
            resolved = await self.host.client.resolve(ref)
            manifest = manifest or resolved.manifest_digest
            layers = layers or [d.digest for d in resolved.layers]
        rec = self.recorder.start(manifest, layers)
        return rec.id, rec.manifest

    async def stop_recording(self, rec_id: str, *, save_profile: bool = True) -> tuple[Profile, Path | None]:
        """Stop; merge the recording into the image's local profile and save it."""
        rec = self.recorder.stop(rec_id)
        counts = {}
        for d in rec.layers:
            layer = self.host.layer(d)
            if layer is not None:
                counts[d] = layer.fetcher.codec.chunk_count
        new = rec.profile(counts)
        new.layers = [lp for lp in new.layers if lp.digest in counts]
        if not save_profile:
            return new, None
        try:
            old = await asyncio.to_thread(load, self.root, rec.manifest)
        except ProfileError as exc:
            log.warning("profile_rejected", source="local", manifest=rec.manifest, reason=str(exc)[:300],
                        action="replaced by the new recording")
            old = None
        merged = merge(old, new) if old is not None else new
        path = await asyncio.to_thread(save, self.root, merged)
        log.info("profile_saved", manifest=merged.manifest, path=str(path), recordings=merged.recordings,
                 chunks=merged.chunks, bytes=merged.bytes, files=merged.files)
        return merged, path

    def profile_bytes(self, manifest: str) -> bytes | None:
        p = load(self.root, manifest)
        return None if p is None else dumps(p)


def _decode(reader: PackReader, blocks: list[bytes]) -> PackBatch:
    """Worker thread: the chunks completed by ``blocks``, decoded block by block (joining
    the blocks first cost a copy of the whole pack); at most ``STEP_BYTES`` per block, the
    rest left as the reader's backlog."""
    batch = reader.take(blocks[0])
    for block in blocks[1:]:
        more = reader.take(block)
        base = len(batch.buffers)
        batch.buffers.extend(more.buffers)
        batch.chunks.extend(more.chunks)
        batch.where.extend((b + base, off) for b, off in more.where)
    return batch


def _store_pack_batch(store: Any, codecs: Mapping[str, Any], batch: PackBatch, todo: Iterable[int]
                      ) -> dict[str, int]:
    """Store chunks ``todo`` of a batch whose bytes hash to what this node's index says.

    Worker thread. One ``verify_chunks`` call per decoder buffer hashes its candidates with
    the GIL released once; a mismatch stops it, so it resumes after each bad chunk. ``codec.digest`` fills
    a dict cache, atomic under the GIL.
    """
    counts = {"stored": 0, "already_local": 0, "rejected": 0}
    candidates: dict[int, list[tuple[int, bytes]]] = {}  # by buffer: (chunk number, digest)
    for i in todo:
        c = batch.chunks[i]
        codec = codecs[c.layer]
        if not 0 <= c.chunk < codec.chunk_count:
            counts["rejected"] += 1
            continue
        digest = codec.digest(c.chunk)
        if store.known(digest):
            counts["already_local"] += 1
            continue
        candidates.setdefault(batch.where[i][0], []).append((i, digest))
    for buf, todo_here in candidates.items():
        records = b"".join(CHUNK_RECORD.pack(batch.where[i][1], batch.chunks[i].size, digest)
                           for i, digest in todo_here)
        bad: set[int] = set()
        start = 0
        while start < len(todo_here):
            k = verify_chunks(batch.buffers[buf], 0, memoryview(records)[start * CHUNK_RECORD.size:])
            if k < 0:
                break
            bad.add(start + k)
            start += k + 1
        good = [(digest, batch.data(i)) for j, (i, digest) in enumerate(todo_here) if j not in bad]
        counts["rejected"] += len(bad)
        # one C call writes them all (GIL released once); present ones (another writer, an
        # earlier chunk of this batch) count as already local
        stored = store.put_many(good) if good else 0
        counts["stored"] += stored
        counts["already_local"] += len(good) - stored
    return counts


def _add(counts: dict[str, int], more: Mapping[str, int]) -> None:
    for state, n in more.items():
        counts[state] += n


def span_batches(codec: SpanCodec, accesses: Sequence[Any]) -> list[list[Any]]:
    """Profile chunks grouped by the checkpoint span (fetch plan) that yields them, the
    groups in the order their first chunk was first read: one range request per group."""
    plans = codec.plan([a.chunk for a in accesses])
    plan_of: dict[int, int] = {}
    for i, plan in enumerate(plans):
        for c in plan.chunk_ids:
            plan_of.setdefault(c, i)
    groups: dict[int, list[Any]] = {}
    for a in accesses:  # dicts keep insertion order: first access of each span
        groups.setdefault(plan_of.get(a.chunk, -1 - a.chunk), []).append(a)
    return list(groups.values())
