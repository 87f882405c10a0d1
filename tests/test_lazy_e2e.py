"""End to end: real containerd + runc + docker-registry + `lazysnap serve` with the lazy provider.

`ctr-remote image rpull --snapshotter lazysnap` pulls without downloading the layers (the
indexes were published with `lazysnap index --push`), `ctr run` prints the expected
output, and the registry's counted bytes show the big layer was read only in part.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from harness.containerd import start_containerd, start_lazysnap, unmount_under
from harness.images import File, LayerSpec, build_image, busybox_rootfs
from harness.proxy import start_proxy
from harness.registry import start_registry

pytestmark = [pytest.mark.root, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIG = 24 << 20


def _big() -> bytes:
    seed = hashlib.sha256(b"big").digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(BIG // 32))


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_rpull_and_run_lazily(tmp_path: Path) -> None:
    reg = start_registry(tmp_path / "reg")
    proxy = start_proxy(reg.url)
    daemon = None
    cd = None
    try:
        layers = [
            busybox_rootfs(),
            LayerSpec(entries=[File("/data/big.bin", _big()), File("/data/hello.txt", b"hello lazy world\n"),
                               File("/data/doomed.txt", b"deleted by the next layer\n")]),
            LayerSpec(entries=[File("/data/extra.txt", b"top layer\n")], delete=["/data/doomed.txt"]),
        ]
        img = build_image(tmp_path / "img", layers, cmd=["/bin/sh", "-c", "cat /data/hello.txt; ls /data"],
                          ref=f"{reg.host}/lazy/e2e:v1")
        big_layer_size = max(img.layer_sizes)
        subprocess.run([sys.executable, "-m", "snapshotter", "index", img.ref, "--push", "--root",
                        str(tmp_path / "publisher"), "--hosts-dir", str(tmp_path / "nohosts")],
                       check=True, cwd=REPO, capture_output=True, timeout=300)
        daemon = start_lazysnap(tmp_path / "daemon", root=tmp_path / "root")
        cd = start_containerd(tmp_path / "ctrd", proxy_plugins={"lazysnap": daemon.address})
        proxy.reset_stats()
        ref = f"{proxy.host}/lazy/e2e:v1"
        cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
        have = set(cd.ctr("content", "ls", "-q").stdout.split())
        assert not have & set(img.layer_digests), "containerd downloaded a layer blob"
        r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, "lazy-e2e")
        assert r.stdout == "hello lazy world\nbig.bin\nextra.txt\nhello.txt\n", r.stdout + r.stderr
        fetched = proxy.stats.body_bytes
        assert fetched < img.compressed_size - big_layer_size // 2, (fetched, img.layer_sizes)
        # a file read through overlayfs + FUSE equals the layer content
        r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, "lazy-e2e-2", "sha256sum", "/data/big.bin")
        assert r.stdout.split()[0] == hashlib.sha256(_big()).hexdigest()
        assert daemon.metrics_url is not None
        assert _metric(daemon.metrics_url, "lazysnap_registry_bytes_fetched_total") > 0
        assert _metric(daemon.metrics_url, "lazysnap_remote_snapshots_total") == len(img.layer_digests)
    finally:
        if cd is not None:
            cd.stop()
        if daemon is not None:
            daemon.terminate()
            daemon.stop()
        unmount_under(tmp_path)
        proxy.stop()
        reg.stop()
