"""The lazy layer provider behind the service's remote-snapshot hook.

``provide`` makes a layer's tree appear at ``<root>/mnt/<digest hex>`` (a directory of
the daemon's one FUSE filesystem) without downloading the layer:

1. On the first Prepare of an image, index work starts for *all* its layers at once
   (containerd prepares layers one by one, in order; later ones find their work done).
2. Per layer: small layers (≤ ``small_layer_bytes``) are fetched whole, verified against
   their digest and put in the chunk store; others get an index from the local cache, a
   trusted published artifact, or by streaming the layer once through the indexer.
3. The layer is registered in the filesystem; reads fetch chunks on demand.

Every way a layer ends up not lazy is logged with its reason and counted; failures the
service must turn into a normal download raise ``ProviderError(reason)``.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.fetch import Fetcher, FetchOptions, LayerFetcher, Priority
from snapshotter.fetch.metrics import REGISTRY_BYTES
from snapshotter.fetch.sources import FileBlobSource, IndexCodec, RegistryBlobSource
from snapshotter.fetch.windows import WindowCache, windows_path
from snapshotter.fs import LayerData, LayerTree, LazyFS
from snapshotter.fs.mount import HOLDER_SOCKET, detach
from snapshotter.fs.compiled import CompiledTree, build_compiled, compile_tree
from snapshotter.fsutil import create_private, write_atomic
from snapshotter.index.builder import index_file_bytes
from snapshotter.index.errors import IndexBuildError
from snapshotter.index.format import IndexFile
from snapshotter.layers import indexes
from snapshotter.layers.options import LazyOptions
from snapshotter.layers.status import FillStatus, ImageStatus, LayerStatus, ProviderStatus
from snapshotter.log import get_logger
from snapshotter.registry.reference import places
from snapshotter.registry.signatures import Voucher, load_private_key, load_public_keys, push_signature
from snapshotter.service.provider import ProviderError, RemoteLayerRequest
from snapshotter.store import ChunkStore, PruneResult
from snapshotter.tasks import TaskSet

if TYPE_CHECKING:
    import grpc

log = get_logger("lazysnap.layers")

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"


@dataclass(slots=True)
class ProvidedLayer:
    digest: str
    ref: str
    index: IndexFile
    fetcher: LayerFetcher
    data: LayerData
    path: Path
    source: str  # local | referrer | built | whole
    verified: bool  # the whole blob has been checked against its digest
    verify_task: asyncio.Task[bool] | None = None


@dataclass(slots=True)
class _Image:
    ref: str
    manifest_digest: str | None
    layers: list[str] = field(default_factory=list)
    published: indexes.PublishedIndexes | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LazyLayerProvider:
    """Implements ``snapshotter.service.provider.LayerProvider``."""

    def __init__(self, root: Path, client: Any, options: LazyOptions | None = None,
                 prefetch: Any = None) -> None:
        self.root = Path(root)
        self.options = (options or LazyOptions()).validate()
        self._keys = load_public_keys(self.options.trusted_keys)
        self._signer = load_private_key(self.options.publish_sign_key) if self.options.publish_sign_key else None
        self._background = TaskSet("provider")  # layers being prepared, indexes pushed, layers verified
        self.client = client
        self.store = ChunkStore(self.root, limit_bytes=self.options.store_limit_bytes,
                                fsync=self.options.fsync)  # type: ignore[arg-type]
        self.fetcher = Fetcher(self.store, FetchOptions(max_concurrency=self.options.max_concurrency,
                                                        deadline_s=self.options.fetch_deadline_s,
                                                        readahead_spans=self.options.readahead_spans))
        self.fs = LazyFS(self.root / "mnt", read_ahead_kb=self.options.read_ahead_kb,
                         threads=self.options.fuse_threads,
                         holder=self.root / HOLDER_SOCKET if self.options.fuse_holder else None,
                         holder_external=self.options.fuse_holder_external,
                         passthrough=self.options.fuse_passthrough,
                         passthrough_min_bytes=self.options.fuse_passthrough_min_bytes)
        self.blobs_dir = self.root / "blobs"
        self._layers: dict[str, ProvidedLayer] = {}
        self._tasks: dict[str, asyncio.Task[ProvidedLayer]] = {}
        self._images: dict[str, _Image] = {}
        self._chains: dict[str, tuple[str, str]] = {}  # chain ID → (layer digest, parent chain ID)
        self._sem = asyncio.Semaphore(self.options.layer_parallel)
        self._verify_one = asyncio.Semaphore(1)  # completeness checks run one at a time (memory)
        # trees are built one at a time, in the order layers were started (an image's order):
        # the builds are Python (one GIL), so running them side by side only made the bottom
        # layer, which containerd prepares first, wait for the others
        self._build_one = asyncio.Lock()
        self._started = False
        self._start_lock = asyncio.Lock()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        from snapshotter.prefetch.manager import ProfileManager  # start-up profiles: record, prefetch, fill

        self.profiles = ProfileManager(self.root, self, self.store, prefetch,
                                       voucher=Voucher(self.options.index_trust, tuple(self._keys)),
                                       signer=self._signer, places=self._places)
        self.fs.backing_gate = self.profiles.pause.wait  # no backing files while images start

    # -- public API: every call runs on the provider's own loop -------------------------------
    # The FUSE filesystem must be served by a loop no other code blocks: the service checks
    # provider directories with plain os calls (isdir, statvfs…) on its own loop, and a
    # blocking call on the mount from the loop that serves it deadlocks. So the fs, the
    # fetcher, the registry client and all index work live on one dedicated loop thread;
    # the service's loop only awaits the results.
    async def provide(self, req: RemoteLayerRequest) -> Path:
        return await self._hop(self._provide(req))

    async def restore(self, layer_digest: str, labels: Mapping[str, str]) -> Path:
        return await self._hop(self._restore(layer_digest, labels))

    async def release(self, layer_digest: str) -> None:
        await self._hop(self._release(layer_digest))

    async def restore_finished(self, referenced: Collection[str]) -> None:
        await self._hop(self.fs.release_held(keep={_dirname(d) for d in referenced}))

    async def start(self) -> None:
        await self._hop(self._start())

    async def close(self) -> None:
        if self._thread is None:
            self.store.close()
            return
        try:
            await self._hop(self._close())
        finally:
            loop, thread = self._loop, self._thread
            assert loop is not None
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, 10)
            self._thread = None
            loop.close()

    def add_services(self, server: grpc.aio.Server) -> None:
        """lazysnap.v1.Control: `lazysnap record` starts and stops recordings through it."""
        from snapshotter.prefetch.control import add_control

        add_control(server, self.profiles, self._hop)

    async def verify_layer(self, digest: str) -> bool:
        """Run the completeness check of a provided layer now (see ``check_complete``)."""
        layer = self._layers[digest]
        return await self._hop(self.check_complete(layer))

    async def wait_verified(self, digest: str, timeout: float = 120) -> bool:
        """Wait for a scheduled completeness check; True if the layer is verified."""
        async def wait() -> bool:
            layer = self._layers[digest]
            if layer.verify_task is not None:
                await asyncio.wait_for(asyncio.shield(layer.verify_task), timeout)
            return layer.verified
        return await self._hop(wait())

    def _ensure_thread(self) -> asyncio.AbstractEventLoop:
        with self._thread_lock:
            if self._thread is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="lazysnap-fs", daemon=True)
                self._thread.start()
        assert self._loop is not None
        return self._loop

    async def _hop(self, coro: Any) -> Any:
        loop = self._ensure_thread()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    # -- lifecycle (on the provider loop) --------------------------------------------------------
    async def _start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            await self.fs.start()
            self._started = True
            if self.fs.holder is None:  # a holder's mount outlives this process by design
                atexit.register(_unmount_at_exit, str(self.fs.mountpoint))

    async def _close(self) -> None:
        await self.profiles.close()
        for layer in list(self._layers.values()):
            layer.fetcher.close()
        await self._background.aclose()
        if self._started:
            await self.fs.stop()
            self._started = False
        for layer in self._layers.values():
            layer.index.close()
        self._layers.clear()
        self.store.close()
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()

    # -- LayerProvider ----------------------------------------------------------------------------
    async def _provide(self, req: RemoteLayerRequest) -> Path:
        await self._start()
        self._chains[req.chain_id] = (req.layer_digest, req.parent)
        image = self._images.get(req.image_ref)
        if image is None:
            # containerd names the layers from this one upward; the ones below come from
            # the parent chain, prepared for an image before (a shared base layer)
            image = self._images[req.image_ref] = _Image(
                req.image_ref, req.manifest_digest, [*self._lower_layers(req.parent),
                                                     *(list(req.image_layers) or [req.layer_digest])])
            self.profiles.image_started(req.image_ref, req.manifest_digest,
                                        list(req.image_layers) or [req.layer_digest])
        digests = list(req.image_layers) or [req.layer_digest]
        if req.layer_digest not in digests:
            digests.append(req.layer_digest)
        for d in digests:  # first Prepare of an image: start work for every layer
            self._start_layer(image, d)
        try:
            layer = await asyncio.shield(self._tasks[req.layer_digest])
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means a normal download
            raise ProviderError(f"layer {req.layer_digest}: {type(exc).__name__}: {exc}",
                                reason=_reason(exc)) from exc
        return layer.path

    async def _restore(self, layer_digest: str, labels: Mapping[str, str]) -> Path:
        await self._start()
        layer = self._layers.get(layer_digest)
        if layer is not None:
            return layer.path
        ref = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE) or ""
        idx = indexes.open_local(self.root, layer_digest)
        if idx is None:
            raise ProviderError(f"no local index for {layer_digest}", reason="no_local_index")
        blob = self._blob_path(layer_digest)
        verified = blob.exists() or self.profiles.is_complete(layer_digest)
        layer = await self._register(layer_digest, ref, idx, "local", verified=verified,
                                     local_blob=blob if blob.exists() else None)
        log.info("layer_restored", layer=layer_digest, dir=str(layer.path))
        self.profiles.layer_restored(layer_digest)
        return layer.path

    async def _release(self, layer_digest: str) -> None:
        layer = self._layers.pop(layer_digest, None)
        self._tasks.pop(layer_digest, None)
        # an image missing a layer is no longer one a container can run from: forget it, so
        # status stops listing it and a later pull of it starts its prefetch afresh
        for ref in [ref for ref, img in self._images.items() if layer_digest in img.layers]:
            del self._images[ref]
        for chain in [c for c, (d, _) in self._chains.items() if d == layer_digest]:
            del self._chains[chain]
        if layer is None:
            return
        layer.fetcher.close()
        self.profiles.layer_released(layer_digest)
        if layer.verify_task is not None:
            layer.verify_task.cancel()
        await self.fs.remove_layer(_dirname(layer_digest))
        if self.options.store_policy == "drop-unreferenced":
            await asyncio.to_thread(self.store.unpin_and_drop, layer_digest)
        else:
            self.store.unpin(layer_digest)
        layer.index.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._blob_path(layer_digest))
        log.info("layer_released", layer=layer_digest)

    async def status(self) -> ProviderStatus:
        """What this provider serves: images, their layers, fill progress, the store."""
        return await self._hop(self._status())

    async def prune(self, apply: bool) -> PruneResult:
        """Chunks no provided layer pins: what a prune would reclaim, or reclaim it."""
        return await asyncio.to_thread(self.store.prune, apply=apply)

    async def _status(self) -> ProviderStatus:
        images = [ImageStatus(img.ref, img.manifest_digest, list(img.layers)) for img in self._images.values()]
        named = {d for img in images for d in img.layers}
        orphans: dict[str, list[str]] = {}  # restored after a restart: grouped by their image ref
        for digest, layer in self._layers.items():
            if digest not in named:
                orphans.setdefault(layer.ref, []).append(digest)
        images += [ImageStatus(ref, None, digests) for ref, digests in orphans.items()]
        order = list(dict.fromkeys(d for img in images for d in img.layers))
        layers = [await self._layer_status(d) for d in order]
        released = {s.digest for s in layers if s.state == "released"}
        images = [img for img in images if not released.intersection(img.layers)]
        usage = await asyncio.to_thread(self.store.usage)
        return ProviderStatus(images, [s for s in layers if s.state != "released"], usage,
                              self.options.store_policy)

    async def _layer_status(self, digest: str) -> LayerStatus:
        layer = self._layers.get(digest)
        if layer is None:
            task = self._tasks.get(digest)
            if task is None:
                return LayerStatus(digest, "released")
            if not task.done():
                return LayerStatus(digest, "preparing")
            exc = None if task.cancelled() else task.exception()
            reason = "cancelled" if exc is None else (exc.reason if isinstance(exc, ProviderError) else _reason(exc))
            return LayerStatus(digest, "failed", reason=reason)
        idx = layer.index
        info = idx.info
        # on this loop, not a thread: a release (same loop) closes the index's mmap; one pass
        # over a 26k-chunk layer is a few ms, and status calls are rare
        sizes = idx.chunk_extents()[1]
        share = self.store.local_share(idx.chunk_digests(), sizes)
        progress = self.profiles.fill_progress(digest)
        fill = None if progress is None else FillStatus(
            progress.state, progress.chunks_done, progress.chunks_total, progress.bytes_fetched,
            round(progress.rate(time.time()), 1), progress.started, progress.finished)
        return LayerStatus(digest, "lazy", image_ref=layer.ref, index_source=layer.source, format=info.format.value,
                           sequential_only=info.sequential_only, verified=layer.verified,
                           complete=self.profiles.is_complete(digest), quarantined=layer.data.failed,
                           chunks_total=idx.chunk_count, chunks_local=share.chunks, chunks_verified=share.verified,
                           bytes_total=sum(sizes), bytes_local=share.bytes, compressed_bytes=info.compressed_size,
                           registry_bytes=layer.fetcher.bytes_fetched, fill=fill,
                           passthrough_files=self.fs.passthrough_files(_dirname(digest)))

    def _lower_layers(self, parent: str) -> list[str]:
        """Layer digests of the parent chain, bottom first, as far as this daemon saw it."""
        out: list[str] = []
        while parent in self._chains and len(out) < 1000:
            digest, parent = self._chains[parent]
            out.append(digest)
        return out[::-1]

    # -- per layer ---------------------------------------------------------------------------------
    def layer(self, digest: str) -> ProvidedLayer | None:
        return self._layers.get(digest)

    def _start_layer(self, image: _Image, digest: str) -> None:
        task = self._tasks.get(digest)
        if task is not None and not (task.done() and (task.cancelled() or task.exception() is not None)):
            return
        self._tasks[digest] = self._background.spawn(self._prepare(image, digest), name=f"layer-{digest[:19]}")

    async def _prepare(self, image: _Image, digest: str) -> ProvidedLayer:
        existing = self._layers.get(digest)
        if existing is not None:
            return existing
        async with self._sem:
            ref = image.ref
            idx = indexes.open_local(self.root, digest)
            if idx is not None:
                indexes.INDEX_SOURCES.labels("local").inc()
                blob = self._blob_path(digest)
                return await self._register(digest, ref, idx, "local", verified=blob.exists(),
                                            local_blob=blob if blob.exists() else None)
            size = await self.client.blob_size(ref, digest)
            if size <= self.options.small_layer_bytes:
                return await self._prepare_whole(ref, digest, size)
            published = await self._published(image, digest)
            if published is not None:
                indexes.INDEX_SOURCES.labels("referrer").inc()
                log.info("index_published_used", layer=digest, vouched=published[1])
                return await self._register(digest, ref, published[0], "referrer", verified=False)
            keep = self._blob_path(digest) if self.options.keep_streamed_blobs else None
            log.info("layer_index_build", layer=digest, size=size, reason="no_local_or_published_index",
                     note="streaming the layer once")
            store = self.store if self.options.store_streamed_chunks else None
            idx = await indexes.build_by_streaming(self.client, ref, digest, self.options, self.root, keep, store)
            indexes.INDEX_SOURCES.labels("built").inc()
            if self.options.publish_built_indexes:  # in the background: Prepare does not wait for it
                self._background.spawn(self._publish(image, digest), name=f"publish-{digest[:19]}")
            return await self._register(digest, ref, idx, "built", verified=True, local_blob=keep)

    async def _prepare_whole(self, ref: str, digest: str, size: int) -> ProvidedLayer:
        """Small layer: one GET (digest verified), indexed locally, every chunk stored."""
        log.info("layer_fetch_whole", layer=digest, size=size, reason="below_small_layer_threshold",
                 threshold=self.options.small_layer_bytes)
        data = await self.client.fetch_blob(ref, digest, self.options.small_layer_bytes + 1, purpose="layer")
        REGISTRY_BYTES.labels(Priority.ON_DEMAND.purpose).inc(len(data))  # what the start waited for
        blob = self._blob_path(digest)
        await asyncio.to_thread(write_atomic, blob, data, fsync=False)
        data = await asyncio.to_thread(index_file_bytes, str(blob), span=self.options.span_size,
                                       chunk_size=self.options.chunk_size)
        with IndexFile.from_bytes(data) as built:
            if built.info.blob_digest != digest:
                raise ProviderError(f"layer {digest} indexed as {built.info.blob_digest}", reason="digest_mismatch")
        path = await asyncio.to_thread(indexes.write_trusted, self.root, digest, data, "built")
        idx = IndexFile.open(path)
        indexes.INDEX_SOURCES.labels("whole").inc()
        layer = await self._register(digest, ref, idx, "whole", verified=True, local_blob=blob)
        await layer.fetcher.fetch_all(Priority.ON_DEMAND)
        return layer

    async def _published(self, image: _Image, digest: str) -> tuple[IndexFile, str] | None:
        """A vouched-for published index of ``digest`` and its provenance, or None."""
        if self.options.index_trust == "local-only":
            return None
        async with image.lock:
            if image.published is None:
                try:
                    if image.manifest_digest is None:
                        image.manifest_digest = (await self.client.resolve(image.ref)).manifest_digest
                    image.published = await indexes.published_indexes(self.client, self._places(image.ref),
                                                                       image.manifest_digest, self.options,
                                                                       self._keys)
                except Exception as exc:  # noqa: BLE001 - no artifact: build instead
                    indexes.INDEX_FALLBACKS.labels("referrers_failed").inc()
                    log.warning("index_referrers_failed", image=image.ref, error=str(exc))
                    image.published = indexes.PublishedIndexes()
        candidates = image.published.blobs.get(digest)
        if not candidates:
            if image.published.artifacts > image.published.unsigned:
                indexes.INDEX_FALLBACKS.labels("layer_not_in_artifact").inc()
            return None
        try:
            return await indexes.fetch_published(self.client, digest, candidates, self.options, self.root)
        except Exception as exc:  # noqa: BLE001
            indexes.INDEX_FALLBACKS.labels("index_fetch_failed").inc()
            log.warning("index_fetch_failed", layer=digest, error=str(exc))
            return None

    async def _publish(self, image: _Image, digest: str) -> None:
        """Publish one built index as its own artifact (best effort, logged)."""
        try:
            resolved = await self.client.resolve(image.ref)
            if image.manifest_digest is None:
                image.manifest_digest = resolved.manifest_digest
            data = await asyncio.to_thread(indexes.index_path(self.root, digest).read_bytes)
            to = self._places(image.ref)[-1]  # the share registry when there is one
            art = await self.client.push_artifact(to, subject=resolved.manifest_descriptor,
                                                  artifact_type=indexes.INDEX_ARTIFACT,
                                                  blobs=[(indexes.INDEX_LAYER_MEDIA, data,
                                                          {indexes.LAYER_ANNOTATION: digest})])
            if self._signer is not None:
                await push_signature(self.client, to, art.digest, self._signer)
            log.info("index_published", layer=digest, image=image.ref, artifact=art.digest, to=to,
                     signed=self._signer is not None)
        except Exception as exc:  # noqa: BLE001
            log.warning("index_publish_failed", layer=digest, error=str(exc))

    def _places(self, ref: str) -> list[str]:
        """Where what nodes learn of ``ref`` is published: its own repository, then the share
        registry's copy of that repository path ([lazy] share_registry)."""
        return places(ref, self.options.share_registry)

    async def _register(self, digest: str, ref: str, idx: IndexFile, source: str, *, verified: bool,
                        local_blob: Path | None = None) -> ProvidedLayer:
        existing = self._layers.get(digest)
        if existing is not None:
            idx.close()
            return existing
        info = idx.info
        if info.sequential_only:
            log.info("layer_sequential_only", layer=digest, format=info.format.value,
                     note="no random access (e.g. single-frame zstd): first read streams the layer from the start")
        blob_source: Any = (FileBlobSource(local_blob) if local_blob is not None
                            else RegistryBlobSource(self.client, ref, digest))
        windows = None
        if idx.windows_apart:  # published with --windows-apart: windows come from their own blob, by range
            windows = await asyncio.to_thread(
                WindowCache, idx, windows_path(indexes.index_path(self.root, digest)),
                RegistryBlobSource(self.client, ref, idx.windows_digest, purpose="index"))
        lf = self.fetcher.layer(digest, IndexCodec(idx, windows), blob_source, sequential_only=info.sequential_only)
        async with self._build_one:
            tree, compiled = await asyncio.to_thread(_build_tree, idx, digest)
        data = LayerData(idx, self.store, lf, on_access=self.profiles.recorder.hook(digest, idx))
        digests = await asyncio.to_thread(idx.chunk_digests)
        self.store.pin(digest, digests)
        data.layer_file = await asyncio.to_thread(self.store.layer_file_offsets, digest, digests)
        path = await self.fs.add_layer(_dirname(digest), tree, data, compiled=compiled, digests=b"".join(digests))
        layer = ProvidedLayer(digest, ref, idx, lf, data, path, source, verified)
        if not verified and self.options.verify_complete_layers:
            lf.on_complete = lambda: self._schedule_verify(layer)
        self._layers[digest] = layer
        self.profiles.layer_ready(digest)
        log.info("layer_provided", layer=digest, source=source, files=tree.files, chunks=idx.chunk_count,
                 dir=str(path), sequential_only=info.sequential_only)
        return layer

    # -- completeness check ----------------------------------------------------------------------------
    def _schedule_verify(self, layer: ProvidedLayer) -> asyncio.Task[bool] | None:
        if layer.verified:
            return None
        if layer.verify_task is None or (layer.verify_task.done() and not layer.verify_task.cancelled()
                                         and layer.verify_task.exception() is not None):
            layer.verify_task = self._background.spawn(self._do_verify(layer), name=f"verify-{layer.digest[:19]}")
        return layer.verify_task  # type: ignore[return-value]

    async def check_complete(self, layer: ProvidedLayer) -> bool:
        """The completeness check, at most once per layer however many callers ask
        (the fetcher's on_complete hook, the profile manager's background fill, the API);
        True if the layer is verified. On the provider's loop."""
        task = self._schedule_verify(layer)
        if task is None:
            return layer.verified
        return bool(await asyncio.shield(task))

    async def _do_verify(self, layer: ProvidedLayer) -> bool:
        """Stream the blob once (digest checked), re-index it and compare with the index in use.

        A mismatch means the index lied about this blob: quarantine it and fail reads.
        The re-index runs in a child process (``lazysnap index``): in the daemon it held
        ~50 MB for the inference image's big layer, which glibc kept resident afterwards,
        and ran Python under the GIL the filesystem's loop needs. One layer at a time.
        """
        async with self._verify_one:
            return await self._verify_now(layer)

    async def _verify_now(self, layer: ProvidedLayer) -> bool:
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            blob, out = Path(tmp) / "blob", Path(tmp) / "rebuilt.idx"
            with create_private(blob) as f:
                async for block in self.client.stream_blob(layer.ref, layer.digest, purpose="verify"):
                    await asyncio.to_thread(f.write, block)
            await _index_elsewhere(blob, out, layer.index.info.span_size, layer.index.info.chunk_size)
            blob.unlink()
            rebuilt = await asyncio.to_thread(IndexFile.open, out)
            try:
                problem = None if rebuilt.info.blob_digest == layer.digest else "blob digest differs"
                problem = problem or await asyncio.to_thread(indexes.same_content, layer.index, rebuilt)
            finally:
                rebuilt.close()
        if problem is not None:
            self.quarantine(layer, problem)
            return False
        layer.verified = True
        log.info("layer_verified", layer=layer.digest)
        return True

    def quarantine(self, layer: ProvidedLayer, reason: str) -> None:
        layer.data.failed = reason
        self.fs.quarantine(_dirname(layer.digest), reason)
        layer.fetcher.quarantine(reason)
        indexes.quarantine(self.root, layer.digest, reason)

    def prepare_failed(self, digest: str) -> bool:
        """The layer's Prepare ended without providing it (containerd pulls it instead): what
        waits for it to be registered need wait no more. On the provider's loop."""
        task = self._tasks.get(digest)
        return task is not None and task.done() and (task.cancelled() or task.exception() is not None)

    def _blob_path(self, digest: str) -> Path:
        return self.blobs_dir / digest.replace(":", "-")


