"""Scan result → :class:`LayerIndex`: the tar semantics of applying one layer.

The scanner (C ``native.Scanner``; the tests' pure-Python oracle alike) reports raw tar
entries in stream order. Here they become the tree a container would see after containerd
applied the layer:

* Paths are cleaned like containerd's applier (``filepath.Clean``): leading "/" and "./"
  are stripped, "a/./b" and "a//b" collapse, "a/../b" resolves lexically.
* **Escaping entries are rejected** (``IndexBuildError``), as are hard links whose target
  escapes: containerd would clamp "../x" to "x" at the root, but such a layer is hostile
  or broken, and refusing to index it makes the snapshotter fall back to containerd's own
  applier, which then treats it exactly as it always has. Link targets are data: a
  symlink to "/etc/passwd" stays a symlink with that target, never resolved.
* Later entries replace earlier ones at the same path (tar semantics); a non-directory
  replacing a directory removes that directory's subtree; a directory replacing a
  directory only updates its attributes.
* Missing parent directories are synthesised (mode 0755, uid/gid 0, mtime 0); a path
  below a non-directory is an error.
* A hard link must name an existing non-directory entry (chains are followed to the
  first entry holding the data); if that entry is later replaced, the link keeps the old
  content, as it would on disk.

:func:`index_file_bytes` and :func:`index_stream_bytes` feed a scanner and return the serialized
index, built in C where it can be (:func:`index_bytes`); :func:`index_file` returns the
reference's ``LayerIndex``.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshotter.index.decompress import detect_format
from snapshotter.index.errors import IndexBuildError, TruncatedLayerError
from snapshotter.index.layerindex import LayerIndex
from snapshotter.index.model import (
    CHUNK_RECORD,
    MARK_RECORD,
    Checkpoint,
    CheckpointKind,
    Chunk,
    Entry,
    EntryType,
    LayerFormat,
    LayerInfo,
)
from snapshotter.native import LayerFileTarget, Scanner

log = logging.getLogger(__name__)

#: Takes in what a scan stored (``ScanResult.stored``, ``store_errno``): ChunkStore.adopt_layer_file
StoredHook = Callable[[bytes, int], object]

DEFAULT_SPAN = 4 << 20
DEFAULT_CHUNK = 1 << 20
READ_SIZE = 1 << 20
_U32 = (1 << 32) - 1


def make_scanner(*, span: int = DEFAULT_SPAN, chunk_size: int = DEFAULT_CHUNK, diff_id: bool = False,
                 format: str | None = None, layer_file: LayerFileTarget | None = None,
                 build_index: bool = False) -> Scanner:
    """The C scanner (``native.Scanner``) with this module's span and chunk size."""
    return Scanner(span_size=span, chunk_size=chunk_size, diff_id=diff_id, format=format,
                   layer_file=layer_file, build_index=build_index)


def clean_path(raw: bytes | str, *, what: str = "entry") -> str:
    """Normalise a tar path to the layer-relative form of ``Entry.path`` ("" is the root).

    Raises IndexBuildError when ".." climbs above the root.
    """
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    if (text and text[0] not in "/." and text[-1] != "/" and "//" not in text and "/." not in text
            and "\0" not in text):
        return text  # already clean: the common case, kept cheap for 500k-entry layers
    if "\0" in text:
        raise IndexBuildError(f"{what} path {text!r} contains a NUL byte")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise IndexBuildError(f"{what} path {text!r} escapes the layer root")
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


@dataclass(slots=True, eq=False)
class _Node:
    path: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data_offset: int = 0
    first_chunk: int = 0
    chunk_count: int = 0
    sparse: tuple[tuple[int, int], ...] | None = None
    target: _Node | None = None  # hard links: the node holding the data


def _synth_dir(path: str) -> _Node:
    return _Node(path=path, type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=0)


