"""The in-memory result of indexing one layer, before it is written to disk.

``entries`` form a complete tree (every parent directory present, the root is the entry
with path ``""``), one entry per path; hard links name their target in ``linkname``.
``format.write_index`` decides the on-disk order; readers use ``format.IndexFile``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.index.model import Checkpoint, Chunk, Entry, LayerInfo


@dataclass(slots=True)
class LayerIndex:
    info: LayerInfo
    entries: list[Entry] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    # End marks (uncompressed offset, compressed offset), ascending: decoding from the
    # checkpoint before ``uoff`` yields every byte before ``uoff`` from the compressed bytes
    # before ``coff``. They let a read stop fetching short of the next checkpoint.
    marks: list[tuple[int, int]] = field(default_factory=list)
