"""A layer tree as the C filesystem reads it: fixed little-endian records in one blob.

Why a blob: the C workers answer lookups, attributes, listings and xattrs without Python,
so they need the tree in memory they own. Records mirror ``native/fuse/fastfs.h``:
header, nodes (index = local inode, 0 unused), children sorted by name per directory
(binary search), xattrs, then one string table (names are deduplicated: a Python tree
repeats ``__init__.py`` thousands of times).
"""
from __future__ import annotations

import stat
import struct

from snapshotter._fuse import NODE_PYDATA, TREE_MAGIC
from snapshotter.fs.tree import LayerTree

VERSION = 1
HEADER = struct.Struct("<6IQ")
NODE = struct.Struct("<QqQQ14I")
CHILD = struct.Struct("<3I")
XATTR = struct.Struct("<4I")
_U32 = 0xFFFFFFFF


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