class _Tree:
    """Path → node with per-directory child sets, applying entries in tar order."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {"": _synth_dir("")}
        self.kids: dict[str, set[str]] = {"": set()}

    def _ensure_parents(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent in self.nodes:
            node = self.nodes[parent]
            if node.type != EntryType.DIR:
                raise IndexBuildError(f"{path!r}: parent {parent!r} is not a directory ({node.type.name.lower()})")
            return
        self._ensure_parents(parent)
        self.nodes[parent] = _synth_dir(parent)
        self.kids[parent] = set()
        self.kids[parent.rpartition("/")[0]].add(parent)

    def _remove_subtree(self, path: str) -> None:
        for child in self.kids.pop(path, ()):
            self._remove_subtree(child)
            del self.nodes[child]

    def put(self, node: _Node) -> None:
        path = node.path
        if path == "":
            if node.type != EntryType.DIR:
                raise IndexBuildError(f"the layer root entry is a {node.type.name.lower()}, not a directory")
            self.nodes[""] = node
            return
        self._ensure_parents(path)
        old = self.nodes.get(path)
        if old is not None and old.type == EntryType.DIR and node.type != EntryType.DIR:
            self._remove_subtree(path)
        if old is not None and old.type == EntryType.DIR and node.type == EntryType.DIR:
            node.xattrs = {**old.xattrs, **node.xattrs}  # a directory entry merges into the existing one
        self.nodes[path] = node
        if node.type == EntryType.DIR:
            self.kids.setdefault(path, set())
        self.kids[path.rpartition("/")[0]].add(path)


_LIMITS = {"uid": _U32, "gid": _U32, "devmajor": _U32, "devminor": _U32, "size": (1 << 63) - 1,
           "stored_size": (1 << 63) - 1, "data_offset": (1 << 63) - 1}


def _check_ranges(path: str, *, mtime_ns: int, **fields: int) -> None:
    """Header numbers must fit the index's fixed-width records (and make sense)."""
    for name, value in fields.items():
        if not 0 <= value <= _LIMITS[name]:
            raise IndexBuildError(f"{path!r}: {name} {value} out of range")
    if not -(1 << 63) <= mtime_ns < (1 << 63):
        raise IndexBuildError(f"{path!r}: mtime out of range")


def _field(scan: Any, key: str, default: Any = None) -> Any:
    """Scan results come as a ``native.ScanResult`` dataclass, or a dict (the tests' oracle)."""
    if isinstance(scan, Mapping):
        return scan.get(key, default)
    return getattr(scan, key, default)


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else bytes(v)


def build_index(scan: Any, *, span_size: int = DEFAULT_SPAN, chunk_size: int | None = None) -> LayerIndex:
    """Apply the scanned entries (tar order) and return the layer's complete tree.

    ``chunk_size`` must be the one the scanner chunked with (readers map file offsets
    to chunks with it); None infers it from the chunk table. Either way every file's
    chunks are checked against it, so a wrong value is an error here, not at read time.
    """
    raw_chunks = _as_bytes(_field(scan, "chunks"))
    tree = _Tree()
    for raw in _field(scan, "entries"):
        (rpath, etype, mode, uid, gid, size, mtime_ns, rlink, devmajor, devminor, xattrs,
         data_offset, stored_size, first_chunk, chunk_count, sparse) = raw
        etype = EntryType(etype)
        path = clean_path(rpath)
        _check_ranges(path, uid=uid, gid=gid, devmajor=devmajor, devminor=devminor, size=size,
                      stored_size=stored_size, data_offset=data_offset, mtime_ns=mtime_ns)
        node = _Node(
            path=path, type=etype, mode=mode & 0o7777, uid=uid, gid=gid, size=size, mtime_ns=mtime_ns,
            linkname=rlink.decode("utf-8", "surrogateescape") if isinstance(rlink, bytes) else str(rlink),
            devmajor=devmajor, devminor=devminor,
            xattrs={str(k): _as_bytes(v) for k, v in (xattrs or {}).items()},
            data_offset=data_offset if etype == EntryType.REG else 0,
            first_chunk=first_chunk if etype == EntryType.REG else 0,
            chunk_count=chunk_count if etype == EntryType.REG else 0,
            sparse=tuple((int(o), int(n)) for o, n in sparse) if sparse is not None and etype == EntryType.REG else None,
        )
        if any("\0" in k for k in node.xattrs) or "\0" in node.linkname:
            raise IndexBuildError(f"{path!r}: NUL byte in an xattr name or link target")
        if etype == EntryType.REG and sparse is None and size != stored_size:
            raise IndexBuildError(f"{path!r}: stored size {stored_size} differs from size {size}")
        if etype == EntryType.HARDLINK:
            target_path = clean_path(rlink, what=f"hard link {path!r} target")
            target = tree.nodes.get(target_path)
            if target is None or target_path == "":
                raise IndexBuildError(f"hard link {path!r} points to missing entry {target_path!r}")
            while target.type == EntryType.HARDLINK and target.target is not None:
                target = target.target
            if target.type == EntryType.DIR:
                raise IndexBuildError(f"hard link {path!r} points to directory {target_path!r}")
            if target is node:
                raise IndexBuildError(f"hard link {path!r} points to itself")
            node.target = target
            node.size = 0
            _apply_link_header(target, node)
        tree.put(node)
    _promote_orphan_link_targets(tree)
    chunks = _renumber_chunks(tree, raw_chunks)
    chunk_size = _check_chunking(tree, chunks, chunk_size)
    entries = [_entry(n) for n in tree.nodes.values()]
    return LayerIndex(info=_info(scan, span_size, chunk_size), entries=entries, chunks=chunks,
                      checkpoints=[_checkpoint(c) for c in _field(scan, "checkpoints")], marks=_marks(scan))


