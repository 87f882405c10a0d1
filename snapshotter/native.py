"""The one typed door to the C core (``snapshotter._core``).

Everything outside this module imports the scanner, range decompression and hashing from
here, never from ``_core`` directly, so the C surface can change without touching callers.
The C side does the byte work with the GIL released; this module only names things.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from snapshotter import _core
from snapshotter.index.model import (  # re-exported
    CHUNK_RECORD,
    ENTRY_BLOCK_RECORDS,
    ENTRY_FIELDS,
    ENTRY_RECORD,
    INDEX_CHUNK_RECORD,
    CheckpointKind,
    EntrySections,
    EntryType,
    MAX_SPARSE_SEGMENTS,
    WINDOW_SIZE,
)

# The layouts Python packs and the C core reads and writes are one contract: refuse a
# mismatched build.
_C_LAYOUT = (_core.CHUNK_RECORD_SIZE, _core.WINDOW_SIZE, _core.MAX_SPARSE_SEGMENTS, _core.INDEX_ENTRY_RECORD_SIZE,
             _core.INDEX_CHUNK_RECORD_SIZE, _core.INDEX_BLOCK_RECORDS)
_PY_LAYOUT = (CHUNK_RECORD.size, WINDOW_SIZE, MAX_SPARSE_SEGMENTS, ENTRY_RECORD.size, INDEX_CHUNK_RECORD.size,
              ENTRY_BLOCK_RECORDS)
_PY_ENUMS = ({t.name: t.value for t in EntryType}, {k.name: k.value for k in CheckpointKind})
if (_core.ENTRY_TYPES, _core.CHECKPOINT_KINDS) != _PY_ENUMS:
    raise ImportError(f"snapshotter._core numbers entry types and checkpoint kinds "
                      f"{_core.ENTRY_TYPES} {_core.CHECKPOINT_KINDS}; Python has {_PY_ENUMS[0]} {_PY_ENUMS[1]}")


def _fields(record: struct.Struct, names: tuple[str, ...]) -> tuple[tuple[str, int, int, int], ...]:
    """(name, offset, bytes, signed) of each field of a packed little-endian record."""
    out, at = [], 0
    for name, code in zip(names, record.format.lstrip("<"), strict=True):
        width = struct.calcsize("<" + code)
        out.append((name, at, width, int(code.islower() and code not in "x")))
        at += width
    return tuple(out)


if _core.INDEX_ENTRY_LAYOUT != _fields(ENTRY_RECORD, ENTRY_FIELDS):
    raise ImportError(f"snapshotter._core lays out the index entry record as {_core.INDEX_ENTRY_LAYOUT}; "
                      f"Python has {_fields(ENTRY_RECORD, ENTRY_FIELDS)}")
if _C_LAYOUT != _PY_LAYOUT:
    raise ImportError(f"snapshotter._core was built for layouts {_C_LAYOUT} (scan chunk record, window, sparse "
                      f"segments, index entry record, index chunk record, records per block); Python has "
                      f"{_PY_LAYOUT}")

LayerError = _core.LayerError  # base class: a ValueError and an index.errors.LayerDataError
CorruptLayerError = _core.CorruptLayerError  # bad bytes: checksum, header, stream data
TruncatedLayerError = _core.TruncatedLayerError  # input ended inside a stream/entry
#: One zstd frame decoded in calls ``decompress(data, max_output) -> (output, consumed,
#: frame ended)`` that each produce at most ``max_output`` bytes (GIL released; one thread
#: at a time). Corrupt input raises CorruptLayerError.
ZstdStream = _core.ZstdStream

DEFAULT_SPAN_SIZE = 4 << 20
DEFAULT_CHUNK_SIZE = 1 << 20



class RawEntry(NamedTuple):
    """A tar entry as the scanner saw it; paths are raw bytes, not normalised yet."""

    path: bytes
    type: int  # model.EntryType number
    mode: int
    uid: int
    gid: int
    size: int  # logical size (sparse: full size)
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] | None
    data_offset: int  # uncompressed offset of the stored data in the tar stream
    stored_size: int  # bytes of stored data (sparse: the concatenated data segments)
    first_chunk: int
    chunk_count: int
    sparse: list[tuple[int, int]] | None


class RawCheckpoint(NamedTuple):
    """Where decoding can start. The first is always STREAM_START at offset 0; then gzip
    gives DEFLATE (bits + 32 KiB window, at a deflate block boundary after every
    span_size compressed bytes) and GZIP_MEMBER (each later member); zstd gives
    ZSTD_FRAME for each later frame; plain tar has only STREAM_START."""

    kind: int  # model.CheckpointKind number
    compressed_offset: int
    uncompressed_offset: int
    bits: int
    window: bytes


@dataclass(slots=True, frozen=True)
class LayerFileTarget:
    """Where a scan writes the chunks it cuts into one file (``Scanner(layer_file=)``): each
    at its offset in the layer's tar, into the open file ``fd`` (the caller's, open until the
    scan is finished), up to ``budget`` bytes, the chunks of files of at least ``min_file``
    bytes only (``ChunkStore.layer_file_target``)."""

    fd: int
    budget: int
    min_file: int = 0


@dataclass(slots=True)
class ScanResult:
    """Everything one pass over a layer produced (see ``Scanner``)."""

    format: str  # "gzip" | "zstd" | "tar"
    compressed_size: int
    uncompressed_size: int
    blob_digest: bytes  # 32-byte SHA-256 of the compressed bytes
    diff_id: bytes | None  # 32-byte SHA-256 of the uncompressed tar, if requested
    sequential_only: bool  # single-frame zstd: no random access
    entries: list[RawEntry]
    chunks: bytes  # packed CHUNK_RECORD records, in file order
    checkpoints: list[RawCheckpoint]
    hash_thread_cpu_ns: int = 0  # CPU time of the scanner's hash thread (benchmarks)
    marks: bytes = b""  # packed MARK_RECORD end marks (uoff, coff), ascending; none for plain tar
    #: ``finish(index_chunk_size=N)``: the index's entry sections built in C (``entries`` and
    #: ``chunks`` are then empty), or None with ``index_declined`` saying why the C builder
    #: left this layer to the Python one (snapshotter.index.builder)
    index: EntrySections | None = None
    index_declined: str | None = None
    #: False for a scanner made with ``build_index``: it kept no entries or chunks, so a
    #: layer its C build declined must be scanned again to be built by the reference
    entries_kept: bool = True
    #: ``Scanner(layer_file=)``: packed CHUNK_RECORD records of the chunks the scan wrote
    #: (hashed from the bytes written), each at its record's offset in the file, and the
    #: errno that made it stop storing (EDQUOT: its budget), 0 if it did not
    stored: bytes = b""
    store_errno: int = 0

    def iter_chunks(self) -> Iterator[tuple[int, int, bytes]]:
        return iter_chunk_records(self.chunks)

    @property
    def chunk_count(self) -> int:
        return len(self.chunks) // CHUNK_RECORD.size


class Scanner:
    """Streaming single-pass indexer: feed compressed bytes in order, then ``finish()``.

    ``hash_thread`` moves tar parsing and SHA-256 of chunks (and the diff ID) to a
    worker thread owned by this scanner, so decompression and hashing overlap on two
    cores. Without it, the one thread queues the SHA-256 of every chunk of a 16 MiB
    output block (and of the fed compressed bytes) and hashes them 16 at a time in
    AVX-512 lanes where the CPU has them (``simd=False`` forces one at a time; tests
    compare the two). ``sparse_windows`` zeroes the bytes of each gzip checkpoint's
    window that the data after it never refers to (``native/window_refs.h``): decoding
    is unchanged and the packed windows get several times smaller. ``build_index`` applies
    each entry to the index as the scan completes it and keeps none (memory grows with the
    tree, ~100 bytes a path, not with the layer's headers): ``finish()`` then returns the
    index sections, or ``index_declined`` with nothing to build from. Separate scanners
    are independent and may run in separate threads.
    """

    __slots__ = ("_core",)

    def __init__(self, *, span_size: int = DEFAULT_SPAN_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, diff_id: bool = False,
                 format: str | None = None, hash_thread: bool = True, simd: bool = True,
                 sparse_windows: bool = True, build_index: bool = False,
                 layer_file: LayerFileTarget | None = None) -> None:
        target = None if layer_file is None else (layer_file.fd, layer_file.budget, layer_file.min_file)
        self._core = _core.Scanner(span_size=span_size, chunk_size=chunk_size,
                                   diff_id=diff_id, format=format, hash_thread=hash_thread,
                                   simd=simd, sparse_windows=sparse_windows, build_index=build_index,
                                   layer_file=target)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._core.feed(data)

    def finish(self, *, index_chunk_size: int = 0) -> ScanResult:
        """End of input. With ``index_chunk_size`` (the chunk size the scanner was made
        with), also the index's entry sections, built in C with the GIL released."""
        r = self._core.finish(index_chunk_size=index_chunk_size)
        built = r.get("index")
        return ScanResult(
            format=r["format"], compressed_size=r["compressed_size"],
            uncompressed_size=r["uncompressed_size"], blob_digest=r["blob_digest"],
            diff_id=r["diff_id"], sequential_only=r["sequential_only"],
            entries=[RawEntry._make(e) for e in r["entries"]], chunks=r["chunks"],
            checkpoints=[RawCheckpoint._make(c) for c in r["checkpoints"]],
            hash_thread_cpu_ns=r.get("hash_thread_cpu_ns", 0), marks=r.get("marks", b""),
            index=EntrySections(*built) if built is not None else None, index_declined=r.get("index_declined"),
            entries_kept=r["entries_kept"],
            stored=r["stored"], store_errno=r["store_errno"],
        )


def scan_stream(stream: BinaryIO, *, span_size: int = DEFAULT_SPAN_SIZE,
                chunk_size: int = DEFAULT_CHUNK_SIZE, diff_id: bool = False,
                format: str | None = None, hash_thread: bool = True,
                read_size: int = 4 << 20, sparse_windows: bool = True) -> ScanResult:
    """Scan a whole layer from a binary stream (file, pipe, HTTP body wrapper)."""
    scanner = Scanner(span_size=span_size, chunk_size=chunk_size, diff_id=diff_id,
                      format=format, hash_thread=hash_thread, sparse_windows=sparse_windows)
    buf = bytearray(read_size)
    view = memoryview(buf)
    while True:
        n = stream.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        scanner.feed(view[:n])
    return scanner.finish()


def decompress_range(format: str, kind: int, bits: int, window: bytes,
                     data: bytes | bytearray | memoryview, skip: int, length: int) -> bytes:
    """Decompress from a checkpoint: ``data`` starts at its compressed offset.

    Discards ``skip`` uncompressed bytes, returns exactly ``length`` bytes; raises
    TruncatedLayerError if ``data`` ends too early, CorruptLayerError on bad data.
    """
    return _core.decompress_range(format, kind, bits, window, data, skip, length)


def window_refs(deflate: bytes | bytearray | memoryview, bits: int, wlen: int) -> bytes | str:
    """Which bytes of a ``wlen``-byte window the deflate data starting at bit ``bits``
    refers to in its next 32 KiB of output: one byte per window byte (1 = referenced), or
    ``"short"`` / ``"invalid"`` when the walk cannot finish (the scanner then keeps the
    whole window). What ``Scanner(sparse_windows=True)`` runs per gzip checkpoint."""
    return _core.window_refs(deflate, bits, wlen)


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return _core.sha256(data)


def write_chunks(chunks_dir: str, tmp_dir: str, tag: str,
                 items: Sequence[tuple[bytes, bytes | bytearray | memoryview]], fsync: int) -> list[int]:
    """Write chunk files ``<chunks_dir>/<hex[:2]>/<hex[2:]>`` via ``tmp_dir`` + rename, all in
    one call with the GIL released (fsync: 0 none, 1 each file, 2 files and directories).
    Per item: 1 written, 0 already present, or -errno."""
    return _core.write_chunks(chunks_dir, tmp_dir, tag, items, fsync)


def verify_chunks(data: bytes | bytearray | memoryview, data_offset: int,
                  records: bytes | bytearray | memoryview) -> int:
    """Check packed chunk records against ``data`` (uncompressed bytes starting at
    tar offset ``data_offset``); returns the index of the first bad record or -1.

    Every record must lie inside ``data`` (ValueError otherwise).
    """
    return _core.verify_chunks(data, data_offset, records)


def iter_chunk_records(chunks: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, bytes]]:
    return CHUNK_RECORD.iter_unpack(chunks)


def zlib_block_boundaries(deflate_member: bytes | bytearray | memoryview) -> list[int]:
    """Bit positions of every deflate block boundary of a gzip stream, found by zlib
    (``Z_BLOCK``); used by tests to cross-check the ISA-L scanner's checkpoints."""
    return _core.zlib_block_boundaries(deflate_member)


@dataclass(slots=True, frozen=True)
class BuildInfo:
    """How this C core was built: reported by ``lazysnap version --json``."""

    compiler: str
    cflags: str
    sanitize: bool
    libraries: dict[str, str]  # zlib, zstd, openssl: loaded at run time; isal: its headers


def build_info() -> BuildInfo:
    raw = _core.build_info()
    return BuildInfo(str(raw["compiler"]), str(raw["cflags"]), bool(raw["sanitize"]),
                     {str(k): str(v) for k, v in raw["libraries"].items()})
