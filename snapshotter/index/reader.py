"""Random access into a layer through its index: planning separated from byte work.

The lazy fetcher (fetch/) does its own async I/O, so the pieces are split:

* :func:`chunks_for_range` — which chunk ids hold bytes [offset, offset+length) of a file.
* :func:`plan_chunks` — for chunk ids, the :class:`SpanPlan` s: which checkpoint to start
  from and which compressed byte range [c_start, c_end) of the blob to fetch. Chunks that
  start after the same checkpoint share one plan (one fetch, one decompression). The range
  ends at the index's end mark after the last chunk, not at the next checkpoint; if a
  (hostile or buggy) mark proves short, :func:`widen` gives the plan up to the checkpoint.
* :func:`decode_span` — decompress a fetched range from its checkpoint (C core, GIL
  released), cut out the chunks and verify each one's SHA-256. Unverified bytes are never
  returned: a mismatch raises :class:`ChunkVerificationError`.
* :func:`assemble_range` — file bytes from verified chunk bytes (sparse holes are zeros).
* :func:`resolve_regular` — the entry holding a hard link's data; errors for non-files.

:class:`LayerReader` strings them together synchronously over a :class:`RangeSource`
(:class:`FileRangeSource` for a local blob) for the CLI, tests and the bench.
"""
from __future__ import annotations

import bisect
import dataclasses
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from snapshotter import native
from snapshotter.index.errors import (
    ChunkVerificationError,
    EntryNotFoundError,
    NotRegularFileError,
    TruncatedLayerError,
)
from snapshotter.index.format import IndexFile
from snapshotter.index.model import Chunk, Entry, EntryType, LayerFormat

TAR_COALESCE_GAP = 64 << 10  # merge chunk reads separated by less than this
# Cap on one merged plan's uncompressed output: with its compressed range and the chunk
# copies, a plan in flight holds ~2.5x this (background fill peaked the daemon at 563 MB
# RSS with 64 MiB plans).
MAX_PLAN_BYTES = 16 << 20
# Bytes fetched past an end mark: the mark is the decoder's consumed count, which already
# includes its bit-buffer look-ahead; the slack only guards decoders that peek further.
MARK_SLACK = 64


_SHORT_INPUT: tuple[type[BaseException], ...] = (TruncatedLayerError, native.TruncatedLayerError)


def _decompress_range(fmt: str, kind: int, bits: int, window: bytes, data: bytes, skip: int, length: int) -> bytes:
    return native.decompress_range(fmt, kind, bits, window, data, skip, length)


def _first_bad(out: bytes, base: int, chunks: list[Chunk]) -> int | None:
    """Index of the first chunk whose bytes in ``out`` (starting at tar offset ``base``) are
    missing or do not hash to its digest, else None.

    One C call for the whole span: hashing chunk by chunk released and re-took the GIL
    per chunk, and a span of small files holds hundreds of chunks; on a busy daemon each
    re-take can wait a switch interval."""
    for i, c in enumerate(chunks):
        if c.uncompressed_offset < base or c.uncompressed_offset - base + c.length > len(out):
            return i
    records = b"".join(native.CHUNK_RECORD.pack(c.uncompressed_offset, c.length, c.digest) for c in chunks)
    bad = native.verify_chunks(out, base, records)
    return None if bad < 0 else bad


@dataclass(slots=True, frozen=True)
class SpanPlan:
    """One fetch + one decompression producing a run of chunks.

    Fetch blob bytes [c_start, c_end), decompress starting at checkpoint ``checkpoint``
    (for plain tar: no checkpoint, ``checkpoint`` is -1), skip ``skip`` uncompressed bytes
    and produce ``length`` bytes starting at uncompressed offset ``u_start``.
    """

    checkpoint: int
    c_start: int
    c_end: int
    skip: int
    length: int
    u_start: int
    chunk_ids: tuple[int, ...]
    c_limit: int = -1  # where the range would end without end marks (-1: c_end is that end)

    @property
    def compressed_length(self) -> int:
        return self.c_end - self.c_start

    @property
    def widenable(self) -> bool:
        return self.c_limit > self.c_end


