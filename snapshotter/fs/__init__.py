"""The daemon's FUSE filesystem: one mount, one directory per lazily provided layer."""
from __future__ import annotations

from snapshotter.fs.data import ChunkFetcher, LayerData
from snapshotter.fs.lazyfs import LazyFS, MountedLayer
from snapshotter.fs.tree import LayerTree, Node

__all__ = ["ChunkFetcher", "LayerData", "LazyFS", "LayerTree", "MountedLayer", "Node"]
