"""Pure-Python layer scanner: the test oracle for the C core (production requires C).

Same interface and result shape as ``snapshotter.native.Scanner`` (``feed``/``finish``
returning a dict with ``entries`` tuples, packed ``chunks`` and ``checkpoints``), but it
records only the ``STREAM_START`` checkpoint: random access into an index built from it
decompresses from the start of the blob. It exists so that the C core can be checked
against an independent implementation.

Also :func:`decompress_range` for the checkpoint kinds that need no bit priming
(STREAM_START, GZIP_MEMBER, ZSTD_FRAME, and plain tar).
"""
from __future__ import annotations

import hashlib
import re
import zlib
from typing import Any

import zstandard

from snapshotter.index.decompress import GZIP_MAGIC, ZSTD_MAGIC, StreamDecompressor, detect_format, header_checksum_ok
from snapshotter.index.errors import CorruptLayerError, TruncatedLayerError
from snapshotter.index.model import CHUNK_RECORD, CheckpointKind, EntryType

BLOCK = 512


def _parse_number(field: bytes, what: str, offset: int) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU): big-endian two's complement
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        elif field[0] != 0x80:
            value |= (field[0] & 0x7F) << (8 * (len(field) - 1))
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptLayerError(f"invalid tar {what} field {field!r} at offset {offset}") from None


