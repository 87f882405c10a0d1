"""``LayerTree.build`` (inlined fast path) gives exactly the tree of a plain reference
builder that applies the tar → overlayfs rules one entry at a time, node for node (inode
numbers, modes, owners, sizes, nlink, xattrs, children, parents), on random entry streams
full of the awkward cases: whiteouts, opaque markers, replaced entries of every type,
directories replaced by files and back, implicit parents, hard links before their
targets, trusted.* xattrs, unnormalised paths. Also ``IndexFile.entries`` (inlined record
decoding) against ``entry_at`` record by record on indexes with every entry kind.
"""
from __future__ import annotations

import gc
import logging
import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.fs.compiled import HEADER, NODE, build_compiled, compile_tree
from snapshotter.fs.tree import OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX, LayerTree, Node
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.format import IndexFile, write_index
from snapshotter.index.layerindex import LayerIndex
from snapshotter.index.model import Chunk, Entry, EntryType, LayerFormat, LayerInfo

_BITS = {EntryType.REG: stat.S_IFREG, EntryType.SYMLINK: stat.S_IFLNK, EntryType.CHAR: stat.S_IFCHR,
         EntryType.BLOCK: stat.S_IFBLK, EntryType.DIR: stat.S_IFDIR, EntryType.FIFO: stat.S_IFIFO}


def _norm(path: str) -> str:
    while path.startswith("./"):
        path = path[2:]
    path = path.strip("/")
    return "" if path == "." else path


