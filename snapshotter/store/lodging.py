"""Lodging records: which chunks a file under ``<root>/files/`` holds, and where.

A FUSE backing file (``snapshotter.fs.backing``) holds one file's chunks in order. Once the
kernel has it, the chunk store deletes the chunks' own files and reads them from it
(``ChunkStore.lodge``), so such a file is on disk once. A layer file holds the chunks a
streamed layer's scan cut, each at its offset in the layer's tar (``ChunkStore.
adopt_layer_file``). The record beside either,
``<file>.chunks``, lets every process that opens the store find them there: a restarted
daemon, ``lazysnap profile push --pack``, ``lazysnap prune``. A record is written after its
file is in place and deleted before it; a record whose file is missing or of another size
is ignored. The digests in it are checked like chunk files, by hashing on first read.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from snapshotter.fsutil import write_atomic
from snapshotter.index.model import CHUNK_RECORD

_HEAD_V1 = struct.Struct("<8sQII")  # magic, file size, chunk size, chunk count; then the digests
_MAGIC_V1 = b"LZLODGE1"  # chunks back to back (what daemons before layer files wrote)
_HEAD = struct.Struct("<8sQQ")  # magic, file size, extent count; then CHUNK_RECORDs
_MAGIC = b"LZLODGE2"
_MAX_EXTENTS = 1 << 24
SUFFIX = ".chunks"
FILES_DIR = "files"  # under the store's root

Extent = tuple[bytes, int, int]  # digest, offset in the file, size


@dataclass(slots=True, frozen=True)
class LodgingRecord:
    size: int
    extents: tuple[Extent, ...]

    @classmethod
    def of(cls, size: int, chunk_size: int, digests: Sequence[bytes]) -> LodgingRecord:
        """A file of ``size`` bytes holding ``digests`` back to back, each ``chunk_size``
        bytes but the last."""
        if chunk_size <= 0 or len(digests) != -(-size // chunk_size):
            raise ValueError(f"{len(digests)} chunks of {chunk_size} bytes cannot make a file of {size} bytes")
        return cls(size, tuple((d, k * chunk_size, min(chunk_size, size - k * chunk_size))
                               for k, d in enumerate(digests)))

    @classmethod
    def at(cls, size: int, extents: Iterable[Extent]) -> LodgingRecord:
        """A file of ``size`` bytes holding each extent's chunk at its offset."""
        out = tuple(extents)
        for digest, offset, length in out:
            if len(digest) != 32 or offset < 0 or length <= 0 or offset + length > size:
                raise ValueError(f"a chunk of {length} bytes at {offset} is not in a file of {size} bytes")
        return cls(size, out)

    @property
    def digests(self) -> tuple[bytes, ...]:
        return tuple(d for d, _, _ in self.extents)

    def encode(self) -> bytes:
        return _HEAD.pack(_MAGIC, self.size, len(self.extents)) + b"".join(
            CHUNK_RECORD.pack(offset, length, digest) for digest, offset, length in self.extents)

    @classmethod
    def decode(cls, data: bytes) -> LodgingRecord:
        if data[:8] == _MAGIC_V1 and len(data) >= _HEAD_V1.size:
            _, size, chunk_size, n = _HEAD_V1.unpack_from(data)
            if len(data) != _HEAD_V1.size + 32 * n:
                raise ValueError("not a lodging record")
            body = data[_HEAD_V1.size:]
            return cls.of(size, chunk_size, [body[i * 32:(i + 1) * 32] for i in range(n)])
        if data[:8] != _MAGIC or len(data) < _HEAD.size:
            raise ValueError("not a lodging record")
        _, size, n = _HEAD.unpack_from(data)
        if n > _MAX_EXTENTS or len(data) != _HEAD.size + CHUNK_RECORD.size * n:
            raise ValueError("not a lodging record")
        return cls.at(size, ((d, o, n_) for o, n_, d in CHUNK_RECORD.iter_unpack(data[_HEAD.size:])))


def record_path(path: str) -> str:
    return path + SUFFIX


def write_record(path: str, record: LodgingRecord) -> None:
    write_atomic(record_path(path), record.encode())


def read_record(path: str) -> LodgingRecord | None:
    """The record of ``path`` if it is readable and ``path`` is a file of its size."""
    try:
        with open(record_path(path), "rb") as f:
            record = LodgingRecord.decode(f.read(_HEAD.size + CHUNK_RECORD.size * _MAX_EXTENTS + 1))
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return None
    return record if st.st_size == record.size else None


def delete_record(path: str) -> None:
    try:
        os.unlink(record_path(path))
    except FileNotFoundError:
        pass


def recorded_files(files_dir: str) -> Iterator[tuple[str, float]]:
    """Each file under ``files_dir`` with a record beside it, and the record's mtime."""
    try:
        subs = list(os.scandir(files_dir))
    except FileNotFoundError:
        return
    for sub in subs:
        if not sub.is_dir(follow_symlinks=False) or sub.name.startswith("."):
            continue
        for f in os.scandir(sub.path):
            if f.name.endswith(SUFFIX) and not f.name.startswith("."):
                try:
                    mtime = f.stat().st_mtime
                except OSError:
                    continue
                yield f.path[:-len(SUFFIX)], mtime
