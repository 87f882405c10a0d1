"""The directory tree of one layer as overlayfs must see it, built once from index entries.

Why a tree of our own instead of asking the index per call: FUSE lookups, getattr and
readdir are the hot metadata path (``find | stat`` of 38k files); a dict per directory
answers them without touching the index. The tree also applies the OCI → overlayfs
conventions exactly like containerd's overlay applier:
- ``.wh.<name>``      → a character device 0/0 named ``<name>`` (mode 0, owner from tar);
- ``.wh..wh..opq``    → the directory gets ``trusted.overlay.opaque=y``, marker hidden;
- hard links share the target's inode (nlink counted), later tar entries replace earlier.
"""
from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from snapshotter.index.model import Entry, EntryType
from snapshotter.log import get_logger

log = get_logger("lazysnap.fs")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"

_TYPE_BITS = {
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.FIFO: stat.S_IFIFO,
}


@dataclass(slots=True)
class Node:
    """One inode of a layer. ``entry`` is the tar entry holding the data (regular files)."""

    local: int  # inode number inside the layer (root = 1)
    mode: int  # st_mode with type bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    entry: Entry | None = None
    target: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, int] | None = None  # name → local inode (directories only)
    parent: int = 1

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class LayerTree:
    """Inodes of one layer, numbered 1.. (1 is the layer root)."""

    def __init__(self) -> None:
        self.nodes: list[Node | None] = [None]  # index = local inode
        self.root = self._new(Node(0, stat.S_IFDIR | 0o755, children={}))
        self.by_path: dict[str, int] = {"": 1}
        self.total_size = 0
        self.files = 0
        self._listings: dict[int, list[tuple[bytes, int]]] = {}

    def _new(self, node: Node) -> Node:
        node.local = len(self.nodes)
        self.nodes.append(node)
        return node

    def listing(self, local: int) -> list[tuple[bytes, int]]:
        """(name, inode) of a directory, cached: readdir is called once per ~30 entries."""
        items = self._listings.get(local)
        if items is None:
            node = self.nodes[local]
            assert node is not None and node.children is not None
            items = self._listings[local] = list(node.children.items())
        return items

    def node(self, local: int) -> Node | None:
        if 0 < local < len(self.nodes):
            return self.nodes[local]
        return None

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, entries: Iterable[Entry]) -> LayerTree:
        tree = cls()
        links: list[Entry] = []
        for e in entries:
            if e.type == EntryType.HARDLINK:
                links.append(e)  # the on-disk order may put a link before its target
            else:
                tree._add(e)
        for e in links:
            tree._add(e)
        tree._finish()
        return tree

    def _dir(self, path: str) -> Node:
        """The directory at ``path``, creating implicit parents (tars may omit them)."""
        local = self.by_path.get(path)
        if local is not None:
            node = self.nodes[local]
            assert node is not None
            if node.is_dir:
                return node
        parent_path, _, name = path.rpartition("/")
        parent = self._dir(parent_path)
        node = self._new(Node(0, stat.S_IFDIR | 0o755, children={}, parent=parent.local))
        self._link(parent, name.encode(), node, path)
        return node

    def _link(self, parent: Node, name: bytes, node: Node, path: str) -> None:
        assert parent.children is not None
        old = parent.children.get(name)
        if old is not None and old != node.local:
            self._unlink_path(path, old)
        parent.children[name] = node.local
        self.by_path[path] = node.local

    def _unlink_path(self, path: str, local: int) -> None:
        old = self.nodes[local]
        if old is None:
            return
        old.nlink -= 1
        if old.is_dir:
            prefix = path + "/"
            for p in [p for p in self.by_path if p.startswith(prefix)]:
                del self.by_path[p]

    def _add(self, e: Entry) -> None:
        path = _norm(e.path)
        if path == "":
            if e.type == EntryType.DIR:
                self._set_attrs(self.root, e)
            return
        parent_path, _, name = path.rpartition("/")
        parent = self._dir(parent_path)
        if name == OPAQUE_MARKER:
            parent.xattrs[OPAQUE_XATTR] = b"y"
            return
        if name.startswith(WHITEOUT_PREFIX):
            real = name[len(WHITEOUT_PREFIX):]
            node = self._new(Node(0, stat.S_IFCHR, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns,
                                  rdev=0, parent=parent.local))
            self._link(parent, real.encode(), node, f"{parent_path}/{real}" if parent_path else real)
            return
        if e.type == EntryType.DIR:
            local = self.by_path.get(path)
            node = self.nodes[local] if local is not None else None
            if node is None or not node.is_dir:
                node = self._new(Node(0, stat.S_IFDIR, children={}, parent=parent.local))
                self._link(parent, name.encode(), node, path)
            self._set_attrs(node, e)
            return
        if e.type == EntryType.HARDLINK:
            target_local = self.by_path.get(_norm(e.linkname))
            target = self.nodes[target_local] if target_local is not None else None
            if target is None or target.is_dir:
                log.warning("hardlink_target_missing", path=path, target=e.linkname, action="skip")
                return
            if self.by_path.get(path) == target.local:
                return
            target.nlink += 1
            self._link(parent, name.encode(), target, path)
            return
        node = self._new(Node(0, _TYPE_BITS[e.type], parent=parent.local))
        self._set_attrs(node, e)
        if e.type == EntryType.REG:
            node.entry = e
            node.size = e.size
            self.total_size += e.size
            self.files += 1
        elif e.type == EntryType.SYMLINK:
            node.mode = stat.S_IFLNK | 0o777  # Linux symlinks have no mode of their own
            node.target = e.linkname.encode()
            node.size = len(node.target)
        elif e.type in (EntryType.CHAR, EntryType.BLOCK):
            node.rdev = _makedev(e.devmajor, e.devminor)
        self._link(parent, name.encode(), node, path)

    @staticmethod
    def _set_attrs(node: Node, e: Entry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
        node.uid, node.gid, node.mtime_ns = e.uid, e.gid, e.mtime_ns
        opaque = node.xattrs.get(OPAQUE_XATTR)
        # containerd's applier refuses trusted.* xattrs from a layer (trusted.overlay.* would
        # steer overlayfs); only the .wh..wh..opq marker may make a directory opaque
        node.xattrs = {k.encode(): v for k, v in e.xattrs.items() if not k.startswith("trusted.")}
        if opaque is not None:
            node.xattrs[OPAQUE_XATTR] = opaque

    def _finish(self) -> None:
        """Directory nlink = 2 + subdirectories; sizes as ext4 shows them."""
        for node in self.nodes[1:]:
            if node is not None and node.children is not None:
                node.size = 4096
                node.nlink = 2
        for node in self.nodes[1:]:
            if node is not None and node.children is not None:
                for local in node.children.values():
                    child = self.nodes[local]
                    if child is not None and child.is_dir:
                        node.nlink += 1


def _norm(path: str) -> str:
    while path.startswith("./"):
        path = path[2:]
    path = path.strip("/")
    return "" if path == "." else path


def _makedev(major: int, minor: int) -> int:
    import os

    return os.makedev(major, minor)
