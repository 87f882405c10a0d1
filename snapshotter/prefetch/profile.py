"""The start-up profile: which chunks of which layers an image reads while it starts, and when.

One profile per image manifest digest. Per layer: the chunks read (chunk id of the layer
index, the file and range of the read that first touched it) with their first-access
times (microseconds since the recording started), ordered by the median first access over
all merged recordings. Stored as JSON (``<root>/profiles/<algo>-<hex>.json``) and shared
as the single blob of an OCI artifact; both ways it is parsed by :func:`loads`, which
enforces hard size limits and rejects anything malformed with a one-line ``ProfileError``.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.fsutil import write_atomic

MEDIA_TYPE = "application/vnd.lazysnap.profile.v1+json"
ARTIFACT_TYPE = MEDIA_TYPE
SCHEMA = "lazysnap.profile.v1"

MAX_PROFILE_BYTES = 32 << 20  # serialized size accepted from disk or the registry
MAX_LAYERS = 512
MAX_CHUNKS = 2_000_000  # over all layers
MAX_FILES = 1_000_000
MAX_PATH = 4096
MAX_SAMPLES = 15  # first-access times kept per chunk (the newest recordings win)

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ProfileError(ValueError):
    """A profile is malformed, too large or for something else (one-line message)."""


@dataclass(slots=True)
class ChunkAccess:
    """One chunk of a layer read during start: where, and when (µs after start) per recording."""

    chunk: int
    size: int  # the chunk's uncompressed length (from the index)
    path: str
    offset: int  # of the first read that touched the chunk, in file coordinates
    length: int
    times_us: list[int] = field(default_factory=list)

    @property
    def first_us(self) -> int:
        """The median first access over the recordings that read this chunk."""
        return int(statistics.median_low(self.times_us)) if self.times_us else 0


@dataclass(slots=True)
class LayerProfile:
    digest: str
    chunk_count: int  # of the layer's index: a profile for another index is not used
    accesses: list[ChunkAccess] = field(default_factory=list)  # ordered by first_us

    @property
    def bytes(self) -> int:
        """Uncompressed bytes of the listed chunks."""
        return sum(a.size for a in self.accesses)

    def ordered_chunks(self) -> list[int]:
        return [a.chunk for a in self.accesses]

    @property
    def files(self) -> int:
        return len({a.path for a in self.accesses})


@dataclass(slots=True)
class Profile:
    manifest: str
    layers: list[LayerProfile] = field(default_factory=list)
    recordings: int = 1

    @property
    def chunks(self) -> int:
        return sum(len(lp.accesses) for lp in self.layers)

    @property
    def bytes(self) -> int:
        return sum(lp.bytes for lp in self.layers)

    @property
    def files(self) -> int:
        return sum(lp.files for lp in self.layers)

    def layer(self, digest: str) -> LayerProfile | None:
        return next((lp for lp in self.layers if lp.digest == digest), None)

    def summary(self) -> dict[str, object]:
        return {"manifest": self.manifest, "recordings": self.recordings, "files": self.files,
                "chunks": self.chunks, "bytes": self.bytes,
                "layers": [{"digest": lp.digest, "files": lp.files, "chunks": len(lp.accesses),
                            "bytes": lp.bytes, "chunk_count": lp.chunk_count,
                            "last_first_access_ms": round(lp.accesses[-1].first_us / 1000, 3)
                            if lp.accesses else 0.0}
                           for lp in self.layers]}


def _sort(accesses: list[ChunkAccess]) -> None:
    accesses.sort(key=lambda a: (a.first_us, a.chunk))


def merge(a: Profile, b: Profile) -> Profile:
    """Union of two recordings of one image; chunks ordered by median first access.

    Layers whose index differs (another ``chunk_count``) cannot be merged: ``b`` (the
    newer one) replaces ``a``'s for that layer.
    """
    if a.manifest != b.manifest:
        raise ProfileError(f"cannot merge profiles of {a.manifest} and {b.manifest}")
    out: list[LayerProfile] = []
    by_digest = {lp.digest: lp for lp in a.layers}
    seen: set[str] = set()
    for nb in b.layers:
        seen.add(nb.digest)
        old = by_digest.get(nb.digest)
        if old is None or old.chunk_count != nb.chunk_count:
            out.append(_copy_layer(nb))
            continue
        acc = {x.chunk: _copy(x) for x in old.accesses}
        for x in nb.accesses:
            cur = acc.get(x.chunk)
            if cur is None:
                acc[x.chunk] = _copy(x)
            else:
                cur.times_us = (cur.times_us + x.times_us)[-MAX_SAMPLES:]
        merged = list(acc.values())
        _sort(merged)
        out.append(LayerProfile(nb.digest, nb.chunk_count, merged))
    out.extend(_copy_layer(lp) for lp in a.layers if lp.digest not in seen)
    return Profile(a.manifest, out, a.recordings + b.recordings)


def _copy(x: ChunkAccess) -> ChunkAccess:
    return ChunkAccess(x.chunk, x.size, x.path, x.offset, x.length, list(x.times_us))


def _copy_layer(lp: LayerProfile) -> LayerProfile:
    acc = [_copy(x) for x in lp.accesses]
    _sort(acc)
    return LayerProfile(lp.digest, lp.chunk_count, acc)


# -- JSON ------------------------------------------------------------------------------------
def dumps(p: Profile) -> bytes:
    """Compact JSON: per layer a file table and ``[chunk, size, file, offset, length, [µs…]]`` rows."""
    layers = []
    for lp in p.layers:
        files: dict[str, int] = {}
        rows = []
        for a in lp.accesses:
            fi = files.setdefault(a.path, len(files))
            rows.append([a.chunk, a.size, fi, a.offset, a.length, a.times_us])
        layers.append({"digest": lp.digest, "chunkCount": lp.chunk_count, "bytes": lp.bytes,
                       "files": list(files), "chunks": rows})
    doc = {"schema": SCHEMA, "mediaType": MEDIA_TYPE, "manifest": p.manifest, "recordings": p.recordings,
           "chunks": p.chunks, "bytes": p.bytes, "layers": layers}
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile is {len(data)} bytes, over the {MAX_PROFILE_BYTES}-byte limit")
    return data


def _int(v: object, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProfileError(f"bad {what}: {str(v)[:40]!r}")
    return v


def loads(data: bytes, *, expect_manifest: str | None = None) -> Profile:
    """Parse and check a serialized profile; ``ProfileError`` for anything wrong.

    ``expect_manifest``: the image the caller is starting; a profile of any other manifest
    is refused (it would prefetch the wrong bytes).
    """
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile is {len(data)} bytes, over the {MAX_PROFILE_BYTES}-byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ProfileError(f"not a {SCHEMA} document")
    manifest = doc.get("manifest")
    if not isinstance(manifest, str) or not _DIGEST.match(manifest):
        raise ProfileError(f"bad manifest digest: {str(manifest)[:80]!r}")
    if expect_manifest is not None and manifest != expect_manifest:
        raise ProfileError(f"profile is for manifest {manifest}, not {expect_manifest}")
    recordings = _int(doc.get("recordings"), "recordings", 1, 1 << 31)
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or len(raw_layers) > MAX_LAYERS:
        raise ProfileError(f"layers must be a list of at most {MAX_LAYERS}")
    total_chunks = total_files = 0
    layers: list[LayerProfile] = []
    seen: set[str] = set()
    for rl in raw_layers:
        if not isinstance(rl, dict):
            raise ProfileError("layer entry is not an object")
        digest = rl.get("digest")
        if not isinstance(digest, str) or not _DIGEST.match(digest) or digest in seen:
            raise ProfileError(f"bad or repeated layer digest: {str(digest)[:80]!r}")
        seen.add(digest)
        chunk_count = _int(rl.get("chunkCount"), "chunkCount", 0, 1 << 40)
        files, rows = rl.get("files"), rl.get("chunks")
        if not isinstance(files, list) or not isinstance(rows, list):
            raise ProfileError(f"layer {digest}: files and chunks must be lists")
        total_files += len(files)
        total_chunks += len(rows)
        if total_files > MAX_FILES or total_chunks > MAX_CHUNKS:
            raise ProfileError(f"profile lists more than {MAX_FILES} files or {MAX_CHUNKS} chunks")
        for f in files:
            if not isinstance(f, str) or len(f) > MAX_PATH:
                raise ProfileError(f"layer {digest}: bad file path")
        acc: list[ChunkAccess] = []
        ids: set[int] = set()
        for row in rows:
            if not isinstance(row, list) or len(row) != 6 or not isinstance(row[5], list):
                raise ProfileError(f"layer {digest}: bad chunk row {str(row)[:60]}")
            cid = _int(row[0], "chunk id", 0, max(chunk_count - 1, 0))
            if cid >= chunk_count or cid in ids:
                raise ProfileError(f"layer {digest}: chunk {cid} out of range or repeated")
            ids.add(cid)
            size = _int(row[1], "chunk size", 0, 1 << 32)
            fi = _int(row[2], "file index", 0, max(len(files) - 1, 0))
            if fi >= len(files):
                raise ProfileError(f"layer {digest}: file index {fi} out of range")
            times = row[5]
            if not 1 <= len(times) <= MAX_SAMPLES:
                raise ProfileError(f"layer {digest}: chunk {cid} has {len(times)} access times")
            acc.append(ChunkAccess(cid, size, files[fi], _int(row[3], "offset"), _int(row[4], "length"),
                                   [_int(t, "access time") for t in times]))
        _sort(acc)
        layers.append(LayerProfile(digest, chunk_count, acc))
    return Profile(manifest, layers, recordings)


# -- local files -----------------------------------------------------------------------------
def profile_path(root: Path, manifest: str) -> Path:
    return Path(root) / "profiles" / f"{manifest.replace(':', '-')}.json"


def save(root: Path, p: Profile) -> Path:
    """Write atomically (temp file + rename): a crash never leaves half a profile."""
    path = profile_path(root, p.manifest)
    write_atomic(path, dumps(p))
    return path


def load(root: Path, manifest: str) -> Profile | None:
    """The local profile of ``manifest``; None if there is none; ProfileError if it is bad."""
    path = profile_path(root, manifest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path} is {size} bytes, over the {MAX_PROFILE_BYTES}-byte limit")
    return loads(path.read_bytes(), expect_manifest=manifest)
