"""FUSE passthrough through the daemon (``[lazy] fuse_passthrough``): a file whose chunks are
all local gets a backing file and its next open is passed to the kernel; a file with a chunk
missing never is. With the session in this process and in a FUSE holder."""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import mmap
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.containerd import lazysnap_node, stop_fuse_holder, unmount_under
from harness.images import File, LayerSpec, build_image, busybox_rootfs
from harness.registry import start_registry
from harness.signing import sign_flags
from snapshotter.fetch import Fetcher, FetchOptions
from snapshotter.fetch.sources import FileBlobSource, IndexCodec
from snapshotter.fs import LayerData, LayerTree, lazyfs
from snapshotter.fs.thread import FuseThread
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, write_index
from snapshotter.store import ChunkStore
from snapshotter.store.metrics import REGISTRY

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[1]

CHUNK = 256 << 10
FILES = {"models/a.bin": 3 << 20, "models/b.bin": (2 << 20) + 12345, "etc/small": 1000}


def _bytes(name: str, size: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))[:size]


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[tuple[Path, IndexFile]]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, size in FILES.items():
            ti = tarfile.TarInfo(name)
            ti.size = size
            tf.addfile(ti, io.BytesIO(_bytes(name, size)))
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(gzip.compress(raw.getvalue(), 1))
    write_index(tmp_path / "layer.idx", index_file(str(blob), span=CHUNK, chunk_size=CHUNK))
    index = IndexFile.open(tmp_path / "layer.idx")
    try:
        yield blob, index
    finally:
        index.close()


def _mount(root: Path, blob: Path, index: IndexFile, holder: bool) -> tuple[FuseThread, Path]:
    store = ChunkStore(root)
    lf = Fetcher(store, FetchOptions(max_concurrency=2, deadline_s=10)).layer("L", IndexCodec(index),
                                                                               FileBlobSource(blob))
    ft = FuseThread(root / "mnt", passthrough=True, passthrough_min_bytes=1 << 20, threads=2,
                    holder=root / "fuse.sock" if holder else None)
    d = ft.run(lambda: ft.fs.add_layer("abc", LayerTree.build(index.entries()), LayerData(index, store, lf)))
    return ft, d


