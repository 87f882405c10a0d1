"""A private, throw-away containerd for tests and benchmarks.

Every instance gets its own root, state, gRPC and ttrpc sockets, opt dir and runc root, so
several can run next to each other and next to a system containerd. The CRI plugin is
disabled unless ``cri_snapshotter`` names the snapshotter it should use (the tests' CRI
client then talks to ``address``, as kubelet would); snapshotters are wired in as
``[proxy_plugins.<name>]``.

Usage::

    with start_containerd(tmp_path, proxy_plugins={"lazysnap": sock}) as cd:
        cd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazysnap", ref)
        out = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, "c1", "echo", "hi")
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import signal
import subprocess
import tempfile
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from harness.signing import publisher_keys

__all__ = ["Containerd", "ContainerdError", "LazysnapDaemon", "LazysnapThread", "health_status", "mounts_under",
           "start_containerd", "start_lazysnap", "stop_fuse_holder", "unmount_under", "wait_serving"]

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
CTR_REMOTE = shutil.which("ctr-remote") or "/usr/bin/ctr-remote"

# Subcommands that talk to a registry and so honour --hosts-dir.
_REGISTRY_CMDS = {("images", "pull"), ("image", "pull"), ("i", "pull"),
                  ("images", "push"), ("image", "push"), ("i", "push"),
                  ("images", "fetch"), ("content", "fetch"),
                  ("images", "rpull"), ("image", "rpull"), ("i", "rpull")}
_RUN_CMDS = {("run",)}


class ContainerdError(RuntimeError):
    """containerd did not start or a ``ctr`` command failed (the message has its stderr)."""


def _short_dir(prefix: str) -> Path:
    """A short directory for unix sockets: sun_path is limited to 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def mounts_under(root: Path) -> list[str]:
    """The mount points at or below ``root`` (from mountinfo: nothing is stat'ed, so a
    mount whose FUSE server is gone cannot hang the call)."""
    root_s = os.path.realpath(root)
    points: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == root_s or mnt.startswith(root_s + "/"):
                points.append(mnt)
    return points


def unmount_under(root: Path) -> list[str]:
    """Lazily unmount every mount point below ``root`` (deepest first); return them."""
    points = mounts_under(root)
    for mnt in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    return points


