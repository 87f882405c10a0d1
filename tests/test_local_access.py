"""A node's local users cannot read what its lazily served images hold.

Real registry, containerd, runc, FUSE and ``lazysnap serve``; the unprivileged user is
``nobody`` (``setpriv``). The node's directories sit under a world-traversable directory
(not pytest's 0700 tmp), so only lazysnap's own modes stand between ``nobody`` and the
image: the control checks prove ``nobody`` does reach that far.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.containerd import lazysnap_node, unmount_under
from harness.images import File, LayerSpec, PushedImage, build_image, busybox_rootfs
from harness.proxy import Proxy, start_proxy
from harness.registry import Registry, start_registry
from harness.signing import publish_signed

pytestmark = [pytest.mark.root, pytest.mark.slow]
BIG = 6 << 20
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _big() -> bytes:
    seed = hashlib.sha256(b"private").digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(BIG // 32))


PASSWD = b"root:x:0:0:root:/:/bin/sh\napp:x:1000:1000::/:/bin/sh\nother:x:1001:1001::/:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nother:x:1001:\n"
FILES = {
    "/data/weights.bin": (_big(), 0o644, 0),
    "/data/secret.txt": (b"api key of the private image\n", 0o644, 0),
    "/data/own.txt": (b"only uid 1000 reads this\n", 0o600, 1000),
}


@dataclass
class World:
    reg: Registry
    proxy: Proxy  # counts what nodes fetch
    img: PushedImage
    base: Path  # world-traversable: the node's dirs live here

    @property
    def ref(self) -> str:
        return f"{self.proxy.host}/private/app:v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("access")
    base = Path(tempfile.mkdtemp(prefix="lzs-access-", dir="/var/tmp"))
    base.chmod(0o755)
    reg = start_registry(tmp / "reg")
    proxy = start_proxy(reg.url)
    try:
        layers = [busybox_rootfs([File("/etc/passwd", PASSWD), File("/etc/group", GROUP)]),
                  LayerSpec(entries=[File(p, data, mode=mode, uid=uid, gid=uid)
                                     for p, (data, mode, uid) in FILES.items()])]
        img = build_image(tmp / "img", layers, cmd=["/bin/true"], ref=f"{reg.host}/private/app:v1")
        publish_signed(img.ref, tmp)
        yield World(reg, proxy, img, base)
    finally:
        proxy.stop()
        reg.stop()
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, timeout=60)


def _read_all(cd, ref: str, name: str, user: str = "root") -> dict[str, str]:  # noqa: ANN001
    """sha256 of every file of FILES that a container process of ``user`` can read. ctr
    1.6 has no --user and ignores the image for a --config spec, so the container starts as
    root and busybox ``su`` drops to the user (uid and gid from the image's /etc/passwd)."""
    cmd = "sha256sum " + " ".join(FILES)
    args = ["sha256sum", *FILES] if user == "root" else ["su", "-s", "/bin/sh", user, "-c", cmd]
    out = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, name, *args, check=False)
    assert out.returncode in (0, 1), out.stderr  # sha256sum exits 1 when a file is unreadable
    return {line.split()[1]: line.split()[0] for line in out.stdout.splitlines() if len(line.split()) == 2}


def _expected(paths: list[str]) -> dict[str, str]:
    return {p: hashlib.sha256(FILES[p][0]).hexdigest() for p in paths}


def _passed_through(address: str) -> int:
    """Files of the node's layers that have a backing file (``status --json``)."""
    out = subprocess.run([sys.executable, "-m", "snapshotter", "status", "--address", address, "--json"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return sum(layer.get("passthrough_files") or 0 for img in json.loads(out)["images"] for layer in img["layers"])


def _store_entries(root: Path) -> Iterator[Path]:
    """Everything lazysnap wrote: not the FUSE mount, not a container's own tree."""
    for top, dirs, names in os.walk(root):
        here = Path(top)
        dirs[:] = [d for d in dirs if not os.path.ismount(here / d)
                   and not (here.parent.name == "snapshots" and d in ("fs", "work"))]
        yield from (here / d for d in dirs)
        yield from (here / n for n in names)


def _store_modes(root: Path) -> Iterator[tuple[Path, int]]:
    """``_store_entries`` with their modes, leaving out what goes while the walk runs: a
    finished container's snapshot, which containerd removes after ``--rm`` returns."""
    for p in _store_entries(root):
        try:
            yield p, p.lstat().st_mode
        except FileNotFoundError:
            continue


@pytest.fixture
def node(world: World) -> Iterator[tuple]:
    workdir = Path(tempfile.mkdtemp(prefix="node-", dir=world.base))
    workdir.chmod(0o755)
    try:
        with lazysnap_node(workdir, config="[prefetch]\nbackground = false\n") as pair:
            yield pair
    finally:
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def test_nobody_reads_nothing_containers_read_everything(world: World, node: tuple) -> None:
    daemon, cd = node
    root = daemon.root
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
    # containers: root reads every file; uid 1000 every file it may (its own 0600 one included)
    assert _read_all(cd, world.ref, "as-root") == _expected(list(FILES))
    assert _read_all(cd, world.ref, "as-1000", user="app") == _expected(list(FILES))
    assert _read_all(cd, world.ref, "as-1001", user="other") == _expected(
        ["/data/weights.bin", "/data/secret.txt"])  # 0600 of uid 1000 stays closed to 1001

    # control: nobody reaches the directory the root lives in
    assert _as_nobody("ls", str(root.parent)).returncode == 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    listing = _as_nobody("ls", str(root))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    # the FUSE mount: no layer listed, no byte of the image read
    mnt = root / "mnt"
    layer_files = [Path(top) / n for top, _, names in os.walk(mnt) for n in names if n == "secret.txt"]
    assert layer_files, "the lazy layer is not under <root>/mnt"
    for path in [mnt, *layer_files]:
        got = _as_nobody("cat", str(path))
        assert got.returncode != 0 and got.stdout == "", (path, got)
    # every chunk, blob, index and database file lazysnap wrote is private
    wide = [f"{p.relative_to(root)} {stat.S_IMODE(mode):04o}" for p, mode in _store_modes(root)
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077]
    assert not wide, wide
    assert any((root / "chunks").rglob("*")), "nothing was fetched into the store"


def test_old_wide_root_is_tightened_and_every_chunk_still_serves(world: World, node: tuple) -> None:
    daemon, cd = node
    root = daemon.root
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
    assert _read_all(cd, world.ref, "first") == _expected(list(FILES))
    # weights.bin passes through: its chunks move into its backing file (once, then stable)
    deadline = time.monotonic() + 30
    while _passed_through(daemon.address) < 1:
        assert time.monotonic() < deadline, "weights.bin got no backing file"
        time.sleep(0.2)
    assert daemon.terminate() == 0
    # what an older version left: 0755 directories, 0644 files
    for p in [root, *_store_entries(root)]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    chunks = sorted(p for p in (root / "chunks").rglob("*") if p.is_file() and ".tmp" not in p.parts)
    assert chunks
    daemon.start()
    cd.wait_snapshotter("lazysnap")
    world.proxy.reset_stats()
    assert "event=root_tightened" in daemon.log_path.read_text()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in chunks)
    assert _as_nobody("ls", str(root)).returncode != 0
    # every chunk still serves: the same bytes, from the store, nothing fetched again
    assert _read_all(cd, world.ref, "after") == _expected(list(FILES))
    assert world.proxy.stats.body_bytes == 0
    assert sorted(p for p in (root / "chunks").rglob("*") if p.is_file() and ".tmp" not in p.parts) == chunks
