"""The same image through containerd's overlayfs snapshotter and through lazysnap yields
identical merged trees (issue 6 acceptance): every path's type, permission bits, owners,
size, SHA-256, symlink target, device numbers, hard-link grouping, xattrs and mtime.

One private containerd serves both snapshotters; the image is pulled with
``ctr images pull --snapshotter overlayfs`` and ``ctr-remote images rpull --snapshotter
lazysnap`` (no layer blob downloaded), each top-layer snapshot is mounted as a read-only
view, and both mounts are walked and diffed by :mod:`harness.trees`. The image is built to
exercise what differs between an unpacked layer and a FUSE layer under overlayfs:
whiteouts, opaque directories, type changes across layers, hard links, devices, fifos,
odd modes, owners, xattrs, long and unicode names, multi-chunk files, ns mtimes.
"""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.containerd import Containerd, LazysnapDaemon, lazysnap_node
from harness.images import (Device, Dir, Fifo, File, HardLink, LayerSpec, PushedImage, Symlink, build_image,
                            busybox_rootfs)
from harness.registry import Registry, start_registry
from harness.trees import Policy, Tree, chain_id, diff, format_diff, mount_view, walk
from harness.signing import sign_flags

pytestmark = [pytest.mark.root, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIG = (5 << 20) + 12345  # six 1 MiB chunks, the last one partial
LONG = "l" * 120 + "-ünïcødé-" + "x" * 100  # one name > 100 bytes (PAX path), < NAME_MAX
DEEP = "/".join(["d" * 60] * 5)  # a path > 255 bytes
NS_MTIME = "1700000001.123456789"  # PAX mtime with nanoseconds


def _pseudo(seed: bytes, size: int) -> bytes:
    """Deterministic incompressible-ish bytes (each chunk distinct)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:size])


def _base() -> LayerSpec:
    return busybox_rootfs(extra=[
        Dir("data"),
        File("data/empty"),
        File("data/small.txt", b"small\n"),
        File("data/big.bin", _pseudo(b"big", BIG), mode=0o640, uid=1000, gid=1000),
        File("data/ünïcødé/日本語ファイル.txt", "こんにちは\n".encode()),
        File(f"data/{LONG}", b"long name\n"),
        File(f"data/{DEEP}/leaf", b"deep\n"),
        Symlink("data/rel", "small.txt"),
        Symlink("data/abs", "/data/small.txt"),
        Symlink("data/dangling", "/nonexistent/target"),
        Symlink("data/dirlink", "../etc"),
        File("data/hl/a", b"linked three times\n", mode=0o751, uid=7, gid=8),
        HardLink("data/hl/b", "data/hl/a"),
        HardLink("data/hl/c", "data/hl/a"),
        Fifo("data/fifo", mode=0o620, uid=33, gid=33),
        Device("data/dev/null", "char", 1, 3, mode=0o666),
        Device("data/dev/loop0", "block", 7, 0, mode=0o660, gid=6),
        File("data/modes/setuid", b"#!/bin/sh\n", mode=0o4755),
        File("data/modes/setgid", b"#!/bin/sh\n", mode=0o2711),
        File("data/modes/secret", b"key\n", mode=0o600, uid=1000, gid=1000),
        File("data/modes/none", b"", mode=0o000),
        Dir("data/modes/sticky", mode=0o1777),
        File("data/owners/nobody", b"n\n", uid=65534, gid=65534),
        File("data/owners/high", b"h\n", uid=100000, gid=200000),
        File("data/xattr.txt", b"x\n", xattrs={"user.comment": "hello", "user.empty": ""}),
        Dir("data/xattrdir", xattrs={"user.kind": "dir"}),
        File("data/doomed.txt", b"deleted by layer 1\n"),
        File("data/opaque/old1", b"hidden by opaque\n"),
        File("data/opaque/sub/old2", b"hidden by opaque\n"),
        File("data/replaced.txt", b"version 0\n"),
        File("data/typechange/inner", b"dir in layer 0\n"),
        File("data/gone_dir/a", b"a\n"),
        File("data/gone_dir/sub/b", b"b\n"),
        Dir("data/attrdir", mode=0o755),
        File("data/attrdir/keep", b"keep\n"),
        File("data/to_symlink", b"becomes a symlink\n"),
        Symlink("data/to_file", "small.txt"),
        File("data/recreated/old", b"whiteout + same-layer dir in layer 2\n"),
        File("data/trusted/lower", b"must stay visible\n"),
    ])


def _middle() -> LayerSpec:
    return LayerSpec(
        delete=["data/doomed.txt", "data/hl/b", "data/gone_dir"],
        opaque=["data/opaque"],
        entries=[
            File("data/opaque/new", b"only file left\n"),
            File("data/replaced.txt", _pseudo(b"v1", (1 << 20) + 7), mode=0o600, uid=5, gid=6),
            File("data/typechange", b"a file in layer 1\n"),
            Dir("data/attrdir", mode=0o700, uid=1000, gid=100),
            File("data/attrdir/added", b"added in layer 1\n"),
            File("data/hl/d", b"separate inode\n"),
        ])


def _top() -> LayerSpec:
    return LayerSpec(
        delete=["data/to_symlink", "data/to_file", "data/recreated"],
        entries=[
            File("data/typechange/again", b"a dir again in layer 2\n"),
            Symlink("data/to_symlink", "/data/small.txt"),
            File("data/to_file", b"was a symlink\n"),
            File("data/recreated/new", b"new\n"),
            File("data/replaced.txt", b"version 2\n", mode=0o644),
            File("data/new-in-top/x2", _pseudo(b"x2", 3 << 20)),
            HardLink("data/new-in-top/x2-link", "data/new-in-top/x2"),
            # trusted.* xattrs from a tar are refused by containerd's applier
            Dir("data/trusted", xattrs={"trusted.overlay.opaque": "y"}),
            File("data/trusted/upper", b"u\n", xattrs={"trusted.foo": "bar", "user.ok": "1"}),
        ])


IMPLICIT_DIRS = {"data", "newdir", "newdir/sub"}  # parents the last layer's tar does not declare


def _no_parents() -> LayerSpec:
    """A layer without entries for parent directories (as some image builders write them)."""
    return LayerSpec(parents=False, entries=[File("data/implicit-parent", b"p\n"),
                                             File("newdir/sub/file", b"f\n")])


def _raw_layer(path: Path) -> Path:
    """A PAX tar written directly: nanosecond mtimes, a symlink whose header mode is not
    0777, and a hard link whose own header carries other owners, mode, mtime and xattrs
    (harness entries cannot express these)."""
    def info(name: str, kind: bytes, mode: int, **kw: object) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = kind, mode, 1_700_000_001
        ti.pax_headers = {"mtime": NS_MTIME}
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info("raw", tarfile.DIRTYPE, 0o755))
        tar.addfile(info("raw/file", tarfile.REGTYPE, 0o644, size=4), io.BytesIO(b"raw\n"))
        tar.addfile(info("raw/symlink", tarfile.SYMTYPE, 0o644, linkname="file"))
        link = info("raw/hardlink", tarfile.LNKTYPE, 0o600, linkname="raw/file", uid=42, gid=43)
        link.pax_headers = {"mtime": "1600000000.5", "SCHILY.xattr.user.fromlink": "1"}
        tar.addfile(link)
        # a link to a path that a later entry of the same layer replaces keeps the old inode
        tar.addfile(info("raw/re", tarfile.REGTYPE, 0o644, size=3), io.BytesIO(b"v1\n"))
        tar.addfile(info("raw/re-link", tarfile.LNKTYPE, 0o644, linkname="raw/re"))
        tar.addfile(info("raw/re", tarfile.REGTYPE, 0o644, size=3), io.BytesIO(b"v2\n"))
        # a directory declared twice in one layer: metadata merges, xattrs accumulate
        first = info("raw/dd", tarfile.DIRTYPE, 0o700)
        first.pax_headers = {"mtime": NS_MTIME, "SCHILY.xattr.user.a": "1"}
        tar.addfile(first)
        second = info("raw/dd", tarfile.DIRTYPE, 0o750, uid=3)
        second.pax_headers = {"mtime": NS_MTIME, "SCHILY.xattr.user.b": "2"}
        tar.addfile(second)
    return path


@dataclass
class World:
    reg: Registry
    img: PushedImage


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("trees")
    reg = start_registry(tmp / "reg")
    try:
        layers: list[LayerSpec | Path] = [_base(), _middle(), _top(), _raw_layer(tmp / "raw.tar"), _no_parents()]
        img = build_image(tmp / "img", layers, cmd=["/bin/sh"], ref=f"{reg.host}/lazy/trees:v1")
        r = subprocess.run([sys.executable, "-m", "snapshotter", "index", img.ref, "--push", *sign_flags(), "--root",
                            str(tmp / "publisher"), "--hosts-dir", str(tmp / "nohosts")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"lazysnap index --push: {r.stderr.strip()[-800:]}"
        yield World(reg, img)
    finally:
        reg.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[LazysnapDaemon, Containerd]]:
    """lazysnap with the background filler off (files hashed are read through FUSE on demand) + containerd."""
    with lazysnap_node(tmp_path, config="[prefetch]\nbackground = false\n") as pair:
        yield pair


def _expect_built_tree(t: Tree) -> None:
    """The walked tree holds what the image was built with (so equality is not vacuous)."""
    r = t.records
    assert r["data/big.bin"].sha256 == hashlib.sha256(_pseudo(b"big", BIG)).hexdigest()
    assert (r["data/big.bin"].uid, r["data/big.bin"].mode) == (1000, 0o640)
    assert r["data/replaced.txt"].sha256 == hashlib.sha256(b"version 2\n").hexdigest()
    hidden = {"data/doomed.txt", "data/hl/b", "data/gone_dir", "data/opaque/old1", "data/opaque/sub",
              "data/typechange/inner"} & r.keys()
    assert not hidden, f"whited-out paths visible: {sorted(hidden)}"
    assert "data/opaque/new" in r and "data/recreated/new" in r and "data/typechange/again" in r
    assert set(r["data/hl/a"].links) == {"data/hl/c"} and r["data/hl/a"].nlink == 3
    assert r["data/new-in-top/x2"].links == ("data/new-in-top/x2-link",)
    assert r["data/hl/d"].links == ()
    assert (r["data/rel"].target, r["data/dangling"].target) == ("small.txt", "/nonexistent/target")
    assert (r["data/to_symlink"].kind, r["data/to_file"].kind) == ("symlink", "file")
    assert (r["data/fifo"].kind, r["data/dev/null"].rdev, r["data/dev/loop0"].kind) == ("fifo", (1, 3), "block")
    assert (r["data/modes/setuid"].mode, r["data/modes/sticky"].mode) == (0o4755, 0o1777)
    assert (r["data/owners/high"].uid, r["data/owners/high"].gid) == (100000, 200000)
    assert (r["data/attrdir"].mode, r["data/attrdir"].uid) == (0o700, 1000)
    assert {"data/attrdir/keep", "data/attrdir/added"} <= r.keys()
    assert dict(r["data/xattr.txt"].xattrs) == {"user.comment": b"hello", "user.empty": b""}
    assert f"data/{LONG}" in r and f"data/{DEEP}/leaf" in r and "data/ünïcødé/日本語ファイル.txt" in r
    # containerd gives the shared inode the hard-link header's owners, mode, mtime, xattrs
    assert (r["raw/file"].mode, r["raw/file"].uid, r["raw/file"].mtime_ns) == (0o600, 42, 1_600_000_000_500_000_000)
    assert dict(r["raw/hardlink"].xattrs) == {"user.fromlink": b"1"}
    assert r["raw/re-link"].sha256 == hashlib.sha256(b"v1\n").hexdigest() and r["raw/re-link"].links == ()
    assert r["raw/symlink"].mode == 0o777
    assert dict(r["raw/dd"].xattrs) == {"user.a": b"1", "user.b": b"2"}
    # trusted.* xattrs from a tar are ignored: no opaque directory, no trusted.foo
    assert "data/trusted/lower" in r and dict(r["data/trusted/upper"].xattrs) == {"user.ok": b"1"}


def test_overlayfs_and_lazysnap_trees_identical(world: World, node: tuple[LazysnapDaemon, Containerd],
                                                tmp_path: Path) -> None:
    daemon, cd = node
    ref = world.img.ref
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
    have = set(cd.ctr("content", "ls", "-q").stdout.split())
    assert not have & set(world.img.layer_digests), "lazysnap fell back to downloading a layer"
    cd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    top = chain_id(world.img.diff_ids)
    t0 = time.monotonic()
    with mount_view(cd, "overlayfs", "tree-ovl", top, tmp_path / "ovl") as a, \
            mount_view(cd, "lazysnap", "tree-lzs", top, tmp_path / "lzs") as b:
        left, right = walk(a), walk(b)
    # full ns mtimes, except where containerd's value is its unpack time (not image content)
    mismatches = diff(left, right, Policy(mtime="ns", mtime_skip=frozenset({""} | IMPLICIT_DIRS)))
    if mismatches:
        pytest.fail(format_diff(mismatches, "overlayfs", "lazysnap"), pytrace=False)
    _expect_built_tree(left)
    # nanosecond mtimes survive both paths (containerd's applier and the FUSE attributes)
    assert left.records["raw/symlink"].mtime_ns == 1_700_000_001_123_456_789
    print(f"entries={len(left.records)} bytes_hashed={right.bytes_hashed} "
          f"walk_s={time.monotonic() - t0:.2f}", file=sys.stderr)