def _apply_link_header(target: _Node, link: _Node) -> None:
    """containerd's applier links, then chowns, sets xattrs, chmods and chtimes the link
    path: the shared inode takes the link header's owners, mode, mtime and xattrs."""
    target.uid, target.gid, target.mtime_ns = link.uid, link.gid, link.mtime_ns
    if target.type != EntryType.SYMLINK:
        target.mode = link.mode
    target.xattrs = {**target.xattrs, **link.xattrs}


def _promote_orphan_link_targets(tree: _Tree) -> None:
    """A link whose target path was later replaced keeps the old data: the first such link
    becomes the entry holding it, the others link to that one."""
    live = {id(n) for n in tree.nodes.values()}
    promoted: dict[int, _Node] = {}
    for path, node in list(tree.nodes.items()):
        if node.type != EntryType.HARDLINK or node.target is None or id(node.target) in live:
            continue
        old = node.target
        if id(old) in promoted:
            node.target = promoted[id(old)]
            continue
        heir = _Node(path=path, type=old.type, mode=old.mode, uid=old.uid, gid=old.gid, size=old.size,
                     mtime_ns=old.mtime_ns, linkname=old.linkname, devmajor=old.devmajor,
                     devminor=old.devminor, xattrs=old.xattrs, data_offset=old.data_offset,
                     first_chunk=old.first_chunk, chunk_count=old.chunk_count, sparse=old.sparse)
        tree.nodes[path] = heir
        promoted[id(old)] = heir
    for node in tree.nodes.values():
        if node.type == EntryType.HARDLINK and node.target is not None:
            node.linkname = node.target.path


def _renumber_chunks(tree: _Tree, raw: bytes) -> list[Chunk]:
    """Keep only chunks of live entries, in stream order, and renumber entries' ranges."""
    total = len(raw) // CHUNK_RECORD.size
    files = sorted((n for n in tree.nodes.values() if n.type == EntryType.REG and n.chunk_count),
                   key=lambda n: n.first_chunk)
    chunks: list[Chunk] = []
    for node in files:
        if node.first_chunk + node.chunk_count > total:
            raise IndexBuildError(f"{node.path!r}: chunk range beyond the scanner's chunk table")
        first = len(chunks)
        for i in range(node.first_chunk, node.first_chunk + node.chunk_count):
            off, length, digest = CHUNK_RECORD.unpack_from(raw, i * CHUNK_RECORD.size)
            chunks.append(Chunk(off, length, digest))
        node.first_chunk = first
    for node in tree.nodes.values():
        if node.type == EntryType.REG and not node.chunk_count:
            node.first_chunk = len(chunks)
    return chunks


def _check_chunking(tree: _Tree, chunks: list[Chunk], chunk_size: int | None) -> int:
    """Chunk k of a file must cover stored bytes [k*cs, min((k+1)*cs, stored))."""
    files = [n for n in tree.nodes.values() if n.type == EntryType.REG]
    if chunk_size is None:
        multi = [chunks[n.first_chunk].length for n in files if n.chunk_count > 1]
        if chunk_size is not None and chunk_size <= 0:
            raise IndexBuildError(f"invalid chunk size {chunk_size}")
        longest = max((c.length for c in chunks), default=0)
        chunk_size = multi[0] if multi else max(DEFAULT_CHUNK, longest)
    for n in files:
        stored = sum(length for _, length in n.sparse) if n.sparse is not None else n.size
        for k in range(n.chunk_count):
            c = chunks[n.first_chunk + k]
            want = min(chunk_size, stored - k * chunk_size)
            if c.uncompressed_offset != n.data_offset + k * chunk_size or c.length != want:
                raise IndexBuildError(f"{n.path!r}: chunk {k} does not match chunk size {chunk_size} "
                                      f"(offset {c.uncompressed_offset}, length {c.length})")
        if stored == 0 and n.chunk_count == 0:
            continue
        if n.chunk_count * chunk_size < stored or (n.chunk_count - 1) * chunk_size >= max(stored, 1):
            raise IndexBuildError(f"{n.path!r}: {n.chunk_count} chunks do not cover {stored} bytes")
    return chunk_size


