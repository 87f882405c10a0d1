"""Profile packs: the start-up chunks of an image, in first-access order, as one zstd blob.

Replaying a profile chunk by chunk still decodes each one from its layer's checkpoint:
the bytes before the chunk in its span are fetched and inflated for nothing (about three
times the profile's size on the inference image), on the node's CPU, while the container
starts. The node that recorded the profile already holds those chunks verified, so
``lazysnap profile push`` also publishes them, concatenated in first-access order over
all layers and zstd-compressed, as a second blob of the profile artifact. A new node
streams that one blob and stores chunks as they arrive, so the first ones are local
within milliseconds and the last ones long before the start needs them.

Nothing in a pack is trusted: each chunk is checked against the SHA-256 that the node's
own (separately verified) layer index gives for it before it is stored. A pack whose
table does not fit the image's indexes is dropped whole and prefetch goes on as if
there were none.

Layout of the uncompressed stream: ``MAGIC``, u32 little-endian table length, the table
(JSON: schema, manifest, layer digests, ``[layer number, chunk id, size]`` per chunk in
pack order), then the chunks' bytes back to back.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import zstandard

from snapshotter import native

MEDIA_TYPE = "application/vnd.lazysnap.profile.pack.v1+zstd"
SCHEMA = "lazysnap.pack.v1"
MAGIC = b"LZPACK1\n"
MAX_TABLE_BYTES = 16 << 20  # ~800k chunks; bounds what a hostile table costs to parse
MAX_CHUNK_BYTES = 64 << 20
LEVEL = 6  # zstd level: packs are built once, read by every node
WRITE_SIZE = 4 << 20  # decoder output step (the GIL is released once per step; 16 MiB was slower)
# Most output one ``PackReader.take`` produces; input beyond it waits as backlog. A zstd
# block of a few bytes can stand for 128 KiB, so without a bound a hostile pack of a few
# megabytes would be decoded into gigabytes by one call, before any size check.
STEP_BYTES = 4 * WRITE_SIZE


class PackError(ValueError):
    """A pack is malformed or does not belong to this image (one-line message)."""


@dataclass(slots=True, frozen=True)
class PackChunk:
    layer: str
    chunk: int
    size: int


def build_pack(manifest: str, chunks: Iterable[tuple[str, int, bytes]]) -> tuple[bytes, int]:
    """The pack blob for ``(layer digest, chunk id, bytes)`` in the order given; (blob, chunk count)."""
    layers: list[str] = []
    number: dict[str, int] = {}
    table: list[list[int]] = []
    payload: list[bytes] = []
    for layer, chunk, data in chunks:
        if layer not in number:
            number[layer] = len(layers)
            layers.append(layer)
        table.append([number[layer], chunk, len(data)])
        payload.append(data)
    head = json.dumps({"schema": SCHEMA, "manifest": manifest, "layers": layers, "chunks": table},
                      separators=(",", ":")).encode()
    cctx = zstandard.ZstdCompressor(level=LEVEL, threads=-1)
    comp = cctx.compressobj()
    out = [comp.compress(MAGIC + struct.pack("<I", len(head)) + head)]
    out += [comp.compress(p) for p in payload]
    out.append(comp.flush())
    return b"".join(out), len(table)


@dataclass(slots=True, frozen=True)
class PackBatch:
    """Chunks completed by one ``PackReader.take``, in pack order. Chunk ``i`` is
    ``chunks[i].size`` bytes at offset ``where[i][1]`` of ``buffers[where[i][0]]``: whole
    chunks stay in the decoder's output buffer (no copy); only a chunk spanning two
    decoder outputs is assembled. Buffers are never written to once in a batch."""

    buffers: list[bytes | bytearray]
    chunks: list[PackChunk]
    where: list[tuple[int, int]]

    def data(self, i: int) -> memoryview:
        b, off = self.where[i]
        return memoryview(self.buffers[b])[off:off + self.chunks[i].size]


class PackReader:
    """Incremental decoder: ``take`` compressed bytes as they arrive, get finished chunks.

    CPU-bound (zstd decode in C with the GIL released): callers on an event loop run it in
    a worker thread, one call at a time, with as much input per call as has arrived (each
    GIL release costs up to a switch interval when other threads run Python). Each call
    produces at most ``STEP_BYTES``; while ``backlog`` is set, ``take(b"")`` goes on.
    """

    def __init__(self, manifest: str, layers: Iterable[str], *, max_bytes: int) -> None:
        self.manifest = manifest
        self.layers = set(layers)
        self.max_bytes = max_bytes
        self._z = native.ZstdStream()
        self._rest = b""  # input a take() left undecoded (it stopped at STEP_BYTES of output)
        self._eof = False
        self._buf = bytearray()
        self._table: list[PackChunk] | None = None
        self._next = 0
        self.out_bytes = 0
        self.total_bytes = 0  # of chunk data, from the table
        self._expected = 0  # bytes of the uncompressed stream, once the table is known

    @property
    def chunks(self) -> list[PackChunk]:
        return list(self._table or [])

    @property
    def done(self) -> bool:
        return self._table is not None and self._next == len(self._table)

    @property
    def backlog(self) -> bool:
        """The last ``take`` stopped at ``STEP_BYTES`` of output with input left: ``take(b"")``
        decodes the next step (a very compressible pack)."""
        return bool(self._rest)

    def take(self, data: bytes | bytearray | memoryview) -> PackBatch:
        """The chunks completed by ``data`` (and any backlog), at most ``STEP_BYTES`` of output."""
        if data and self._eof:
            raise PackError(f"{len(data)} byte(s) after the end of the pack")
        src: bytes | bytearray | memoryview = self._rest + bytes(data) if self._rest else data
        self._rest = b""
        batch = _empty()
        pos = made = 0
        view = memoryview(src)
        try:
            # each call yields at most WRITE_SIZE bytes (4 MiB steps: the 128 KiB default
            # meant ~1,700 GIL round trips per 200 MB); the size limit is checked per step
            while made < STEP_BYTES and not self._eof:
                cap = min(WRITE_SIZE, STEP_BYTES - made)
                try:
                    plain, used, self._eof = self._z.decompress(view[pos:], cap)
                except native.LayerError as exc:
                    raise PackError(f"pack does not decompress: {exc}") from None
                pos += used
                if not plain:
                    break  # the decoder wants more input
                hungry = len(plain) < cap  # it stopped short of the cap: it wants more input
                made += len(plain)
                self.out_bytes += len(plain)
                if self.out_bytes > self.max_bytes:
                    raise PackError(f"pack is larger than the {self.max_bytes}-byte limit")
                if self._table is not None and self.out_bytes > self._expected:
                    raise PackError(f"pack holds more than the {self._expected} bytes its table lists")
                self._consume(plain, batch)
                if hungry:
                    break
            if not data and src and pos == 0 and made == 0:
                raise PackError("pack decoder makes no progress")  # never loop on a backlog
            if pos < len(src):
                if self._eof:
                    raise PackError(f"{len(src) - pos} byte(s) after the end of the pack")
                self._rest = bytes(view[pos:])
        finally:
            view.release()
        return batch

    def _consume(self, plain: bytes, batch: PackBatch) -> None:
        """Add the chunks ``plain`` (the decoder's next output) completes to ``batch``."""
        if self._table is None:
            self._buf += plain
            if not self._parse_table():
                return
            plain = b""  # now in _buf, after the table
        assert self._table is not None
        table = self._table
        pos = 0
        if self._buf:  # a partial chunk (or what followed the table): complete it from plain
            if self._next < len(table):
                need = table[self._next].size - len(self._buf)
                if need > 0:
                    pos = min(need, len(plain))
                    self._buf += memoryview(plain)[:pos]
            pending = self._buf
            used = self._carve(pending, 0, batch)
            if used:
                self._buf = bytearray(memoryview(pending)[used:])
        if not self._buf:
            pos = self._carve(plain, pos, batch)
            if pos < len(plain):
                self._buf = bytearray(memoryview(plain)[pos:])
        elif pos < len(plain):
            self._buf += memoryview(plain)[pos:]

    def _carve(self, buf: bytes | bytearray, pos: int, batch: PackBatch) -> int:
        """Add the table's next chunks that lie whole in ``buf`` from ``pos``; returns the end."""
        table, start = self._table, pos
        assert table is not None
        n = len(batch.buffers)
        while self._next < len(table) and len(buf) - pos >= table[self._next].size:
            batch.chunks.append(table[self._next])
            batch.where.append((n, pos))
            pos += table[self._next].size
            self._next += 1
        if pos > start:
            batch.buffers.append(buf)
        return pos

    def finish(self) -> None:
        """The stream ended: every chunk the table lists must have arrived, nothing more."""
        if self._rest:
            raise PackError("pack finished with input not decoded (take(b\"\") until no backlog)")
        if self._table is None:
            raise PackError("pack ends inside its table")
        if self._next < len(self._table) or self._buf:
            raise PackError(f"pack has {len(self._table) - self._next} chunk(s) missing or "
                            f"{len(self._buf)} trailing byte(s)")

    def _parse_table(self) -> bool:
        head = len(MAGIC) + 4
        if len(self._buf) < head:
            return False
        if bytes(self._buf[:len(MAGIC)]) != MAGIC:
            raise PackError("not a lazysnap pack (bad magic)")
        (n,) = struct.unpack_from("<I", self._buf, len(MAGIC))
        if n > MAX_TABLE_BYTES:
            raise PackError(f"pack table of {n} bytes is over the {MAX_TABLE_BYTES}-byte limit")
        if len(self._buf) < head + n:
            return False
        try:
            doc = json.loads(bytes(self._buf[head:head + n]))
            if doc.get("schema") != SCHEMA:
                raise PackError(f"unknown pack schema {doc.get('schema')!r}")
            if doc.get("manifest") != self.manifest:
                raise PackError(f"pack is for {doc.get('manifest')}, not {self.manifest}")
            layers = [str(d) for d in doc["layers"]]
            table = []
            for li, chunk, size in doc["chunks"]:
                if not (isinstance(li, int) and isinstance(chunk, int) and isinstance(size, int)):
                    raise PackError("pack table entries must be integers")
                if not 0 <= li < len(layers) or chunk < 0 or not 0 < size <= MAX_CHUNK_BYTES:
                    raise PackError(f"pack table entry {[li, chunk, size]} out of range")
                table.append(PackChunk(layers[li], chunk, size))
        except PackError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise PackError(f"pack table is malformed: {exc}") from None
        stray = set(layers) - self.layers
        if stray:
            raise PackError(f"pack names layer(s) not in the image: {', '.join(sorted(stray))[:200]}")
        self._table = table
        self.total_bytes = sum(c.size for c in table)
        self._expected = head + n + self.total_bytes  # the whole stream: nothing may follow
        if self.total_bytes + head + n > self.max_bytes:
            raise PackError(f"pack of {self.total_bytes} bytes is over the {self.max_bytes}-byte limit")
        del self._buf[:head + n]
        return True


def _empty() -> PackBatch:
    return PackBatch([], [], [])
