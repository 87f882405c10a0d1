"""One throw-away "node": a private containerd, optionally a lazysnap daemon, hosts.toml.

The runner and the demo drive lazysnap only through its command-line contract
(``lazysnap serve|health|record|profile push``) and containerd through ``ctr`` /
``ctr-remote``, exactly as an operator would; nothing here imports ``snapshotter``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.containerd import Containerd, start_containerd, stop_fuse_holder, unmount_under
from harness.registry import free_port
from harness.signing import publisher_keys, sign_flags

__all__ = ["LazysnapDaemon", "Node", "NodeError", "Skip", "drop_caches", "write_hosts",
           "lazysnap_argv", "lazysnap_has", "publish_index"]

SNAPSHOTTER = "lazysnap"


class NodeError(RuntimeError):
    """A daemon or command failed; the message carries the relevant log tail."""


class Skip(Exception):
    """This variant cannot be measured yet (the message says why)."""


def lazysnap_argv() -> list[str]:
    """How to invoke the lazysnap CLI: the installed entry point, else ``python -m``."""
    exe = Path(sys.executable).with_name("lazysnap")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snapshotter"]


def lazysnap_has(*command: str) -> bool:
    """Whether the CLI knows ``command`` (e.g. ``("profile", "push")``); a command that
    exists but fails later is reported as a failure, not skipped."""
    r = subprocess.run([*lazysnap_argv(), *command, "--help"], capture_output=True, text=True)
    return r.returncode == 0


def drop_caches() -> None:
    """Write back and drop the page cache, dentries and inodes (cold start)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cpu_busy_idle() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, idle


def quiesce(busy_below: float = 0.25, window: float = 1.0, limit: float = 30.0) -> float:
    """Wait until the machine's CPUs were less than ``busy_below`` busy over ``window``
    seconds (what the previous run left behind: exiting daemons, writeback, the kernel
    freeing a dropped page cache), at most ``limit`` s; returns the last busy share. A
    measured run then starts on a quiet machine whatever ran before it."""
    deadline = time.monotonic() + limit
    share = 1.0
    while time.monotonic() < deadline:
        b0, i0 = _cpu_busy_idle()
        time.sleep(window)
        b1, i1 = _cpu_busy_idle()
        share = (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))
        if share < busy_below:
            break
    return share


def write_hosts(hosts_dir: Path, host: str) -> Path:
    """hosts.toml declaring ``host`` a plain-HTTP registry (pull + resolve)."""
    d = hosts_dir / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(
        f'server = "http://{host}"\n\n[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n')
    return hosts_dir


# Published indexes use the CLI's --push default (256 KiB checkpoint spacing, sparse windows
# inline) unless LAZYSNAP_BENCH_SPAN says otherwise; LAZYSNAP_BENCH_WINDOWS_APART=1 publishes
# the windows as a blob of their own (trade-offs in bench/RESULTS.md).
PUBLISH_WINDOWS_APART = bool(os.environ.get("LAZYSNAP_BENCH_WINDOWS_APART"))
PUBLISH_SPAN = os.environ.get("LAZYSNAP_BENCH_SPAN")
PUBLISH_CHUNK = int(os.environ.get("LAZYSNAP_BENCH_CHUNK", 1 << 20))


