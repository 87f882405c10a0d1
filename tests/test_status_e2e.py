"""The operator's view through real containerd: `status --json` follows a lazy start to a
complete background fill, and after `ctr images rm` + GC, `prune --apply` reclaims the
removed image's own chunks and keeps the ones another image still uses."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.containerd import Containerd, LazysnapDaemon, lazysnap_node
from harness.images import File, LayerSpec, PushedImage, build_image, busybox_rootfs
from harness.registry import Registry, start_registry
from harness.signing import sign_flags
from snapshotter.index.format import IndexFile
from snapshotter.layers.indexes import index_path
from snapshotter.store import ChunkStore
from tests.test_status import validate_status

pytestmark = [pytest.mark.root, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
CONFIG = """[lazy]
small_layer_bytes = 65536
[prefetch]
pause_after_start_s = 4.0
"""


def _random(seed: str, n: int) -> bytes:
    base = hashlib.sha256(seed.encode()).digest()
    return b"".join(hashlib.sha256(base + i.to_bytes(4, "big")).digest() for i in range(n // 32))


SHARED = _random("shared", 3 << 20)


def lazysnap(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, PushedImage, PushedImage]]:
    tmp = tmp_path_factory.mktemp("status-e2e")
    reg = start_registry(tmp / "reg")
    try:
        a = build_image(tmp / "a", [busybox_rootfs(), LayerSpec(entries=[
            File("/data/a.bin", _random("a", 6 << 20)), File("/data/s.bin", SHARED)])],
            cmd=["ls", "/data"], ref=f"{reg.host}/op/a:v1")
        b = build_image(tmp / "b", [busybox_rootfs(), LayerSpec(entries=[
            File("/data/b.bin", _random("b", 5 << 20)), File("/data/s.bin", SHARED)])],
            cmd=["ls", "/data"], ref=f"{reg.host}/op/b:v1")
        for img in (a, b):
            lazysnap("index", img.ref, "--push", *sign_flags(), "--root", str(tmp / "publisher"),
                     "--hosts-dir", str(tmp / "none"))
        yield reg, a, b
    finally:
        reg.stop()


def _on_node(root: Path, digests: Iterable[bytes]) -> set[bytes]:
    """Which chunks the node's store holds, as files of their own or lodged in a backing file
    (read as ``lazysnap profile push --pack`` does: the daemon owns the store)."""
    store = ChunkStore(root)
    try:
        return {d for d in digests if store.known(d)}
    finally:
        store.close()


def status(daemon: LazysnapDaemon) -> dict[str, Any]:
    doc = json.loads(lazysnap("status", "--json", "--address", daemon.address).stdout)
    validate_status(doc)
    return doc


def _layers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {layer["digest"]: layer for img in doc["images"] for layer in img["layers"]}


def _chunks(root: Path, digest: str) -> dict[bytes, int]:
    idx = IndexFile.open(index_path(root, digest))
    try:
        return {idx.chunk(i).digest: idx.chunk(i).length for i in range(idx.chunk_count)}
    finally:
        idx.close()


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[LazysnapDaemon, Containerd]]:
    with lazysnap_node(tmp_path, config=CONFIG) as pair:
        yield pair


def test_status_follows_a_lazy_start_and_prune_reclaims_a_removed_image(
        images: tuple[Registry, PushedImage, PushedImage], node: tuple[LazysnapDaemon, Containerd]) -> None:
    _, a, b = images
    daemon, cd = node
    for img in (a, b):
        cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", img.ref)
    doc = status(daemon)  # right after the pulls: nothing read, the fill still paused
    assert [img["ref"] for img in doc["images"]] == [a.ref, b.ref]
    assert [[layer["digest"] for layer in img["layers"]] for img in doc["images"]] == [a.layer_digests,
                                                                                       b.layer_digests]
    layers = _layers(doc)
    assert set(layers) == set(a.layer_digests) | set(b.layer_digests)  # the base layer is shared
    for layer in layers.values():
        assert (layer["state"], layer["index_source"], layer["format"]) == ("lazy", "referrer", "gzip")
        assert layer["bytes_total"] > 0 and layer["chunks_total"] > 0
    top_a = layers[a.layer_digests[1]]
    assert top_a["bytes_local"] < top_a["bytes_total"], top_a
    assert doc["store"]["policy"] == "lru" and doc["store"]["pinned_layers"] == 3
    text = lazysnap("status", "--address", daemon.address).stdout
    assert f"IMAGE {a.ref}" in text and "referrer" in text

    r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", a.ref, "status-a", "sha256sum", "/data/s.bin")
    assert r.stdout.split()[0] == hashlib.sha256(SHARED).hexdigest()

    def complete() -> dict[str, Any] | None:
        d = status(daemon)
        ls = _layers(d)
        done = all(x["bytes_local"] == x["bytes_total"] and x["chunks_local"] == x["chunks_total"]
                   and x["complete"] and x["verified"] and x["fill"] and x["fill"]["state"] == "done"
                   for x in ls.values())
        return d if done else None

    doc = _wait(complete, 180, "every layer filled and verified")
    for layer in _layers(doc).values():
        fill = layer["fill"]
        assert fill["chunks_done"] == fill["chunks_total"] == layer["chunks_total"]
    top_a = _layers(doc)[a.layer_digests[1]]
    assert top_a["fill"]["bytes_fetched"] > 0 and top_a["registry_bytes"] > 0
    assert doc["store"]["evictable_bytes"] == 0

    # ctr images rm + containerd's GC: Remove of A's own snapshots releases its top layer
    unique = {d: n for d, n in _chunks(daemon.root, a.layer_digests[1]).items()
              if d not in _chunks(daemon.root, b.layer_digests[1]) and d not in _chunks(daemon.root, b.layer_digests[0])}
    shared = {d for d in _chunks(daemon.root, a.layer_digests[1]) if d not in unique}
    assert unique and shared
    cd.ctr("images", "rm", "--sync", a.ref)
    doc = status(daemon)
    assert [img["ref"] for img in doc["images"]] == [b.ref], json.dumps(doc["images"], indent=1)[:3000]
    assert doc["store"]["pinned_layers"] == 2 and doc["store"]["evictable_bytes"] == sum(unique.values())

    dry = json.loads(lazysnap("prune", "--address", daemon.address, "--json").stdout)
    assert (dry["applied"], dry["via"], dry["chunks"], dry["bytes"]) == (False, "daemon", len(unique),
                                                                          sum(unique.values()))
    assert _on_node(daemon.root, unique) == set(unique)
    out = lazysnap("prune", "--address", daemon.address, "--apply").stdout
    assert out.startswith(f"reclaimed {len(unique)} chunks"), out
    assert not _on_node(daemon.root, unique)
    assert _on_node(daemon.root, shared) == shared
    assert status(daemon)["store"]["evictable_bytes"] == 0
    r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", b.ref, "status-b", "sha256sum", "/data/s.bin")
    assert r.stdout.split()[0] == hashlib.sha256(SHARED).hexdigest()