def _entry(n: _Node) -> Entry:
    return Entry(path=n.path, type=n.type, mode=n.mode, uid=n.uid, gid=n.gid, size=n.size,
                 mtime_ns=n.mtime_ns, linkname=n.linkname if n.type in (EntryType.SYMLINK, EntryType.HARDLINK) else "",
                 devmajor=n.devmajor, devminor=n.devminor, xattrs=n.xattrs, data_offset=n.data_offset,
                 first_chunk=n.first_chunk, chunk_count=n.chunk_count, sparse=n.sparse)


def _checkpoint(c: Any) -> Checkpoint:
    kind, coff, uoff, bits, window = c
    return Checkpoint(CheckpointKind(kind), coff, uoff, bits, _as_bytes(window or b""))


def _marks(scan: Any) -> list[tuple[int, int]]:
    """The scanner's end marks, kept strictly ascending in both offsets (a mark that does
    not advance says nothing new)."""
    raw = _as_bytes(_field(scan, "marks", b"") or b"")
    out: list[tuple[int, int]] = []
    for uoff, coff in MARK_RECORD.iter_unpack(raw[:len(raw) - len(raw) % MARK_RECORD.size]):
        if not out or (uoff > out[-1][0] and coff >= out[-1][1]):
            out.append((uoff, coff))
    return out