def widen(plan: SpanPlan) -> SpanPlan:
    """The plan fetching up to the next checkpoint (after a decode came up short)."""
    return dataclasses.replace(plan, c_end=max(plan.c_end, plan.c_limit), c_limit=-1)


def plan_chunks(index: IndexFile, chunk_ids: Iterable[int], *, max_plan_bytes: int = MAX_PLAN_BYTES) -> list[SpanPlan]:
    """Group chunks by the checkpoint they start after and compute each fetch range.

    The range ends at the first checkpoint at or beyond the group's last byte (+1 byte:
    a DEFLATE checkpoint may sit in the middle of that byte), or at the blob's end.
    Consecutive groups whose data follow each other (a sequential read or prefetch) are
    merged into one plan, up to ``max_plan_bytes`` of output, so the bytes of a chunk
    straddling a checkpoint are not inflated twice.
    """
    ids = sorted(set(chunk_ids))
    if not ids:
        return []
    chunks = {i: index.chunk(i) for i in ids}
    info = index.info
    if info.format == LayerFormat.TAR:
        return _plan_tar(index, ids, chunks)
    us, cs = index.checkpoint_offsets()
    mus, mcs = index.mark_offsets()
    if not us:
        raise TruncatedLayerError(f"index of layer {info.blob_digest} has no checkpoints")
    groups: dict[int, list[int]] = {}
    for i in ids:
        ck = bisect.bisect_right(us, chunks[i].uncompressed_offset) - 1
        if ck < 0:
            raise TruncatedLayerError(f"chunk {i} lies before the first checkpoint")
        groups.setdefault(ck, []).append(i)
    plans: list[SpanPlan] = []
    for ck, members in sorted(groups.items()):
        u_lo = min(chunks[i].uncompressed_offset for i in members)
        u_hi = max(chunks[i].uncompressed_offset + chunks[i].length for i in members)
        nxt = bisect.bisect_left(us, u_hi, lo=ck + 1)
        c_limit = min(cs[nxt] + 1, info.compressed_size) if nxt < len(us) else info.compressed_size
        c_end = c_limit
        m = bisect.bisect_left(mus, u_hi)
        if m < len(mus):
            c_end = min(c_limit, max(cs[ck] + 1, mcs[m] + MARK_SLACK))
        prev = plans[-1] if plans else None
        if (prev is not None and u_lo - (prev.u_start + prev.length) <= TAR_COALESCE_GAP
                and cs[ck] <= prev.c_end and u_hi - prev.u_start <= max_plan_bytes):
            plans[-1] = SpanPlan(prev.checkpoint, prev.c_start, max(c_end, prev.c_end), prev.skip,
                                 u_hi - prev.u_start, prev.u_start, prev.chunk_ids + tuple(members),
                                 max(c_limit, prev.c_limit))
            continue
        plans.append(SpanPlan(checkpoint=ck, c_start=cs[ck], c_end=c_end, skip=u_lo - us[ck],
                              length=u_hi - u_lo, u_start=u_lo, chunk_ids=tuple(members), c_limit=c_limit))
    return plans


def _plan_tar(index: IndexFile, ids: list[int], chunks: Mapping[int, Any]) -> list[SpanPlan]:
    plans: list[SpanPlan] = []
    run: list[int] = []
    span = max(index.info.span_size, 1)

    def flush() -> None:
        lo = chunks[run[0]].uncompressed_offset
        hi = max(chunks[i].uncompressed_offset + chunks[i].length for i in run)
        plans.append(SpanPlan(-1, lo, hi, 0, hi - lo, lo, tuple(run)))

    for i in ids:
        c = chunks[i]
        if run:
            lo = chunks[run[0]].uncompressed_offset
            prev = chunks[run[-1]]
            gap = c.uncompressed_offset - (prev.uncompressed_offset + prev.length)
            if gap > TAR_COALESCE_GAP or c.uncompressed_offset + c.length - lo > span:
                flush()
                run = []
        run.append(i)
    flush()
    return plans


