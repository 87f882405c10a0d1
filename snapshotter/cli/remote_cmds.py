"""``lazysnap index REF [--push]`` and ``lazysnap cat REF PATH`` for remote images.

``index`` streams each layer once from the registry through the indexer (layers in
parallel), keeps ``<root>/indexes/<layer digest>.idx`` and, with ``--push``, publishes
them as one OCI artifact (``application/vnd.lazysnap.index.v1``) whose subject is the
image manifest. ``cat`` prints one file as the container sees it (the merged view of
all layers: top-most wins, whiteouts and opaque directories hide lower layers, symlinks
and hard links resolved) and fetches only the compressed ranges that hold it, using a
cached or published index (building one if neither exists).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import posixpath
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.cli import CLIError
from snapshotter.cli.progress import progress
from snapshotter.fetch.sources import RegistryBlobSource
from snapshotter.fetch.windows import WindowCache, windows_path
from snapshotter.index.builder import (
    DEFAULT_CHUNK,
    DEFAULT_SPAN,
    clean_path,
    index_stream_bytes,
)
from snapshotter.index.errors import LAYER_ERRORS, LayerIndexError
from snapshotter.index.format import IndexFile, serialize_split
from snapshotter.index.model import Entry, EntryType
from snapshotter.index.reader import (
    assemble_range,
    chunks_for_range,
    decode_span,
    plan_chunks,
)
from snapshotter.layers.indexes import (
    INDEX_ARTIFACT,
    INDEX_LAYER_MEDIA,
    LAYER_ANNOTATION,
    WINDOWS_LAYER_MEDIA,
    PublishedIndexes,
    fetch_published,
    index_path,
    open_local,
    published_indexes,
    write_trusted,
)
from snapshotter.layers.options import LazyOptions
from snapshotter.log import configure
from snapshotter.registry import (
    Descriptor,
    RegistryClient,
    RegistryConfig,
    RegistryError,
    ResolvedImage,
)
from snapshotter.registry.reference import places
from snapshotter.registry.signatures import (
    SignatureError,
    load_private_key,
    load_public_keys,
    push_signature,
    signature_tag,
)

MAX_INDEX_BLOB = 512 << 20
LAYER_PARALLEL = 3
CAT_WINDOW = 8 << 20
MAX_SYMLINKS = 40
_ERRORS: tuple[type[BaseException], ...] = (RegistryError, LayerIndexError, SignatureError, *LAYER_ERRORS)


def _config(args: argparse.Namespace) -> RegistryConfig:
    """hosts.toml dir from --hosts-dir; docker config from $DOCKER_CONFIG; ECR API endpoint
    override from $LAZYSNAP_ECR_ENDPOINT_URL (botocore also honours $AWS_ENDPOINT_URL_ECR)."""
    hosts = getattr(args, "hosts_dir", None)
    return RegistryConfig(hosts_dir=Path(hosts) if hosts and os.path.isdir(hosts) else None,
                          ecr_endpoint_url=os.environ.get("LAZYSNAP_ECR_ENDPOINT_URL") or None)


def _run(coro: object) -> int:
    # Retries and fallbacks are worth seeing on stderr, as key=value lines (redacted).
    configure(os.environ.get("LAZYSNAP_LOG_LEVEL", "warning"))
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except _ERRORS as exc:
        raise CLIError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    except OSError as exc:
        raise CLIError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


# -- index ---------------------------------------------------------------------------
async def build_layer_index(client: RegistryClient, ref: str, layer: Descriptor, root: Path, *,
                            span: int = DEFAULT_SPAN, chunk_size: int = DEFAULT_CHUNK,
                            diff_id: bool = False, on_bytes: Callable[[int], None] | None = None
                            ) -> tuple[bytes, bool]:
    """(index bytes, built?) for one layer: the cached file, else stream and index it
    (``on_bytes`` hears of each block streamed: the progress display)."""
    cached = open_local(root, layer.digest)
    if cached is not None:
        cached.close()
        return index_path(root, layer.digest).read_bytes(), False
    stream = client.stream_blob(ref, layer.digest, purpose="layer")
    data = await index_stream_bytes(stream if on_bytes is None else _counted(stream, on_bytes), span=span,
                                    chunk_size=chunk_size, diff_id=diff_id, expected_digest=layer.digest,
                                    again=lambda: client.stream_blob(ref, layer.digest, purpose="layer"))
    await asyncio.to_thread(write_trusted, root, layer.digest, data, "built")
    return data, True


async def _counted(stream: AsyncIterator[bytes], on_bytes: Callable[[int], None]) -> AsyncIterator[bytes]:
    async for block in stream:
        on_bytes(len(block))
        yield block


async def _index(args: argparse.Namespace) -> int:
    root = Path(args.root)
    started = time.monotonic()
    signer = load_private_key(args.sign_key) if args.sign_key else None  # a bad key fails before any work
    async with RegistryClient(_config(args)) as client:
        image = await client.resolve(args.source)
        sem = asyncio.Semaphore(LAYER_PARALLEL)
        shown = progress("index", steps=len(image.layers) + int(args.push), unit="steps",
                         total_bytes=sum(layer.size for layer in image.layers))

        async def one(layer: Descriptor) -> bytes:
            async with sem:
                t0 = time.monotonic()
                data, built = await build_layer_index(client, args.source, layer, root, span=args.span,
                                                      chunk_size=args.chunk_size, diff_id=args.diff_id,
                                                      on_bytes=shown.advance)
                if not built:
                    shown.advance(layer.size)
                shown.step(f"layer {layer.digest[:19]} {'indexed' if built else 'cached'}")
                print(f"layer {layer.digest} size={layer.size} index_bytes={len(data)} "
                      f"{'built' if built else 'cached'} seconds={time.monotonic() - t0:.2f}", flush=True)
                return data

        try:
            datas = await asyncio.gather(*(one(layer) for layer in image.layers))
            pushed = windows = ""
            if args.push:
                blobs = []
                for layer, data in zip(image.layers, datas):
                    if not args.windows_apart:
                        blobs.append((INDEX_LAYER_MEDIA, data, {LAYER_ANNOTATION: layer.digest}))
                        continue
                    head, apart = await asyncio.to_thread(_split, data)
                    blobs.append((INDEX_LAYER_MEDIA, head, {LAYER_ANNOTATION: layer.digest}))
                    if apart:
                        blobs.append((WINDOWS_LAYER_MEDIA, apart, {LAYER_ANNOTATION: layer.digest}))
                # what a node fetches at its first Prepare: the indexes, not their windows
                datas = [b for media, b, _ in blobs if media == INDEX_LAYER_MEDIA]
                if args.windows_apart:
                    windows = f" windows_bytes={sum(len(b) for media, b, _ in blobs if media == WINDOWS_LAYER_MEDIA)}"
                to = places(args.source, args.share_registry)[-1]
                art = await client.push_artifact(to, subject=image.manifest_descriptor,
                                                 artifact_type=INDEX_ARTIFACT, blobs=blobs,
                                                 annotations={"org.opencontainers.image.created":
                                                              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                pushed = f" pushed={art.digest}"
                shown.step(f"indexes published as {art.digest[:19]}")
                if signer is not None:
                    await push_signature(client, to, art.digest, signer)
                    pushed += f" signature={signature_tag(art.digest)}"
        finally:
            shown.close()
        print(f"indexed {image.reference} manifest={image.manifest_digest} layers={len(image.layers)} "
              f"index_bytes={sum(len(d) for d in datas)} registry_bytes={client.stats.registry_bytes} "
              f"seconds={time.monotonic() - started:.2f}{pushed}{windows}")
    return 0


def _split(data: bytes) -> tuple[bytes, bytes]:
    """An index file's bytes as (index, windows blob) with the windows apart."""
    idx = IndexFile.from_bytes(data)
    try:
        return serialize_split(idx.to_layer_index())
    finally:
        idx.close()


