"""Lodging records: which chunks a file under ``<root>/files/`` holds, back to back.

A FUSE backing file (``snapshotter.fs.backing``) holds one file's chunks in order. Once the
kernel has it, the chunk store deletes the chunks' own files and reads them from it
(``ChunkStore.lodge``), so such a file is on disk once. The record beside it,
``<file>.chunks``, lets every process that opens the store find them there: a restarted
daemon, ``lazysnap profile push --pack``, ``lazysnap prune``. A record is written after its
file is in place and deleted before it; a record whose file is missing or of another size
is ignored. The digests in it are checked like chunk files, by hashing on first read.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from snapshotter.fsutil import write_atomic

_HEAD = struct.Struct("<8sQII")  # magic, file size, chunk size, chunk count; then the digests
_MAGIC = b"LZLODGE1"
SUFFIX = ".chunks"
FILES_DIR = "files"  # under the store's root


@dataclass(slots=True, frozen=True)
class LodgingRecord:
    size: int
    chunk_size: int
    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, size: int, chunk_size: int, digests: Sequence[bytes]) -> LodgingRecord:
        if chunk_size <= 0 or len(digests) != -(-size // chunk_size):
            raise ValueError(f"{len(digests)} chunks of {chunk_size} bytes cannot make a file of {size} bytes")
        return cls(size, chunk_size, tuple(digests))

    def extents(self) -> Iterator[tuple[bytes, int, int]]:
        """Each chunk's digest, offset and size in the file."""
        for k, digest in enumerate(self.digests):
            offset = k * self.chunk_size
            yield digest, offset, min(self.chunk_size, self.size - offset)

    def encode(self) -> bytes:
        return _HEAD.pack(_MAGIC, self.size, self.chunk_size, len(self.digests)) + b"".join(self.digests)

    @classmethod
    def decode(cls, data: bytes) -> LodgingRecord:
        if len(data) < _HEAD.size:
            raise ValueError("lodging record too short")
        magic, size, chunk_size, n = _HEAD.unpack_from(data)
        if magic != _MAGIC or len(data) != _HEAD.size + 32 * n:
            raise ValueError("not a lodging record")
        body = data[_HEAD.size:]
        return cls.of(size, chunk_size, [body[i * 32:(i + 1) * 32] for i in range(n)])


def record_path(path: str) -> str:
    return path + SUFFIX


def write_record(path: str, record: LodgingRecord) -> None:
    write_atomic(record_path(path), record.encode())


def read_record(path: str) -> LodgingRecord | None:
    """The record of ``path`` if it is readable and ``path`` is a file of its size."""
    try:
        with open(record_path(path), "rb") as f:
            record = LodgingRecord.decode(f.read(_HEAD.size + 32 * (1 << 24)))
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
