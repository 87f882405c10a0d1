"""Handlers for ``lazysnap index | inspect | cat | ls`` on local layers and index files.

Bad input (missing or corrupt files, unknown format, missing path) becomes a
``CLIError`` with a one-line message; tracebacks are for bugs only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator

from snapshotter.cli import CLIError
from snapshotter.fsutil import write_atomic
from snapshotter.index.builder import DEFAULT_SPAN, clean_path, index_file_bytes
from snapshotter.index.errors import LAYER_ERRORS, LayerIndexError
from snapshotter.index.format import IndexFile
from snapshotter.index.model import Entry, EntryType
from snapshotter.index.reader import FileRangeSource, LayerReader

CAT_WINDOW = 32 << 20  # bytes assembled per write: bounded memory for any file size
_ERRORS = (LayerIndexError, *LAYER_ERRORS)


def _fail(exc: BaseException) -> CLIError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CLIError(text)


def _os_fail(what: str, path: str, exc: OSError) -> CLIError:
    return CLIError(f"cannot {what} {path}: {exc.strerror or exc}")


def _remote(func: str, args: argparse.Namespace, what: str) -> int:
    """Hand image references to the registry side of the CLI."""
    try:
        from snapshotter.cli import remote_cmds
    except ImportError:
        raise CLIError(f"{what}: no such file, and remote image support is not available") from None
    return int(getattr(remote_cmds, func)(args) or 0)


@contextlib.contextmanager
def _open_index(path: str) -> Iterator[IndexFile]:
    try:
        index = IndexFile.open(path)
    except OSError as exc:
        raise _os_fail("open index", path, exc) from None
    except _ERRORS as exc:
        raise _fail(exc) from None
    try:
        yield index
    finally:
        index.close()


# Checkpoint spacing of a published index (--push): it serves lazy pulls, where a miss
# fetches from the checkpoint before it, so dense checkpoints cut the bytes per miss. With
# sparse windows a checkpoint costs ~2 KB packed inline (64 bytes up front when apart), so
# 256 KiB keeps the index near 1.3 % of the blob (bench/RESULTS.md, 2026-11-27).
PUBLISH_SPAN = 256 << 10


def cmd_index(args: argparse.Namespace) -> int:
    if args.span is None:
        args.span = PUBLISH_SPAN if args.push else DEFAULT_SPAN
    if args.windows_apart and not args.push:
        raise CLIError("--windows-apart publishes: it needs --push", status=2)
    if args.share_registry and not args.push:
        raise CLIError("--share-registry is where --push publishes: it needs --push", status=2)
    if os.path.isdir(args.source):
        raise CLIError(f"{args.source} is a directory, not a layer file")
    if not os.path.isfile(args.source):
        # an image reference never starts like a path; anything that does is a local layer
        if os.path.lexists(args.source):
            raise CLIError(f"{args.source} is not a regular file (a layer is a gzip, zstd or tar file)")
        if args.source.startswith(("/", "./", "../", "~")):
            raise CLIError(f"{args.source}: no such file")
        return _remote("index_ref", args, args.source)
    if not args.output:
        raise CLIError("-o INDEX is required for a local layer", status=2)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CLIError(f"-o {args.output}: directory {out_dir} does not exist")
    if args.span <= 0 or args.chunk_size <= 0 or args.chunk_size > 0xFFFFFFFF:
        raise CLIError("--span and --chunk-size must be positive (chunk size < 4 GiB)", status=2)
    started = time.monotonic()
    try:
        data = index_file_bytes(args.source, span=args.span, chunk_size=args.chunk_size, diff_id=args.diff_id)
        write_atomic(args.output, data)
    except OSError as exc:
        raise _os_fail("index", exc.filename or args.source, exc) from None
    except _ERRORS as exc:
        raise CLIError(f"{args.source}: {_fail(exc)}") from None
    with IndexFile.from_bytes(data) as index:
        info = index.info
        entries, files, chunks, checkpoints = (index.entry_count, index.file_count, index.chunk_count,
                                               index.checkpoint_count)
    size = len(data)
    pct = 100.0 * size / info.compressed_size if info.compressed_size else 0.0
    elapsed = time.monotonic() - started
    print(f"indexed {args.source}: format={info.format.value} entries={entries} files={files} "
          f"chunks={chunks} checkpoints={checkpoints} index_bytes={size} "
          f"({pct:.2f}% of blob) seconds={elapsed:.2f}"
          + (" sequential_only=true" if info.sequential_only else ""))
    return 0


def inspect_dict(index: IndexFile) -> dict[str, object]:
    info = index.info
    return {
        "format": info.format.value,
        "files": index.file_count,
        "entries": index.entry_count,
        "chunks": index.chunk_count,
        "checkpoints": index.checkpoint_count,
        "uncompressed_size": info.uncompressed_size,
        "compressed_size": info.compressed_size,
        "blob_digest": info.blob_digest,
        "diff_id": info.diff_id,
        "index_bytes": index.index_bytes,
        "span_size": info.span_size,
        "chunk_size": info.chunk_size,
        "sequential_only": info.sequential_only,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open_index(args.index) as index:
        d = inspect_dict(index)
    if args.json:
        print(json.dumps(d))
        return 0
    csize = int(d["compressed_size"])  # type: ignore[call-overload]
    pct = 100.0 * int(d["index_bytes"]) / csize if csize else 0.0  # type: ignore[call-overload]
    print(f"{args.index}: {d['format']} layer {d['blob_digest']}")
    print(f"  {d['compressed_size']} bytes compressed, {d['uncompressed_size']} uncompressed")
    print(f"  {d['entries']} entries ({d['files']} regular files), {d['chunks']} chunks, "
          f"{d['checkpoints']} checkpoints")
    print(f"  index {d['index_bytes']} bytes ({pct:.2f}% of blob), span {d['span_size']}, chunk {d['chunk_size']}")
    print(f"  diff_id {d['diff_id'] or '(not computed)'}"
          + ("; sequential only (no random access)" if d["sequential_only"] else ""))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    if len(args.operands) == 2:
        return _remote("cat_ref", args, args.operands[0])
    if len(args.operands) != 3:
        raise CLIError("usage: cat INDEX LAYER PATH  or  cat REF PATH", status=2)
    index_path, layer_path, file_path = args.operands
    if args.offset < 0 or (args.length is not None and args.length < 0):
        raise CLIError("--offset and --length must be non-negative", status=2)
    with _open_index(index_path) as index:
        try:
            source = FileRangeSource(layer_path)
        except OSError as exc:
            raise _os_fail("open layer", layer_path, exc) from None
        with source:
            if source.size != index.info.compressed_size:
                raise CLIError(f"layer {layer_path} is {source.size} bytes but the index describes a "
                               f"{index.info.compressed_size}-byte blob ({index.info.blob_digest})")
            reader = LayerReader(index, source)
            try:
                _cat(reader, file_path, args.offset, args.length)
            except _ERRORS as exc:
                raise _fail(exc) from None
            finally:
                if args.stats:
                    print(json.dumps(reader.stats.as_dict()), file=sys.stderr)
    return 0


def _cat(reader: LayerReader, file_path: str, offset: int, length: int | None) -> None:
    path = clean_path(file_path)
    entry = reader.resolve(path)
    end = entry.size if length is None else min(entry.size, offset + length)
    out = sys.stdout.buffer
    pos = offset
    while pos < end:
        n = min(CAT_WINDOW, end - pos)
        out.write(reader.read_file(entry, pos, n))
        pos += n
    out.flush()


def _mode_string(e: Entry) -> str:
    kind = {EntryType.REG: stat.S_IFREG, EntryType.HARDLINK: stat.S_IFREG, EntryType.SYMLINK: stat.S_IFLNK,
            EntryType.CHAR: stat.S_IFCHR, EntryType.BLOCK: stat.S_IFBLK, EntryType.DIR: stat.S_IFDIR,
            EntryType.FIFO: stat.S_IFIFO}[e.type]
    text = stat.filemode(kind | e.mode)
    return ("h" + text[1:]) if e.type == EntryType.HARDLINK else text


def format_ls_line(e: Entry) -> str:
    """One ``tar -tv``-style line."""
    size = f"{e.devmajor},{e.devminor}" if e.type in (EntryType.CHAR, EntryType.BLOCK) else str(e.size)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    name = e.path + ("/" if e.type == EntryType.DIR else "")
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    line = f"{_mode_string(e)} {e.uid}/{e.gid} {size:>10} {when} {name}"
    if e.type == EntryType.SYMLINK:
        line += f" -> {e.linkname}"
    elif e.type == EntryType.HARDLINK:
        line += f" link to {e.linkname}"
    return line


def _walk(index: IndexFile, n: int) -> Iterator[Entry]:
    """Depth-first, name-sorted: the listing order of a tree."""
    stack = [n]
    while stack:
        cur = stack.pop()
        if cur != 0:
            yield index.entry_at(cur)
        stack.extend(reversed(index.child_range(cur)))


def cmd_ls(args: argparse.Namespace) -> int:
    with _open_index(args.index) as index:
        try:
            path = clean_path(args.path)
            n = index.find(path)
            if n is None:
                raise CLIError(f"no such path in layer: {args.path!r}")
            out = sys.stdout
            for e in _walk(index, n):  # the entry itself (unless root), then its subtree
                out.write(format_ls_line(e) + "\n")
        except _ERRORS as exc:
            raise _fail(exc) from None
    return 0