class Containerd:
    """A running private containerd; ``stop()`` kills it and every shim it started."""

    def __init__(self, workdir: Path, *, proxy_plugins: dict[str, str] | None = None,
                 hosts_dir: Path | None = None, cri_snapshotter: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "containerd-root"
        self.state = self.workdir / "containerd-state"
        self.hosts_dir = Path(hosts_dir) if hosts_dir is not None else None
        self.proxy_plugins = dict(proxy_plugins or {})
        self.cri_snapshotter = cri_snapshotter
        self._sockdir = _short_dir("ctrd-")
        self.address = str(self._sockdir / "containerd.sock")
        self.ttrpc_address = str(self._sockdir / "containerd.sock.ttrpc")
        self.runc_root = self.state / "runc"
        self.config_path = self.workdir / "containerd.toml"
        self.log_path = self.workdir / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    # -- lifecycle -------------------------------------------------------------------
    def config_text(self) -> str:
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "" if self.cri_snapshotter else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "",
            "[grpc]",
            f'  address = "{self.address}"',
            "",
            "[ttrpc]",
            f'  address = "{self.ttrpc_address}"',
            "",
            "[debug]",
            '  level = "info"',
            "",
            "[timeouts]",
            '  "io.containerd.timeout.shim.cleanup" = "5s"',
            '  "io.containerd.timeout.shim.load" = "5s"',
            '  "io.containerd.timeout.shim.shutdown" = "3s"',
            '  "io.containerd.timeout.task.state" = "2s"',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.root / "opt"}"',
            "",
        ]
        if self.cri_snapshotter:
            cri = '[plugins."io.containerd.grpc.v1.cri"'
            lines += [f"{cri}]", '  stream_server_address = "127.0.0.1"', '  stream_server_port = "0"',
                      f"{cri}.containerd]", f'  snapshotter = "{self.cri_snapshotter}"',
                      "  disable_snapshot_annotations = false",
                      f"{cri}.cni]", f'  bin_dir = "{self.root / "cni-bin"}"', f'  conf_dir = "{self.root / "cni-conf"}"']
            if self.hosts_dir is not None:
                lines += [f"{cri}.registry]", f'  config_path = "{self.hosts_dir}"']
            lines.append("")
        for name, address in sorted(self.proxy_plugins.items()):
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{address}"', ""]
        return "\n".join(lines)

    def start(self, timeout: float = 30.0) -> None:
        """Start containerd and wait until ``ctr version`` answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [CONTAINERD, "--config", str(self.config_path)],
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerdError(f"containerd exited with {self._proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.address):
                r = subprocess.run([CTR, "--address", self.address, "version"],
                                   capture_output=True, timeout=10, check=False)
                if r.returncode == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise ContainerdError(f"containerd not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _shim_pids(self) -> list[int]:
        """Shims started by this containerd (their command line names our address)."""
        pids: list[int] = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and self.address.encode() in argv:
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        """Stop containerd (SIGTERM, then SIGKILL), its shims, and unmount what is left."""
        shims = self._shim_pids()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        for pid in shims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for d in (self.state, self.root):
            unmount_under(d)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------
    def _argv(self, binary: str, args: Sequence[str], namespace: str) -> list[str]:
        args = [str(a) for a in args]
        extra: list[str] = []
        if self.hosts_dir is not None and tuple(args[:2]) in _REGISTRY_CMDS:
            extra += ["--hosts-dir", str(self.hosts_dir)]
        if tuple(args[:1]) in _RUN_CMDS or tuple(args[:2]) in _RUN_CMDS:
            extra += ["--runc-root", str(self.runc_root)]
        n = 2 if tuple(args[:2]) in _REGISTRY_CMDS or tuple(args[:2]) in _RUN_CMDS else 1
        return [binary, "--address", self.address, "--namespace", namespace,
                *args[:n], *extra, *args[n:]]

    def _run(self, binary: str, args: Sequence[str], check: bool, namespace: str,
             timeout: float, input: bytes | None) -> subprocess.CompletedProcess[str]:
        argv = self._argv(binary, args, namespace)
        r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False,
                           input=input.decode() if input is not None else None, text=True)
        if check and r.returncode != 0:
            raise ContainerdError(
                f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def ctr(self, *args: str, check: bool = True, namespace: str = "default",
            timeout: float = 300.0, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address … --namespace … ARGS`` (text output).

        ``--hosts-dir`` is added to registry commands and ``--runc-root`` to ``run``.
        """
        return self._run(CTR, args, check, namespace, timeout, input)

    def wait_snapshotter(self, name: str, timeout: float = 30.0) -> None:
        """Wait until ``name`` answers through containerd: its client to a proxy plugin
        reconnects with backoff after the plugin restarts."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.ctr("snapshots", "--snapshotter", name, "ls", check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd did not reconnect to {name}: {r.stderr}")
            time.sleep(0.2)

    def ctr_remote(self, *args: str, check: bool = True, namespace: str = "default",
                   timeout: float = 300.0, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run stargz-snapshotter's ``ctr-remote`` against this containerd (e.g. ``images rpull``)."""
        return self._run(CTR_REMOTE, args, check, namespace, timeout, input)


def start_containerd(workdir: Path, *, proxy_plugins: dict[str, str] | None = None,
                     hosts_dir: Path | None = None, cri_snapshotter: str | None = None) -> Containerd:
    """Start a private containerd under ``workdir``; the caller must ``stop()`` it."""
    cd = Containerd(workdir, proxy_plugins=proxy_plugins, hosts_dir=hosts_dir, cri_snapshotter=cri_snapshotter)
    cd.start()
    return cd


# -- the lazysnap daemon next to it ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(address: str, timeout: float = 2.0) -> str | None:
    """The daemon's grpc.health.v1 status name, or None if it does not answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{address}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def wait_serving(address: str, timeout: float = 30.0, alive: Any = None) -> None:
    """Poll grpc.health.v1 until SERVING; ``alive()`` returning False aborts early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ContainerdError(f"lazysnap at {address} exited before serving")
        if os.path.exists(address) and health_status(address, 1.0) == "SERVING":
            return
        time.sleep(0.05)
    raise ContainerdError(f"lazysnap at {address} not SERVING after {timeout}s")