class RefTree:
    """The rules spelled out plainly (the pre-optimisation builder): one call per entry."""

    def __init__(self) -> None:
        self.nodes: list[Node | None] = [None, Node(1, stat.S_IFDIR | 0o755, children={})]
        self.by_path: dict[str, int] = {"": 1}
        self.files = self.total_size = 0

    def new(self, node: Node) -> Node:
        node.local = len(self.nodes)
        self.nodes.append(node)
        return node

    def dir(self, path: str) -> Node:
        local = self.by_path.get(path)
        if local is not None and self.nodes[local].children is not None:  # type: ignore[union-attr]
            return self.nodes[local]  # type: ignore[return-value]
        parent_path, _, name = path.rpartition("/")
        parent = self.dir(parent_path)
        node = self.new(Node(0, stat.S_IFDIR | 0o755, children={}, parent=parent.local))
        self.link(parent, name, node, path)
        return node

    def link(self, parent: Node, name: str, node: Node, path: str) -> None:
        assert parent.children is not None
        key = name.encode("utf-8", "surrogateescape")
        old = parent.children.get(key)
        if old is not None and old != node.local:
            gone = self.nodes[old]
            assert gone is not None
            gone.nlink -= 1
            if gone.children is not None:
                for p in [p for p in self.by_path if p.startswith(path + "/")]:
                    del self.by_path[p]
        parent.children[key] = node.local
        self.by_path[path] = node.local

    @staticmethod
    def attrs(node: Node, e: Entry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
        node.uid, node.gid, node.mtime_ns = e.uid, e.gid, e.mtime_ns
        opaque = node.xattrs.get(OPAQUE_XATTR)
        node.xattrs = {k.encode(): v for k, v in e.xattrs.items() if not k.startswith("trusted.")}
        if opaque is not None:
            node.xattrs[OPAQUE_XATTR] = opaque

    def add(self, e: Entry) -> None:
        path = _norm(e.path)
        if path == "":
            if e.type == EntryType.DIR:
                self.attrs(self.nodes[1], e)  # type: ignore[arg-type]
            return
        parent_path, _, name = path.rpartition("/")
        parent = self.dir(parent_path)
        if name == OPAQUE_MARKER:
            parent.xattrs[OPAQUE_XATTR] = b"y"
        elif name.startswith(WHITEOUT_PREFIX):
            real = name[len(WHITEOUT_PREFIX):]
            node = self.new(Node(0, stat.S_IFCHR, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, parent=parent.local))
            self.link(parent, real, node, f"{parent_path}/{real}" if parent_path else real)
        elif e.type == EntryType.DIR:
            local = self.by_path.get(path)
            node = self.nodes[local] if local is not None else None  # type: ignore[assignment]
            if node is None or node.children is None:
                node = self.new(Node(0, stat.S_IFDIR, children={}, parent=parent.local))
                self.link(parent, name, node, path)
            self.attrs(node, e)
        elif e.type == EntryType.HARDLINK:
            local = self.by_path.get(_norm(e.linkname))
            target = self.nodes[local] if local is not None else None
            if target is None or target.children is not None or self.by_path.get(path) == target.local:
                return
            target.nlink += 1
            self.link(parent, name, target, path)
        else:
            node = self.new(Node(0, _BITS[e.type], parent=parent.local))
            self.attrs(node, e)
            if e.type == EntryType.REG:
                node.entry, node.size = e, e.size
                self.total_size += e.size
                self.files += 1
            elif e.type == EntryType.SYMLINK:
                node.mode = stat.S_IFLNK | 0o777
                node.target = e.linkname.encode()
                node.size = len(node.target)
            elif e.type in (EntryType.CHAR, EntryType.BLOCK):
                node.rdev = os.makedev(e.devmajor, e.devminor)
            self.link(parent, name, node, path)

    @classmethod
    def build(cls, entries: list[Entry]) -> RefTree:
        tree = cls()
        for e in [e for e in entries if e.type != EntryType.HARDLINK]:
            tree.add(e)
        for e in [e for e in entries if e.type == EntryType.HARDLINK]:
            tree.add(e)
        for node in tree.nodes[1:]:
            if node is not None and node.children is not None:
                node.size = 4096
                node.nlink = 2 + sum(1 for c in node.children.values() if tree.nodes[c].children is not None)  # type: ignore[union-attr]
        return tree


def _state(tree: LayerTree | RefTree) -> tuple[object, ...]:
    nodes = [(n.local, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev, n.nlink, n.entry, n.target,
              n.xattrs, n.children, n.parent) for n in tree.nodes[1:] if n is not None]
    return nodes, tree.files, tree.total_size


_NAMES = ["a", "b", "c", "ü", ".wh.a", ".wh.b", ".wh.c", OPAQUE_MARKER]
_TYPES = [EntryType.REG, EntryType.REG, EntryType.DIR, EntryType.DIR, EntryType.SYMLINK, EntryType.HARDLINK,
          EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO]


@st.composite
def _entries(draw: st.DrawFn) -> list[Entry]:
    out = []
    for _ in range(draw(st.integers(0, 40))):
        parts = draw(st.lists(st.sampled_from(_NAMES), min_size=0, max_size=3))
        path = "/".join(parts)
        path = draw(st.sampled_from(["", "./", "/"])) + path + draw(st.sampled_from(["", "", "/"]))
        t = draw(st.sampled_from(_TYPES))
        link = "/".join(draw(st.lists(st.sampled_from(_NAMES[:4]), min_size=1, max_size=3)))
        xattrs = draw(st.sampled_from([{}, {}, {"user.k": b"v"}, {"trusted.overlay.opaque": b"y", "user.x": b""}]))
        out.append(Entry(path=path, type=t, mode=draw(st.integers(0, 0o7777)), uid=draw(st.integers(0, 3)),
                         gid=draw(st.integers(0, 3)), size=draw(st.integers(0, 5)) if t == EntryType.REG else 0,
                         mtime_ns=draw(st.integers(0, 10)),
                         linkname=link if t in (EntryType.SYMLINK, EntryType.HARDLINK) else "",
                         devmajor=draw(st.integers(0, 9)), devminor=draw(st.integers(0, 9)), xattrs=xattrs))
    return out


@settings(max_examples=400, deadline=None)
@given(_entries())
def test_build_matches_reference(entries: list[Entry]) -> None:
    assert _state(LayerTree.build(entries)) == _state(RefTree.build(entries))


def test_build_restores_the_collector() -> None:
    assert gc.isenabled()
    LayerTree.build([Entry(path="x", type=EntryType.REG, mode=0o644, uid=0, gid=0, size=1, mtime_ns=0)])
    assert gc.isenabled()
    gc.disable()
    try:
        LayerTree.build([])
        assert not gc.isenabled()  # not ours to turn on
    finally:
        gc.enable()


def test_names_that_are_not_utf8_keep_their_bytes() -> None:
    """The index decodes names with surrogateescape; the tree must give the kernel the tar's bytes."""
    raw = b"caf\xe9"  # Latin-1, not UTF-8
    name = raw.decode("utf-8", "surrogateescape")
    tree = LayerTree.build([
        Entry(path=f"d/{name}", type=EntryType.REG, mode=0o644, uid=0, gid=0, size=3, mtime_ns=0),
        Entry(path=f"d/l-{name}", type=EntryType.SYMLINK, mode=0o777, uid=0, gid=0, size=0, mtime_ns=0,
              linkname=name),
        Entry(path=f"d/.wh.{name}x", type=EntryType.REG, mode=0o644, uid=0, gid=0, size=0, mtime_ns=0),
    ])
    d = tree.nodes[tree.root.children[b"d"]]  # type: ignore[index]
    assert d is not None and d.children is not None
    assert set(d.children) == {raw, b"l-" + raw, raw + b"x"}
    assert tree.nodes[d.children[b"l-" + raw]].target == raw  # type: ignore[union-attr]


def _index(entries: list[Entry], chunks: int) -> LayerIndex:
    info = LayerInfo(format=LayerFormat.GZIP, compressed_size=1, uncompressed_size=1 << 20,
                     blob_digest="sha256:" + "ab" * 32, diff_id=None, chunk_size=4096, span_size=1 << 20,
                     sequential_only=False)
    return LayerIndex(info=info, entries=entries, chunks=[Chunk(i * 4096, 4096, bytes([i % 256]) * 32)
                                                          for i in range(chunks)], checkpoints=[], marks=[])


def test_entries_match_entry_at(tmp_path: Path) -> None:
    """Record blocks of 256: 700 entries of every kind, with and without extras."""
    e: list[Entry] = [Entry(path="", type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=1)]
    for d in range(5):
        e.append(Entry(path=f"d{d}", type=EntryType.DIR, mode=0o750, uid=d, gid=d, size=0, mtime_ns=d,
                       xattrs={"user.d": b"1"} if d == 2 else {}))
        for i in range(140):
            p = f"d{d}/f{i:03d}-ü"
            k = i % 7
            if k == 0:
                e.append(Entry(path=p, type=EntryType.SYMLINK, mode=0o777, uid=1, gid=2, size=0, mtime_ns=i,
                               linkname=f"../target-{i}"))
            elif k == 1:
                e.append(Entry(path=p, type=EntryType.HARDLINK, mode=0o644, uid=1, gid=2, size=0, mtime_ns=i,
                               linkname=f"d{d}/f{i + 1:03d}-ü"))
            elif k == 3:
                e.append(Entry(path=p, type=EntryType.CHAR, mode=0o600, uid=0, gid=0, size=0, mtime_ns=i,
                               devmajor=1, devminor=i))
            elif k == 4:
                e.append(Entry(path=p, type=EntryType.FIFO, mode=0o600, uid=0, gid=0, size=0, mtime_ns=i))
            else:
                e.append(Entry(path=p, type=EntryType.REG, mode=0o644, uid=3, gid=4, size=4096, mtime_ns=i,
                               data_offset=4096 * i, first_chunk=(d * 140 + i) % 9, chunk_count=1,
                               xattrs={"user.x": b"y"} if k == 5 else {},
                               sparse=((0, 4096),) if i == 6 else None))
    path = tmp_path / "all.idx"
    write_index(path, _index(e, 10))
    with IndexFile.open(path) as idx:
        got = list(idx.entries())
    with IndexFile.open(path) as idx:  # a fresh reader: no directory path cached
        want = [idx.entry_at(n) for n in range(idx.entry_count)]
    assert got == want
    assert sorted(got, key=lambda x: x.path) == sorted(e, key=lambda x: x.path)
    assert all(type(x.type) is EntryType for x in got)


# -- the C builder (native/fuse/treebuild.c) against LayerTree + compile_tree ---------------------

_REAL = ["a", "b", "ü", "caf\udce9", "lib", "x.so"]  # the last but two: a non-UTF-8 byte, kept
_GONE = ["old", "stale"]  # whiteout targets that no real entry uses


def _masked(blob: bytes) -> bytes:
    """The blob without the node field only the C builder fills (a file's record + 1)."""
    out = bytearray(blob)
    for local in range(HEADER.get(out, 0, "n_nodes")):
        struct.pack_into("<I", out, HEADER.size + local * NODE.size + NODE.offset("record"), 0)
    return bytes(out)


def _reference(idx: IndexFile) -> tuple[bytes, LayerTree]:
    tree = LayerTree.build(idx.entries())
    return compile_tree(tree), tree


@st.composite
def _layer(draw: st.DrawFn) -> tuple[list[Entry], bool]:
    """A valid index's entries, and whether the C builder must leave it to Python."""
    entries = [Entry(path="", type=EntryType.DIR, mode=draw(st.integers(0, 0o7777)), uid=1, gid=2, size=0,
                     mtime_ns=draw(st.integers(-5, 5)), xattrs=draw(st.sampled_from([{}, {"user.r": b"1"}])))]
    dirs = [""]
    names: dict[str, set[str]] = {"": set()}
    data: list[str] = []
    odd = False  # a whiteout beside its name, or entries under a whiteout or opaque marker
    for _ in range(draw(st.integers(0, 30))):
        parent = draw(st.sampled_from(dirs))
        kind = draw(st.sampled_from(["reg", "reg", "dir", "dir", "sym", "dev", "fifo", "wh", "opq", "link"]))
        if kind == "wh":
            name = ".wh." + draw(st.sampled_from(_GONE + _REAL[:1]))
        elif kind == "opq":
            name = OPAQUE_MARKER
        else:
            name = draw(st.sampled_from(_REAL))
        if name in names[parent] or (kind == "link" and not data):
            continue
        names[parent].add(name)
        path = f"{parent}/{name}" if parent else name
        if name.startswith(WHITEOUT_PREFIX) and name[4:] in names[parent] or (
                not name.startswith(WHITEOUT_PREFIX) and WHITEOUT_PREFIX + name in names[parent]):
            odd = True
        if any(part.startswith(WHITEOUT_PREFIX) for part in parent.split("/")):
            odd = True
        x = draw(st.sampled_from([{}, {}, {"user.k": b"v"}, {"trusted.overlay.opaque": b"y", "user.x": b""},
                                  {"security.capability": b"\x01\x02", "user.a": b"b"}]))
        common = dict(path=path, mode=draw(st.integers(0, 0o7777)), uid=draw(st.integers(0, 3)),
                      gid=draw(st.integers(0, 3)), mtime_ns=draw(st.integers(0, 10**18)), xattrs=x)
        if kind in ("dir",) or (kind in ("wh", "opq") and draw(st.booleans())):
            entries.append(Entry(type=EntryType.DIR, size=0, **common))  # type: ignore[arg-type]
            if not name.startswith(WHITEOUT_PREFIX):
                dirs.append(path)
                names[path] = set()
        elif kind == "sym":
            entries.append(Entry(type=EntryType.SYMLINK, size=0, linkname=draw(st.sampled_from(["", "a", "../x/ü"])),
                                 **common))  # type: ignore[arg-type]
            data.append(path)
        elif kind == "dev":
            entries.append(Entry(type=draw(st.sampled_from([EntryType.CHAR, EntryType.BLOCK])), size=0,
                                 devmajor=draw(st.integers(0, 4095)), devminor=draw(st.integers(0, 1 << 20)),
                                 **common))  # type: ignore[arg-type]
            data.append(path)
        elif kind == "fifo":
            entries.append(Entry(type=EntryType.FIFO, size=0, **common))  # type: ignore[arg-type]
            data.append(path)
        elif kind == "link":
            target = draw(st.sampled_from(data))
            if target.rpartition("/")[2].startswith(WHITEOUT_PREFIX):
                odd = True
            entries.append(Entry(type=EntryType.HARDLINK, size=0, linkname=target, **common))  # type: ignore[arg-type]
        else:
            first = draw(st.integers(0, 6))
            sparse = draw(st.sampled_from([None, None, (), ((0, 10), (100, 5))]))
            entries.append(Entry(type=EntryType.REG, size=draw(st.integers(0, 4 * 4096)), first_chunk=first,
                                 chunk_count=draw(st.integers(0, 8 - first)), sparse=sparse,
                                 **common))  # type: ignore[arg-type]
            data.append(path)
    return entries, odd


@settings(max_examples=300, deadline=None)
@given(_layer())
def test_c_builder_matches_layertree(tmp_path_factory, layer: tuple[list[Entry], bool]) -> None:
    entries, odd = layer
    path = tmp_path_factory.mktemp("idx") / "l.idx"
    write_index(path, _index(entries, 8))
    with IndexFile.open(path) as idx:
        want, tree = _reference(idx)
        try:
            got = build_compiled(idx)
        except NotImplementedError:
            assert odd, "declined a layer it should build"
            return
        assert not odd, "built a layer it should leave to LayerTree"
        assert _masked(got.blob) == want
        assert (got.files, got.total_size, got.inodes) == (tree.files, tree.total_size, tree.inodes)
        for local in range(1, tree.inodes + 1):
            assert got.entry(local) == tree.entry(local)


def _corrupted_blocks(idx: IndexFile, blocks: list[bytes]) -> None:
    """Make ``idx`` read these decompressed entry blocks (both builders read through these)."""
    idx._blocks_from = lambda first, count: blocks[first:first + count]  # type: ignore[method-assign]
    idx._block = lambda b: blocks[b]  # type: ignore[method-assign]


@settings(max_examples=300, deadline=None)
@given(_layer(), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6))
def test_c_builder_on_corrupt_records(tmp_path_factory, layer: tuple[list[Entry], bool],
                                      flips: list[tuple[int, int]]) -> None:
    """Whatever a damaged index holds, the C builder either refuses it (as Python does) or
    builds exactly what LayerTree builds from the same records: never a third tree."""
    path = tmp_path_factory.mktemp("idx") / "l.idx"
    write_index(path, _index(layer[0], 8))
    with IndexFile.open(path) as idx:
        blocks = [bytearray(b) for b in idx.entry_blocks()]
        for pos, value in flips:
            blk = blocks[pos % len(blocks)]
            blk[pos % len(blk)] = value
        _corrupted_blocks(idx, [bytes(b) for b in blocks])
        try:
            got = build_compiled(idx)
        except NotImplementedError:
            return
        except IndexFormatError:
            with pytest.raises(IndexFormatError):
                _reference(idx)
            return
        want, tree = _reference(idx)
        assert _masked(got.blob) == want
        assert (got.files, got.total_size) == (tree.files, tree.total_size)