def decode_span(index: IndexFile, plan: SpanPlan, compressed: bytes) -> dict[int, bytes]:
    """Verified chunk bytes of ``plan`` from the fetched blob range [c_start, c_end).

    CPU-bound (inflate + SHA-256, in C with the GIL released): async callers should run
    it with ``asyncio.to_thread``. Raises TruncatedLayerError if ``compressed`` is short,
    CorruptLayerError on bad data, ChunkVerificationError on a digest mismatch.
    """
    info = index.info
    need = plan.c_end - plan.c_start
    if len(compressed) < need:
        raise TruncatedLayerError(
            f"layer {info.blob_digest}: got {len(compressed)} of {need} bytes at offset {plan.c_start}")
    if info.format == LayerFormat.TAR:
        out = bytes(compressed[:plan.length])
    else:
        ck = index.checkpoint(plan.checkpoint)
        try:
            out = _decompress_range(info.format.value, int(ck.kind), ck.bits, ck.window, bytes(compressed[:need]),
                                    plan.skip, plan.length)
        except _SHORT_INPUT as exc:  # one class for callers that retry with a widened plan
            raise TruncatedLayerError(f"layer {info.blob_digest}: range {plan.c_start}-{plan.c_end} "
                                      f"ends early: {exc}") from exc
        if len(out) != plan.length:
            raise TruncatedLayerError(f"layer {info.blob_digest}: span from checkpoint {plan.checkpoint} "
                                      f"decoded to {len(out)} of {plan.length} bytes")
    chunks = [index.chunk(cid) for cid in plan.chunk_ids]
    bad = _first_bad(out, plan.u_start, chunks)
    if bad is not None:
        raise ChunkVerificationError(plan.chunk_ids[bad], info.blob_digest)
    result: dict[int, bytes] = {}
    for cid, c in zip(plan.chunk_ids, chunks):
        start = c.uncompressed_offset - plan.u_start
        result[cid] = out[start:start + c.length]
    return result


def resolve_regular(index: IndexFile, entry: Entry) -> Entry:
    """The regular-file entry holding ``entry``'s data (follows a hard link); raises
    NotRegularFileError naming what the entry is otherwise."""
    if entry.type == EntryType.HARDLINK:
        target = index.lookup(entry.linkname)
        if target is None:
            raise EntryNotFoundError(f"hard link {entry.path!r} target {entry.linkname!r} not in index")
        entry = target
    if entry.type != EntryType.REG:
        what = {EntryType.DIR: "a directory", EntryType.SYMLINK: f"a symlink to {entry.linkname!r}",
                EntryType.CHAR: "a character device", EntryType.BLOCK: "a block device",
                EntryType.FIFO: "a fifo"}.get(entry.type, entry.type.name)
        raise NotRegularFileError(f"{entry.path!r} is {what}, not a regular file")
    return entry


def _segments(entry: Entry) -> list[tuple[int, int, int]]:
    """(file offset, stored offset, length) of the entry's data segments."""
    if entry.sparse is None:
        return [(0, 0, entry.size)] if entry.size else []
    segs = []
    stored = 0
    for off, length in entry.sparse:
        if length:
            segs.append((off, stored, length))
        stored += length
    return segs


def _clip(entry: Entry, offset: int, length: int | None) -> tuple[int, int]:
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must be non-negative")
    start = min(offset, entry.size)
    end = entry.size if length is None else min(entry.size, offset + length)
    return start, max(start, end)


