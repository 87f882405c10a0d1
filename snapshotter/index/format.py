"""On-disk layer index: versioned, checksummed, compact, opened lazily with mmap.

Layout (all integers little-endian)::

    header   magic "LZSNAPIX", version, xxh3-64 of the whole file (but itself), file size, LayerInfo,
             counts, and (offset, length) of the six sections below
    entries  fixed 58-byte records, one per path, in *directory order*: the root is
             record 0; the children of a directory are contiguous, sorted by name bytes,
             and directories' child blocks follow each other in breadth-first order.
             Stored in blocks of 256 records, each block followed by its own string
             area (names, symlink targets) and zstd-compressed on its own
    blockidx u64 offsets of the compressed blocks inside ``entries``
    extras   per-entry xattrs and sparse maps (deduplicated), referenced by offset
    chunks   fixed 44-byte records: uncompressed offset, length, SHA-256
    checkpoints  fixed 32-byte records; windows zlib-compressed in the next section
    windows  a gzip checkpoint's 32 KiB window with the bytes nothing after it copies from
             zeroed (the scanner's sparse windows, native/window_refs.h): ~10 % of a window
             is used in layer data, so a packed window is ~2 KB instead of ~13 KB
    marks    16-byte end marks (uncompressed offset, compressed offset), ascending: a read
             that ends before a mark's uncompressed offset needs no compressed byte past
             its compressed offset, so it fetches less than a whole span

Windows apart (version 4, header flag 1; what ``lazysnap index --push --windows-apart``
publishes): the zlib-compressed windows go to a blob of their own and the ``windows`` section holds the
SHA-256 of that blob followed by one SHA-256 per checkpoint (zeros where a checkpoint has
no window); checkpoint records then give offsets into the windows blob. A node fetches the
index once and a window only when a read first decodes from its checkpoint, by range,
checked against the digest here (:meth:`IndexFile.attach_windows`). Why: apart, a
checkpoint costs 64 bytes up front instead of its packed window (~2 KB sparse, ~13 KB
whole), for one more range request per decoded span; with sparse windows inline indexes
at 256 KiB spacing are small enough that this rarely pays (bench/RESULTS.md).

Why this shape: opening costs one checksum pass (xxh3 runs at ~10 GB/s) and no parsing,
so a 500k-entry index opens in milliseconds; ``lookup`` walks path components with one
binary search per directory (O(depth · log fanout)), decompressing only the few record
blocks it touches (LRU-cached, ~20 µs each); ``child_range`` gives FUSE readdir a
contiguous run of records. Block compression cuts the entry table ~5×, which keeps a
file-dense layer's index near 1.2 % of the blob; chunk digests (32 random bytes each)
and checkpoint windows (zlib of sparse windows, ≈ 2 KB per span) make up most of the
rest. The record number is a stable inode for FUSE (``inode(rec)``): hard links share
their target's.

Public API (used by fs/ and fetch/; keep stable): :func:`write_index`,
:func:`serialize_index`, :class:`IndexFile` (``open``, ``from_bytes``, ``info``,
``lookup``, ``find``, ``lookup_child``, ``child_range``, ``children``, ``entry_at``,
``inode``, ``path_of``, ``entries``, ``entry_blocks``, ``extras_section``,
``entry_count``, ``chunk``, ``chunk_count``, ``chunks_of``, ``chunk_range``,
``chunk_digests``, ``chunk_extents``, ``checkpoint``, ``checkpoints``,
``checkpoint_count``, ``mark_offsets``, ``index_bytes``, ``close``; windows apart:
:func:`serialize_split`, ``windows_apart``, ``windows_digest``, ``window_extent``,
``windows_size``, ``attach_windows``, ``window_local``).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import xxhash
import zstandard

from snapshotter.fsutil import write_atomic
from snapshotter.index.errors import IndexBuildError, IndexFormatError, WindowMissingError
from snapshotter.index.layerindex import LayerIndex
from snapshotter.index.model import (
    Checkpoint,
    CheckpointKind,
    Chunk,
    ENTRY_BLOCK_RECORDS,
    ENTRY_RECORD,
    Entry,
    EntrySections,
    EntryType,
    INDEX_CHUNK_RECORD,
    WINDOW_SIZE,
    LayerFormat,
    LayerInfo,
    MAX_SPARSE_SEGMENTS,
    MAX_XATTR_BYTES,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
)

MAGIC = b"LZSNAPIX"
VERSION = 4
_READABLE = (3, 4)  # version 3 is version 4 without the windows-apart flag
_FLAG_WINDOWS_APART = 1
_NO_WINDOW = bytes(32)
MAX_PACKED_WINDOW = 64 << 10  # zlib of a 32 KiB window never comes near this
BLOCK_RECORDS = ENTRY_BLOCK_RECORDS
_BLOCK_CACHE = 512  # decompressed entry blocks kept per open index (≈ 8 MB max)
_BULK_BLOCKS = 64  # entry blocks decompressed per call when walking all entries (~1 MB)
_CHECKSUM_AT = 16  # the u64 checksum covers every byte of the file except itself


def _checksum(buf: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64()
    mv = memoryview(buf)
    h.update(mv[:_CHECKSUM_AT])
    h.update(mv[_CHECKSUM_AT + 8:])
    return h.intdigest()
HEADER = struct.Struct("<8sHHIQQBBBBIQQQ32s32sIIII14Q")
ENTRY = ENTRY_RECORD
# Names and link targets longer than Linux's PATH_MAX cannot be created by any applier, so
# no index holds one (serialize refuses them); that bounds an entry block to ~2 MiB, what a
# hostile frame header may make a reader allocate before the block is refused.
MAX_NAME_BYTES = 4096
MAX_LINK_BYTES = 4096
MAX_ENTRY_BLOCK = BLOCK_RECORDS * (ENTRY.size + MAX_NAME_BYTES + MAX_LINK_BYTES)
CHUNK = INDEX_CHUNK_RECORD
CHECKPOINT = struct.Struct("<BBHIQQQ")
MARK = struct.Struct("<QQ")
_NONE = 0xFFFFFFFF
_FLAG_EXTRA = 1
_FORMATS = [LayerFormat.TAR, LayerFormat.GZIP, LayerFormat.ZSTD]
_ENTRY_TYPES = tuple(EntryType)  # by value: 0..6, looked up per entry without the enum call
assert all(t.value == i for i, t in enumerate(_ENTRY_TYPES))
_REG, _DIR, _SYMLINK = EntryType.REG, EntryType.DIR, EntryType.SYMLINK
_REG_CODE, _DIR_CODE, _SYMLINK_CODE = int(_REG), int(_DIR), int(_SYMLINK)
_FAST_CODES = frozenset((_REG_CODE, _DIR_CODE, _SYMLINK_CODE))  # decoded inline by ``entries``
_SECTIONS = ("entries", "blockidx", "extras", "chunks", "checkpoints", "windows", "marks")


def _name_key(path: str) -> bytes:
    return path.rpartition("/")[2].encode("utf-8", "surrogateescape")


def _encode_extra(entry: Entry) -> bytes:
    xattrs = sorted(entry.xattrs.items())
    sparse = entry.sparse or ()
    if len(sparse) > MAX_SPARSE_SEGMENTS:
        raise IndexBuildError(f"{entry.path[:200]!r} has {len(sparse)} sparse segments, more than "
                              f"{MAX_SPARSE_SEGMENTS}")
    total = 0
    for key, value in xattrs:
        kl = len(key.encode("utf-8", "surrogateescape"))
        total += kl + len(value)
        if kl > MAX_XATTR_NAME or len(value) > MAX_XATTR_VALUE or total > MAX_XATTR_BYTES:
            raise IndexBuildError(f"{entry.path[:200]!r} has an extended attribute larger than Linux "
                                  f"allows ({key[:80]!r}: {len(value)} bytes)")
    out = [struct.pack("<HII", len(xattrs), len(sparse), 1 if entry.sparse is not None else 0)]
    for key, value in xattrs:
        kb = key.encode("utf-8", "surrogateescape")
        out.append(struct.pack("<HI", len(kb), len(value)))
        out += [kb, value]
    out += [struct.pack("<QQ", o, n) for o, n in sparse]
    return b"".join(out)


def serialize_index(index: LayerIndex) -> bytes:
    """The index file's bytes, windows included (what :func:`write_index` writes)."""
    return _serialize(index, apart=False)[0]


