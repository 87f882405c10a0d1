"""Backing files for FUSE passthrough: made only from verified chunks, exactly the file's bytes."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.fs.backing import BackingFiles, candidates
from snapshotter.fs.compiled import compile_tree
from snapshotter.fs.tree import LayerTree
from snapshotter.index.model import Entry, EntryType
from snapshotter.store import ChunkStore

CHUNK = 4096


def _file(size: int, seed: int = 0) -> tuple[bytes, list[bytes], list[bytes]]:
    """A file's bytes, its chunks and their digests."""
    data = b"".join(hashlib.sha256(b"%d-%d" % (seed, i)).digest() for i in range(size // 32 + 1))[:size]
    chunks = [data[i:i + CHUNK] for i in range(0, size, CHUNK)]
    return data, chunks, [hashlib.sha256(c).digest() for c in chunks]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 9 * CHUNK), local=st.data())
def test_made_only_when_every_chunk_is_local_and_then_exact(tmp_path_factory: pytest.TempPathFactory, size: int,
                                                            local: st.DataObject) -> None:
    root = tmp_path_factory.mktemp("node")
    store = ChunkStore(root)
    files = BackingFiles(store)
    data, chunks, digests = _file(size)
    present = local.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    for chunk, digest, here in zip(chunks, digests, present):
        if here:
            store.put(digest, chunk)
    path = files.make(size, digests, CHUNK)
    if not all(present):
        assert path is None
        assert not any(p.is_file() for p in (root / "files").rglob("*"))
        return
    assert path is not None and path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert files.total_bytes == size


def test_a_damaged_chunk_file_is_never_copied(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    files = BackingFiles(store)
    data, chunks, digests = _file(3 * CHUNK)
    for c, d in zip(chunks, digests):
        store.put(d, c)
    damaged = store.path_of(digests[1])
    os.chmod(damaged, 0o600)
    damaged.write_bytes(b"x" * CHUNK)  # after its check at write: only a new hash catches it
    assert files.make(len(data), digests, CHUNK) is None
    assert files.total_bytes == 0


def _name(path: Path) -> str:
    return path.parent.name + path.name


def test_a_lodged_file_is_shared_then_cache_and_checked_before_reuse(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data, chunks, digests = _file(5 * CHUNK + 7)
    for c, d in zip(chunks, digests):
        store.put(d, c)
    files = BackingFiles(store)
    path = files.make(len(data), digests, CHUNK)
    assert path is not None
    store.lodge(path, len(data), digests, CHUNK, verified=True)  # the kernel has it (LazyFS)
    assert not any(store.path_of(d).exists() for d in digests) and store.held_bytes == len(data)
    # the same file in a second layer: one file, two users
    assert files.make(len(data), digests, CHUNK) == path
    files.release([_name(path)])
    assert store.held_bytes == len(data)
    files.release([_name(path)])  # no layer uses it: cache, evictable and prunable whole
    assert path.exists() and files.total_bytes == 0 and store.held_bytes == 0
    assert store.usage().evictable_bytes == len(data) and store.usage().evictable_chunks == len(digests)

    # a later daemon finds it through its record, unchecked; reused, it is hashed first
    store = ChunkStore(tmp_path)
    assert all(store.known(d) for d in digests) and store.usage().evictable_bytes == len(data)
    assert store.read(digests[2]) == chunks[2]
    files = BackingFiles(store)
    assert files.make(len(data), digests, CHUNK) == path

    # damaged: dropped with its chunks (they were only there), made once they are back
    store = ChunkStore(tmp_path)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"!")
    files = BackingFiles(store)
    assert files.make(len(data), digests, CHUNK) is None
    assert not path.exists() and not any(store.known(d) for d in digests)
    for c, d in zip(chunks, digests):
        store.put(d, c)
    assert files.make(len(data), digests, CHUNK) == path and path.read_bytes() == data


def test_a_file_without_a_record_is_deleted_at_start(tmp_path: Path) -> None:
    """A daemon died between making a file and lodging its chunks: nothing tracks it."""
    store = ChunkStore(tmp_path)
    data, chunks, digests = _file(2 * CHUNK)
    for c, d in zip(chunks, digests):
        store.put(d, c)
    path = BackingFiles(store).make(len(data), digests, CHUNK)
    assert path is not None
    BackingFiles(ChunkStore(tmp_path)).prepare()
    assert not path.exists()
    assert all(ChunkStore(tmp_path).read(d) == c for c, d in zip(chunks, digests))  # chunks untouched


def test_room_is_the_store_limit(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, limit_bytes=10 * CHUNK)
    files = BackingFiles(store)
    assert files.room_for(10 * CHUNK) and not files.room_for(10 * CHUNK + 1)


def test_candidates_are_big_plain_files_biggest_first() -> None:
    def reg(path: str, size: int, first: int, sparse: tuple[tuple[int, int], ...] | None = None) -> Entry:
        return Entry(path, EntryType.REG, 0o644, 0, 0, size, 0, first_chunk=first,
                     chunk_count=-(-size // CHUNK), sparse=sparse)

    tree = LayerTree.build([
        reg("small", 100, 0), reg("big", 10 * CHUNK, 1), reg("mid", 3 * CHUNK, 11),
        reg("holes", 8 * CHUNK, 14, sparse=((0, CHUNK), (7 * CHUNK, CHUNK))),
        Entry("dir", EntryType.DIR, 0o755, 0, 0, 0, 0),
        Entry("link", EntryType.SYMLINK, 0o777, 0, 0, 0, 0, linkname="big"),
    ])
    found = candidates(compile_tree(tree), CHUNK)
    by_local = {n.local: n for n in tree.nodes if n is not None}
    assert [by_local[c.local].entry.path for c in found] == ["big", "mid"]
    assert [(c.size, c.first_chunk, c.chunk_count) for c in found] == [(10 * CHUNK, 1, 10), (3 * CHUNK, 11, 3)]
