"""Compare two mounted file trees entry by entry: the check that two snapshotters agree.

A tree is walked once into ``{path: Record}`` (type, permission bits, owners, size,
SHA-256 of regular files, symlink target, device numbers, hard-link group, xattrs,
mtime) and two such maps are diffed with an explicit :class:`Policy` saying what is
not part of an image's content (directory sizes, the root's mtime, overlayfs' private
xattrs), so every exclusion is named rather than hidden in the walk.

Also here: how to obtain an image's merged rootfs from a snapshotter without running a
container (:func:`chain_id`, :func:`mount_view`), so tests and the bench share it.

Usage::

    with mount_view(cd, "overlayfs", "v1", chain_id(img.diff_ids), tmp / "a") as a, \\
         mount_view(cd, "lazysnap", "v2", chain_id(img.diff_ids), tmp / "b") as b:
        left, right = walk(a), walk(b)
    assert not (d := diff(left, right)), format_diff(d, "overlayfs", "lazysnap")
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = ["Mismatch", "Policy", "Record", "Tree", "chain_id", "diff", "format_diff", "mount_view", "walk"]

_READ = 1 << 20
_KINDS = ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "char"),
          (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"))


@dataclass(slots=True, frozen=True)
class Record:
    """What an image defines about one path (plus ``nlink``/``size`` as the kernel shows them)."""

    kind: str  # dir, file, symlink, char, block, fifo, socket
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    nlink: int
    mtime_ns: int
    sha256: str = ""  # regular files
    target: str = ""  # symlinks
    rdev: tuple[int, int] = (0, 0)  # char/block devices: (major, minor)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    links: tuple[str, ...] = ()  # the other paths of this tree sharing the inode (non-dirs)


@dataclass(slots=True)
class Tree:
    """A walked tree: records by path ("" is the root, others "a/b"), and totals."""

    root: Path
    records: dict[str, Record]
    bytes_hashed: int = 0
    seconds: float = 0.0


@dataclass(slots=True, frozen=True)
class Policy:
    """What :func:`diff` compares. Defaults: everything an image defines.

    ``mtime``: "ns" compares full timestamps, "s" whole seconds, "off" nothing.
    ``dir_size``: directory sizes are the backing filesystem's business (ext4 grows them
    in 4 KiB blocks, a FUSE layer reports a constant), not the image's.
    ``mtime_skip``: paths whose mtime is whenever the snapshotter created them, not image
    content: the root (layer tars rarely have a "./" entry) and directories a layer tar
    implies without declaring them (containerd creates those at unpack time).
    ``xattr_skip``: prefixes never compared (overlayfs' own bookkeeping).
    """

    mtime: Literal["ns", "s", "off"] = "ns"
    dir_size: bool = False
    mtime_skip: frozenset[str] = frozenset({""})
    xattr_skip: tuple[str, ...] = ("trusted.overlay.",)


@dataclass(slots=True, frozen=True)
class Mismatch:
    path: str
    field: str  # a Record field, or "presence"
    left: Any
    right: Any

    def __str__(self) -> str:
        shown = "/" + self.path
        if self.field == "presence":
            return f"{shown}: only in {'left' if self.left else 'right'} ({self.left or self.right})"
        return f"{shown}: {self.field} {_show(self.field, self.left)} != {_show(self.field, self.right)}"


def _show(name: str, value: Any) -> str:
    if name == "mode":
        return oct(value)
    if name == "mtime_ns":
        return f"{value // 10**9}.{value % 10**9:09d}"
    return repr(value)


# ---------------------------------------------------------------- walking


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "unknown"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as exc:
            out.append((n, f"<{exc.strerror}>".encode()))
    return tuple(out)


def _sha256(path: str) -> tuple[str, int]:
    """Digest and byte count of a regular file (hashlib releases the GIL on big updates)."""
    h = hashlib.sha256()
    n = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, _READ):
            h.update(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest(), n


def _scan(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below ``root``, root first, no symlink following."""
    yield "", os.lstat(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            child = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def walk(root: Path | str, *, workers: int = 4) -> Tree:
    """Record every entry below ``root``; regular files are hashed on ``workers`` threads
    (a lazily served tree answers concurrent reads with concurrent fetches)."""
    t0 = time.monotonic()
    base = os.fspath(root)
    stats = list(_scan(base))
    by_inode: dict[tuple[int, int], list[str]] = {}
    for rel, st in stats:
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    files = [rel for rel, st in stats if stat.S_ISREG(st.st_mode)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        hashed = dict(zip(files, pool.map(lambda r: _sha256(os.path.join(base, r)), files)))
    records: dict[str, Record] = {}
    for rel, st in stats:
        full = os.path.join(base, rel) if rel else base
        kind = _kind(st.st_mode)
        digest, target, rdev = "", "", (0, 0)
        links: tuple[str, ...] = ()
        if kind == "file":
            digest, n = hashed[rel]
            if n != st.st_size:  # the bytes served disagree with the size stat reports
                digest = f"{digest} (read {n} bytes)"
        elif kind == "symlink":
            target = os.readlink(full)
        elif kind in ("char", "block"):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != "dir":
            links = tuple(p for p in by_inode[(st.st_dev, st.st_ino)] if p != rel)
        records[rel] = Record(kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                              size=st.st_size, nlink=st.st_nlink, mtime_ns=st.st_mtime_ns, sha256=digest,
                              target=target, rdev=rdev, xattrs=_xattrs(full), links=links)
    return Tree(Path(base), records, sum(n for _, n in hashed.values()), time.monotonic() - t0)


# ---------------------------------------------------------------- comparing


def _view(rec: Record, path: str, policy: Policy) -> dict[str, Any]:
    """The fields of ``rec`` that ``policy`` compares."""
    out = {f.name: getattr(rec, f.name) for f in fields(Record)}
    out["xattrs"] = tuple((k, v) for k, v in rec.xattrs if not k.startswith(policy.xattr_skip))
    if rec.kind == "dir" and not policy.dir_size:
        del out["size"]
    if policy.mtime == "off" or path in policy.mtime_skip:
        del out["mtime_ns"]
    elif policy.mtime == "s":
        out["mtime_ns"] = rec.mtime_ns // 10**9 * 10**9
    return out


def diff(left: Tree | Mapping[str, Record], right: Tree | Mapping[str, Record],
         policy: Policy = Policy()) -> list[Mismatch]:
    """Every difference between two walked trees, path order, one per field."""
    a = left.records if isinstance(left, Tree) else left
    b = right.records if isinstance(right, Tree) else right
    out: list[Mismatch] = []
    for path in sorted(a.keys() | b.keys()):
        ra, rb = a.get(path), b.get(path)
        if ra is None or rb is None:
            out.append(Mismatch(path, "presence", ra and ra.kind, rb and rb.kind))
            continue
        va, vb = _view(ra, path, policy), _view(rb, path, policy)
        for name in va:
            if name in vb and va[name] != vb[name]:
                out.append(Mismatch(path, name, va[name], vb[name]))
    return out


def format_diff(mismatches: list[Mismatch], left: str = "left", right: str = "right", limit: int = 60) -> str:
    """A readable report: one line per mismatch (first ``limit``), sides named."""
    lines = [f"{len(mismatches)} mismatch(es), {left} vs {right}:"]
    for m in mismatches[:limit]:
        lines.append("  " + str(m).replace("only in left", f"only in {left}").replace("only in right", f"only in {right}"))
    if len(mismatches) > limit:
        lines.append(f"  … {len(mismatches) - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------- an image's merged rootfs


def chain_id(diff_ids: list[str]) -> str:
    """The snapshot key containerd commits an image's top layer under (OCI ChainID)."""
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


class _Ctr(Protocol):
    def ctr(self, *args: str, check: bool = True, namespace: str = "default",
            timeout: float = 300.0, input: bytes | None = None) -> subprocess.CompletedProcess[str]: ...


@contextmanager
def mount_view(cd: _Ctr, snapshotter: str, key: str, parent: str, target: Path) -> Iterator[Path]:
    """A read-only view snapshot of ``parent`` mounted at ``target`` (unmounted and removed
    on exit): the merged rootfs exactly as a container of that snapshotter would see it."""
    r = cd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, parent)
    mounts = [{k.lower(): v for k, v in m.items()} for m in json.loads(r.stdout)]  # Go: Type, Source, Options
    target.mkdir(parents=True, exist_ok=True)
    mounted: list[Path] = []
    try:
        for m in mounts:
            opts = [o for o in m.get("options") or [] if o not in ("bind", "rbind")]
            if m["type"] == "bind":  # a view of a single layer: bind, then make it read-only
                steps = [["mount", "--rbind", m["source"], str(target)]]
                if "ro" in opts:
                    steps.append(["mount", "-o", "remount,bind,ro", str(target)])
            else:
                steps = [["mount", "-t", m["type"], "-o", ",".join(opts), m["source"], str(target)]]
            for argv in steps:
                cp = subprocess.run(argv, capture_output=True, text=True, check=False)
                if cp.returncode != 0:
                    raise RuntimeError(f"mount {snapshotter} view {key}: {cp.stderr.strip()}")
                if argv is steps[0]:
                    mounted.append(target)
        yield target
    finally:
        for t in reversed(mounted):
            if subprocess.run(["umount", "-R", str(t)], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", str(t)], capture_output=True, check=False)
        cd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)