def _wait(what, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _backing_sizes(root: Path) -> list[int]:
    """The sizes of the backing files (not their lodging records) under ``root``."""
    return sorted(p.stat().st_size for p in (root / "files").rglob("*") if p.is_file() and p.suffix != ".chunks")


def _drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


@pytest.mark.parametrize("holder", [False, True], ids=["in-process", "fuse-holder"])
def test_complete_files_pass_through_and_partial_ones_never(tmp_path: Path, layer, holder: bool) -> None:
    blob, index = layer
    root = tmp_path / "root"
    ft, d = _mount(root, blob, index, holder)
    counters = ft.fs.counters
    try:
        a, b = d / "models/a.bin", d / "models/b.bin"
        assert a.read_bytes() == _bytes("models/a.bin", FILES["models/a.bin"])  # every chunk of a: local
        with open(b, "rb") as f:
            assert f.read(100_000) == _bytes("models/b.bin", FILES["models/b.bin"])[:100_000]  # b: one chunk
        _wait(lambda: counters().get("backing_files", 0) >= 1)
        time.sleep(2.5 * lazyfs.BACKING_SETTLE_S)  # b's pass too
        assert counters()["backing_files"] == 1
        assert _backing_sizes(root) == [FILES["models/a.bin"]]

        _drop_caches()
        before = counters()
        with open(a, "rb") as f:  # passed through: its reads never reach us
            assert f.read() == _bytes("models/a.bin", FILES["models/a.bin"])
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                assert m[FILES["models/a.bin"] - 5000:] == _bytes("models/a.bin", FILES["models/a.bin"])[-5000:]
        with open(b, "rb") as f:  # partly local: served by us, and right
            assert f.read() == _bytes("models/b.bin", FILES["models/b.bin"])
        time.sleep(0.7)  # the holder reports its counters twice a second
        after = counters()
        assert after["open_passthrough"] - before["open_passthrough"] == 1
        assert after["read"] > before["read"]  # b's reads

        # b is now complete: from its next open on it passes through too
        _wait(lambda: counters()["backing_files"] >= 2)
        with open(b, "rb") as f:
            assert f.read() == _bytes("models/b.bin", FILES["models/b.bin"])
        _wait(lambda: counters()["open_passthrough"] - before["open_passthrough"] == 2)
        assert REGISTRY.get_sample_value("lazysnap_fuse_passthrough") == 1

        # a.bin is on disk once, in its backing file
        want = _bytes("models/a.bin", FILES["models/a.bin"])
        a_chunks = [hashlib.sha256(want[i:i + CHUNK]).digest() for i in range(0, len(want), CHUNK)]
        store = ft.fs.layer("abc").data.store
        assert not any(store.path_of(c).exists() for c in a_chunks)
        assert store.usage().bytes == sum(FILES.values())  # the layer's bytes, each once

        ft.run(lambda: ft.fs.remove_layer("abc"))  # its backing files become cache, whole
        assert _backing_sizes(root) == sorted([FILES["models/a.bin"], FILES["models/b.bin"]])
        store = ChunkStore(root)  # what a daemon or `lazysnap prune` started now finds
        assert all(store.known(c) for c in a_chunks) and store.usage().evictable_bytes >= len(want)
        store.prune(apply=True)
        assert not [p for p in (root / "files").rglob("*") if p.is_file()]
        assert not any(store.known(c) for c in a_chunks)
    finally:
        ft.stop()
        if holder:
            stop_fuse_holder(root)
        unmount_under(tmp_path)


def test_backing_files_wait_while_images_start(tmp_path: Path, layer) -> None:
    """``backing_gate`` (the prefetch manager's Pause in the daemon): a complete file gets its
    backing file only once the gate opens, so the copy does not compete with a start."""
    import asyncio

    blob, index = layer
    root = tmp_path / "root"
    ft, d = _mount(root, blob, index, False)
    counters = ft.fs.counters

    async def closed_gate() -> asyncio.Event:
        return asyncio.Event()

    gate = ft.run(closed_gate)
    ft.fs.backing_gate = gate.wait
    try:
        assert (d / "models/a.bin").read_bytes() == _bytes("models/a.bin", FILES["models/a.bin"])
        time.sleep(3 * lazyfs.BACKING_SETTLE_S)
        assert counters().get("backing_files", 0) == 0 and _backing_sizes(root) == []

        async def open_gate() -> None:
            gate.set()

        ft.run(open_gate)
        _wait(lambda: counters().get("backing_files", 0) >= 1)
        assert _backing_sizes(root) == [FILES["models/a.bin"]]
    finally:
        ft.stop()
        unmount_under(tmp_path)


def test_a_file_completed_while_open_passes_through_from_its_next_open(tmp_path: Path, layer) -> None:
    blob, index = layer
    root = tmp_path / "root"
    ft, d = _mount(root, blob, index, False)
    counters = ft.fs.counters
    want = _bytes("models/a.bin", FILES["models/a.bin"])
    try:
        with open(d / "models/a.bin", "rb") as held:  # open through us before the file is local
            assert held.read() == want
            _wait(lambda: counters().get("backing_files", 0) >= 1)
            first = counters()["open_passthrough"]
            with open(d / "models/a.bin", "rb") as again:  # a cached open is outstanding: not yet
                assert again.read() == want
            assert counters()["open_passthrough"] == first
            # the file is on disk once: its chunks are lodged in the backing file
            store = ft.fs.layer("abc").data.store
            chunks = [hashlib.sha256(want[i:i + CHUNK]).digest() for i in range(0, len(want), CHUNK)]
            _wait(lambda: not any(store.path_of(c).exists() for c in chunks), 5)
            assert all(store.known(c) for c in chunks)
            assert store.read(chunks[3], 10, 20) == want[3 * CHUNK + 10:3 * CHUNK + 30]
            # and the open through us reads it from there (C workers, no chunk file)
            _drop_caches()
            local = counters()["read_local"]
            held.seek(0)
            assert held.read() == want
            assert counters()["read_local"] > local
        with open(d / "models/a.bin", "rb") as f:
            assert f.read() == want
        assert counters()["open_passthrough"] == first + 1
    finally:
        ft.stop()
        unmount_under(tmp_path)


def test_a_holder_started_without_passthrough_is_named_as_the_reason(tmp_path: Path, layer) -> None:
    """A supervisor's holder unit without ``--passthrough``: the daemon says so in one line
    and serves every read itself."""
    blob, index = layer
    root = tmp_path / "root"
    holder = subprocess.Popen([sys.executable, "-m", "snapshotter", "fuse-holder", "--root", str(root)], cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: (root / "fuse.sock").exists() and holder.poll() is None)
        ft, d = _mount(root, blob, index, True)
        try:
            assert "--passthrough" in str(ft.fs.passthrough_unavailable)
            assert REGISTRY.get_sample_value("lazysnap_fuse_passthrough") == 0
            assert (d / "models/a.bin").read_bytes() == _bytes("models/a.bin", FILES["models/a.bin"])
            assert not (root / "files").exists()
        finally:
            ft.stop()
    finally:
        stop_fuse_holder(root)
        unmount_under(tmp_path)


def test_a_restarted_daemon_keeps_passing_files_through(tmp_path: Path, layer) -> None:
    """Daemon 1 gives a file its backing file and stops; the holder keeps the layer and its
    registered backing. Daemon 2 adds the layer back: the backing file on disk is hashed
    again before it is used, nothing is made twice, and opens keep passing through."""
    blob, index = layer
    root = tmp_path / "root"
    want = _bytes("models/a.bin", FILES["models/a.bin"])
    made = REGISTRY.get_sample_value("lazysnap_fuse_backing_materialized_bytes_total") or 0
    try:
        ft, d = _mount(root, blob, index, True)
        try:
            assert (d / "models/a.bin").read_bytes() == want
            _wait(lambda: ft.fs.counters().get("backing_files", 0) >= 1)
        finally:
            ft.stop()
        assert REGISTRY.get_sample_value("lazysnap_fuse_backing_materialized_bytes_total") - made == len(want)
        with open(d / "models/a.bin", "rb") as f:  # no daemon: the holder passes it through
            assert f.read() == want
        ft, d = _mount(root, blob, index, True)
        try:
            assert ft.fs.passthrough_unavailable is None
            # daemon 1 lodged a.bin's chunks in its backing file: daemon 2 knows them from
            # the layer's registration on (nothing fetches them again), checked on first read
            store = ft.fs.layer("abc").data.store
            chunks = [hashlib.sha256(want[i:i + CHUNK]).digest() for i in range(0, len(want), CHUNK)]
            assert all(store.known(c) for c in chunks)
            assert not any(store.path_of(c).exists() for c in chunks)
            assert store.read(chunks[-1]) == want[(len(chunks) - 1) * CHUNK:]
            _wait(lambda: ft.fs.passthrough_files("abc") == 1)
            before = ft.fs.counters()["open_passthrough"]
            with open(d / "models/a.bin", "rb") as f:
                assert f.read() == want
            _wait(lambda: ft.fs.counters()["open_passthrough"] > before, 5)
            assert REGISTRY.get_sample_value("lazysnap_fuse_backing_materialized_bytes_total") - made == len(want)
        finally:
            ft.stop()
    finally:
        stop_fuse_holder(root)
        unmount_under(tmp_path)


def test_a_quarantined_layer_never_serves_from_its_backing_files(tmp_path: Path, layer) -> None:
    blob, index = layer
    root = tmp_path / "root"
    ft, d = _mount(root, blob, index, False)
    try:
        assert (d / "models/a.bin").read_bytes() == _bytes("models/a.bin", FILES["models/a.bin"])
        _wait(lambda: ft.fs.counters().get("backing_files", 0) >= 1)
        ft.call(lambda: ft.fs.quarantine("abc", "the layer's blob does not match its index"))
        with pytest.raises(OSError) as exc:
            (d / "models/a.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert ft.fs.counters()["open_passthrough"] == 0
    finally:
        ft.stop()
        unmount_under(tmp_path)


@pytest.mark.parametrize("holder", [False, True], ids=["in-process", "fuse-holder"])
def test_many_opens_and_closes_while_files_complete(tmp_path: Path, layer, holder: bool) -> None:
    """Readers open, read (read and mmap) and close both big files over and over from before
    any chunk is local until well after both pass through: every byte right, no open fails
    (an inode is in either cached or passthrough mode; a wrong open count would fail opens
    with ETXTBSY)."""
    blob, index = layer
    root = tmp_path / "root"
    ft, d = _mount(root, blob, index, holder)
    # readers in processes of their own: a page fault on a mapping holds the GIL, which
    # the filesystem's loop in this process needs to answer the read the fault waits for
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(d), str(k)], stdout=subprocess.PIPE, text=True)
               for k in range(6)]
    try:
        _wait(lambda: ft.fs.counters().get("backing_files", 0) >= 2, 60)
        _wait(lambda: ft.fs.counters()["open_passthrough"] >= 20, 30)
    finally:
        (d.parent.parent / "stop-readers").touch()
        outs = [r.communicate(timeout=60)[0] for r in readers]
        ft.stop()
        if holder:
            stop_fuse_holder(root)
        unmount_under(tmp_path)
    assert all(r.returncode == 0 for r in readers), outs
    assert all(out.startswith("reads ") for out in outs), outs
    errors = [ln for out in outs for ln in out.splitlines()[1:] if ln]
    assert not errors, errors[:10]


