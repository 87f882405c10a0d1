"""A layer tree as the C filesystem reads it: fixed little-endian records in one blob.

Why a blob: the C workers answer lookups, attributes, listings and xattrs without Python,
so they need the tree in memory they own. Records mirror ``native/fuse/fastfs.h``:
header, nodes (index = local inode, 0 unused), children sorted by name per directory
(binary search), xattrs, then one string table (names are deduplicated: a Python tree
repeats ``__init__.py`` thousands of times).

Two builders make the same blob: ``build_compiled`` in C straight from the index's entry
records (the daemon's path: a 23k-entry layer in milliseconds instead of ~0.3 s of Python
under the GIL at the layer's first Prepare), and ``compile_tree`` from a Python
``LayerTree``, which stays the reference and builds the layers the C builder declines
(a whiteout beside the name it hides, links to odd targets: see native/fuse/treebuild.c).
"""
from __future__ import annotations

import stat
import struct

from snapshotter import _fuse
from snapshotter._fuse import NODE_PYDATA, TREE_MAGIC
from snapshotter.fs.tree import LayerTree
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.format import BLOCK_RECORDS, IndexFile
from snapshotter.index.model import ENTRY_RECORD, Entry

VERSION = 1
HEADER = struct.Struct("<6IQ")
NODE = struct.Struct("<QqQQ14I")
CHILD = struct.Struct("<3I")
XATTR = struct.Struct("<4I")
_U32 = 0xFFFFFFFF

# The tree blob's records as C reads them (native/fuse/fastfs.h) and the index entry record
# the C tree builder reads (native/fuse/treebuild.h): one contract, refused if they differ.
_C_LAYOUT = (_fuse.TREE_HEADER_SIZE, _fuse.TREE_NODE_SIZE, _fuse.TREE_CHILD_SIZE, _fuse.TREE_XATTR_SIZE,
             _fuse.INDEX_ENTRY_RECORD_SIZE)
_PY_LAYOUT = (HEADER.size, NODE.size, CHILD.size, XATTR.size, ENTRY_RECORD.size)
if _C_LAYOUT != _PY_LAYOUT:
    raise ImportError(f"snapshotter._fuse was built for tree header, node, child, xattr and index entry records of "
                      f"{_C_LAYOUT} bytes; Python has {_PY_LAYOUT}")


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
            pack_node(node_buf, local * NODE.size, 0, 0, 0, 0, stat.S_IFDIR, 0, 0, 2, 1,
                      n_children, 0, n_xattrs, 0, 0, 0, 0, 0, 0)
            continue
        child_start = n_children
        if node.children:
            for name, child in sorted(node.children.items()):
                children += pack_child(intern(name), len(name), child)
            n_children += len(node.children)
        xattr_start = n_xattrs
        for key, value in node.xattrs.items():
            xattrs += pack_xattr(intern(key), len(key), intern(value), len(value))
        n_xattrs += len(node.xattrs)
        target_off = intern(node.target) if node.target else 0
        e = node.entry
        first_chunk = chunk_count = flags = 0
        if e is not None:
            first_chunk, chunk_count = e.first_chunk, e.chunk_count
            if e.sparse:
                flags = NODE_PYDATA
        pack_node(node_buf, local * NODE.size, node.size, node.mtime_ns, node.rdev, first_chunk,
                  node.mode & _U32, node.uid & _U32, node.gid & _U32, min(node.nlink, _U32),
                  node.parent, child_start, len(node.children or ()), xattr_start, len(node.xattrs),
                  target_off, len(node.target), chunk_count, flags, 0)
    header = HEADER.pack(TREE_MAGIC, VERSION, len(nodes), n_children, n_xattrs, 0, len(strings))
    return b"".join((header, node_buf, children, xattrs, strings))


_ENTRY_AT = NODE.size - 4  # the node's last u32: a regular file's index record + 1 (C builder)
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
        self.inodes = HEADER.unpack_from(blob)[2] - 1
        self._index = index
        self._entries: dict[int, Entry] = {}

    def entry(self, local: int) -> Entry | None:
        """The entry holding the data of regular file ``local`` (None: not a file here)."""
        e = self._entries.get(local)
        if e is not None:
            return e
        if not 0 < local <= self.inodes:
            return None
        (rec,) = struct.unpack_from("<I", self.blob, HEADER.size + local * NODE.size + _ENTRY_AT)
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
