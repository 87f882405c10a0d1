"""Mounts computed from metadata, the way containerd's overlayfs snapshotter does it.

- no parent: ``bind`` of the snapshot's own ``fs`` (``rw`` active, ``ro`` view, ``rbind``);
- a view of exactly one parent: ``bind ro`` of that parent's directory;
- otherwise ``overlay`` with ``lowerdir`` nearest parent first, plus ``upperdir`` and
  ``workdir`` for an active snapshot.

A remote layer's directory is whatever its provider returned; the caller supplies it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.service.model import Kind, Layer, Snapshot

__all__ = ["Mount", "SnapshotPaths", "compute_mounts", "overlay_index_off"]


@dataclass(slots=True, frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = field(default_factory=tuple)


@dataclass(slots=True, frozen=True)
class SnapshotPaths:
    """``<root>/snapshots/<id>/{fs,work}`` like containerd's overlayfs snapshotter."""

    snapshots_dir: Path

    def dir(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id)

    def upper(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "fs"

    def work(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "work"


def overlay_index_off() -> bool:
    """containerd adds ``index=off`` when the kernel has the overlay ``index`` feature."""
    return os.path.exists("/sys/module/overlay/parameters/index")


def compute_mounts(snap: Snapshot, paths: SnapshotPaths, lower_dir: Callable[[Layer], str], *,
                   index_off: bool = False) -> list[Mount]:
    if not snap.parents:
        mode = "ro" if snap.kind == Kind.VIEW else "rw"
        return [Mount(type="bind", source=str(paths.upper(snap.id)), options=(mode, "rbind"))]
    if snap.kind != Kind.ACTIVE and len(snap.parents) == 1:
        return [Mount(type="bind", source=lower_dir(snap.parents[0]), options=("ro", "rbind"))]
    options: list[str] = ["index=off"] if index_off else []
    if snap.kind == Kind.ACTIVE:
        options += [f"workdir={paths.work(snap.id)}", f"upperdir={paths.upper(snap.id)}"]
    options.append("lowerdir=" + ":".join(lower_dir(p) for p in snap.parents))
    return [Mount(type="overlay", source="overlay", options=tuple(options))]