READER = f"""
import mmap, os, random, sys
sys.path.insert(0, {str(REPO)!r})
from tests.test_passthrough import FILES, _bytes
d, k = sys.argv[1], int(sys.argv[2])
stop = os.path.join(os.path.dirname(os.path.dirname(d)), "stop-readers")
want = {{n: _bytes(n, FILES[n]) for n in ("models/a.bin", "models/b.bin")}}
rnd, n_reads, errors = random.Random(k), 0, []
while not os.path.exists(stop):
    name = rnd.choice(sorted(want))
    off, n = rnd.randrange(FILES[name]), rnd.randrange(1, 300000)
    try:
        with open(os.path.join(d, name), "rb") as f:
            if k % 2:
                f.seek(off)
                got = f.read(n)
            else:
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                    got = m[off:off + n]
        if got != want[name][off:off + n]:
            errors.append(f"{{name}}@{{off}}+{{n}}: wrong bytes")
    except OSError as exc:
        errors.append(f"{{name}}: {{exc}}")
    n_reads += 1
print("reads", n_reads)
print("\\n".join(errors[:20]))
"""


def test_kernel_refusal_turns_passthrough_off_and_reads_go_on(tmp_path: Path, layer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Backing files on overlayfs: the kernel refuses them (a stacked filesystem). Our own
    check says so at start; with that check bypassed, the kernel's refusal does the same."""
    blob, index = layer
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, merged):
        p.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        for bypass in (False, True):
            if bypass:
                monkeypatch.setattr(lazyfs, "filesystem_type", lambda path: "ext4")
            root = merged / f"root-{bypass}"
            ft, d = _mount(root, blob, index, False)
            try:
                assert (d / "models/a.bin").read_bytes() == _bytes("models/a.bin", FILES["models/a.bin"])
                if bypass:
                    _wait(lambda: ft.fs.passthrough_unavailable is not None)
                    assert "kernel refused" in str(ft.fs.passthrough_unavailable)
                else:
                    assert "overlay" in str(ft.fs.passthrough_unavailable)
                assert REGISTRY.get_sample_value("lazysnap_fuse_passthrough") == 0
                assert (d / "models/a.bin").read_bytes() == _bytes("models/a.bin", FILES["models/a.bin"])
                assert ft.fs.counters()["open_passthrough"] == 0
            finally:
                ft.stop()
                unmount_under(root)
    finally:
        unmount_under(merged)


