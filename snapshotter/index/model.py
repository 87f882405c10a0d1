"""The layer index model: what one layer holds, and where its bytes are.

Every other package reads layers through these records, so they are plain, immutable
and independent of how the index is stored on disk (see ``format.py``).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field


class LayerFormat(enum.Enum):
    TAR = "tar"
    GZIP = "gzip"
    ZSTD = "zstd"


class EntryType(enum.IntEnum):
    """Tar entry kinds after GNU/PAX extension records have been folded in."""

    REG = 0
    HARDLINK = 1
    SYMLINK = 2
    CHAR = 3
    BLOCK = 4
    DIR = 5
    FIFO = 6


@dataclass(slots=True, frozen=True)
class Entry:
    """One tar entry.

    ``path`` is normalised and relative to the layer root ("usr/bin/python3", no leading
    "/" or "./", no "..", directories without a trailing "/"). Whiteouts (".wh.<name>",
    ".wh..wh..opq") are kept as the regular files they are in the tar; presenting them is
    the filesystem's job. ``data_offset`` is the uncompressed offset of the file content
    in the tar stream; ``first_chunk``/``chunk_count`` index ``LayerIndex`` chunks.
    For sparse files ``sparse`` lists (offset, length) data segments in file
    coordinates; the stored data (and its chunks) is their concatenation.
    """

    path: str
    type: EntryType
    mode: int  # permission bits incl. setuid/setgid/sticky, without file-type bits
    uid: int
    gid: int
    size: int  # logical size (for sparse files, the full size)
    mtime_ns: int
    linkname: str = ""  # symlink target (data, never followed) or hard-link target path
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data_offset: int = 0
    first_chunk: int = 0
    chunk_count: int = 0
    sparse: tuple[tuple[int, int], ...] | None = None


@dataclass(slots=True, frozen=True)
class Chunk:
    """A piece of one regular file's stored data, addressed by its SHA-256.

    Chunks are file-aligned: chunk k of a file covers stored bytes
    [k * chunk_size, min((k + 1) * chunk_size, stored_size)).
    """

    uncompressed_offset: int  # offset in the tar stream
    length: int
    digest: bytes  # 32-byte SHA-256 of the chunk's bytes


#: A Chunk packed as the C core reads and writes it (native/lz.h LZ_CHUNK_RECORD): u64 LE
#: offset in the tar stream, u64 LE length, SHA-256. snapshotter.native checks the sizes agree.
CHUNK_RECORD = struct.Struct("<QQ32s")
#: The index file's records (format.py), built in C too (native/indexbuild.h, checked at
#: import by snapshotter.native): an entry (parent record, name offset and length in its
#: block's strings, type, flags, mode, uid, gid, size, mtime_ns, data offset, a, b, extras
#: offset), a chunk (offset, length, SHA-256), and the records per compressed entry block.
ENTRY_RECORD = struct.Struct("<IIHBBHIIQqQIII")
ENTRY_FIELDS = ("parent", "name_off", "name_len", "type", "flags", "mode", "uid", "gid", "size", "mtime_ns",
                "data_offset", "a", "b", "extra")  # ENTRY_RECORD's, in order (native/indexrecord.h)
INDEX_CHUNK_RECORD = struct.Struct("<QI32s")
ENTRY_BLOCK_RECORDS = 256


@dataclass(slots=True, frozen=True)
class EntrySections:
    """The index sections its entries and chunks make, as format.py serializes a LayerIndex
    and as the C core builds them straight from a scan (``native.ScanResult.index``):
    compressed entry blocks, their offsets (u64 each, plus the end), the deduplicated
    extras, the chunk records, and the counts the header holds."""

    blocks: bytes
    blockidx: bytes
    extras: bytes
    chunks: bytes
    entry_count: int
    reg_count: int
    chunk_count: int


#: One end mark as the scanner returns it: every uncompressed byte before ``uoff`` is
#: produced by decoding compressed bytes before ``coff`` (from the preceding checkpoint).
MARK_RECORD = struct.Struct("<QQ")


WINDOW_SIZE = 32 << 10  # deflate's history: the most a DEFLATE checkpoint's window holds

# Sizes taken from a layer or an index that no Linux applier could use are refused when an
# index is built and when one is read, so a hostile entry costs little to hold.
#: data segments of one sparse file (native/lz.h LZ_MAX_SPARSE_SEGMENTS, checked at import)
MAX_SPARSE_SEGMENTS = 65536
MAX_XATTR_NAME = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX
MAX_XATTR_BYTES = 1 << 20  # names and values of one entry: the tar reader's PAX header limit


class CheckpointKind(enum.IntEnum):
    STREAM_START = 0  # offset 0 of the blob; nothing to prime
    DEFLATE = 1  # inside a deflate stream at a block boundary: prime bits + window
    GZIP_MEMBER = 2  # start of a gzip member header (multi-member gzip)
    ZSTD_FRAME = 3  # start of a zstd frame


@dataclass(slots=True, frozen=True)
class Checkpoint:
    """A place where decompression can start in the middle of the compressed blob.

    For DEFLATE, decoding starts at bit ``bits`` (0-7, counted from the least significant
    bit) of the byte at ``compressed_offset``, with ``window`` (up to 32 KiB of the
    uncompressed bytes before ``uncompressed_offset``) as the dictionary.
    """

    kind: CheckpointKind
    compressed_offset: int
    uncompressed_offset: int
    bits: int = 0
    window: bytes = b""


@dataclass(slots=True, frozen=True)
class LayerInfo:
    format: LayerFormat
    compressed_size: int
    uncompressed_size: int
    blob_digest: str  # "sha256:<hex>" of the compressed blob (what the manifest pins)
    diff_id: str | None  # "sha256:<hex>" of the uncompressed tar, when computed
    chunk_size: int
    span_size: int
    sequential_only: bool  # e.g. single-frame zstd: no random access