def _parse_pax(data: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """PAX records "LEN key=value\\n" in order (order matters for GNU sparse 0.0)."""
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise CorruptLayerError(f"malformed PAX record at offset {offset + pos}")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise CorruptLayerError(f"malformed PAX record length at offset {offset + pos}") from None
        rec = data[sp + 1 : pos + length]
        if length <= sp - pos or pos + length > len(data) or not rec.endswith(b"\n") or b"=" not in rec:
            raise CorruptLayerError(f"malformed PAX record at offset {offset + pos}")
        key, _, value = rec[:-1].partition(b"=")
        records.append((key, value))
        pos += length
    return records


_PAX_TIME = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")
_PAX_INT = re.compile(rb"[0-9]+")


def _pax_time_ns(value: bytes, offset: int) -> int:
    m = _PAX_TIME.fullmatch(value)
    if m is None:
        raise CorruptLayerError(f"invalid PAX mtime {value[:40]!r} before offset {offset}")
    ns = int(m[2]) * 1_000_000_000 + int(((m[3] or b"") + b"000000000")[:9])
    return -ns if m[1] else ns


def _pax_int(pax: dict[bytes, bytes], key: bytes, offset: int) -> int:
    value = pax[key]
    if _PAX_INT.fullmatch(value) is None:
        raise CorruptLayerError(f"invalid PAX {key.decode()} {value[:40]!r} before offset {offset}")
    return int(value)


_TYPES = {
    b"0": EntryType.REG, b"\0": EntryType.REG, b"7": EntryType.REG,
    b"1": EntryType.HARDLINK, b"2": EntryType.SYMLINK, b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK, b"5": EntryType.DIR, b"6": EntryType.FIFO, b"D": EntryType.DIR,
}


class _TarParser:
    """Push parser over the uncompressed tar stream; produces entry tuples and chunks."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.entries: list[tuple[Any, ...]] = []
        self.chunks = bytearray()
        self._buf = bytearray()
        self._pos = 0  # absolute uncompressed offset of _buf[0]
        self._need = BLOCK  # bytes wanted by the current state
        self._state = "header"
        self._pending: dict[str, Any] = {}  # GNU long name/link, PAX for the next header
        self._global: list[tuple[bytes, bytes]] = []
        self._ext_kind = b""
        self._data_left = 0  # stored bytes of the current file still to hash
        self._pad_left = 0
        self._chunk_hash: Any = None
        self._chunk_len = 0
        self._chunk_start = 0
        self._cur: list[Any] | None = None
        self._sparse10: dict[str, Any] | None = None
        self.ended = False

    # -- stream plumbing -------------------------------------------------------------
    def feed(self, data: bytes | memoryview) -> None:
        if self.ended:
            return
        mv = memoryview(data)
        while mv:
            if self._state == "data" and not self._buf:
                take = min(self._data_left, len(mv))
                self._hash_data(mv[:take])
                mv = mv[take:]
                if self._data_left == 0:
                    self._end_data()
                continue
            if self._state == "skip" and not self._buf:
                take = min(self._pad_left, len(mv))
                self._pos += take
                self._pad_left -= take
                mv = mv[take:]
                if self._pad_left == 0:
                    self._state = "header"
                    self._need = BLOCK
                continue
            if self._state == "end":
                return
            take = min(self._need - len(self._buf), len(mv))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) == self._need:
                block = bytes(self._buf)
                start = self._pos
                self._buf.clear()
                self._pos += len(block)
                self._on_block(block, start)

    def finish(self) -> None:
        if self.ended:
            return
        if self._state == "header" and not self._buf and not self._pending and self._cur is None:
            # a tar without the end-of-archive marker: accepted, like GNU tar and Go's reader
            self.ended = True
            return
        raise TruncatedLayerError(f"tar stream ends inside an entry at offset {self._pos + len(self._buf)}")

    # -- states ---------------------------------------------------------------------
    def _on_block(self, block: bytes, start: int) -> None:
        if self._state == "header":
            self._on_header(block, start)
        elif self._state == "ext":
            self._on_ext(block, start)
        elif self._state == "sparsemap":
            self._on_sparse_map(block, start)
        elif self._state == "gnusparse":
            self._on_gnu_sparse_ext(block, start)

    def _skip(self, n: int) -> None:
        if n:
            self._state, self._pad_left = "skip", n
        else:
            self._state, self._need = "header", BLOCK

    def _on_header(self, hdr: bytes, start: int) -> None:
        if hdr == bytes(BLOCK):
            if self._pending:
                raise CorruptLayerError(f"extension header without entry before offset {start}")
            self._state = "end"
            self.ended = True
            return
        if not header_checksum_ok(hdr):
            raise CorruptLayerError(f"invalid tar header checksum at offset {start}")
        flag = hdr[156:157]
        size = _parse_number(hdr[124:136], "size", start)
        if size < 0:
            raise CorruptLayerError(f"negative tar size at offset {start}")
        padded = -(-size // BLOCK) * BLOCK
        if flag in (b"L", b"K", b"x", b"g"):
            if size > 64 << 20:
                raise CorruptLayerError(f"tar extension header too large at offset {start}")
            self._ext_kind, self._ext_size = flag, size
            if padded:
                self._state, self._need = "ext", padded
            else:
                self._on_ext(b"", start)
            return
        if flag in (b"V", b"N"):  # volume label / old GNU names: no file to present
            self._skip(padded)
            return
        etype = _TYPES.get(flag)
        if flag == b"S":
            etype = EntryType.REG
        if etype is None:
            raise CorruptLayerError(f"unsupported tar entry type {flag!r} at offset {start}")
        pend, self._pending = self._pending, {}
        pax: dict[bytes, bytes] = {}
        sparse_records: list[tuple[bytes, bytes]] = []
        for key, value in [*self._global, *pend.get("pax", [])]:
            if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
                sparse_records.append((key, value))
            else:
                pax[key] = value
        magic = hdr[257:263]
        name = hdr[0:100].split(b"\0", 1)[0]
        if magic == b"ustar\x00" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pend.get("L", name)
        name = pax.get(b"path", name)
        link = pend.get("K", hdr[157:257].split(b"\0", 1)[0])
        link = pax.get(b"linkpath", link)
        if flag == b"\0" and name.endswith(b"/"):
            etype = EntryType.DIR
        mode = _parse_number(hdr[100:108], "mode", start) & 0o7777
        uid = _pax_int(pax, b"uid", start) if b"uid" in pax else _parse_number(hdr[108:116], "uid", start)
        gid = _pax_int(pax, b"gid", start) if b"gid" in pax else _parse_number(hdr[116:124], "gid", start)
        if b"size" in pax:
            size = _pax_int(pax, b"size", start)
            padded = -(-size // BLOCK) * BLOCK
        if b"mtime" in pax:
            mtime_ns = _pax_time_ns(pax[b"mtime"], start)
        else:
            mtime_ns = _parse_number(hdr[136:148], "mtime", start) * 1_000_000_000
        devmajor = devminor = 0
        if etype in (EntryType.CHAR, EntryType.BLOCK):
            devmajor = _parse_number(hdr[329:337], "devmajor", start)
            devminor = _parse_number(hdr[337:345], "devminor", start)
        xattrs: dict[str, bytes] | None = None
        for key, value in pax.items():
            if key.startswith(b"SCHILY.xattr."):
                if xattrs is None:
                    xattrs = {}
                xattrs[key[len(b"SCHILY.xattr."):].decode("utf-8", "surrogateescape")] = value
        data_offset = start + BLOCK
        logical = size
        sparse: list[tuple[int, int]] | None = None
        if b"GNU.sparse.name" in pax:
            name = pax[b"GNU.sparse.name"]
        if b"GNU.sparse.realsize" in pax:
            logical = _pax_int(pax, b"GNU.sparse.realsize", start)
        elif b"GNU.sparse.size" in pax:
            logical = _pax_int(pax, b"GNU.sparse.size", start)
        cur = [name, etype, mode, uid, gid, logical, mtime_ns, link, devmajor, devminor,
               xattrs, data_offset, size, 0, 0, None]
        if etype != EntryType.REG:
            cur[5] = 0 if etype != EntryType.HARDLINK else size
            cur[12] = 0
            self.entries.append(tuple(cur))
            self._skip(padded)
            return
        if pax.get(b"GNU.sparse.major") == b"1":
            self._cur = cur
            self._sparse10 = {"left": size, "size": size, "padded": padded, "text": b""}
            if padded == 0:
                raise TruncatedLayerError(f"sparse map missing at offset {start}")
            self._state, self._need = "sparsemap", BLOCK
            return
        try:
            if b"GNU.sparse.map" in pax:
                nums = [int(x) for x in pax[b"GNU.sparse.map"].split(b",") if x]
                sparse = list(zip(nums[0::2], nums[1::2]))
            elif sparse_records:
                offs = [int(v) for k, v in sparse_records if k == b"GNU.sparse.offset"]
                lens = [int(v) for k, v in sparse_records if k == b"GNU.sparse.numbytes"]
                sparse = list(zip(offs, lens))
        except ValueError:
            raise CorruptLayerError(f"malformed GNU sparse map before offset {start}") from None
        if flag == b"S":
            sparse = []
            for i in range(4):
                o = 386 + 24 * i
                off_f, len_f = hdr[o:o + 12], hdr[o + 12:o + 24]
                if off_f[0] == 0:
                    break
                sparse.append((_parse_number(off_f, "sparse", start), _parse_number(len_f, "sparse", start)))
            cur[5] = _parse_number(hdr[483:495], "realsize", start)
            if hdr[482]:
                self._cur = cur
                self._gnu_sparse = sparse
                self._state, self._need = "gnusparse", BLOCK
                return
        cur[15] = tuple(sparse) if sparse is not None else None
        self._begin_data(cur, size, padded - size)

    def _on_gnu_sparse_ext(self, block: bytes, start: int) -> None:
        assert self._cur is not None
        for i in range(21):
            off_f, len_f = block[24 * i:24 * i + 12], block[24 * i + 12:24 * i + 24]
            if off_f[0] == 0:
                break
            self._gnu_sparse.append((_parse_number(off_f, "sparse", start), _parse_number(len_f, "sparse", start)))
        if block[504]:
            return
        cur, self._cur = self._cur, None
        cur[11] = start + BLOCK
        cur[15] = tuple(self._gnu_sparse)
        size = cur[12]
        self._begin_data(cur, size, -(-size // BLOCK) * BLOCK - size)

    def _on_sparse_map(self, block: bytes, start: int) -> None:
        """GNU sparse 1.0: the map is decimal lines at the start of the entry's data."""
        assert self._cur is not None and self._sparse10 is not None
        sp = self._sparse10
        sp["text"] += block
        sp["left"] -= BLOCK
        lines = sp["text"].split(b"\n")
        try:
            complete = len(lines) >= 2 and len(lines) - 1 >= 1 + 2 * int(lines[0])
            if not complete:
                if sp["left"] <= 0:
                    raise TruncatedLayerError(f"sparse map truncated at offset {start}")
                self._need = BLOCK
                return  # the map continues in the next block
            count = int(lines[0])
            nums = [int(x) for x in lines[1:1 + 2 * count]]
        except ValueError:
            raise CorruptLayerError(f"malformed sparse map at offset {start}") from None
        cur, self._sparse10 = self._cur, None
        cur[11] = start + BLOCK
        cur[15] = tuple(zip(nums[0::2], nums[1::2]))
        self._begin_data(cur, sp["left"], sp["padded"] - sp["size"])

    def _on_ext(self, block: bytes, start: int) -> None:
        data = block[: self._ext_size]
        if self._ext_kind == b"L":
            self._pending["L"] = data.split(b"\0", 1)[0]
        elif self._ext_kind == b"K":
            self._pending["K"] = data.split(b"\0", 1)[0]
        elif self._ext_kind == b"x":
            self._pending.setdefault("pax", []).extend(_parse_pax(data, start))
        else:  # global PAX header: applies to every later entry
            self._global = [*self._global, *_parse_pax(data, start)]
        self._state, self._need = "header", BLOCK

    # -- file content -----------------------------------------------------------------
    def _begin_data(self, cur: list[Any], stored: int, pad: int) -> None:
        cur[12] = stored
        cur[13] = len(self.chunks) // CHUNK_RECORD.size
        self._cur = cur
        self._data_left = stored
        self._pad_after = pad
        self._chunk_hash, self._chunk_len, self._chunk_start = None, 0, cur[11]
        if stored == 0:
            self._end_data()
        else:
            self._state = "data"

    def _hash_data(self, mv: memoryview) -> None:
        cs = self.chunk_size
        while mv:
            if self._chunk_hash is None:
                self._chunk_hash, self._chunk_len, self._chunk_start = hashlib.sha256(), 0, self._pos
            take = min(cs - self._chunk_len, len(mv))
            self._chunk_hash.update(mv[:take])
            self._chunk_len += take
            self._pos += take
            self._data_left -= take
            mv = mv[take:]
            if self._chunk_len == cs or self._data_left == 0:
                self.chunks += CHUNK_RECORD.pack(self._chunk_start, self._chunk_len, self._chunk_hash.digest())
                self._chunk_hash = None

    def _end_data(self) -> None:
        cur, self._cur = self._cur, None
        assert cur is not None
        cur[14] = len(self.chunks) // CHUNK_RECORD.size - cur[13]
        self.entries.append(tuple(cur))
        self._skip(self._pad_after)


class PyScanner:
    """Drop-in, pure-Python counterpart of ``native.Scanner`` (see module docstring)."""

    def __init__(self, span_size: int = 4 << 20, chunk_size: int = 1 << 20, diff_id: bool = False,
                 format: str | None = None) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.span_size = span_size
        self._format = format
        self._head = bytearray()
        self._blob = hashlib.sha256()
        self._diff = hashlib.sha256() if diff_id else None
        self._csize = 0
        self._usize = 0
        self._tar = _TarParser(chunk_size)
        self._stream: StreamDecompressor | None = None
        self._finished = False

    def feed(self, buffer: bytes | bytearray | memoryview) -> None:
        data = bytes(buffer)
        if not data:
            return
        self._blob.update(data)
        self._csize += len(data)
        if self._format is None:
            self._head += data
            head = bytes(self._head)
            if len(head) < BLOCK and not (head[:2] == GZIP_MAGIC or head[:4] == ZSTD_MAGIC):
                return  # not enough bytes yet to tell tar from garbage
            self._format = detect_format(head)
            self._head = bytearray()
            data = head
        self._decompress(data)

    def _emit(self, out: bytes) -> None:
        if out:
            self._usize += len(out)
            if self._diff is not None:
                self._diff.update(out)
            self._tar.feed(out)

    def _decompress(self, data: bytes) -> None:
        if self._stream is None:
            self._stream = StreamDecompressor(self._format or "tar")
        for out in self._stream.feed(data):
            self._emit(out)

    def finish(self) -> dict[str, Any]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._format is None:
            if not self._head and self._csize == 0:
                raise TruncatedLayerError("empty layer")
            self._format = detect_format(bytes(self._head))
            data, self._head = bytes(self._head), bytearray()
            self._decompress(data)
        if self._stream is not None:
            for out in self._stream.finish():
                self._emit(out)
        self._tar.finish()
        return {
            "format": self._format,
            "compressed_size": self._csize,
            "uncompressed_size": self._usize,
            "blob_digest": self._blob.digest(),
            "diff_id": self._diff.digest() if self._diff is not None else None,
            "sequential_only": self._format != "tar",
            "entries": self._tar.entries,
            "chunks": bytes(self._tar.chunks),
            "checkpoints": [(int(CheckpointKind.STREAM_START), 0, 0, 0, b"")],
        }


def scan_file(path: str, *, chunk_size: int = 1 << 20, diff_id: bool = False, read_size: int = 1 << 20) -> dict[str, Any]:
    scanner = PyScanner(chunk_size=chunk_size, diff_id=diff_id)
    with open(path, "rb") as f:
        while block := f.read(read_size):
            scanner.feed(block)
    return scanner.finish()


def decompress_range(format: str, kind: int, bits: int, window: bytes, data: bytes, skip: int, length: int) -> bytes:
    """Uncompressed bytes [skip, skip+length) counted from a checkpoint; data starts there.

    Pure-Python counterpart of ``native.decompress_range`` for checkpoints at a stream,
    gzip-member or zstd-frame start. Bit-primed DEFLATE checkpoints need the C core.
    """
    if format == "tar":
        out = bytes(data[skip:skip + length])
    elif kind == CheckpointKind.DEFLATE:
        raise CorruptLayerError("DEFLATE checkpoints need the C core (snapshotter.native)")
    else:
        out = _inflate_members(format, data, skip + length)[skip:]
    if len(out) < length:
        raise TruncatedLayerError(f"{format} data ends {length - len(out)} bytes short of the requested range")
    return out[:length]


def _inflate_members(format: str, data: bytes, want: int) -> bytes:
    out = bytearray()
    buf = bytes(data)
    while buf and len(out) < want:
        dec: Any = zlib.decompressobj(31) if format == "gzip" else zstandard.ZstdDecompressor().decompressobj()
        try:
            if format == "gzip":
                out += dec.decompress(buf, want - len(out))
            else:
                out += dec.decompress(buf)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise CorruptLayerError(f"corrupt {format} data: {exc}") from None
        if not dec.eof:
            break
        buf = dec.unused_data
    return bytes(out)