class LazysnapDaemon:
    """``lazysnap serve`` as a subprocess (the real CLI), restartable on the same root."""

    def __init__(self, workdir: Path, *, root: Path | None = None, extra_args: Sequence[str] = (),
                 metrics: bool = True, env: dict[str, str] | None = None, trust_publisher: bool = True) -> None:
        self.workdir = Path(workdir)
        self.root = Path(root) if root is not None else self.workdir / "lazysnap-root"
        self._sockdir = _short_dir("lzs-")
        self.address = str(self._sockdir / "run" / "lazysnap.sock")
        self.metrics_port = _free_port() if metrics else None
        # what the harness publishes is signed with its publisher key (harness.signing)
        self.extra_args = list(extra_args) + (["--trusted-key", str(publisher_keys().public)]
                                              if trust_publisher else [])
        self.env = dict(env or {})
        self.log_path = self.workdir / "lazysnap.log"
        # where the package is imported from: this checkout, or another build (an upgrade)
        self.tree = Path(__file__).resolve().parent.parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def start(self, timeout: float = 30.0) -> LazysnapDaemon:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "snapshotter", "serve", "--root", str(self.root), "--address", self.address,
                "--log-level", "debug", *self.extra_args]
        if self.metrics_port:
            argv += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        tree = str(self.tree)
        env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", ""), **self.env}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=tree, env=env, start_new_session=True)
        proc = self._proc
        wait_serving(self.address, timeout, alive=lambda: proc.poll() is None)
        return self

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        rc = self._proc.returncode
        self._proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (crash test)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of ``name``'s samples whose labels start with ``labels`` (``'a="b"'``)."""
        assert self.metrics_url is not None, "started with metrics=False"
        return scrape_metric(self.metrics_url, name, labels)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        self.terminate()
        stop_fuse_holder(self.root)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> LazysnapDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape_metric(url: str, name: str, labels: str = "") -> float:
    """The sum of the Prometheus samples of ``name`` at ``url`` whose labels start with
    ``labels`` (all of them when empty)."""
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
            key = line.rsplit(" ", 1)[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def stop_fuse_holder(root: Path, timeout: float = 20.0) -> None:
    """Stop the FUSE holder serving ``root`` (``[lazy] fuse_holder``), if one runs: SIGTERM
    (it fails waiting reads and unmounts), SIGKILL after ``timeout``, then make sure the
    mount is gone."""
    pid_file = Path(root) / "fuse-holder.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        pid = 0
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _running(pid):
                time.sleep(0.02)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "-l", str(Path(root) / "mnt")], capture_output=True, check=False)


def _running(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie its parent has not reaped has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_lazysnap(workdir: Path, **kwargs: Any) -> LazysnapDaemon:
    """Start ``lazysnap serve`` under ``workdir`` and wait until it reports SERVING; if it
    does not, stop what was started (the process, a FUSE holder it spawned) and raise."""
    daemon = LazysnapDaemon(workdir, **kwargs)
    try:
        return daemon.start()
    except BaseException:
        daemon.stop()
        raise


class LazysnapThread:
    """The service in this process on its own event-loop thread, with an injected provider.

    For tests that need a provider object (the remote-snapshot hook) while blocking
    ``ctr`` commands run in the test thread.
    """

    def __init__(self, root: Path, provider: Any = None, *, probe_interval: float = 0.5) -> None:
        self.root = Path(root)
        self.provider = provider
        self.probe_interval = probe_interval
        self._sockdir = _short_dir("lzt-")
        self.address = str(self._sockdir / "lazysnap.sock")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lazysnap-service", daemon=True)
        self.service: Any = None

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> LazysnapThread:
        from snapshotter.service import SnapshotService, Snapshotter

        if not self._thread.is_alive():
            self._thread.start()

        async def _start() -> Any:
            sn = Snapshotter(self.root, self.provider)
            await sn.open()
            svc = SnapshotService(sn, self.address, probe_interval=self.probe_interval)
            await svc.start()
            return svc

        self.service = self.call(_start())
        return self

    def stop_service(self) -> None:
        if self.service is not None:
            self.call(self.service.stop(grace=5.0))
            self.service = None

    def stop(self) -> None:
        try:
            self.stop_service()
        finally:
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
            shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> LazysnapThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def lazysnap_node(workdir: Path, *, config: str = "") -> Iterator[tuple[LazysnapDaemon, Containerd]]:
    """A lazysnap daemon (``config``: TOML for its ``--config``, "" for the defaults) and a
    private containerd using it as the ``lazysnap`` proxy snapshotter. On exit containerd
    stops first (it holds mounts on lazysnap's FUSE), then lazysnap; mounts under
    ``workdir`` are undone even when a test failed."""
    daemon = cd = None
    args: list[str] = []
    if config:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "lazysnap.toml").write_text(config)
        args = ["--config", str(workdir / "lazysnap.toml")]
    try:
        daemon = start_lazysnap(workdir / "daemon", root=workdir / "root", extra_args=args)
        cd = start_containerd(workdir / "ctrd", proxy_plugins={"lazysnap": daemon.address})
        yield daemon, cd
    finally:
        if cd is not None:
            cd.stop()
        if daemon is not None:
            daemon.stop()
        unmount_under(workdir)