def serialize_split(index: LayerIndex) -> tuple[bytes, bytes]:
    """(index bytes, windows blob): the index with its windows apart (what ``--push`` publishes)."""
    return _serialize(index, apart=True)


def _serialize(index: LayerIndex, *, apart: bool) -> tuple[bytes, bytes]:
    return assemble(index.info, _entry_sections(index), index.checkpoints, index.marks, apart=apart)


def _entry_sections(index: LayerIndex) -> EntrySections:
    by_path = {e.path: e for e in index.entries}
    if "" not in by_path or by_path[""].type != EntryType.DIR:
        raise ValueError("index has no root directory entry")
    kids: dict[str, list[str]] = {}
    for path in by_path:
        if path:
            parent = path.rpartition("/")[0]
            if parent not in by_path or by_path[parent].type != EntryType.DIR:
                raise ValueError(f"entry {path!r} has no parent directory entry")
            kids.setdefault(parent, []).append(path)
    order = [""]
    parent_of = [0]
    child_block: dict[int, tuple[int, int]] = {}
    i = 0
    while i < len(order):
        path = order[i]
        if by_path[path].type == EntryType.DIR:
            names = sorted(kids.get(path, ()), key=_name_key)
            child_block[i] = (len(order), len(names))
            order += names
            parent_of += [i] * len(names)
        i += 1
    rec_of = {p: n for n, p in enumerate(order)}

    strings = bytearray()
    string_at: dict[bytes, int] = {}

    def intern(b: bytes) -> int:  # block-local string area
        off = string_at.get(b)
        if off is None:
            off = string_at[b] = len(strings)
            strings.extend(b)
        return off

    extras = bytearray()
    extra_at: dict[bytes, int] = {}
    entry_recs = bytearray()
    blocks = bytearray()
    block_offsets = [0]
    cctx = zstandard.ZstdCompressor(level=6)
    reg_count = 0
    for n, path in enumerate(order):
        e = by_path[path]
        name = _name_key(path)
        if len(name) > MAX_NAME_BYTES:
            raise IndexBuildError(f"name of {path[:200]!r} is {len(name)} bytes: longer than any Linux "
                                  f"filesystem holds ({MAX_NAME_BYTES})")
        a = b = 0
        if e.type == EntryType.REG:
            reg_count += 1
            a, b = e.first_chunk, e.chunk_count
        elif e.type == EntryType.DIR:
            a, b = child_block[n]
        elif e.type in (EntryType.CHAR, EntryType.BLOCK):
            a, b = e.devmajor, e.devminor
        elif e.type == EntryType.SYMLINK:
            link = e.linkname.encode("utf-8", "surrogateescape")
            if len(link) > MAX_LINK_BYTES:
                raise IndexBuildError(f"symlink {path[:200]!r} has a {len(link)}-byte target: longer than "
                                      f"Linux allows ({MAX_LINK_BYTES})")
            a, b = intern(link), len(link)
        elif e.type == EntryType.HARDLINK:
            if e.linkname not in rec_of or by_path[e.linkname].type in (EntryType.DIR, EntryType.HARDLINK):
                raise ValueError(f"hard link {path!r} target {e.linkname!r} is not a data entry")
            a = rec_of[e.linkname]
        extra_off = _NONE
        flags = 0
        if e.xattrs or e.sparse is not None:
            blob = _encode_extra(e)
            extra_off = extra_at.get(blob, -1)
            if extra_off < 0:
                extra_off = extra_at[blob] = len(extras)
                extras.extend(blob)
            flags |= _FLAG_EXTRA
        entry_recs += ENTRY.pack(parent_of[n], intern(name), len(name), int(e.type), flags, e.mode & 0o7777,
                                 e.uid, e.gid, e.size, e.mtime_ns, e.data_offset, a, b, extra_off)
        if (n + 1) % BLOCK_RECORDS == 0 or n + 1 == len(order):
            blocks += cctx.compress(bytes(entry_recs + strings))
            block_offsets.append(len(blocks))
            entry_recs.clear()
            strings.clear()
            string_at.clear()

    chunk_recs = b"".join(CHUNK.pack(c.uncompressed_offset, c.length, c.digest) for c in index.chunks)
    blockidx = struct.pack(f"<{len(block_offsets)}Q", *block_offsets)
    return EntrySections(bytes(blocks), blockidx, bytes(extras), chunk_recs, len(order), reg_count,
                         len(index.chunks))