def test_c_builder_takes_a_rich_layer_and_finds_entries(tmp_path: Path) -> None:
    """Every kind the daemon meets in real images is built in C, not left to Python."""
    e = [Entry(path="", type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=1),
         Entry(path="etc", type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=2,
               xattrs={"trusted.overlay.opaque": b"y", "user.t": b"1"}),
         Entry(path="etc/.wh..wh..opq", type=EntryType.REG, mode=0, uid=0, gid=0, size=0, mtime_ns=0),
         Entry(path="etc/.wh.passwd-", type=EntryType.REG, mode=0, uid=5, gid=6, size=0, mtime_ns=3),
         Entry(path="etc/hosts", type=EntryType.REG, mode=0o644, uid=0, gid=0, size=10, mtime_ns=4,
               first_chunk=0, chunk_count=1),
         Entry(path="etc/hosts.link", type=EntryType.HARDLINK, mode=0o644, uid=0, gid=0, size=0, mtime_ns=4,
               linkname="etc/hosts"),
         Entry(path="etc/sparse", type=EntryType.REG, mode=0o600, uid=0, gid=0, size=9000, mtime_ns=4,
               first_chunk=1, chunk_count=1, sparse=((0, 10), (8990, 10))),
         Entry(path="lib", type=EntryType.SYMLINK, mode=0o777, uid=0, gid=0, size=0, mtime_ns=5,
               linkname="usr/lib"),
         Entry(path="dev", type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=6),
         Entry(path="dev/null", type=EntryType.CHAR, mode=0o666, uid=0, gid=0, size=0, mtime_ns=6,
               devmajor=1, devminor=3),
         Entry(path="dev/fifo", type=EntryType.FIFO, mode=0o600, uid=0, gid=0, size=0, mtime_ns=6)]
    write_index(tmp_path / "r.idx", _index(e, 2))
    with IndexFile.open(tmp_path / "r.idx") as idx:
        got = build_compiled(idx)
        want, tree = _reference(idx)
        assert _masked(got.blob) == want
        assert got.blob != want  # the entry field is filled
        assert got.files == 2 and got.total_size == 9010
        hosts = tree.by_path["etc/hosts"]
        assert tree.by_path["etc/hosts.link"] == hosts
        assert got.entry(hosts).path == "etc/hosts"  # type: ignore[union-attr]
        assert got.entry(tree.by_path["etc/sparse"]).sparse == ((0, 10), (8990, 10))  # type: ignore[union-attr]
        assert got.entry(tree.by_path["lib"]) is None and got.entry(0) is None and got.entry(10**6) is None


