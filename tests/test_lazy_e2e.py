"""End to end: real containerd + runc + docker-registry + `lazysnap serve` with the lazy provider.

`ctr-remote image rpull --snapshotter lazysnap` pulls without downloading the layers (the
indexes were published with `lazysnap index --push`), `ctr run` prints the expected
output, and the registry's counted bytes show the big layer was read only in part.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.containerd import Containerd, LazysnapDaemon, lazysnap_node
from harness.images import File, LayerSpec, PushedImage, build_image, busybox_rootfs
from harness.proxy import Proxy, start_proxy
from harness.registry import Registry, start_registry
from harness.signing import publish_signed

pytestmark = [pytest.mark.root, pytest.mark.slow]
BIG = 24 << 20
CMD = ["/bin/sh", "-c", "cat /data/hello.txt; ls /data"]
EXPECTED = "hello lazy world\nbig.bin\nextra.txt\nhello.txt\n"


def _big() -> bytes:
    seed = hashlib.sha256(b"big").digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(BIG // 32))


@dataclass
class World:
    reg: Registry
    proxy: Proxy
    img: PushedImage

    @property
    def ref(self) -> str:
        """The image through the counting proxy (what containerd pulls)."""
        return f"{self.proxy.host}/lazy/e2e:v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e")
    reg = start_registry(tmp / "reg")
    proxy = start_proxy(reg.url)
    try:
        layers = [
            busybox_rootfs(),
            LayerSpec(entries=[File("/data/big.bin", _big()), File("/data/hello.txt", b"hello lazy world\n"),
                               File("/data/doomed.txt", b"deleted by the next layer\n")]),
            LayerSpec(entries=[File("/data/extra.txt", b"top layer\n")], delete=["/data/doomed.txt"]),
        ]
        img = build_image(tmp / "img", layers, cmd=CMD, ref=f"{reg.host}/lazy/e2e:v1")
        publish_signed(img.ref, tmp)
        yield World(reg, proxy, img)
    finally:
        proxy.stop()
        reg.stop()


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LazysnapDaemon, Containerd]]:
    """A lazysnap daemon (default config unless ``request.param`` gives ``[prefetch]`` keys) + containerd."""
    fetch = getattr(request, "param", {})
    config = "[prefetch]\n" + "".join(f"{k} = {str(v).lower()}\n" for k, v in fetch.items()) if fetch else ""
    with lazysnap_node(tmp_path, config=config) as pair:
        yield pair


@pytest.mark.parametrize("node", [{"background": False}], indirect=True)
def test_rpull_and_run_lazily(world: World, node: tuple[LazysnapDaemon, Containerd]) -> None:
    daemon, cd = node
    world.proxy.reset_stats()
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
    have = set(cd.ctr("content", "ls", "-q").stdout.split())
    assert not have & set(world.img.layer_digests), "containerd downloaded a layer blob"
    r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", world.ref, "lazy-e2e")
    assert r.stdout == EXPECTED, r.stdout + r.stderr
    fetched = world.proxy.stats.body_bytes
    big_layer = max(world.img.layer_sizes)
    assert fetched < world.img.compressed_size - big_layer // 2, (fetched, world.img.layer_sizes)
    # a file read through overlayfs + FUSE equals the layer content
    r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", world.ref, "lazy-e2e-2", "sha256sum", "/data/big.bin")
    assert r.stdout.split()[0] == hashlib.sha256(_big()).hexdigest()
    assert daemon.metrics_url is not None
    assert daemon.metric("lazysnap_registry_bytes_fetched_total") > 0
    assert daemon.metric("lazysnap_remote_snapshots_total") == len(world.img.layer_digests)
    rss_kb = int(next(line.split()[1] for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:")))
    assert rss_kb < 300 << 10, f"daemon RSS {rss_kb >> 10} MiB"


def test_four_containers_at_once(world: World, node: tuple[LazysnapDaemon, Containerd]) -> None:
    _, cd = node
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: cd.ctr("run", "--rm", "--snapshotter", "lazysnap", world.ref,
                                              f"par-{i}", "sha256sum", "/data/big.bin").stdout, range(4)))
    want = hashlib.sha256(_big()).hexdigest()
    assert [o.split()[0] for o in outs] == [want] * 4


def test_daemon_restart_remounts_layers(world: World, node: tuple[LazysnapDaemon, Containerd]) -> None:
    daemon, cd = node
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
    assert cd.ctr("run", "--rm", "--snapshotter", "lazysnap", world.ref, "before").stdout == EXPECTED
    assert daemon.terminate() == 0
    daemon.start()  # same root: the service restores every provided layer from the local index
    cd.wait_snapshotter("lazysnap")
    assert cd.ctr("run", "--rm", "--snapshotter", "lazysnap", world.ref, "after").stdout == EXPECTED
