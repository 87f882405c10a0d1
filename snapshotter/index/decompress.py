"""Whole-layer decompression as the bytes stream by, and a layer's format from its first
bytes: what the fetch path needs for a layer without random access (a single-frame zstd
layer is read from its start), in Python, with bounded memory against inflate bombs."""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import zstandard

from snapshotter.index.errors import CorruptLayerError, TruncatedLayerError, UnknownFormatError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 512
_OUT_STEP = 1 << 20  # bounded inflate output per call, so a zip bomb cannot exhaust memory


def detect_format(head: bytes) -> str:
    """Layer format from its first bytes: gzip and zstd by magic, tar by header checksum."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if len(head) >= BLOCK and (header_checksum_ok(head[:BLOCK]) or head[:BLOCK] == bytes(BLOCK)):
        return "tar"
    raise UnknownFormatError("unknown layer format: not gzip, zstd or tar")


def header_checksum_ok(hdr: bytes) -> bool:
    """The 512-byte tar header's checksum field matches its bytes, summed unsigned or
    signed (old writers summed signed chars)."""
    text = hdr[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        stored = int(text, 8)
    except ValueError:
        return False
    unsigned = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    signed = unsigned - 2 * (sum(b for b in hdr[:148] if b > 127) + sum(b for b in hdr[156:] if b > 127))
    return stored in (unsigned, signed)


class StreamDecompressor:
    """A whole layer decompressed as it streams by: gzip members / zstd frames back to back.

    ``feed`` yields uncompressed pieces of at most ``_OUT_STEP`` bytes for gzip (bounded
    memory against inflate bombs); ``consumed`` counts the compressed bytes fed so far, so
    errors name the offset. Used by the fetch path for layers without random access (and
    by the tests' pure-Python scanner).
    """

    def __init__(self, fmt: str) -> None:
        if fmt not in ("tar", "gzip", "zstd"):
            raise UnknownFormatError(f"unknown layer format {fmt!r}")
        self.format = fmt
        self.consumed = 0
        self._dec: Any = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        fmt = self.format
        if fmt == "tar":
            self.consumed += len(data)
            if data:
                yield data
            return
        while data:
            if self._dec is None:
                magic = GZIP_MAGIC if fmt == "gzip" else ZSTD_MAGIC
                if not data.startswith(magic[: len(data)]):
                    what = "gzip member" if fmt == "gzip" else "zstd frame"
                    raise CorruptLayerError(f"trailing data after {what} at offset {self.consumed}")
                self._dec = zlib.decompressobj(31) if fmt == "gzip" else zstandard.ZstdDecompressor().decompressobj()
            try:
                if fmt == "gzip":
                    yield self._dec.decompress(data, _OUT_STEP)
                    while self._dec.unconsumed_tail:
                        yield self._dec.decompress(self._dec.unconsumed_tail, _OUT_STEP)
                else:
                    yield self._dec.decompress(data)
            except (zlib.error, zstandard.ZstdError) as exc:
                raise CorruptLayerError(
                    f"corrupt {fmt} data near offset {self.consumed + len(data)}: {exc}") from None
            if self._dec.eof:
                rest = self._dec.unused_data
                self._dec = None
            else:
                rest = b""
            self.consumed += len(data) - len(rest)
            data = rest

    def finish(self) -> Iterator[bytes]:
        """What the decompressor still holds; the input must not end inside a member/frame."""
        if self._dec is None:
            return
        if self.format == "gzip":
            yield self._dec.flush()
        if not self._dec.eof:
            raise TruncatedLayerError(f"{self.format} stream truncated at offset {self.consumed}")