def test_provider_falls_back_to_layertree_for_a_declined_layer(tmp_path: Path, caplog) -> None:
    """A whiteout beside the name it hides (legal in a tar, odd in a layer): the daemon
    builds that layer with LayerTree, logs why, and serves the same blob format."""
    from snapshotter.layers.provider import _build_tree

    caplog.set_level(logging.INFO)
    e = [Entry(path="", type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=1),
         Entry(path=".wh.a", type=EntryType.REG, mode=0, uid=0, gid=0, size=0, mtime_ns=1),
         Entry(path="a", type=EntryType.REG, mode=0o644, uid=0, gid=0, size=3, mtime_ns=1, first_chunk=0,
               chunk_count=1)]
    write_index(tmp_path / "w.idx", _index(e, 1))
    with IndexFile.open(tmp_path / "w.idx") as idx:
        with pytest.raises(NotImplementedError, match="twice"):
            build_compiled(idx)
        tree, blob = _build_tree(idx, "sha256:" + "cd" * 32)
        assert isinstance(tree, LayerTree) and blob == compile_tree(tree)
        assert set(tree.root.children or ()) == {b"a"}  # the later entry wins, as in containerd's applier
    logged = [r for r in caplog.records if r.getMessage() == "layer_tree_python"]
    assert logged and "twice" in str(logged[0].fields["reason"])  # type: ignore[attr-defined]