def _digest(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v if v.startswith("sha256:") else "sha256:" + v
    return "sha256:" + _as_bytes(v).hex()


def _info(scan: Any, span_size: int, chunk_size: int) -> LayerInfo:
    blob = _digest(_field(scan, "blob_digest"))
    assert blob is not None
    return LayerInfo(format=LayerFormat(_field(scan, "format")), compressed_size=_field(scan, "compressed_size"),
                     uncompressed_size=_field(scan, "uncompressed_size"), blob_digest=blob,
                     diff_id=_digest(_field(scan, "diff_id")), chunk_size=chunk_size, span_size=span_size,
                     sequential_only=bool(_field(scan, "sequential_only")))


class _Declined(Exception):
    """The C build of a scanner made with ``build_index`` declined the layer, and the
    scanner kept nothing to build it from: the layer must be scanned again."""


def index_bytes(scanner: Scanner, *, span: int = DEFAULT_SPAN, chunk_size: int = DEFAULT_CHUNK,
                expected_digest: str | None = None, stored: StoredHook | None = None) -> bytes:
    """The serialized index of a layer fed whole to ``scanner``. The C core builds the
    entries' sections straight from its scan (no per-entry Python, the GIL released); a
    layer it declines (sparse files, a directory replaced by a non-directory, anything the
    reference refuses) is built here by :func:`build_index`, the reference, which also
    words any error; raises _Declined instead when the scanner was made with
    ``build_index`` (it kept no entries). Raises IndexBuildError when ``expected_digest``
    (what the manifest pinned) is not the blob's. ``stored`` gets where a scanner made
    with ``layer_file`` wrote each chunk (``ChunkStore.adopt_layer_file``), whatever the
    digest: each holds exactly the bytes its digest hashes. Worker thread."""
    from snapshotter.index.format import assemble, serialize_index

    scan = scanner.finish(index_chunk_size=chunk_size)
    if stored is not None and (scan.stored or scan.store_errno):
        stored(scan.stored, scan.store_errno)
    _check_digest(scan, expected_digest)
    if scan.index is None and not scan.entries_kept:
        raise _Declined(scan.index_declined)
    if scan.index is None:
        log.debug("event=index_built_in_python reason=%s", (scan.index_declined or "").replace(" ", "_"))
        return serialize_index(build_index(scan, span_size=span, chunk_size=chunk_size))
    return assemble(_info(scan, span, chunk_size), scan.index, [_checkpoint(c) for c in scan.checkpoints],
                    _marks(scan))[0]


def _check_digest(scan: Any, expected: str | None) -> None:
    blob = _digest(_field(scan, "blob_digest"))
    if expected is not None and blob != expected:
        raise IndexBuildError(f"blob digest {blob} does not match expected {expected}")


def _scan_file(path: str, sc: Scanner) -> None:
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            sc.feed(block)


def index_file_bytes(path: str, *, span: int = DEFAULT_SPAN, chunk_size: int = DEFAULT_CHUNK,
                     diff_id: bool = False) -> bytes:
    """The serialized index of a local layer file (format from magic bytes); see
    :func:`index_bytes`. The scan keeps no entries (C applies them as it goes); a layer C
    declines is read a second time for the reference. Raises UnknownFormatError for a
    file that is neither gzip, zstd nor tar."""
    fmt = _format_of(path)
    sc = make_scanner(span=span, chunk_size=chunk_size, diff_id=diff_id, format=fmt, build_index=True)
    _scan_file(path, sc)
    try:
        return index_bytes(sc, span=span, chunk_size=chunk_size)
    except _Declined as exc:
        _log_rescan(exc)
    sc = make_scanner(span=span, chunk_size=chunk_size, diff_id=diff_id, format=fmt)
    _scan_file(path, sc)
    return index_bytes(sc, span=span, chunk_size=chunk_size)


def _log_rescan(exc: _Declined) -> None:
    log.debug("event=index_rescanned reason=%s", str(exc).replace(" ", "_"))


def _format_of(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise TruncatedLayerError(f"{path}: empty layer file")
    return detect_format(head)


def index_file(path: str, *, span: int = DEFAULT_SPAN, chunk_size: int = DEFAULT_CHUNK,
               diff_id: bool = False) -> LayerIndex:
    """Scan a local layer file (format from magic bytes) and build its index with the
    reference (tests, and the checks that compare against it).

    Raises UnknownFormatError for a file that is neither gzip, zstd nor tar.
    """
    sc = make_scanner(span=span, chunk_size=chunk_size, diff_id=diff_id, format=_format_of(path))
    _scan_file(path, sc)
    return build_index(sc.finish(), span_size=span, chunk_size=chunk_size)


async def index_stream_bytes(stream: AsyncIterator[bytes], *, span: int = DEFAULT_SPAN,
                             chunk_size: int = DEFAULT_CHUNK, diff_id: bool = False,
                             expected_digest: str | None = None, layer_file: LayerFileTarget | None = None,
                             stored: StoredHook | None = None,
                             again: Callable[[], AsyncIterator[bytes]] | None = None) -> bytes:
    """The serialized index of a layer arriving as an async byte stream (a registry blob
    GET); see :func:`index_bytes`. Raises IndexBuildError when ``expected_digest`` (what the
    manifest pinned) is not the blob's. With ``layer_file`` the scan also writes every
    chunk it cuts into that file and hands their records to ``stored``. With ``again`` (the
    same bytes once more: the kept blob, or the registry) the scan keeps no entries, and a
    layer C declines is scanned again from ``again()`` for the reference.

    Each ``feed`` inflates, parses and hashes the slice: hundreds of milliseconds of CPU
    for a few MiB. Run on the event loop it would stall every other request (FUSE reads,
    gRPC), so each slice is fed on a worker thread with ``asyncio.to_thread``; the C core
    releases the GIL there, so the loop keeps running. Slices are fed strictly in order
    (one ``to_thread`` at a time), which the scanner requires."""
    import asyncio  # here: `lazysnap index FILE` starts ~25 ms sooner without it

    sc = make_scanner(span=span, chunk_size=chunk_size, diff_id=diff_id, layer_file=layer_file,
                      build_index=again is not None)
    async for block in stream:
        if block:
            await asyncio.to_thread(sc.feed, block)
    try:
        return await asyncio.to_thread(index_bytes, sc, span=span, chunk_size=chunk_size,
                                       expected_digest=expected_digest, stored=stored)
    except _Declined as exc:
        assert again is not None
        _log_rescan(exc)
    sc = make_scanner(span=span, chunk_size=chunk_size, diff_id=diff_id)
    async for block in again():
        if block:
            await asyncio.to_thread(sc.feed, block)
    return await asyncio.to_thread(index_bytes, sc, span=span, chunk_size=chunk_size,
                                   expected_digest=expected_digest)
