"""Finding a layer's index: local cache → published artifact (trusted only) → build.

Local indexes live at ``<root>/indexes/<algo>-<hex>.idx`` (the same files
``lazysnap index`` writes). A published index is accepted only if the artifact is a
referrer of the image manifest in the image's own repository (default policy) or its
blob digest is pinned in the configuration, and the index describes exactly this layer
(``info.blob_digest`` equals the layer digest).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from snapshotter.fsutil import create_private, private_dirs, write_atomic
from snapshotter.index.builder import index_stream
from snapshotter.index.errors import LayerIndexError
from snapshotter.index.format import IndexFile, serialize_index
from snapshotter.layers.options import LazyOptions
from snapshotter.log import get_logger
from snapshotter.store.metrics import REGISTRY

log = get_logger("lazysnap.layers")

INDEX_ARTIFACT = "application/vnd.lazysnap.index.v1"
INDEX_LAYER_MEDIA = "application/vnd.lazysnap.index.layer.v1"
WINDOWS_LAYER_MEDIA = "application/vnd.lazysnap.index.windows.v1"  # an index's windows, apart
LAYER_ANNOTATION = "io.lazysnap.layer.digest"

INDEX_SOURCES = Counter("lazysnap_layer_index_sources", "Where layer indexes came from (local/referrer/built/whole)",
                        ["source"], registry=REGISTRY)
INDEX_FALLBACKS = Counter("lazysnap_layer_index_fallbacks",
                          "Published indexes not used, by reason (the layer was indexed another way)",
                          ["reason"], registry=REGISTRY)


def index_path(root: Path, digest: str) -> Path:
    return root / "indexes" / f"{digest.replace(':', '-')}.idx"


def open_local(root: Path, digest: str) -> IndexFile | None:
    """The cached index for ``digest`` if it opens cleanly and describes that blob."""
    path = index_path(root, digest)
    if not path.is_file():
        return None
    try:
        idx = IndexFile.open(path)
    except (OSError, LayerIndexError) as exc:
        log.warning("index_local_unusable", layer=digest, path=str(path), error=str(exc))
        return None
    if idx.info.blob_digest != digest:
        log.warning("index_local_mismatch", layer=digest, describes=idx.info.blob_digest)
        idx.close()
        return None
    return idx


def quarantine(root: Path, digest: str, reason: str) -> None:
    """Move a bad index aside so it is never served again (kept for inspection)."""
    src = index_path(root, digest)
    dst = root / "indexes" / "quarantine" / f"{src.name}.{int(time.time())}"
    private_dirs(dst.parent)
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dst)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src.with_name(src.name + ".win"))  # its apart windows, if any
    log.error("index_quarantined", layer=digest, reason=reason, moved_to=str(dst))


@dataclass(slots=True)
class PublishedIndexes:
    """Layer digest → index blob descriptor of the newest trusted published artifact."""

    blobs: dict[str, Any]
    artifact: str | None


async def published_indexes(client: Any, ref: str, manifest_digest: str | None) -> PublishedIndexes:
    if not manifest_digest:
        return PublishedIndexes({}, None)
    from snapshotter.registry import Descriptor

    arts = await client.referrers(ref, manifest_digest, INDEX_ARTIFACT)
    arts.sort(key=lambda d: d.annotations.get("org.opencontainers.image.created", ""), reverse=True)
    for art in arts[:1]:
        body, _, _ = await client.get_manifest(ref, art.digest)
        blobs: dict[str, Any] = {}
        for d in json.loads(body).get("layers") or []:
            desc = Descriptor.from_dict(d)
            layer = desc.annotations.get(LAYER_ANNOTATION)
            if layer and desc.media_type == INDEX_LAYER_MEDIA:  # not the windows blobs beside them
                blobs[layer] = desc
        return PublishedIndexes(blobs, art.digest)
    return PublishedIndexes({}, None)


async def fetch_published(client: Any, ref: str, layer_digest: str, desc: Any, opts: LazyOptions,
                          root: Path) -> IndexFile | None:
    """Download, check and cache a published index; None (logged, counted) if not trusted."""
    if opts.index_trust == "local-only":
        return None
    if opts.index_trust == "pinned" and opts.pinned_indexes.get(layer_digest) != desc.digest:
        INDEX_FALLBACKS.labels("not_pinned").inc()
        log.warning("index_rejected", layer=layer_digest, index_blob=desc.digest, reason="not_pinned")
        return None
    try:
        data = await client.fetch_blob(ref, desc.digest, opts.max_index_bytes, purpose="index")
        probe = IndexFile.from_bytes(data)
    except (LayerIndexError, ValueError) as exc:
        INDEX_FALLBACKS.labels("unreadable").inc()
        log.warning("index_rejected", layer=layer_digest, index_blob=desc.digest, reason="unreadable",
                    error=str(exc))
        return None
    describes = probe.info.blob_digest
    probe.close()
    if describes != layer_digest:
        INDEX_FALLBACKS.labels("wrong_layer").inc()
        log.warning("index_rejected", layer=layer_digest, index_blob=desc.digest, reason="wrong_layer",
                    describes=describes)
        return None
    path = index_path(root, layer_digest)
    await asyncio.to_thread(write_atomic, path, data)
    return IndexFile.open(path)


async def build_by_streaming(client: Any, ref: str, layer_digest: str, opts: LazyOptions, root: Path,
                             keep_blob: Path | None) -> IndexFile:
    """Stream the layer once through the indexer (digest checked); optionally keep the blob."""
    part = None
    fobj = None
    if keep_blob is not None:
        private_dirs(keep_blob.parent)
        part = keep_blob.with_name(keep_blob.name + f".part-{os.getpid()}")
        fobj = create_private(part)

    async def tee() -> AsyncIterator[bytes]:
        async for block in client.stream_blob(ref, layer_digest, purpose="layer"):
            if fobj is not None:
                await asyncio.to_thread(fobj.write, block)
            yield block

    try:
        index = await index_stream(tee(), span=opts.span_size, chunk_size=opts.chunk_size,
                                   expected_digest=layer_digest)
        if fobj is not None:
            fobj.close()
            fobj = None
            assert part is not None and keep_blob is not None
            os.replace(part, keep_blob)
    finally:
        if fobj is not None:
            fobj.close()
        if part is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
    data = await asyncio.to_thread(serialize_index, index)
    path = index_path(root, layer_digest)
    await asyncio.to_thread(write_atomic, path, data)
    return IndexFile.open(path)


def same_content(a: IndexFile, b: IndexFile) -> str | None:
    """None if two indexes of one blob describe the same files and chunks, else what differs.

    Streams both: records are in a canonical order (breadth-first, children sorted by name
    bytes; ``serialize_index``), so indexes of the same content pair up record by record
    and the first pair that differs names the difference. Nothing is materialised: this
    runs for every layer that becomes fully local."""
    if a.info.uncompressed_size != b.info.uncompressed_size:
        return f"uncompressed size {a.info.uncompressed_size} != {b.info.uncompressed_size}"
    if a.chunk_count != b.chunk_count:
        return f"chunk count {a.chunk_count} != {b.chunk_count}"
    for i in range(a.chunk_count):
        x, y = a.chunk(i), b.chunk(i)
        if (x.uncompressed_offset, x.length, x.digest) != (y.uncompressed_offset, y.length, y.digest):
            return f"chunk {i} differs"
    if a.entry_count != b.entry_count:
        return f"entry count {a.entry_count} != {b.entry_count}"
    for x, y in zip(a.entries(), b.entries()):
        if x != y:
            return f"entries differ at {min(x.path, y.path)}"
    return None