@pytest.mark.slow
def test_containers_read_passed_through_files_through_overlayfs(tmp_path: Path) -> None:
    """Real containerd, runc and registry: overlayfs stacks on the lazy layers' mount with
    passthrough agreed; a file read whole by a first container gets a backing file, and a
    second container's reads of it go straight to that file, every byte right."""
    weights = _bytes("weights", (4 << 20) + 777)
    reg = start_registry(tmp_path / "reg")
    try:
        img = build_image(tmp_path / "img", [busybox_rootfs(), LayerSpec(entries=[File("/models/w.bin", weights)])],
                          cmd=["/bin/sh"], ref=f"{reg.host}/pt/e2e:v1")
        subprocess.run([sys.executable, "-m", "snapshotter", "index", img.ref, "--push", *sign_flags(),
                        "--root", str(tmp_path / "publisher"), "--hosts-dir", str(tmp_path / "nohosts")],
                       check=True, cwd=REPO, capture_output=True, timeout=300)
        config = "[lazy]\nfuse_passthrough = true\nfuse_passthrough_min_bytes = 1048576\n"
        with lazysnap_node(tmp_path / "node", config=config) as (daemon, cd):
            cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", img.ref)
            want = hashlib.sha256(weights).hexdigest()

            def checksum(name: str) -> str:
                return cd.ctr("run", "--rm", "--snapshotter", "lazysnap", img.ref, name,
                              "sha256sum", "/models/w.bin").stdout.split()[0]

            assert checksum("first") == want  # through the daemon: fetched, verified, stored
            _wait(lambda: daemon.metric("lazysnap_fuse_backing_bytes") >= len(weights), 30)
            assert daemon.metric("lazysnap_fuse_passthrough") == 1
            status = json.loads(subprocess.run(
                [sys.executable, "-m", "snapshotter", "status", "--json", "--address", daemon.address],
                cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout)
            counts = [layer["passthrough_files"] for image in status["images"] for layer in image["layers"]]
            assert max(counts) == 1, counts  # the weights file; the busybox layer has none that big
            opens = daemon.metric("lazysnap_fuse_passthrough_opens_total")
            _drop_caches()
            assert checksum("second") == want
            _wait(lambda: daemon.metric("lazysnap_fuse_passthrough_opens_total") > opens, 10)
    finally:
        reg.stop()