def publish_index(ref: str, hosts_dir: Path, root: Path, timeout: float = 1800) -> str:
    """``lazysnap index REF --push``: what an image publisher runs once after pushing, so
    nodes find each layer's index in the registry instead of streaming the layer to build
    it, signed with the bench's publisher key (nodes trust its public half). Returns the
    command's summary line."""
    argv = [*lazysnap_argv(), "index", ref, "--push", *sign_flags(),
            "--chunk-size", str(PUBLISH_CHUNK),
            "--root", str(root), "--hosts-dir", str(hosts_dir)]
    if PUBLISH_SPAN:
        argv += ["--span", PUBLISH_SPAN]
    if PUBLISH_WINDOWS_APART:
        argv.append("--windows-apart")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise NodeError(f"lazysnap index --push failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return (r.stdout.strip().splitlines() or [""])[-1]


class LazysnapDaemon:
    """``lazysnap serve`` as a child process with a private root and socket."""

    def __init__(self, root: Path, hosts_dir: Path, log_path: Path, config: str = "") -> None:
        self.root = root
        self.config = config  # TOML for `lazysnap serve --config` ("" = defaults)
        self.hosts_dir = hosts_dir
        self.log_path = log_path
        self._sockdir = Path(tempfile.mkdtemp(prefix="lzs-", dir="/tmp"))
        self.address = str(self._sockdir / "lazysnap.sock")
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        argv = [*lazysnap_argv(), "serve", "--root", str(self.root), "--address", self.address,
                "--hosts-dir", str(self.hosts_dir), "--metrics-address", self.metrics_address,
                "--trusted-key", str(publisher_keys().public)]
        if self.config:
            conf = self._sockdir / "config.toml"
            conf.write_text(self.config)
            argv += ["--config", str(conf)]
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NodeError(f"lazysnap serve exited {self._proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.address):
                r = subprocess.run([*lazysnap_argv(), "health", "--address", self.address,
                                    "--timeout", "2"], capture_output=True)
                if r.returncode == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise NodeError(f"lazysnap serve not healthy after {timeout:.0f}s: {self.log_tail()}")

    def metrics(self) -> str:
        """The Prometheus text exposition (empty if unreachable)."""
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""

    def fetched_by_purpose(self) -> dict[str, int]:
        """``lazysnap_registry_bytes_fetched`` per purpose (on_demand/prefetch/background)."""
        return self._by_label("lazysnap_registry_bytes_fetched_total", "purpose")

    def index_sources(self) -> dict[str, int]:
        """``lazysnap_layer_index_sources`` per source (local/referrer/built/whole)."""
        return self._by_label("lazysnap_layer_index_sources_total", "source")

    def profile_lookups(self) -> dict[str, int]:
        """``lazysnap_profile_lookups`` per result (local/registry/none/rejected)."""
        return self._by_label("lazysnap_profile_lookups_total", "result")

    def reset_peak_rss(self) -> None:
        """Start the daemon's peak RSS (VmHWM) afresh from its current RSS (Linux clear_refs 5),
        so ``peak_rss_mb`` covers only what follows (one measured start, not a previous
        image's background fill and completeness check)."""
        if self._proc is not None:
            try:
                Path(f"/proc/{self._proc.pid}/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_rss_mb(self) -> float:
        """The daemon's peak resident memory since it started or ``reset_peak_rss``, MB; 0 if
        it is not running."""
        if self._proc is None:
            return 0.0
        try:
            for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def startup_reads(self) -> dict[str, int]:
        """``lazysnap_startup_chunk_reads``: first reads of chunks while an image starts, hit/miss."""
        return self._by_label("lazysnap_startup_chunk_reads_total", "result")

    def fuse_requests(self) -> dict[str, int]:
        """``lazysnap_fuse_requests`` per FUSE operation (lookup, getxattr, read, ...)."""
        return self._by_label("lazysnap_fuse_requests_total", "op")

    def _by_label(self, metric: str, label: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.metrics().splitlines():
            if line.startswith(metric + "{"):
                labels, _, value = line.rpartition(" ")
                out[labels.partition(f'{label}="')[2].partition('"')[0]] = int(float(value))
        return out

    def log_tail(self, n: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        stop_fuse_holder(self.root)  # with [lazy] fuse_holder, the mount's own process
        unmount_under(self.root)
        shutil.rmtree(self._sockdir, ignore_errors=True)


@dataclass(slots=True)
class Timed:
    seconds: float
    output: str


class Node:
    """containerd (+ lazysnap) under ``workdir``; ``close()`` stops both and unmounts."""

    def __init__(self, workdir: Path, registry_host: str, *, lazysnap: bool,
                 lazysnap_root: Path | None = None, keep: bool = False, lazysnap_config: str = "") -> None:
        self.workdir = workdir
        self.keep = keep
        workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_dir = write_hosts(workdir / "hosts", registry_host)
        self.daemon: LazysnapDaemon | None = None
        self.containerd: Containerd | None = None
        try:
            plugins = None
            if lazysnap:
                self.daemon = LazysnapDaemon(lazysnap_root or workdir / "lazysnap",
                                             self.hosts_dir, workdir / "lazysnap.log", lazysnap_config)
                self.daemon.start()
                plugins = {SNAPSHOTTER: self.daemon.address}
            self.containerd = start_containerd(workdir / "ctrd", proxy_plugins=plugins,
                                               hosts_dir=self.hosts_dir)
        except BaseException:
            self.close()
            raise

    @property
    def cd(self) -> Containerd:
        assert self.containerd is not None
        return self.containerd

    def pull(self, ref: str, *, lazy: bool, timeout: float = 1800) -> Timed:
        """Full pull through overlayfs, or ``ctr-remote image rpull`` into lazysnap."""
        t = time.monotonic()
        if lazy:
            r = self.cd.ctr_remote("images", "rpull", "--snapshotter", SNAPSHOTTER, ref, timeout=timeout)
        else:
            r = self.cd.ctr("images", "pull", "--snapshotter", "overlayfs", ref, timeout=timeout)
        return Timed(time.monotonic() - t, r.stdout)

    def run(self, ref: str, *, lazy: bool, name: str, args: list[str] | None = None,
            timeout: float = 900) -> Timed:
        """``ctr run --rm`` of the image's command (or ``args``); raises on non-zero exit."""
        snap = SNAPSHOTTER if lazy else "overlayfs"
        t = time.monotonic()
        r = self.cd.ctr("run", "--rm", "--snapshotter", snap, ref, name, *(args or []), timeout=timeout)
        return Timed(time.monotonic() - t, r.stdout + r.stderr)

    def record(self, ref: str, timeout: float = 600) -> None:
        """``lazysnap record`` the image's start on this node (profile lands in the root)."""
        assert self.daemon is not None
        # options before REF: everything after REF is the optional command
        argv = [*lazysnap_argv(), "record", "--address", self.daemon.address,
                "--containerd", self.cd.address, "--hosts-dir", str(self.hosts_dir),
                "--timeout", str(int(timeout)), ref]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60)
        if r.returncode != 0:
            raise NodeError(f"lazysnap record failed: {r.stderr.strip()[-500:]}")

    def push_profile(self, ref: str) -> None:
        assert self.daemon is not None
        argv = [*lazysnap_argv(), "profile", "push", *sign_flags(), "--root", str(self.daemon.root),
                "--hosts-dir", str(self.hosts_dir), ref]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise NodeError(f"lazysnap profile push failed: {r.stderr.strip()[-500:]}")

    def close(self) -> None:
        """Stop containerd then lazysnap (containerd holds mounts on lazysnap's FUSE);
        remove the node's files unless ``keep``."""
        if self.keep and self.daemon is not None:  # for a look at fetch latencies, FUSE requests, ...
            (self.workdir / "lazysnap-metrics.txt").write_text(self.daemon.metrics())
        if self.containerd is not None:
            self.containerd.stop()
            self.containerd = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        unmount_under(self.workdir)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
