"""Finding a layer's index: local cache → published artifact (vouched for only) → build.

An index decides which bytes each file serves: a re-serialized index with two files'
offsets swapped is well-formed, names the right blob and only chunks that really are in
it, and would serve one file's bytes as the other's. So a published index is used only
when someone the node trusts vouches for it - a cosign signature on its artifact by one
of ``trusted_keys`` (``index_trust = "signed"``, the default) or its blob digest pinned in
the configuration (``pinned``) - and it must describe exactly this layer. Every
candidate is tried, newest first, so a bad newer artifact cannot hide a good older one.
Without one the layer is indexed by streaming it once: every byte is then decoded from
the blob, whose digest is checked.

Local indexes live at ``<root>/indexes/<algo>-<hex>.idx`` with a provenance record
``.idx.src`` beside them (written last, so an index without one - from a crash, or
cached by a version that trusted any referrer - is never served).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from snapshotter.fetch import Priority
from snapshotter.fetch.metrics import REGISTRY_BYTES
from snapshotter.fsutil import create_private, private_dirs, write_atomic
from snapshotter.index.builder import index_stream_bytes
from snapshotter.index.errors import LayerIndexError
from snapshotter.index.format import IndexFile
from snapshotter.layers.options import LazyOptions
from snapshotter.log import get_logger
from snapshotter.registry.signatures import TrustedKey, Voucher
from snapshotter.store.chunks import ChunkStore, PendingLayerFile
from snapshotter.store.metrics import REGISTRY

log = get_logger("lazysnap.layers")

INDEX_ARTIFACT = "application/vnd.lazysnap.index.v1"
INDEX_LAYER_MEDIA = "application/vnd.lazysnap.index.layer.v1"
WINDOWS_LAYER_MEDIA = "application/vnd.lazysnap.index.windows.v1"  # an index's windows, apart
LAYER_ANNOTATION = "io.lazysnap.layer.digest"

MAX_ARTIFACTS = 16  # index artifacts of one image looked at: a flood of referrers costs a bounded amount
PROVENANCE_SUFFIX = ".src"

INDEX_SOURCES = Counter("lazysnap_layer_index_sources", "Where layer indexes came from (local/referrer/built/whole)",
                        ["source"], registry=REGISTRY)
INDEX_FALLBACKS = Counter("lazysnap_layer_index_fallbacks",
                          "Published indexes not used, by reason (the layer was indexed another way)",
                          ["reason"], registry=REGISTRY)


def index_path(root: Path, digest: str) -> Path:
    return root / "indexes" / f"{digest.replace(':', '-')}.idx"


def _provenance_path(path: Path) -> Path:
    return path.with_name(path.name + PROVENANCE_SUFFIX)


def write_trusted(root: Path, digest: str, data: bytes, source: str) -> Path:
    """Cache index bytes the caller has vouched for (``source`` says why: built here,
    ``signed:<key>``, ``pinned``); the provenance record is written after the index."""
    path = index_path(root, digest)
    write_atomic(path, data)
    write_atomic(_provenance_path(path), json.dumps({"layer": digest, "source": source}).encode())
    return path


def provenance(root: Path, digest: str) -> str | None:
    """Why the cached index of ``digest`` is trusted, or None if it is not."""
    try:
        record = json.loads(_provenance_path(index_path(root, digest)).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("layer") != digest or not isinstance(record.get("source"), str):
        return None
    return record["source"]


def open_local(root: Path, digest: str) -> IndexFile | None:
    """The cached index for ``digest`` if it is vouched for, opens cleanly and describes that blob."""
    path = index_path(root, digest)
    if not path.is_file():
        return None
    if provenance(root, digest) is None:
        log.warning("index_local_untrusted", layer=digest, path=str(path),
                    note="no provenance record (cached before indexes had to be vouched for, or "
                         "interrupted): not served; the layer is indexed again")
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
        os.unlink(_provenance_path(src))  # first: without it the index is never served again
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dst)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src.with_name(src.name + ".win"))  # its apart windows, if any
    log.error("index_quarantined", layer=digest, reason=reason, moved_to=str(dst))


@dataclass(slots=True, frozen=True)
class Candidate:
    """One published index blob of a layer and who vouches for its artifact."""

    artifact: str
    blob: Any  # registry Descriptor of the index blob
    vouched: str  # "signed:<key fingerprint>" or "pinned" (checked per blob)
    ref: str  # where the artifact is: the image's repository or the share registry's


@dataclass(slots=True)
class PublishedIndexes:
    """Layer digest → candidate index blobs, newest artifact first."""

    blobs: dict[str, list[Candidate]] = field(default_factory=dict)
    artifacts: int = 0  # index artifacts found
    unsigned: int = 0  # of them, not signed by a trusted key (signed mode)


async def published_indexes(client: Any, refs: Sequence[str], manifest_digest: str | None, opts: LazyOptions,
                            keys: list[TrustedKey]) -> PublishedIndexes:
    """The vouched-for index candidates of every layer of one image, looked for in each of
    ``refs`` in turn (the image's own repository, then the share registry's)."""
    out = PublishedIndexes()
    if not manifest_digest or opts.index_trust == "local-only":
        return out
    if opts.index_trust == "signed" and not keys:
        return out  # nothing could be vouched for: do not even ask
    for ref in refs:
        await _published_in(client, ref, manifest_digest, opts, keys, out)
    return out


async def _published_in(client: Any, ref: str, manifest_digest: str, opts: LazyOptions, keys: list[TrustedKey],
                        out: PublishedIndexes) -> None:
    from snapshotter.registry import Descriptor

    voucher = Voucher("signed", tuple(keys))
    arts = await client.referrers(ref, manifest_digest, INDEX_ARTIFACT)
    arts.sort(key=lambda d: d.annotations.get("org.opencontainers.image.created", ""), reverse=True)
    out.artifacts += len(arts)
    for art in arts[:MAX_ARTIFACTS]:
        vouched = "pinned"
        if opts.index_trust == "signed":
            signed = await voucher.vouch(client, ref, art.digest)
            if signed is None:
                out.unsigned += 1
                INDEX_FALLBACKS.labels("unsigned").inc()
                log.warning("index_rejected", image=ref, artifact=art.digest, reason="unsigned",
                            note="no signature by a trusted key: not used")
                continue
            vouched = signed
        body, _, _ = await client.get_manifest(ref, art.digest)
        try:
            manifest = json.loads(body)
            subject = (manifest.get("subject") or {}).get("digest")
            layers = manifest.get("layers") or []
        except (ValueError, AttributeError):
            INDEX_FALLBACKS.labels("unreadable").inc()
            continue
        if subject != manifest_digest:
            INDEX_FALLBACKS.labels("wrong_subject").inc()
            log.warning("index_rejected", image=ref, artifact=art.digest, reason="wrong_subject", subject=subject)
            continue
        for d in layers:
            if not isinstance(d, dict):
                continue
            desc = Descriptor.from_dict(d)
            layer = desc.annotations.get(LAYER_ANNOTATION)
            if layer and desc.media_type == INDEX_LAYER_MEDIA:  # not the windows blobs beside them
                out.blobs.setdefault(layer, []).append(Candidate(art.digest, desc, vouched, ref))


async def fetch_published(client: Any, layer_digest: str, candidates: list[Candidate],
                          opts: LazyOptions, root: Path) -> tuple[IndexFile, str] | None:
    """The first candidate that is vouched for, readable and describes this layer,
    cached with its provenance; None (each rejection logged and counted) if none is."""
    for cand in candidates:
        desc = cand.blob
        if cand.vouched == "pinned" and opts.pinned_indexes.get(layer_digest) != desc.digest:
            INDEX_FALLBACKS.labels("not_pinned").inc()
            log.warning("index_rejected", layer=layer_digest, index_blob=desc.digest, reason="not_pinned")
            continue
        try:
            data = await client.fetch_blob(cand.ref, desc.digest, opts.max_index_bytes, purpose="index")
            probe = await asyncio.to_thread(IndexFile.from_bytes, data)  # checksums MBs: not on the loop
        except (LayerIndexError, ValueError) as exc:
            INDEX_FALLBACKS.labels("unreadable").inc()
            log.warning("index_rejected", layer=layer_digest, index_blob=desc.digest, reason="unreadable",
                        error=str(exc))
            continue
        describes = probe.info.blob_digest
        probe.close()
        if describes != layer_digest:
            INDEX_FALLBACKS.labels("wrong_layer").inc()
            log.warning("index_rejected", layer=layer_digest, index_blob=desc.digest, reason="wrong_layer",
                        describes=describes)
            continue
        source = cand.vouched if cand.vouched != "pinned" else f"pinned:{desc.digest}"
        path = await asyncio.to_thread(write_trusted, root, layer_digest, data, source)
        return IndexFile.open(path), source
    return None


async def build_by_streaming(client: Any, ref: str, layer_digest: str, opts: LazyOptions, root: Path,
                             keep_blob: Path | None, store: ChunkStore | None = None) -> IndexFile:
    """Stream the layer once through the indexer (digest checked); optionally keep the blob
    and write its chunks into a layer file of ``store`` on the way. The index is built as
    the layer streams (no entries kept: memory grows with the tree, not the headers); the
    rare layer C leaves to the reference is read again, from the kept blob when there is
    one."""
    part = None
    fobj = None
    if keep_blob is not None:
        private_dirs(keep_blob.parent)
        part = keep_blob.with_name(keep_blob.name + f".part-{os.getpid()}")
        fobj = create_private(part)

    async def tee(write: bool = True) -> AsyncIterator[bytes]:
        async for block in client.stream_blob(ref, layer_digest, purpose="layer"):
            REGISTRY_BYTES.labels(Priority.ON_DEMAND.purpose).inc(len(block))  # Prepare waits for it
            if write and fobj is not None:
                await asyncio.to_thread(fobj.write, block)
            yield block

    def again() -> AsyncIterator[bytes]:
        if fobj is None or part is None:
            return tee(write=False)
        fobj.flush()
        return _file_blocks(part)

    pending = None
    try:
        if store is not None:
            pending = await asyncio.to_thread(_layer_file_target, store, layer_digest,
                                              opts.store_streamed_min_file_bytes)
        adopt = functools.partial(store.adopt_layer_file, pending) if store is not None and pending else None
        data = await index_stream_bytes(tee(), span=opts.span_size, chunk_size=opts.chunk_size,
                                        expected_digest=layer_digest,
                                        layer_file=pending.target if pending is not None else None,
                                        stored=adopt, again=again)
        if fobj is not None:
            fobj.close()
            fobj = None
            assert part is not None and keep_blob is not None
            os.replace(part, keep_blob)
    finally:
        if pending is not None and pending.fd >= 0:  # the scan did not finish
            assert store is not None
            store.discard_layer_file(pending)
        if fobj is not None:
            fobj.close()
        if part is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
    path = await asyncio.to_thread(write_trusted, root, layer_digest, data, "built")
    return IndexFile.open(path)


def _layer_file_target(store: ChunkStore, layer_digest: str, min_file: int) -> PendingLayerFile | None:
    """A layer file for the streaming pass to write into; None (said once) when it cannot be
    made: the layer is then indexed all the same, its chunks fetched when read."""
    try:
        return store.layer_file_target(layer_digest, min_file)
    except OSError as exc:
        log.warning("layer_file_unavailable", layer=layer_digest, error=str(exc),
                    note="the layer's chunks are fetched when read")
        return None


async def _file_blocks(path: Path, size: int = 4 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while block := await asyncio.to_thread(f.read, size):
            yield block


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