def assemble(info: LayerInfo, entries: EntrySections, checkpoints: Sequence[Checkpoint],
             marks: Sequence[tuple[int, int]], *, apart: bool = False) -> tuple[bytes, bytes]:
    """(index bytes, windows blob if ``apart``): the header, the entry sections, the
    checkpoints with their windows and the marks, checksummed."""
    windows = bytearray()
    ck_recs = bytearray()
    for c in checkpoints:
        packed = zlib.compress(c.window, 6) if c.window else b""  # 9: 6x the time for 2 % less
        ck_recs += CHECKPOINT.pack(int(c.kind), c.bits, 0, len(packed), c.compressed_offset,
                                   c.uncompressed_offset, len(windows))
        windows += packed

    mark_recs = b"".join(MARK.pack(u, c) for u, c in marks)
    apart_blob = b""
    win_section = bytes(windows)
    if apart:
        apart_blob = win_section
        digests = [hashlib.sha256(apart_blob).digest()]
        for rec in CHECKPOINT.iter_unpack(ck_recs):
            clen, woff = rec[3], rec[6]
            digests.append(hashlib.sha256(apart_blob[woff:woff + clen]).digest() if clen else _NO_WINDOW)
        win_section = b"".join(digests)
    sections = [entries.blocks, entries.blockidx, entries.extras, entries.chunks, bytes(ck_recs), win_section,
                mark_recs]
    offsets: list[int] = []
    pos = HEADER.size
    for s in sections:
        offsets += [pos, len(s)]
        pos += len(s)
    diff = bytes.fromhex(info.diff_id.split(":", 1)[1]) if info.diff_id else bytes(32)
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, _FLAG_WINDOWS_APART if apart else 0, 0, pos,
                         _FORMATS.index(info.format),
                         int(info.sequential_only), int(info.diff_id is not None), 0, info.chunk_size,
                         info.span_size, info.compressed_size, info.uncompressed_size,
                         bytes.fromhex(info.blob_digest.split(":", 1)[1]), diff, entries.entry_count,
                         entries.chunk_count, len(checkpoints), entries.reg_count, *offsets)
    body = bytearray(header)
    for s in sections:
        body += s
    struct.pack_into("<Q", body, _CHECKSUM_AT, _checksum(body))
    return bytes(body), apart_blob


