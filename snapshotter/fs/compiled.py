"""A layer tree as the C filesystem reads it: fixed little-endian records in one blob.

Why a blob: the C workers answer lookups, attributes, listings and xattrs without Python,
so they need the tree in memory they own. The records are declared once, in
``native/fuse/fastfs.h``, and packed here by field name (``TreeRecord``): header, nodes
(index = local inode, 0 unused), children sorted by name per directory (binary search),
xattrs, then one string table (names are deduplicated: a Python tree repeats
``__init__.py`` thousands of times).

Two builders make the same blob: ``build_compiled`` in C straight from the index's entry
records (the daemon's path: a 23k-entry layer in milliseconds instead of ~0.3 s of Python
under the GIL at the layer's first Prepare), and ``compile_tree`` from a Python
``LayerTree``, which stays the reference and builds the layers the C builder declines
(a whiteout beside the name it hides, links to odd targets: see native/fuse/treebuild.c).
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import Any

from snapshotter import _fuse
from snapshotter._fuse import NODE_PYDATA, TREE_MAGIC
from snapshotter.fs.tree import LayerTree
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.format import BLOCK_RECORDS, IndexFile
from snapshotter.index.model import ENTRY_RECORD, Entry

VERSION = 1
_U32 = 0xFFFFFFFF
_CODES = {(4, False): "I", (4, True): "i", (8, False): "Q", (8, True): "q"}


@dataclass(slots=True, frozen=True)
class TreeRecord:
    """One record of the tree blob as the C side declares it (``native/fuse/fastfs.h``,
    exported field by field as ``_fuse.TREE_LAYOUT``): Python packs and reads it by field
    name, so the header is the one declaration of the layout."""

    struct: struct.Struct
    fields: tuple[str, ...]
    _one: dict[str, tuple[struct.Struct, int]]  # a field's own format and offset

    @classmethod
    def of(cls, name: str) -> TreeRecord:
        size, layout = _fuse.TREE_LAYOUT[name]
        fmt, at, one = "<", 0, {}
        for field, offset, width, signed in layout:
            code = _CODES.get((width, signed))
            if code is None or offset < at:
                raise ImportError(f"snapshotter._fuse lays out the tree {name} field {field} as {width} bytes at "
                                  f"{offset}: not a record Python can pack")
            fmt += f"{offset - at}x" * (offset > at) + code
            one[field] = (struct.Struct("<" + code), offset)
            at = offset + width
        fmt += f"{size - at}x" * (size > at)
        return cls(struct.Struct(fmt), tuple(f for f, *_ in layout), one)

    @property
    def size(self) -> int:
        return self.struct.size

    def offset(self, field: str) -> int:
        return self._one[field][1]

    def position(self, field: str) -> int:
        """Where ``field`` is in the tuple ``unpack_from`` returns."""
        return self.fields.index(field)

    def unpack_from(self, buf: Any, at: int) -> tuple[int, ...]:
        """Every field of the record at ``at``, in ``fields`` order."""
        return self.struct.unpack_from(buf, at)

    def pack(self, **values: int) -> bytes:
        return self.struct.pack(*[values[f] for f in self.fields])

    def pack_into(self, buf: Any, at: int, **values: int) -> None:
        self.struct.pack_into(buf, at, *[values[f] for f in self.fields])

    def get(self, buf: Any, at: int, field: str) -> int:
        """One field of the record at ``at`` in ``buf``."""
        fmt, offset = self._one[field]
        value: int = fmt.unpack_from(buf, at + offset)[0]
        return value


HEADER = TreeRecord.of("header")
NODE = TreeRecord.of("node")
CHILD = TreeRecord.of("child")
XATTR = TreeRecord.of("xattr")

# The index entry record the C tree builder reads (native/fuse/treebuild.h) is declared in
# index.model and there: refused if they differ.
if _fuse.INDEX_ENTRY_RECORD_SIZE != ENTRY_RECORD.size:
    raise ImportError(f"snapshotter._fuse reads index entry records of {_fuse.INDEX_ENTRY_RECORD_SIZE} bytes; "
                      f"Python writes {ENTRY_RECORD.size}")


def compile_tree(tree: LayerTree) -> bytes:
    nodes = tree.nodes
    strings = bytearray()
    offsets: dict[bytes, int] = {}

    def intern(s: bytes) -> int:
        off = offsets.get(s)
        if off is None:
            off = offsets[s] = len(strings)
            strings.extend(s)
        return off

    node_buf = bytearray(NODE.size * len(nodes))
    children = bytearray()
    xattrs = bytearray()
    n_children = n_xattrs = 0
    pack_node, pack_child, pack_xattr = NODE.pack_into, CHILD.pack, XATTR.pack
    for local in range(1, len(nodes)):
        node = nodes[local]
        if node is None:  # never produced by LayerTree, kept harmless: an empty directory
            pack_node(node_buf, local * NODE.size, size=0, mtime_ns=0, rdev=0, first_chunk=0, mode=stat.S_IFDIR,
                      uid=0, gid=0, nlink=2, parent=1, child_start=n_children, child_count=0,
                      xattr_start=n_xattrs, xattr_count=0, target_off=0, target_len=0, chunk_count=0, flags=0,
                      record=0)
            continue
        child_start = n_children
        if node.children:
            for name, child in sorted(node.children.items()):
                children += pack_child(name_off=intern(name), name_len=len(name), child=child)
            n_children += len(node.children)
        xattr_start = n_xattrs
        for key, value in node.xattrs.items():
            xattrs += pack_xattr(name_off=intern(key), name_len=len(key), value_off=intern(value),
                                 value_len=len(value))
        n_xattrs += len(node.xattrs)
        target_off = intern(node.target) if node.target else 0
        e = node.entry
        first_chunk = chunk_count = flags = 0
        if e is not None:
            first_chunk, chunk_count = e.first_chunk, e.chunk_count
            if e.sparse:
                flags = NODE_PYDATA
        pack_node(node_buf, local * NODE.size, size=node.size, mtime_ns=node.mtime_ns, rdev=node.rdev,
                  first_chunk=first_chunk, mode=node.mode & _U32, uid=node.uid & _U32, gid=node.gid & _U32,
                  nlink=min(node.nlink, _U32), parent=node.parent, child_start=child_start,
                  child_count=len(node.children or ()), xattr_start=xattr_start, xattr_count=len(node.xattrs),
                  target_off=target_off, target_len=len(node.target), chunk_count=chunk_count, flags=flags,
                  record=0)
    header = HEADER.pack(magic=TREE_MAGIC, version=VERSION, n_nodes=len(nodes), n_children=n_children,
                         n_xattrs=n_xattrs, pad=0, strings_len=len(strings))
    return b"".join((header, node_buf, children, xattrs, strings))


_ENTRY_CACHE = 4096


class CompiledTree:
    """A layer's tree as built in C: the blob, and the index to find a file's entry in.

    Python needs an entry only for reads the C side forwards (a fetch, a sparse file) and
    for the recorder, so entries are decoded from the index per node on first use.
    Used on the filesystem's loop only.
    """

    __slots__ = ("blob", "files", "total_size", "inodes", "_index", "_entries")

    def __init__(self, blob: bytes, index: IndexFile, files: int, total_size: int) -> None:
        self.blob = blob
        self.files = files
        self.total_size = total_size
        self.inodes = HEADER.get(blob, 0, "n_nodes") - 1
        self._index = index
        self._entries: dict[int, Entry] = {}

    def entry(self, local: int) -> Entry | None:
        """The entry holding the data of regular file ``local`` (None: not a file here)."""
        e = self._entries.get(local)
        if e is not None:
            return e
        if not 0 < local <= self.inodes:
            return None
        rec = NODE.get(self.blob, HEADER.size + local * NODE.size, "record")  # index record + 1 (C builder)
        if rec == 0:
            return None
        e = self._index.entry_at(rec - 1)
        if len(self._entries) >= _ENTRY_CACHE:
            self._entries.clear()
        self._entries[local] = e
        return e


def build_compiled(index: IndexFile) -> CompiledTree:
    """The layer's tree built in C (GIL released). Raises NotImplementedError (with the
    reason) for a layer only ``LayerTree`` builds, IndexFormatError for a malformed index."""
    try:
        blob, files, total = _fuse.build_tree(index.entry_blocks(), BLOCK_RECORDS, index.entry_count,
                                              index.extras_section(), index.chunk_count)
    except ValueError as exc:
        raise IndexFormatError(f"index {index.source} is corrupt: {exc}") from None
    return CompiledTree(blob, index, files, total)