async def _index_elsewhere(blob: Path, out: Path, span: int, chunk_size: int) -> None:
    """``lazysnap index BLOB -o OUT`` in a child process (killed if we are cancelled)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapshotter", "index", str(blob), "-o", str(out), "--span", str(span),
        "--chunk-size", str(chunk_size), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise IndexBuildError(f"re-indexing the blob failed (exit {proc.returncode}): "
                              f"{err.decode(errors='replace').strip()[-300:]}")


def _build_tree(idx: IndexFile, digest: str) -> tuple[CompiledTree | LayerTree, bytes]:
    """Worker thread: the layer's tree for the C filesystem, built in C from the index, or
    by Python's LayerTree for the rare layer the C builder leaves to it (logged)."""
    try:
        compiled = build_compiled(idx)
        return compiled, compiled.blob
    except NotImplementedError as exc:
        log.info("layer_tree_python", layer=digest, reason=str(exc))
    tree = LayerTree.build(idx.entries())
    return tree, compile_tree(tree)


def _dirname(digest: str) -> str:
    return digest.split(":", 1)[-1]


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    return {"NotFoundError": "not_found", "AuthError": "auth", "UnavailableError": "registry_unavailable",
            "DigestMismatchError": "digest_mismatch", "IndexBuildError": "index_build_failed",
            "CorruptLayerError": "corrupt_layer", "UnknownFormatError": "unknown_format"}.get(name, "provider_error")


def _unmount_at_exit(mountpoint: str) -> None:
    """The daemon is exiting without close(): never leave a dead FUSE mount behind."""
    detach(mountpoint)