def write_index(dest: str | os.PathLike[str] | BinaryIO, index: LayerIndex) -> int:
    """Write the index; a path is written atomically (temp file + rename). Returns bytes."""
    data = serialize_index(index)
    if hasattr(dest, "write"):
        dest.write(data)  # type: ignore[union-attr]
        return len(data)
    write_atomic(dest, data)  # type: ignore[arg-type]
    return len(data)


class IndexFile:
    """A read-only view of one index file; entries are decoded only when asked for."""

    def __init__(self, buf: bytes | mmap.mmap, *, source: str = "<bytes>", _file: BinaryIO | None = None) -> None:
        self._buf = buf
        self._mv = memoryview(buf)
        self._file = _file
        self.source = source
        self._dir_paths: dict[int, str] = {0: ""}
        self._lock = threading.Lock()
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> IndexFile:
        name = os.fspath(path)
        f = open(name, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER.size:
                raise IndexFormatError(f"index {name} is truncated ({size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        return cls(mm, source=name, _file=f)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> IndexFile:
        return cls(bytes(buf))

    def _bad(self, what: str) -> IndexFormatError:
        return IndexFormatError(f"index {self.source} is corrupt: {what}")

    def _parse_header(self) -> None:
        size = len(self._mv)
        if size < HEADER.size:
            if bytes(self._mv[:8]) != MAGIC[:min(8, size)]:
                raise IndexFormatError(f"{self.source} is not a lazysnap index (bad magic)")
            raise IndexFormatError(f"index {self.source} is truncated ({size} bytes)")
        h = HEADER.unpack_from(self._mv, 0)
        (magic, version, hsize, flags, checksum, file_size, fmt, seq, has_diff, _pad, chunk_size, span,
         csize, usize, blob, diff, n_ent, n_chunk, n_ck, n_reg, *offs) = h
        if magic != MAGIC:
            raise IndexFormatError(f"{self.source} is not a lazysnap index (bad magic)")
        if version not in _READABLE or hsize != HEADER.size:
            raise IndexFormatError(f"index {self.source} has unsupported version {version}")
        if file_size > size:
            raise IndexFormatError(f"index {self.source} is truncated ({size} of {file_size} bytes)")
        if file_size < size:
            raise self._bad(f"{size - file_size} unexpected trailing bytes")
        if _checksum(self._mv) != checksum:
            raise self._bad("checksum mismatch")
        if fmt >= len(_FORMATS):
            raise self._bad(f"unknown layer format code {fmt}")
        if chunk_size < 1:
            raise self._bad(f"chunk size {chunk_size} must be positive")
        self.info = LayerInfo(
            format=_FORMATS[fmt], compressed_size=csize, uncompressed_size=usize,
            blob_digest="sha256:" + blob.hex(), diff_id=("sha256:" + diff.hex()) if has_diff else None,
            chunk_size=chunk_size, span_size=span, sequential_only=bool(seq))
        self.entry_count, self.chunk_count, self.checkpoint_count, self.file_count = n_ent, n_chunk, n_ck, n_reg
        self.index_bytes = file_size
        sec = {name: (offs[2 * i], offs[2 * i + 1]) for i, name in enumerate(_SECTIONS)}
        for name, (off, length) in sec.items():
            if off < HEADER.size or off + length > file_size:
                raise self._bad(f"section {name} out of bounds")
        n_blocks = -(-n_ent // BLOCK_RECORDS)
        if sec["blockidx"][1] != 8 * (n_blocks + 1):
            raise self._bad("section blockidx has the wrong size")
        for name, rec, count in (("chunks", CHUNK, n_chunk), ("checkpoints", CHECKPOINT, n_ck)):
            if sec[name][1] != rec.size * count:
                raise self._bad(f"section {name} has the wrong size")
        if flags & ~_FLAG_WINDOWS_APART or (flags and version < 4):
            raise self._bad(f"unknown header flags {flags:#x}")
        self.windows_apart = bool(flags & _FLAG_WINDOWS_APART)
        if self.windows_apart and sec["windows"][1] != 32 * (n_ck + 1):
            raise self._bad("section windows has the wrong size")
        if sec["marks"][1] % MARK.size:
            raise self._bad("section marks has the wrong size")
        if n_ent < 1:
            raise self._bad("no root entry")
        self._ent = self._mv[sec["entries"][0]:sum(sec["entries"])]
        self._block_offsets = struct.unpack_from(f"<{n_blocks + 1}Q", self._mv, sec["blockidx"][0])
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._ext = self._mv[sec["extras"][0]:sum(sec["extras"])]
        self._chk_off = sec["chunks"][0]
        self._ck_off = sec["checkpoints"][0]
        self._win = self._mv[sec["windows"][0]:sum(sec["windows"])]
        self._win_fd = -1  # the local copy of an apart windows blob (attach_windows)
        self._ck_u: list[int] | None = None
        self._ck_c: list[int] | None = None
        self._marks_at, self.mark_count = sec["marks"][0], sec["marks"][1] // MARK.size
        self._mark_u: list[int] | None = None
        self._mark_c: list[int] | None = None

    def close(self) -> None:
        self._ent = self._ext = self._win = memoryview(b"")
        if getattr(self, "_win_fd", -1) >= 0:
            os.close(self._win_fd)
            self._win_fd = -1
        self._blocks = OrderedDict()
        self._mv.release()
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> IndexFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- records ---------------------------------------------------------------------
    def _block(self, b: int) -> bytes:
        """Decompressed entry block ``b`` (records, then the block's string area)."""
        with self._lock:  # the cache may be shared by FUSE and fetcher threads
            blk = self._blocks.get(b)
            if blk is not None:
                self._blocks.move_to_end(b)
                return blk
        lo, hi = self._block_offsets[b], self._block_offsets[b + 1]
        nrec = min(BLOCK_RECORDS, self.entry_count - b * BLOCK_RECORDS)
        if not lo <= hi <= len(self._ent):
            raise self._bad(f"entry block {b} out of range")
        self._frame_fits(b, self._ent[lo:hi])
        try:
            blk = zstandard.ZstdDecompressor().decompress(self._ent[lo:hi])
        except zstandard.ZstdError:
            raise self._bad(f"entry block {b} does not decompress") from None
        if len(blk) < nrec * ENTRY.size:
            raise self._bad(f"entry block {b} is short")
        with self._lock:
            self._blocks[b] = blk
            if len(self._blocks) > _BLOCK_CACHE:
                self._blocks.popitem(last=False)
        return blk

    def _frame_fits(self, b: int, frame: bytes | memoryview) -> None:
        """A hostile frame header can claim petabytes, and zstd allocates what the header
        says before it decodes anything: refuse a block larger than any the builder writes."""
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError:
            raise self._bad(f"entry block {b} does not decompress") from None
        if size > MAX_ENTRY_BLOCK:
            raise self._bad(f"entry block {b} claims {size} bytes")

    def _blocks_from(self, first: int, count: int) -> list[bytes]:
        """Decompressed entry blocks ``first``.. (up to ``count``) in one zstd call.

        Why: each decompression releases the GIL, and in the daemon, where layer trees
        are built in several threads at once, taking it back costs up to a switch
        interval (5 ms) per block. ``entries`` walks every block once per layer build.
        Any problem falls back to ``_block``, block by block, for its exact error.
        """
        last = min(len(self._block_offsets) - 1, first + count)
        offs = self._block_offsets
        try:
            if not all(offs[b] <= offs[b + 1] <= len(self._ent) for b in range(first, last)):
                raise ValueError("block out of range")
            frames = [self._ent[offs[b]:offs[b + 1]] for b in range(first, last)]
            for b, frame in zip(range(first, last), frames):
                self._frame_fits(b, frame)
            dctx = zstandard.ZstdDecompressor()  # one per call: a context is not thread-safe
            out = [seg.tobytes() for seg in dctx.multi_decompress_to_buffer(frames)]
        except (ValueError, zstandard.ZstdError):
            return [self._block(b) for b in range(first, last)]
        for b, blk in zip(range(first, last), out):
            if len(blk) < self._records_in(b) * ENTRY.size:
                raise self._bad(f"entry block {b} is short")
        return out

    def _rec(self, n: int) -> tuple[int, ...]:
        if not 0 <= n < self.entry_count:
            raise self._bad(f"entry record {n} out of range")
        b, i = divmod(n, BLOCK_RECORDS)
        return ENTRY.unpack_from(self._block(b), i * ENTRY.size)

    def _string(self, n: int, off: int, length: int) -> bytes:
        """A string from the block-local string area of record ``n``'s block."""
        b = n // BLOCK_RECORDS
        blk = self._block(b)
        base = min(BLOCK_RECORDS, self.entry_count - b * BLOCK_RECORDS) * ENTRY.size
        if base + off + length > len(blk):
            raise self._bad("string reference out of range")
        return blk[base + off:base + off + length]

    def _name(self, n: int) -> bytes:
        r = self._rec(n)
        return self._string(n, r[1], r[2])

    def path_of(self, n: int) -> str:
        """Full path of record ``n`` (walks parents; directory paths are cached)."""
        cached = self._dir_paths.get(n)
        if cached is not None:
            return cached
        r = self._rec(n)
        name = self._string(n, r[1], r[2]).decode("utf-8", "surrogateescape")
        parent = r[0]
        if parent >= n:
            raise self._bad(f"entry {n} has parent {parent} after it")
        ppath = self.path_of(parent)
        path = f"{ppath}/{name}" if ppath else name
        if r[3] == EntryType.DIR:
            self._dir_paths[n] = path
        return path

    def entry_at(self, n: int) -> Entry:
        """The entry stored in record ``n`` (0 is the root)."""
        if not 0 <= n < self.entry_count:
            raise self._bad(f"entry record {n} out of range")
        b, i = divmod(n, BLOCK_RECORDS)
        blk = self._block(b)
        return self._entry(n, ENTRY.unpack_from(blk, i * ENTRY.size), blk, self._records_in(b) * ENTRY.size)

    def _records_in(self, b: int) -> int:
        return min(BLOCK_RECORDS, self.entry_count - b * BLOCK_RECORDS)

    def _entry(self, n: int, rec: tuple[int, ...], blk: bytes, base: int) -> Entry:
        """Record ``n`` (``rec``, unpacked from block ``blk`` whose strings start at ``base``)."""
        (parent, noff, nlen, etype, flags, mode, uid, gid, size, mtime, doff, a, b, extra_off) = rec
        if etype >= len(_ENTRY_TYPES):
            raise self._bad(f"entry {n} has unknown type {etype}")
        t = _ENTRY_TYPES[etype]

        def string(off: int, length: int) -> str:
            if base + off + length > len(blk):
                raise self._bad("string reference out of range")
            return blk[base + off:base + off + length].decode("utf-8", "surrogateescape")

        if n == 0:
            path = ""
        else:
            if parent >= n:
                raise self._bad(f"entry {n} has parent {parent} after it")
            ppath = self.path_of(parent)
            name = string(noff, nlen)
            path = f"{ppath}/{name}" if ppath else name
            if t == EntryType.DIR:
                self._dir_paths[n] = path
        linkname = ""
        devmajor = devminor = first_chunk = chunk_count = 0
        if t == EntryType.REG:
            first_chunk, chunk_count = a, b
            if a + b > self.chunk_count:
                raise self._bad(f"entry {n} chunk range out of bounds")
        elif t in (EntryType.CHAR, EntryType.BLOCK):
            devmajor, devminor = a, b
        elif t == EntryType.SYMLINK:
            linkname = string(a, b)
        elif t == EntryType.HARDLINK:
            linkname = self.path_of(a)
        xattrs: dict[str, bytes] = {}
        sparse = None
        if flags & _FLAG_EXTRA:
            xattrs, sparse = self._extra(extra_off)
        return Entry(path=path, type=t, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime,
                     linkname=linkname, devmajor=devmajor, devminor=devminor, xattrs=xattrs,
                     data_offset=doff, first_chunk=first_chunk, chunk_count=chunk_count, sparse=sparse)

    def _extra(self, off: int) -> tuple[dict[str, bytes], tuple[tuple[int, int], ...] | None]:
        ext = self._ext
        try:
            nx, ns, has_sparse = struct.unpack_from("<HII", ext, off)
            if ns > MAX_SPARSE_SEGMENTS:
                raise self._bad(f"extras record at {off} lists {ns} sparse segments (at most {MAX_SPARSE_SEGMENTS})")
            pos = off + 10
            total = 0
            xattrs: dict[str, bytes] = {}
            for _ in range(nx):
                kl, vl = struct.unpack_from("<HI", ext, pos)
                pos += 6
                total += kl + vl
                if kl > MAX_XATTR_NAME or vl > MAX_XATTR_VALUE or total > MAX_XATTR_BYTES:
                    raise self._bad(f"extras record at {off} holds an extended attribute larger than Linux allows")
                if pos + kl + vl > len(ext):
                    raise struct.error("xattr beyond section")
                xattrs[bytes(ext[pos:pos + kl]).decode("utf-8", "surrogateescape")] = bytes(ext[pos + kl:pos + kl + vl])
                pos += kl + vl
            if pos + 16 * ns > len(ext):
                raise struct.error("sparse map beyond section")
            pairs = tuple(struct.unpack_from("<QQ", ext, pos + 16 * i) for i in range(ns))
        except struct.error:
            raise self._bad(f"extras record at {off} out of range") from None
        return xattrs, (pairs if has_sparse else None)

    def inode(self, n: int) -> int:
        """Stable inode number of record ``n``: the record itself, or a hard link's target."""
        r = self._rec(n)
        if r[3] != EntryType.HARDLINK:
            return n
        if r[11] >= self.entry_count or self._rec(r[11])[3] in (EntryType.DIR, EntryType.HARDLINK):
            raise self._bad(f"hard link {n} has an invalid target {r[11]}")
        return r[11]

    # -- tree navigation -------------------------------------------------------------
    def child_range(self, n: int) -> range:
        """Record numbers of directory ``n``'s children (empty for non-directories)."""
        r = self._rec(n)
        if r[3] != EntryType.DIR:
            return range(0)
        first, count = r[11], r[12]
        if first + count > self.entry_count or (count and first <= n):
            raise self._bad(f"directory {n} child range out of bounds")
        return range(first, first + count)

    def lookup_child(self, n: int, name: str | bytes) -> int | None:
        """Record number of ``name`` inside directory record ``n`` (binary search)."""
        key = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        kids = self.child_range(n)
        lo, hi = kids.start, kids.stop
        while lo < hi:
            mid = (lo + hi) // 2
            cur = self._name(mid)
            if cur < key:
                lo = mid + 1
            elif cur > key:
                hi = mid
            else:
                return mid
        return None

    def find(self, path: str) -> int | None:
        """Record number of a normalised path ("" is the root), or None."""
        n = 0
        for part in path.split("/"):
            if part in ("", "."):
                continue
            found = self.lookup_child(n, part)
            if found is None:
                return None
            n = found
        return n

    def lookup(self, path: str) -> Entry | None:
        n = self.find(path)
        return None if n is None else self.entry_at(n)

    def children(self, path: str) -> list[Entry]:
        """Entries directly inside directory ``path``, sorted by name (FUSE readdir)."""
        n = self.find(path)
        if n is None:
            return []
        return [self.entry_at(c) for c in self.child_range(n)]

    def entry_blocks(self) -> list[bytes]:
        """Every decompressed entry block, in order (records, then the block's strings):
        what the C tree builder reads (``fs/compiled.py``)."""
        n_blocks = len(self._block_offsets) - 1
        out: list[bytes] = []
        while len(out) < n_blocks:
            out += self._blocks_from(len(out), _BULK_BLOCKS)
        return out

    def extras_section(self) -> memoryview:
        """The raw extras section (xattrs, sparse maps) that records point into."""
        return self._ext

    def entries(self) -> Iterator[Entry]:
        """Every entry in record order (root first, then breadth-first by directory).

        Walks block by block (one decompression, one bulk unpack each): building a
        layer's tree at its first Prepare iterates every entry of the index.
        """
        n = 0
        dir_paths = self._dir_paths
        n_chunks = self.chunk_count
        n_blocks = len(self._block_offsets) - 1
        batch: list[bytes] = []
        for blk_no in range(n_blocks):
            if not batch:
                batch = self._blocks_from(blk_no, _BULK_BLOCKS)[::-1]
            blk = batch.pop()
            base = self._records_in(blk_no) * ENTRY.size
            size_blk = len(blk)
            for rec in ENTRY.iter_unpack(memoryview(blk)[:base]):
                # the common records (files, directories, symlinks without extras) inline,
                # with the same checks as ``_entry``; everything else goes through it
                (parent, noff, nlen, etype, flags, mode, uid, gid, size, mtime, doff, a, b, _x) = rec
                ppath = dir_paths.get(parent)
                start = base + noff
                if (flags or etype not in _FAST_CODES or not 0 < n or parent >= n or ppath is None
                        or start + nlen > size_blk):
                    yield self._entry(n, rec, blk, base)
                    n += 1
                    continue
                name = blk[start:start + nlen].decode("utf-8", "surrogateescape")
                path = f"{ppath}/{name}" if ppath else name
                if etype == _REG_CODE:
                    if a + b > n_chunks:
                        raise self._bad(f"entry {n} chunk range out of bounds")
                    # positional: Entry(path, type, mode, uid, gid, size, mtime_ns, linkname,
                    # devmajor, devminor, xattrs, data_offset, first_chunk, chunk_count, sparse)
                    yield Entry(path, _REG, mode, uid, gid, size, mtime, "", 0, 0, {}, doff, a, b, None)
                elif etype == _DIR_CODE:
                    dir_paths[n] = path
                    yield Entry(path, _DIR, mode, uid, gid, size, mtime, "", 0, 0, {}, doff, 0, 0, None)
                elif etype == _SYMLINK_CODE:
                    if base + a + b > size_blk:
                        raise self._bad("string reference out of range")
                    link = blk[base + a:base + a + b].decode("utf-8", "surrogateescape")
                    yield Entry(path, _SYMLINK, mode, uid, gid, size, mtime, link, 0, 0, {}, doff, 0, 0, None)
                n += 1

    # -- chunks and checkpoints ------------------------------------------------------
    def chunk(self, i: int) -> Chunk:
        if not 0 <= i < self.chunk_count:
            raise IndexError(f"chunk {i} out of range (0..{self.chunk_count - 1})")
        off, length, digest = CHUNK.unpack_from(self._mv, self._chk_off + i * CHUNK.size)
        return Chunk(off, length, digest)

    def chunk_digests(self) -> list[bytes]:
        """Every chunk's SHA-256 in chunk order (one bulk unpack: pinning a layer's chunks)."""
        return [digest for _off, _len, digest in self._chunk_records()]

    def chunk_extents(self) -> tuple[list[int], list[int]]:
        """(uncompressed offsets, lengths) of every chunk in chunk order, in one bulk unpack:
        the fetcher lays a layer out from them at its first miss, on the filesystem's loop."""
        records = list(self._chunk_records())
        return [r[0] for r in records], [r[1] for r in records]

    def _chunk_records(self) -> Iterator[tuple[int, int, bytes]]:
        return CHUNK.iter_unpack(self._mv[self._chk_off:self._chk_off + CHUNK.size * self.chunk_count])

    def chunk_range(self, entry: Entry) -> range:
        return range(entry.first_chunk, entry.first_chunk + entry.chunk_count)

    def chunks_of(self, entry: Entry) -> list[Chunk]:
        return [self.chunk(i) for i in self.chunk_range(entry)]

    def checkpoint(self, i: int) -> Checkpoint:
        if not 0 <= i < self.checkpoint_count:
            raise IndexError(f"checkpoint {i} out of range")
        kind, bits, _pad, clen, coff, uoff, woff = CHECKPOINT.unpack_from(self._mv, self._ck_off + i * CHECKPOINT.size)
        window = b""
        if clen:
            if self.windows_apart:
                packed: bytes | memoryview = self._apart_window(i, woff, clen)
            elif woff + clen > len(self._win):
                raise self._bad(f"checkpoint {i} window out of range")
            else:
                packed = self._win[woff:woff + clen]
            try:  # at most 32 KiB out: a crafted window must not inflate into gigabytes
                d = zlib.decompressobj()
                window = d.decompress(packed, WINDOW_SIZE + 1)
            except zlib.error:
                raise self._bad(f"checkpoint {i} window does not decompress") from None
            if len(window) > WINDOW_SIZE or not d.eof:
                raise self._bad(f"checkpoint {i} window is not a whole zlib stream of at most 32 KiB")
        try:
            k = CheckpointKind(kind)
        except ValueError:
            raise self._bad(f"checkpoint {i} has unknown kind {kind}") from None
        return Checkpoint(k, coff, uoff, bits, window)

    # -- windows apart -----------------------------------------------------------------
    @property
    def windows_digest(self) -> str | None:
        """The digest of the windows blob, for an index with its windows apart."""
        return "sha256:" + bytes(self._win[:32]).hex() if self.windows_apart else None

    def window_extent(self, i: int) -> tuple[int, int, bytes]:
        """(offset, length, SHA-256) of checkpoint ``i``'s window in the windows blob; length 0
        when the checkpoint needs none (stream, member and frame starts)."""
        if not 0 <= i < self.checkpoint_count:
            raise IndexError(f"checkpoint {i} out of range")
        rec = CHECKPOINT.unpack_from(self._mv, self._ck_off + i * CHECKPOINT.size)
        off, n = rec[6], rec[3]
        if self.windows_apart and (n > MAX_PACKED_WINDOW or off > MAX_PACKED_WINDOW * self.checkpoint_count):
            # a crafted extent must not make a node create a huge sparse file or read past it
            raise self._bad(f"checkpoint {i} window extent {off}+{n} is implausible")
        digest = bytes(self._win[32 * (i + 1):32 * (i + 2)]) if self.windows_apart else b""
        return off, n, digest

    def windows_size(self) -> int:
        """Bytes of the windows blob (or section): where the last window ends."""
        size = 0
        for i in range(self.checkpoint_count):
            off, n, _ = self.window_extent(i)
            size = max(size, off + n)
        return size

    def attach_windows(self, path: str | os.PathLike[str]) -> None:
        """Read apart windows from ``path``: a local copy of the windows blob that may be
        partly filled (a sparse file); a window is used only if it matches its digest."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if self._win_fd >= 0:
            os.close(self._win_fd)
        self._win_fd = fd

    def window_local(self, i: int) -> bool:
        """True if checkpoint ``i`` needs no window or its window is local and intact."""
        off, n, digest = self.window_extent(i)
        if n == 0 or not self.windows_apart:
            return True
        return self._win_fd >= 0 and hashlib.sha256(os.pread(self._win_fd, n, off)).digest() == digest

    def _apart_window(self, i: int, off: int, n: int) -> bytes:
        if self._win_fd < 0:
            raise WindowMissingError(f"index {self.source}: checkpoint {i} window is apart and no copy is attached")
        data = os.pread(self._win_fd, n, off)
        if hashlib.sha256(data).digest() != self._win[32 * (i + 1):32 * (i + 2)]:
            raise WindowMissingError(f"index {self.source}: checkpoint {i} window is not local yet")
        return data

    def checkpoints(self) -> list[Checkpoint]:
        return [self.checkpoint(i) for i in range(self.checkpoint_count)]

    def checkpoint_offsets(self) -> tuple[list[int], list[int]]:
        """(uncompressed offsets, compressed offsets) of all checkpoints, for bisecting."""
        if self._ck_u is None or self._ck_c is None:
            us: list[int] = []
            cs: list[int] = []
            for i in range(self.checkpoint_count):
                _k, _b, _p, _l, coff, uoff, _w = CHECKPOINT.unpack_from(self._mv, self._ck_off + i * CHECKPOINT.size)
                us.append(uoff)
                cs.append(coff)
            self._ck_u, self._ck_c = us, cs
        return self._ck_u, self._ck_c

    def mark_offsets(self) -> tuple[list[int], list[int]]:
        """(uncompressed offsets, compressed offsets) of the end marks, for bisecting."""
        if self._mark_u is None or self._mark_c is None:
            flat = struct.unpack_from(f"<{2 * self.mark_count}Q", self._mv, self._marks_at)
            self._mark_u, self._mark_c = list(flat[0::2]), list(flat[1::2])
        return self._mark_u, self._mark_c

    def to_layer_index(self) -> LayerIndex:
        """Materialise everything (tests and tools; the daemon never needs this)."""
        return LayerIndex(info=self.info, entries=list(self.entries()),
                          chunks=[self.chunk(i) for i in range(self.chunk_count)],
                          checkpoints=self.checkpoints(), marks=list(zip(*self.mark_offsets())))
