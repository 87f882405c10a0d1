"""``lazysnap prune [--apply]``: reclaim chunks that no snapshot's layer uses.

Dry run by default (it prints what it would reclaim). With a daemon answering on
``--address`` the daemon prunes its own store (``lazysnap.v1.Node/Prune``): it knows
which layers are registered. Without one, the store under ``--root`` is pruned directly:
the layers still in use are the remote snapshots in the metadata database, their chunks
come from the local indexes. A daemon that holds the root (``<root>/daemon.lock``) but
does not answer on ``--address`` makes this refuse: its store is not ours to change.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from snapshotter.cli import CLIError
from snapshotter.cli.daemon_api import daemon_answers, prune
from snapshotter.cli.units import human_bytes


@dataclass(slots=True, frozen=True)
class Outcome:
    applied: bool
    chunks: int
    bytes: int
    kept_chunks: int
    kept_bytes: int
    via: str  # daemon | store
    unindexed_layers: int = 0  # in use, but no local index names their chunks (offline only)


def cmd_prune(args: argparse.Namespace) -> int:
    if daemon_answers(args.address):
        r = prune(args.address, args.apply, args.timeout)
        out = Outcome(r.applied, r.chunks, r.bytes, r.kept_chunks, r.kept_bytes, "daemon")
    else:
        out = _prune_offline(Path(args.root), args.apply, args.address)
    if args.json:
        print(json.dumps({"applied": out.applied, "chunks": out.chunks, "bytes": out.bytes,
                          "kept_chunks": out.kept_chunks, "kept_bytes": out.kept_bytes, "via": out.via,
                          "unindexed_layers": out.unindexed_layers}))
        return 0
    what = f"{out.chunks} chunks, {human_bytes(out.bytes)} that no snapshot uses"
    kept = f"{out.kept_chunks} chunks, {human_bytes(out.kept_bytes)}"
    if out.applied:
        print(f"reclaimed {what}; the store holds {kept}")
    else:
        print(f"would reclaim {what}; {kept} would stay (run with --apply to delete them)")
    if out.unindexed_layers:
        print(f"note: {out.unindexed_layers} layer(s) in use have no local index; their chunks cannot be "
              f"told apart and were counted as unused")
    return 0


def _prune_offline(root: Path, apply: bool, address: str) -> Outcome:
    from snapshotter.layers.indexes import open_local
    from snapshotter.service.errors import SnapshotError
    from snapshotter.service.server import ROOT_LOCK
    from snapshotter.service.store import MetaStore
    from snapshotter.store import ChunkStore

    if not root.is_dir():
        raise CLIError(f"no lazysnap state under {root} (and no daemon answers on {address})")
    fd = os.open(root / ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CLIError(f"a running lazysnap daemon owns {root} but does not answer on {address}: "
                           f"pass that daemon's --address") from None
        if not (root / "chunks").is_dir():
            raise CLIError(f"no lazysnap chunk store under {root} (and no daemon answers on {address})")
        digests: set[str] = set()
        if (root / "metadata.db").exists():
            try:
                meta = MetaStore(root / "metadata.db")
                try:
                    with meta.transaction(write=False) as tx:
                        digests = {r.layer_digest for r in tx.remote_records()}
                finally:
                    meta.close()
            except SnapshotError as exc:
                raise CLIError(str(exc)) from None
        store = ChunkStore(root)
        unindexed = 0
        try:
            for digest in sorted(digests):
                idx = open_local(root, digest)
                if idx is None:
                    unindexed += 1
                    continue
                try:
                    store.pin(digest, idx.chunk_digests())
                finally:
                    idx.close()
            r = store.prune(apply=apply)
        finally:
            store.close()
        return Outcome(r.applied, r.chunks, r.bytes, r.kept_chunks, r.kept_bytes, "store", unindexed)
    finally:
        os.close(fd)