def index_ref(args: argparse.Namespace) -> int:
    if args.span <= 0 or args.chunk_size <= 0:
        raise CLIError("--span and --chunk-size must be positive", status=2)
    if args.sign_key and not args.push:
        raise CLIError("--sign-key signs what is published: it needs --push", status=2)
    return _run(_index(args))


# -- cat -----------------------------------------------------------------------------
@dataclass(slots=True)
class _Image:
    """Layers of a resolved image with their indexes, fetched on first need."""

    client: RegistryClient
    ref: str
    image: ResolvedImage
    root: Path
    sources: dict[str, str] = field(default_factory=dict)  # layer digest → cache|referrer|built
    _indexes: dict[str, IndexFile] = field(default_factory=dict)
    trusted_keys: list[str] = field(default_factory=list)
    share_registry: str = ""  # looked in after the image's repository
    _published: PublishedIndexes | None = None

    async def index(self, layer: Descriptor) -> IndexFile:
        idx = self._indexes.get(layer.digest)
        if idx is not None:
            return idx
        idx = open_local(self.root, layer.digest)
        if idx is not None:
            self.sources[layer.digest] = "cache"
        else:
            # the daemon's rule: a published index only if signed by a trusted key
            opts = LazyOptions(trusted_keys=self.trusted_keys, max_index_bytes=MAX_INDEX_BLOB)
            if self._published is None:
                self._published = await published_indexes(self.client, places(self.ref, self.share_registry),
                                                          self.image.manifest_digest, opts,
                                                          load_public_keys(self.trusted_keys))
            found = await fetch_published(self.client, layer.digest,
                                          self._published.blobs.get(layer.digest, []), opts, self.root)
            if found is not None:
                idx = found[0]
                self.sources[layer.digest] = "referrer"
            else:
                await build_layer_index(self.client, self.ref, layer, self.root)
                self.sources[layer.digest] = "built"
                idx = IndexFile.open(index_path(self.root, layer.digest))
        self._indexes[layer.digest] = idx
        return idx

    def close(self) -> None:
        for idx in self._indexes.values():
            idx.close()

    async def lookup(self, path: str) -> tuple[Descriptor, IndexFile, Entry] | None:
        """The merged view of ``path`` (no symlink resolution): top-most layer wins."""
        parts = path.split("/") if path else []
        for layer in reversed(self.image.layers):
            idx = await self.index(layer)
            e = idx.lookup(path)
            if e is not None and not posixpath.basename(path).startswith(".wh."):
                return layer, idx, e
            if not parts:
                continue
            for k in range(len(parts)):
                parent = "/".join(parts[:k])
                if idx.lookup(posixpath.join(parent, ".wh." + parts[k])) is not None:
                    return None  # whited out here: lower layers are hidden
                if k < len(parts) - 1:
                    anc = idx.lookup("/".join(parts[:k + 1]))
                    if anc is not None and anc.type != EntryType.DIR:
                        return None  # a non-directory replaced the parent
                    if idx.lookup("/".join(parts[:k + 1]) + "/.wh..wh..opq") is not None:
                        return None  # opaque directory without the path
        return None

    async def resolve(self, path: str) -> tuple[Descriptor, IndexFile, Entry]:
        """Follow symlinks (in any component) through the merged view."""
        todo = [p for p in path.split("/") if p]
        done: list[str] = []
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                if done:
                    done.pop()
                continue
            cur = "/".join(done + [comp])
            found = await self.lookup(cur)
            if found is None:
                raise CLIError(f"{'/' + path}: no such file or directory in {self.image.reference}")
            _, _, entry = found
            if entry.type == EntryType.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise CLIError(f"{'/' + path}: too many levels of symbolic links")
                link = entry.linkname
                if link.startswith("/"):
                    done = []
                todo = [p for p in link.split("/") if p] + todo
                continue
            if todo and entry.type != EntryType.DIR:
                raise CLIError(f"{'/' + cur}: not a directory")
            done.append(comp)
        final = await self.lookup("/".join(done))
        if final is None:
            raise CLIError(f"{'/' + path}: no such file or directory in {self.image.reference}")
        layer, idx, entry = final
        if entry.type == EntryType.HARDLINK:
            linked = idx.lookup(entry.linkname)
            if linked is None:
                raise CLIError(f"{'/' + path}: hard link target {entry.linkname!r} missing in its layer")
            entry = linked
        if entry.type != EntryType.REG:
            raise CLIError(f"{'/' + path}: not a regular file ({entry.type.name.lower()})")
        return layer, idx, entry


