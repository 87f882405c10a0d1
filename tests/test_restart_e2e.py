"""A running container across daemon crashes and restarts (``[lazy] fuse_holder = true``).

Real containerd, runc, docker-registry (behind the fault proxy), FUSE and ``lazysnap
serve``. The container checks every byte of its lazily served data layer over and over
(``sha256sum -c``) while the test drops the page cache, so the reads reach the FUSE
server; the daemon is killed with SIGKILL while a fetch is in flight, restarted, stopped
with SIGTERM and started from another build (an upgrade), and killed and restarted many
times in a row; then the FUSE holder itself is killed, and stopped as for an upgrade. The
container must see no error and no wrong byte.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.containerd import LazysnapDaemon, lazysnap_node, start_containerd, unmount_under
from harness.images import File, LayerSpec, PushedImage, build_image, busybox_rootfs
from harness.proxy import Fault, Proxy, start_proxy
from harness.registry import Registry, start_registry
from harness.signing import sign_flags

pytestmark = [pytest.mark.root, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
FILES = 16
FILE_BYTES = 768 << 10
CYCLES = 20
LOOP = ("n=0; while [ ! -e /out/stop ]; do n=$((n+1)); "
        "if sha256sum -c /data/SUMS > /out/last 2>&1; then echo ok $n >> /out/log; "
        "else echo FAIL $n >> /out/log; cat /out/last >> /out/log; fi; done")


def _data(i: int) -> bytes:
    seed = hashlib.sha256(b"restart-%d" % i).digest()
    return b"".join(hashlib.sha256(seed + k.to_bytes(4, "big")).digest() for k in range(FILE_BYTES // 32))


@dataclass
class World:
    reg: Registry
    proxy: Proxy
    img: PushedImage

    @property
    def ref(self) -> str:
        return self.img.ref.replace(self.reg.host, self.proxy.host)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("restart-e2e")
    reg = start_registry(tmp / "reg")
    proxy = start_proxy(reg.url)
    try:
        files = {f"data/f{i:02d}": _data(i) for i in range(FILES)}
        sums = "".join(f"{hashlib.sha256(v).hexdigest()}  /{k}\n" for k, v in files.items()).encode()
        img = build_image(tmp / "img", [busybox_rootfs(), LayerSpec(entries=[
            *(File("/" + k, v) for k, v in files.items()), File("/data/SUMS", sums)])],
            cmd=["/bin/sh", "-c", LOOP], ref=f"{reg.host}/restart/e2e:v1")
        subprocess.run([sys.executable, "-m", "snapshotter", "index", img.ref, "--push", *sign_flags(),
                        "--root", str(tmp / "publisher"), "--hosts-dir", str(tmp / "nohosts")],
                       check=True, cwd=REPO, capture_output=True, timeout=300)
        yield World(reg, proxy, img)
    finally:
        proxy.stop()
        reg.stop()


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _passes(log: Path) -> list[str]:
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


def _wait_passes(log: Path, more: int, timeout: float) -> list[str]:
    """Wait until ``more`` further passes are logged (dropping the page cache meanwhile)."""
    start = len([x for x in _passes(log) if x.startswith(("ok", "FAIL"))])
    deadline = time.monotonic() + timeout
    while True:
        lines = _passes(log)
        if len([x for x in lines if x.startswith(("ok", "FAIL"))]) >= start + more:
            return lines
        assert time.monotonic() < deadline, f"no {more} more passes within {timeout}s: {lines[-5:]}"
        _drop_caches()
        time.sleep(0.3)


NEXT_VERSION = "999.0.0"


def _another_build(where: Path) -> Path:
    """A second install of the package, as an upgrade brings: another directory, another
    version (what the daemon reports at start comes from its own dist-info)."""
    shutil.copytree(REPO / "snapshotter", where / "snapshotter", ignore=shutil.ignore_patterns("__pycache__"))
    info = where / f"lazysnap-{NEXT_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lazysnap\nVersion: {NEXT_VERSION}\n")
    return where


def _holder_pid(daemon: LazysnapDaemon) -> int:
    return int((daemon.root / "fuse-holder.pid").read_text())


def test_a_running_container_never_sees_a_daemon_restart(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    log = out / "log"
    with lazysnap_node(tmp_path / "node", config="[lazy]\nfuse_holder = true\n") as (daemon, cd):
        cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
        holder = _holder_pid(daemon)
        # every blob read of the registry stalls: the first pass is still fetching when the
        # daemon is killed, so a read is in flight in the dead daemon
        world.proxy.add_fault(Fault("stall", times=-1, path="/blobs/", seconds=0.4))
        try:
            world.proxy.reset_stats()
            cd.ctr("run", "-d", "--snapshotter", "lazysnap",
                   "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw", world.ref, "survivor")
            deadline = time.monotonic() + 30
            while len([r for r in world.proxy.stats.request_log if "/blobs/" in r[1] and r[2]]) < 3:
                assert time.monotonic() < deadline, daemon.log_tail()  # range reads of the data layer
                time.sleep(0.05)
            assert not any(x.startswith("ok") for x in _passes(log))  # the first pass is mid-way
            daemon.kill()  # SIGKILL while the container reads chunks that are not local yet
            time.sleep(1.0)  # no daemon: the container's reads wait in the holder
            daemon.start()
        finally:
            world.proxy.clear_faults()
        lines = _wait_passes(log, 2, 120)
        assert _holder_pid(daemon) == holder
        attached = [x for x in (daemon.root / "fuse-holder.log").read_text().splitlines()
                    if "event=daemon_attached" in x]
        assert len(attached) == 2 and "waiting_reads=0" not in attached[1], attached  # reads were handed over

        rc = daemon.terminate()  # SIGTERM, as an upgrade or `systemctl restart` sends
        assert rc == 0
        daemon.tree = _another_build(tmp_path / "next-build")  # the upgrade: a new build takes over
        # a new container started while no daemon runs: containerd's calls are answered by
        # the holder and wait for the next daemon instead of failing; no retry
        started: dict[str, subprocess.CompletedProcess[str]] = {}
        runner = threading.Thread(target=lambda: started.setdefault("r", cd.ctr(
            "run", "--rm", "--snapshotter", "lazysnap", world.ref, "during-restart",
            "sha256sum", "/data/f03", check=False)))
        runner.start()
        time.sleep(3.0)  # longer than containerd's ~1 s handshake deadline
        assert runner.is_alive()  # waiting, not failed
        daemon.start()
        runner.join(120)
        assert started["r"].returncode == 0, started["r"].stderr
        starts = [x for x in daemon.log_path.read_text().splitlines() if "event=lazysnap_start" in x]
        assert f"version={NEXT_VERSION} " in starts[-1] and f"version={NEXT_VERSION} " not in starts[0], starts
        assert started["r"].stdout.split()[0] == hashlib.sha256(_data(3)).hexdigest()
        lines = _wait_passes(log, 2, 60)

        for _ in range(CYCLES):
            daemon.kill()
            _drop_caches()
            daemon.start()
        lines = _wait_passes(log, 2, 60)
        assert _holder_pid(daemon) == holder

        # the holder itself: killed, then stopped as `systemctl restart lazysnap-fused` does
        # to run a new build; the daemon keeps the session alive and hands it to the next one
        for n, sig in enumerate((signal.SIGKILL, signal.SIGTERM), 1):
            os.kill(holder, sig)
            _drop_caches()
            deadline = time.monotonic() + 60
            while True:
                rehomed = [x for x in daemon.log_path.read_text().splitlines() if "event=holder_rehomed" in x]
                if len(rehomed) == n:
                    break
                assert time.monotonic() < deadline, daemon.log_tail()
                time.sleep(0.1)
            assert "taken_over=True" in rehomed[-1], rehomed
            assert _holder_pid(daemon) != holder
            holder = _holder_pid(daemon)
            lines = _wait_passes(log, 2, 60)
        (out / "stop").touch()
        fails = [x for x in lines if not x.startswith("ok")]
        assert not fails, fails[:20]
        assert len(lines) >= 6
        cd.ctr("task", "kill", "-s", "KILL", "survivor", check=False)


def test_after_a_reboot_a_stopped_container_starts_again(world: World, tmp_path: Path) -> None:
    """Power loss: every process and mount is gone, the disks stay. containerd and lazysnap
    come back with the registry down, and a container created before - whose snapshot sits
    on lazily served layers, every chunk it reads local - starts again from local state,
    with its own writes kept."""
    script = "sha256sum -c /data/SUMS >/dev/null && date >> /var/boots && wc -l < /var/boots"
    node = tmp_path / "node"
    with lazysnap_node(node, config="[lazy]\nfuse_holder = true\n") as (daemon, cd):
        assert stat.S_IMODE(os.stat(daemon.root / "daemon.sock").st_mode) == 0o600  # only the holder connects
        cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", world.ref)
        cd.ctr("container", "create", "--snapshotter", "lazysnap", world.ref, "kept", "--", "/bin/sh", "-c", script)
        assert cd.ctr("task", "start", "kept").stdout.strip() == "1"
        # the power goes: containerd and its shims, the daemon and the holder die at once,
        # the kernel forgets every mount, and /run (containerd's state) is empty again
        cd.stop()
        daemon.kill()
        os.kill(int((daemon.root / "fuse-holder.pid").read_text()), signal.SIGKILL)
        unmount_under(node)
        shutil.rmtree(cd.state, ignore_errors=True)
        _drop_caches()
        world.proxy.add_fault(Fault("status", times=-1, status=503))  # and the registry is down at boot
        try:
            daemon.start()
            cd2 = start_containerd(cd.workdir, proxy_plugins={"lazysnap": daemon.address})
            try:
                assert cd2.ctr("task", "start", "kept").stdout.strip() == "2"
            finally:
                cd2.stop()
        finally:
            world.proxy.clear_faults()
