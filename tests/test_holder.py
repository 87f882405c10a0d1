"""The FUSE holder (``lazysnap fuse-holder``): the mount outlives the daemon.

A real holder process and real FUSE; the "daemon" is ``LazyFS`` in holder mode on its own
loop (``FuseThread``), stopped and started again as ``lazysnap serve`` would be. Reads
through the mount are compared with the tar.
"""
from __future__ import annotations

import array
import asyncio
import concurrent.futures
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.containerd import stop_fuse_holder
from snapshotter.fetch import Fetcher, FetchOptions
from snapshotter.fetch.sources import FileBlobSource, IndexCodec
from snapshotter.fs import LayerData, LayerTree
from snapshotter.fs.metrics import REGISTRY
from snapshotter.fs.holderlink import HolderError
from snapshotter.fs.thread import FuseThread
from snapshotter.index.format import IndexFile
from snapshotter.store import ChunkStore
from tests.test_fetch import _members
from tests import test_fs

layer = test_fs.layer  # the fixture, shared

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[1]


class GatedSource(FileBlobSource):
    """A local blob whose range reads wait until ``gate`` is set (a registry that stalls)."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(path)
        self.gate = gate

    async def read_range(self, start: int, end: int) -> bytes:
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        return await super().read_range(start, end)


class Daemon:
    """What ``lazysnap serve`` does with the filesystem, on a FuseThread."""

    def __init__(self, root: Path, blob: Path, index: IndexFile, gate: threading.Event,
                 external: bool = False, layer_file: tuple[str, bytes] | None = None) -> None:
        self.ft = FuseThread(root / "mnt", holder=root / "fuse.sock", threads=2, holder_external=external)
        store = ChunkStore(root)
        lf = Fetcher(store, FetchOptions(max_concurrency=2, deadline_s=60)).layer(
            "L", IndexCodec(index), GatedSource(blob, gate))
        tree = LayerTree.build(index.entries())
        data = LayerData(index, store, lf)
        data.layer_file = layer_file
        self.dir = self.ft.run(lambda: self.ft.fs.add_layer("layer1", tree, data))

    def settle(self, path: Path) -> None:
        """Wait until the holder answers reads of ``path`` itself: its chunks are stored and
        the holder has heard they are verified (the reader got the bytes before that)."""
        deadline = time.monotonic() + 10
        while True:
            before = self.ft.call(self.ft.fs.counters).get("read_local", 0)
            _uncached_read(path)
            time.sleep(0.6)  # the holder reports its counters twice a second
            if self.ft.call(self.ft.fs.counters).get("read_local", 0) > before:
                return
            assert time.monotonic() < deadline, f"{path} never served from local chunks"

    def stop(self) -> None:
        self.ft.stop()


def _holder(root: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "snapshotter", "fuse-holder", "--root", str(root),
                             "--threads", "2", *extra], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(root.parent / "holder.err", "ab"))
    deadline = time.monotonic() + 15
    while not (root / "fuse.sock").exists():
        assert proc.poll() is None, (root.parent / "holder.err").read_text()[-2000:]
        assert time.monotonic() < deadline, "holder did not listen"
        time.sleep(0.02)
    return proc


def _uncached_read(path: Path, off: int = 0, size: int = -1) -> bytes:
    """Read through FUSE (the page cache dropped for the file first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if size < 0:
            size = os.fstat(fd).st_size - off
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


@pytest.fixture
def held(layer, tmp_path: Path):  # noqa: ANN001 - test_fs's layer: (tar, blob, open index)
    tar, blob, index = layer
    root = tmp_path / "root"
    try:
        yield _members(tar), blob, index, root
    finally:
        stop_fuse_holder(root)
        index.close()


def test_reads_survive_the_daemon_stopping_and_a_new_one_attaching(held) -> None:  # noqa: ANN001
    """Daemon 1 registers the layer and is stopped while a read it took waits on a stalled
    fetch; with no daemon, local reads go on and a new read waits; daemon 2 attaches,
    reuses the layer's slot, and answers both waiting reads - with the layer's bytes - and
    a file opened before the restart reads on."""
    want, blob, index, root = held
    gate = threading.Event()
    gate.set()
    waited_before = REGISTRY.get_sample_value("lazysnap_fuse_waited_reads_total") or 0
    d1 = Daemon(root, blob, index, gate)  # starts the holder
    holder_pid = int((root / "fuse-holder.pid").read_text())
    assert (d1.dir / "etc/hostname").read_bytes() == b"lazy\n"
    d1.settle(d1.dir / "etc/hostname")
    direct_before = REGISTRY.get_sample_value("lazysnap_fuse_holder_direct_replies_total") or 0
    assert _uncached_read(d1.dir / "data/big.bin", 0, 1 << 20) == want["data/big.bin"][:1 << 20]
    # fetched by the daemon and answered on its own copy of the session's fd (counted just
    # after the reply is written, so the reader may wake first: wait a moment for it)
    deadline = time.monotonic() + 5
    while ((REGISTRY.get_sample_value("lazysnap_fuse_holder_direct_replies_total") or 0) <= direct_before
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert (REGISTRY.get_sample_value("lazysnap_fuse_holder_direct_replies_total") or 0) > direct_before
    kept = os.open(d1.dir / "many/f0200", os.O_RDONLY)  # open across the restart
    results: dict[str, bytes | BaseException] = {}

    def read(key: str, path: Path, off: int, size: int) -> None:
        try:
            results[key] = _uncached_read(path, off, size)
        except BaseException as exc:  # noqa: BLE001 - the test checks what it was
            results[key] = exc

    try:
        gate.clear()  # the registry stalls: daemon 1 takes the next read and cannot answer it
        big = len(want["data/big.bin"])
        t1 = threading.Thread(target=read, args=("in_flight", d1.dir / "data/big.bin", big - 4096, 4096))
        t1.start()
        time.sleep(0.5)
        assert "in_flight" not in results
        d1.stop()  # SIGTERM of lazysnap serve: detaches, the holder keeps the mount
        assert os.path.isdir(root / "mnt/layer1")
        # no daemon: verified local chunks are still served, by the holder's C workers
        assert _uncached_read(root / "mnt/layer1/etc/hostname") == b"lazy\n"
        t2 = threading.Thread(target=read, args=("no_daemon", root / "mnt/layer1/data/big.bin", 3 << 20, 65536))
        t2.start()
        time.sleep(0.5)
        assert "no_daemon" not in results and "in_flight" not in results  # waiting, not failed
        gate.set()
        d2 = Daemon(root, blob, index, gate)  # lazysnap serve again: attaches, adopts the slot
        try:
            t1.join(30)
            t2.join(30)
            assert results["in_flight"] == want["data/big.bin"][big - 4096:]
            assert results["no_daemon"] == want["data/big.bin"][3 << 20:(3 << 20) + 65536]
            assert os.pread(kept, 1000, 0) == want["many/f0200"][:1000]
            assert int((root / "fuse-holder.pid").read_text()) == holder_pid  # the same holder
            waited = _counter(d2, "waited_reads", 2)  # both waited for a daemon, and for how long
            assert waited >= 2 and _counter(d2, "waited_ms", 1) >= 500
            assert (REGISTRY.get_sample_value("lazysnap_fuse_waited_reads_total") or 0) - waited_before >= 2
            for name, data in want.items():
                assert (d2.dir / name).read_bytes() == data, name
            with pytest.raises(HolderError, match="another lazysnap serve"):
                Daemon(root, blob, index, gate)  # a second daemon on the same root
        finally:
            d2.stop()
    finally:
        os.close(kept)
        gate.set()


def test_a_read_waits_for_a_daemon_then_fails_cleanly(held) -> None:  # noqa: ANN001
    """With no daemon for ``--wait-s``, a read that needs a fetch fails with EIO (never
    hangs); a read of a local chunk does not wait at all."""
    want, blob, index, root = held
    _holder(root, "--wait-s", "1")
    with pytest.raises(OSError, match="a FUSE holder serves"):
        FuseThread(root / "mnt")  # a daemon without fuse_holder must not mount over it
    gate = threading.Event()
    gate.set()
    d = Daemon(root, blob, index, gate)  # attaches to the running holder
    assert (d.dir / "etc/hostname").read_bytes() == b"lazy\n"
    d.settle(d.dir / "etc/hostname")
    d.stop()
    t0 = time.monotonic()
    assert _uncached_read(root / "mnt/layer1/etc/hostname") == b"lazy\n"
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(OSError) as exc:
        _uncached_read(root / "mnt/layer1/data/big.bin", 0, 4096)
    assert exc.value.errno == errno.EIO
    assert 0.9 < time.monotonic() - t0 < 5


def test_the_holder_reads_a_layer_file_with_no_daemon(held, layer) -> None:  # noqa: ANN001
    """A layer given with its layer file (here the layer's tar: each chunk at its offset in
    it) is read by the holder's C workers from that file, none of its chunks fetched, and
    still after the daemon stopped."""
    want, blob, index, root = held
    tar = layer[0]
    offsets = array.array("Q", (index.chunk(i).uncompressed_offset for i in range(index.chunk_count)))
    gate = threading.Event()  # the registry stalls: a read that needs a fetch does not finish

    def read_all(top: Path) -> None:
        for name, data in want.items():
            assert _uncached_read(top / name) == data, name

    d = Daemon(root, blob, index, gate, layer_file=(str(tar), offsets.tobytes()))
    running = True
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(read_all, d.dir).result(timeout=30)
            running = False
            d.stop()
            pool.submit(read_all, root / "mnt/layer1").result(timeout=30)
    finally:
        gate.set()
        if running:
            d.stop()


def test_layers_no_snapshot_uses_are_released_after_a_restart(held) -> None:  # noqa: ANN001
    """A layer the holder kept for a daemon that stopped, and that the next daemon neither
    restores nor is told to keep (removed while no daemon ran), is released; one still
    referenced (its restore may have failed) stays, its local reads served."""
    want, blob, index, root = held
    gate = threading.Event()
    gate.set()
    d1 = Daemon(root, blob, index, gate)
    assert (d1.dir / "etc/hostname").read_bytes() == b"lazy\n"
    d1.settle(d1.dir / "etc/hostname")
    d1.stop()
    d2 = FuseThread(root / "mnt", holder=root / "fuse.sock", threads=2)
    try:
        d2.run(lambda: d2.fs.release_held(keep={"layer1"}))
        assert _uncached_read(root / "mnt/layer1/etc/hostname") == b"lazy\n"
        d2.run(lambda: d2.fs.release_held(keep=set()))
        assert not (root / "mnt/layer1").exists()
        assert "event=layer_released layer=layer1" in (root / "fuse-holder.log").read_text()
    finally:
        d2.stop()


def _counter(d: Daemon, name: str, at_least: int) -> int:
    """The holder's counter ``name`` as the daemon last heard it, once it reaches
    ``at_least`` (it reports twice a second), or whatever it is after 5 s."""
    deadline = time.monotonic() + 5
    while (value := d.ft.call(d.ft.fs.counters).get(name, 0)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def _rehomes() -> float:
    return REGISTRY.get_sample_value("lazysnap_fuse_holder_rehomes_total", {"how": "taken_over"}) or 0.0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_the_session_outlives_the_holder(held, sig: signal.Signals) -> None:  # noqa: ANN001
    """The holder dies (killed, or stopped to be replaced by a new build) while a read it
    handed to the daemon waits on a stalled fetch and a file is open. The daemon kept a copy
    of the session's fd: the mount never breaks, a new holder takes the session over, the
    kernel sends the unanswered read again, and it gets the layer's bytes; the open file and
    every other file read on."""
    want, blob, index, root = held
    gate = threading.Event()
    gate.set()
    before = _rehomes()
    d = Daemon(root, blob, index, gate)  # starts holder 1
    first = int((root / "fuse-holder.pid").read_text())
    mnt_dev = os.stat(root / "mnt").st_dev
    d.settle(d.dir / "etc/hostname")
    kept = os.open(d.dir / "many/f0200", os.O_RDONLY)
    results: dict[str, bytes | BaseException] = {}

    def read(path: Path, off: int, size: int) -> None:
        try:
            results["in_flight"] = _uncached_read(path, off, size)
        except BaseException as exc:  # noqa: BLE001 - the test checks what it was
            results["in_flight"] = exc

    big = len(want["data/big.bin"])
    t = threading.Thread(target=read, args=(d.dir / "data/big.bin", big - 4096, 4096))
    try:
        gate.clear()  # the registry stalls: the read waits in the daemon, taken from holder 1
        t.start()
        time.sleep(0.5)
        assert "in_flight" not in results
        os.kill(first, sig)
        deadline = time.monotonic() + 30
        while _rehomes() == before:
            assert time.monotonic() < deadline, (root / "fuse-holder.log").read_text()[-3000:]
            time.sleep(0.05)
        second = int((root / "fuse-holder.pid").read_text())
        assert second != first
        gate.set()
        t.join(30)
        assert results["in_flight"] == want["data/big.bin"][big - 4096:]
        assert os.pread(kept, 1000, 0) == want["many/f0200"][:1000]
        assert os.stat(root / "mnt").st_dev == mnt_dev  # the same mount, never remounted
        assert _counter(d, "resent", 1) >= 1  # the kernel sent the unanswered read again
        for name, data in want.items():
            assert _uncached_read(d.dir / name) == data, name
    finally:
        os.close(kept)
        gate.set()
        t.join(30)
        d.stop()


@pytest.mark.parametrize("supervisor", ["systemd", "external"])
def test_a_supervised_holder_is_waited_for(held, monkeypatch: pytest.MonkeyPatch, supervisor: str) -> None:  # noqa: ANN001
    """A daemon run by systemd (``INVOCATION_ID``) leaves starting the next holder to the
    holder's unit; with ``fuse_holder_external`` (a DaemonSet) it never starts one, even at
    its own start: it waits, brings the session to the supervisor's holder, and starts none
    of its own."""
    want, blob, index, root = held
    gate = threading.Event()
    gate.set()
    before = _rehomes()
    if supervisor == "systemd":
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
        first = _holder(root)  # as lazysnap-fused.service runs it
        d = Daemon(root, blob, index, gate)
    else:
        started: list[subprocess.Popen[bytes]] = []
        threading.Timer(1.5, lambda: started.append(_holder(root))).start()  # the holder pod comes up late
        d = Daemon(root, blob, index, gate, external=True)
        first = started[0]
    try:
        assert int((root / "fuse-holder.pid").read_text()) == first.pid
        d.settle(d.dir / "etc/hostname")
        first.kill()
        first.wait(10)
        time.sleep(2.0)  # the unit's RestartSec, and then some
        assert _rehomes() == before  # waiting for the supervisor, not starting a holder itself
        (root / "fuse.sock").unlink()  # a restarted unit's holder binds it anew
        second = _holder(root)
        deadline = time.monotonic() + 30
        while _rehomes() == before:
            assert time.monotonic() < deadline, (root.parent / "holder.err").read_text()[-3000:]
            time.sleep(0.05)
        assert int((root / "fuse-holder.pid").read_text()) == second.pid
        for name, data in want.items():
            assert _uncached_read(d.dir / name) == data, name
    finally:
        d.stop()


def test_a_session_taken_over_but_never_started_is_ended_cleanly(tmp_path: Path) -> None:
    """A daemon brings the session to a new holder and dies before its layers are back: the
    kernel's inode numbers mean layers only that daemon knew, so the holder ends the session
    (unmount) rather than let a new daemon number them otherwise."""
    from snapshotter.fs import holderwire as wire
    from snapshotter.fs.mount import mount_device

    root = tmp_path / "root"

    async def hello(session_fd: int | None) -> tuple[dict[str, object], int | None, socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(root / "fuse.sock"))
        await wire.send_with_fd(sock, wire.control(wire.HELLO, {"version": wire.VERSION, "pid": os.getpid(),
                                                                "fd": session_fd is not None}), session_fd)
        frames, got, fd = wire.FrameReader(), [], None
        while not got:
            data, came = await wire.recv_with_fd(sock)
            fd = came if came is not None else fd
            assert data
            got = frames.feed(data)
        return wire.doc_of(got[0][1]), fd, sock

    session_fd: int | None = None
    first = _holder(root)
    try:
        welcome, session_fd, sock = asyncio.run(hello(None))
        assert welcome["adopted"] is False and session_fd is not None  # the holder's fd, ours too now
        sock.close()
        first.kill()
        first.wait(10)
        (root / "fuse.sock").unlink()
        second = _holder(root)
        assert mount_device(root / "mnt") is not None  # alive on our copy of the fd
        welcome, _, sock = asyncio.run(hello(session_fd))
        assert welcome["adopted"] is True
        sock.close()  # gone before sending START
        assert second.wait(20) == 0
        assert mount_device(root / "mnt") is None
    finally:
        if session_fd is not None:
            os.close(session_fd)
        stop_fuse_holder(root)