async def _read_file(client: RegistryClient, ref: str, layer: Descriptor, idx: IndexFile, entry: Entry,
                     offset: int, length: int | None, out: object) -> int:
    """Write file bytes to ``out`` window by window: only the needed spans are fetched."""
    end = entry.size if length is None else min(entry.size, offset + length)
    pos = offset
    written = 0
    windows = None
    if idx.windows_apart:
        assert idx.windows_digest is not None
        windows = WindowCache(idx, windows_path(Path(idx.source)),
                              RegistryBlobSource(client, ref, idx.windows_digest, purpose="index"))
    try:
        while pos < end:
            n = min(CAT_WINDOW, end - pos)
            ids = chunks_for_range(idx, entry, pos, n)
            plans = plan_chunks(idx, ids)
            fetch = client.read_ranges(ref, layer.digest, [(p.c_start, p.c_end) for p in plans])
            if windows is not None:
                datas, _ = await asyncio.gather(fetch, windows.ensure(p.checkpoint for p in plans))
            else:
                datas = await fetch
            chunks: dict[int, bytes] = {}
            for plan, data in zip(plans, datas):
                chunks.update(await asyncio.to_thread(decode_span, idx, plan, data))
            piece = assemble_range(idx, entry, pos, n, chunks)
            out.write(piece)  # type: ignore[attr-defined]
            written += len(piece)
            pos += n
    finally:
        if windows is not None:
            windows.close()
    return written


async def _cat(args: argparse.Namespace) -> int:
    ref, path = args.operands
    if args.offset < 0 or (args.length is not None and args.length < 0):
        raise CLIError("--offset and --length must be non-negative", status=2)
    clean = clean_path(path)
    started = time.monotonic()
    async with RegistryClient(_config(args)) as client:
        image = _Image(client, ref, await client.resolve(ref), Path(args.root), trusted_keys=args.trusted_key,
                       share_registry=args.share_registry)
        written = 0
        try:
            layer, idx, entry = await image.resolve(clean)
            written = await _read_file(client, ref, layer, idx, entry, args.offset, args.length,
                                       sys.stdout.buffer)
            sys.stdout.buffer.flush()
        finally:
            image.close()
            if args.stats:
                s = client.stats
                print(json.dumps({"registry_bytes": s.registry_bytes, "requests": s.requests,
                                  "bytes_out": written, "bytes_by_purpose": dict(s.bytes_by_purpose),
                                  "requests_by_purpose": dict(s.requests_by_purpose),
                                  "index_sources": image.sources, "retries": s.retries,
                                  "seconds": round(time.monotonic() - started, 3)}), file=sys.stderr)
    return 0


def cat_ref(args: argparse.Namespace) -> int:
    return _run(_cat(args))
