"""How long reads stall while ``lazysnap serve`` is killed and restarted (``[lazy] fuse_holder``).

A real docker-registry, containerd and ``lazysnap serve`` with the FUSE holder; an image
whose data layer is served lazily (signed index published). Two readers on the node read
through the FUSE mount the overlay uses (page cache dropped per read): one re-reads a file
whose chunks are local, the other reads files never read before, each needing a fetch.
Each run SIGKILLs the daemon mid-way and starts it again. Reported per run: the daemon's
restart time (kill → SERVING), the longest local read and the longest fetching read during
the run; medians and maxima over ``--runs``. Baseline in the same run: the same readers
with the daemon left alone. First, what the holder's gRPC relay adds to a call: health
checks on the daemon's own socket against the public one.

Usage: ``.venv/bin/python bench/restart_stall.py [--runs 5] [--files 200]``
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.containerd import lazysnap_node  # noqa: E402
from harness.images import File, LayerSpec, build_image, busybox_rootfs  # noqa: E402
from harness.registry import start_registry  # noqa: E402
from harness.signing import sign_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILE_BYTES = 256 << 10


def _data(i: int) -> bytes:
    seed = hashlib.sha256(b"stall-%d" % i).digest()
    return b"".join(hashlib.sha256(seed + k.to_bytes(4, "big")).digest() for k in range(FILE_BYTES // 32))


def _call_ms(address: str, n: int = 300) -> float:
    """Median latency (ms) of a gRPC health Check on ``address``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _read(path: Path) -> float:
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)
    return time.monotonic() - t0


class Readers:
    """A local-chunk reader and a fetching reader, each keeping its longest read."""

    def __init__(self, local: Path, remote: list[Path], span_s: float) -> None:
        self.local, self.remote = local, list(remote)
        self.interval = span_s / max(1, len(remote))  # fetching reads spread over the whole window
        self.worst = {"local": 0.0, "fetch": 0.0}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=("local",), daemon=True),
                         threading.Thread(target=self._loop, args=("fetch",), daemon=True)]

    def _loop(self, kind: str) -> None:
        while not self._stop.is_set():
            path = self.local if kind == "local" else (self.remote.pop(0) if self.remote else None)
            if path is None:
                return
            try:
                self.worst[kind] = max(self.worst[kind], _read(path))
            except OSError as exc:
                self.errors.append(f"{kind} {path.name}: {exc}")
            time.sleep(0.02 if kind == "local" else self.interval)

    def __enter__(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--window-s", type=float, default=3.0, help="reading time around each restart")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lazysnap-stall-"))
    reg = start_registry(tmp / "reg")
    try:
        files = {f"data/f{i:03d}": _data(i) for i in range(args.files)}
        img = build_image(tmp / "img", [busybox_rootfs(), LayerSpec(entries=[File("/" + k, v) for k, v in files.items()])],
                          cmd=["/bin/sh"], ref=f"{reg.host}/bench/stall:v1")
        subprocess.run([sys.executable, "-m", "snapshotter", "index", img.ref, "--push", *sign_flags(), "--root",
                        str(tmp / "publisher"), "--hosts-dir", str(tmp / "nohosts")],
                       check=True, cwd=REPO, capture_output=True, timeout=600)
        with lazysnap_node(tmp / "node", config="[lazy]\nfuse_holder = true\n[prefetch]\nbackground = false\n") as (daemon, cd):
            cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", img.ref)
            direct, relayed = _call_ms(str(daemon.root / "daemon.sock")), _call_ms(daemon.address)
            print(f"gRPC health Check, median of 300: {direct:.3f} ms to the daemon, {relayed:.3f} ms "
                  f"through the holder's relay (+{relayed - direct:.3f} ms)", flush=True)
            mnt = daemon.root / "mnt"
            layer = next(d for d in mnt.iterdir() if (d / "data").is_dir())
            paths = sorted((layer / "data").iterdir())
            local, rest = paths[0], paths[1:]
            _read(local)
            per = max(1, len(rest) // (2 * args.runs + 2))
            rows: list[tuple[str, float, float, float]] = []
            for run in range(args.runs):
                for mode in ("baseline", "restart"):
                    batch, rest = rest[:per], rest[per:]
                    with Readers(local, batch, args.window_s * 4 / 3) as readers:
                        time.sleep(args.window_s / 3)
                        restart = 0.0
                        if mode == "restart":
                            t0 = time.monotonic()
                            daemon.kill()
                            daemon.start()
                            restart = time.monotonic() - t0
                        time.sleep(args.window_s)
                    if readers.errors:
                        print(f"run {run} {mode}: ERRORS {readers.errors[:5]}", file=sys.stderr)
                        return 1
                    rows.append((mode, restart, readers.worst["local"], readers.worst["fetch"]))
                    print(f"run {run} {mode:8s} restart={restart:.3f}s longest local read="
                          f"{readers.worst['local'] * 1000:.1f} ms longest fetching read="
                          f"{readers.worst['fetch'] * 1000:.1f} ms", flush=True)
            for mode in ("baseline", "restart"):
                r = [x for x in rows if x[0] == mode]
                print(f"{mode:8s} median/max: restart {statistics.median(x[1] for x in r):.3f}/"
                      f"{max(x[1] for x in r):.3f} s, local read {statistics.median(x[2] for x in r) * 1000:.1f}/"
                      f"{max(x[2] for x in r) * 1000:.1f} ms, fetching read "
                      f"{statistics.median(x[3] for x in r) * 1000:.1f}/{max(x[3] for x in r) * 1000:.1f} ms")
    finally:
        reg.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