def chunks_for_range(index: IndexFile, entry: Entry, offset: int, length: int | None) -> list[int]:
    """Chunk ids covering file bytes [offset, offset+length) of a regular file entry."""
    start, end = _clip(entry, offset, length)
    cs = index.info.chunk_size
    ids: list[int] = []
    for foff, soff, slen in _segments(entry):
        lo, hi = max(start, foff), min(end, foff + slen)
        if lo >= hi:
            continue
        s_lo, s_hi = soff + (lo - foff), soff + (hi - foff)
        first, last = s_lo // cs, (s_hi - 1) // cs
        for k in range(first, last + 1):
            if k >= entry.chunk_count:
                raise TruncatedLayerError(f"{entry.path!r}: data beyond its chunks")
            cid = entry.first_chunk + k
            if not ids or ids[-1] != cid:
                ids.append(cid)
    return ids


def assemble_range(index: IndexFile, entry: Entry, offset: int, length: int | None,
                   chunk_bytes: Mapping[int, bytes]) -> bytes:
    """File bytes [offset, offset+length) from verified chunk bytes; holes read as zeros."""
    start, end = _clip(entry, offset, length)
    out = bytearray(end - start)
    cs = index.info.chunk_size
    for foff, soff, slen in _segments(entry):
        lo, hi = max(start, foff), min(end, foff + slen)
        pos = lo
        while pos < hi:
            s = soff + (pos - foff)
            k, within = divmod(s, cs)
            data = chunk_bytes[entry.first_chunk + k]
            n = min(hi - pos, len(data) - within)
            if n <= 0:
                raise TruncatedLayerError(f"{entry.path!r}: chunk {entry.first_chunk + k} shorter than expected")
            out[pos - start:pos - start + n] = data[within:within + n]
            pos += n
    return bytes(out)


class RangeSource(Protocol):
    """Anything that returns bytes [offset, offset+length) of the compressed blob."""

    def read(self, offset: int, length: int) -> bytes: ...


class FileRangeSource:
    """A local blob file; short reads (truncated file) return fewer bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            data = os.pread(self._fd, min(length, 16 << 20), offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileRangeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class ReadStats:
    compressed_bytes_read: int = 0
    spans_decoded: int = 0
    chunks_verified: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"compressed_bytes_read": self.compressed_bytes_read, "spans_decoded": self.spans_decoded,
                "chunks_verified": self.chunks_verified, "bytes_out": self.bytes_out}


class LayerReader:
    """Synchronous file reads through an index and a range source, with a small chunk cache."""

    def __init__(self, index: IndexFile, source: RangeSource, *, cache_chunks: int = 64) -> None:
        self.index = index
        self.source = source
        self.stats = ReadStats()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = cache_chunks

    def resolve(self, path_or_entry: str | Entry) -> Entry:
        entry = self.index.lookup(path_or_entry) if isinstance(path_or_entry, str) else path_or_entry
        if entry is None:
            raise EntryNotFoundError(f"no such file in layer: {path_or_entry!r}")
        return resolve_regular(self.index, entry)

    def read_chunks(self, chunk_ids: Iterable[int]) -> dict[int, bytes]:
        ids = list(dict.fromkeys(chunk_ids))
        have = {i: self._cache[i] for i in ids if i in self._cache}
        for plan in plan_chunks(self.index, [i for i in ids if i not in have]):
            data = self.source.read(plan.c_start, plan.compressed_length)
            self.stats.compressed_bytes_read += len(data)
            try:
                decoded = decode_span(self.index, plan, data)
            except TruncatedLayerError:
                if not plan.widenable:
                    raise
                plan = widen(plan)
                more = self.source.read(plan.c_start + len(data), plan.c_end - plan.c_start - len(data))
                self.stats.compressed_bytes_read += len(more)
                decoded = decode_span(self.index, plan, data + more)
            self.stats.spans_decoded += 1
            self.stats.chunks_verified += len(decoded)
            for cid, piece in decoded.items():
                self._cache[cid] = piece
                self._cache.move_to_end(cid)
            have.update(decoded)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return have

    def read_file(self, path_or_entry: str | Entry, offset: int = 0, length: int | None = None) -> bytes:
        entry = self.resolve(path_or_entry)
        ids = chunks_for_range(self.index, entry, offset, length)
        data = assemble_range(self.index, entry, offset, length, self.read_chunks(ids))
        self.stats.bytes_out += len(data)
        return data
