"""The store's usage and prune: what is pinned by a layer stays, the rest is reclaimable."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from snapshotter.store import ChunkStore


def chunk(i: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = (b"%08d" % i) * (size // 8)
    return hashlib.sha256(data).digest(), data


def test_usage_splits_pinned_and_evictable(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    items = [chunk(i) for i in range(6)]
    store.put_many(items)
    store.pin("sha256:a", [items[0][0], items[1][0], items[2][0]])
    store.pin("sha256:b", [items[2][0], items[3][0], chunk(99)[0]])  # 99: pinned, never stored
    u = store.usage()
    assert (u.chunks, u.bytes) == (6, 6000)
    assert (u.pinned_chunks, u.pinned_bytes, u.evictable_chunks, u.evictable_bytes) == (4, 4000, 2, 2000)
    assert u.pinned_layers == 2 and u.limit is None
    share = store.local_share([d for d, _ in items[:3]] + [chunk(99)[0]], [1000, 1000, 1000, 1000])
    assert (share.chunks, share.bytes, share.verified) == (3, 3000, 3)


def test_prune_dry_run_then_apply_keeps_pinned_chunks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    items = [chunk(i) for i in range(5)]
    store.put_many(items)
    store.pin("sha256:a", [items[0][0], items[1][0]])
    dry = store.prune(apply=False)
    assert (dry.chunks, dry.bytes, dry.applied, dry.kept_chunks, dry.kept_bytes) == (3, 3000, False, 2, 2000)
    assert all(store.path_of(d).exists() for d, _ in items)
    done = store.prune(apply=True)
    assert (done.chunks, done.bytes, done.applied, done.kept_chunks, done.kept_bytes) == (3, 3000, True, 2, 2000)
    assert [store.path_of(d).exists() for d, _ in items] == [True, True, False, False, False]
    assert store.read(items[2][0]) is None and store.read(items[0][0]) == items[0][1]
    assert store.usage().bytes == 2000
    # a restarted store agrees with what is on disk
    store.close()
    again = ChunkStore(tmp_path)
    assert (again.usage().chunks, again.usage().bytes) == (2, 2000)


def test_unpin_and_drop_deletes_only_chunks_no_other_layer_pins(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    items = [chunk(i) for i in range(4)]
    store.put_many(items)
    store.pin("sha256:old", [d for d, _ in items[:3]])
    store.pin("sha256:new", [items[2][0], items[3][0]])  # shares chunk 2
    dropped: list[bytes] = []
    store.watch_verified(lambda joined: None, dropped.append)
    r = store.unpin_and_drop("sha256:old")
    assert (r.chunks, r.bytes, r.kept_chunks) == (2, 2000, 2)
    assert sorted(dropped) == sorted([items[0][0], items[1][0]])  # the C filesystem hears of it
    assert [store.path_of(d).exists() for d, _ in items] == [False, False, True, True]
    assert not store.is_pinned(items[0][0]) and store.is_pinned(items[2][0])
    assert os.listdir(store.tmp_dir) == []
