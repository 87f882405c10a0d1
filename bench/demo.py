"""The README demo: one small image, a full pull next to a lazy start, on one machine.

Starts a loopback ``docker-registry`` (behind a byte-counting relay), builds and pushes
a sample image (busybox rootfs + ~21 MB of application files whose start command reads
only two of them), then on fresh private nodes:

1. containerd's overlayfs snapshotter: ``ctr images pull`` + ``ctr run``
2. lazysnap: ``ctr-remote images rpull --snapshotter lazysnap`` + ``ctr run --snapshotter lazysnap``

and prints time and registry bytes for both. All state lives in one temp directory that
is removed on exit, Ctrl-C included.

    sudo .venv/bin/python -m bench.demo [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench.byteproxy import ByteProxy
from bench.node import Node, NodeError, Skip, drop_caches, lazysnap_has, publish_index, write_hosts
from harness.images import File, LayerSpec, PushedImage, build_image, busybox_rootfs
from harness.registry import start_registry

EXPECTED = "lazysnap demo: model loaded"
MODEL_FILES = 10
MODEL_SIZE = 2 << 20
START_SH = b"""#!/bin/sh
# Reads the config and one of the ten model shards, like a server loading its default model.
. /app/config.env
wc -c "/app/models/$MODEL" > /dev/null
echo "lazysnap demo: model loaded ($MODEL, $(wc -c < /app/models/$MODEL) bytes)"
"""


def _shard(i: int) -> bytes:
    """A deterministic, incompressible 2 MiB model shard."""
    out = bytearray()
    seed = f"demo-shard-{i}".encode()
    counter = 0
    while len(out) < MODEL_SIZE:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:MODEL_SIZE])


def sample_layers() -> list[LayerSpec]:
    app = [File(f"app/models/shard-{i:02d}.bin", _shard(i)) for i in range(MODEL_FILES)]
    app += [File("app/config.env", b"MODEL=shard-03.bin\n"),
            File("app/start.sh", START_SH, mode=0o755)]
    return [busybox_rootfs(), LayerSpec(entries=app)]


def build_sample(workdir: Path, registry_host: str) -> PushedImage:
    """Build and push the demo image to ``registry_host``."""
    return build_image(workdir, sample_layers(), cmd=["/bin/sh", "/app/start.sh"],
                       ref=f"{registry_host}/demo/app:v1")


@dataclass(slots=True)
class Result:
    how: str
    pull: float
    run: float
    bytes: int
    output: str


STEP_TIMEOUT = 180.0  # seconds per pull / run: the demo image is small


def _once(node: Node, proxy: ByteProxy, ref: str, *, lazy: bool, how: str) -> Result:
    drop_caches()
    proxy.reset()
    pull = node.pull(ref, lazy=lazy, timeout=STEP_TIMEOUT)
    run = node.run(ref, lazy=lazy, name="demo", timeout=STEP_TIMEOUT)
    if EXPECTED not in run.output:
        raise NodeError(f"unexpected output {run.output.strip()!r}")
    return Result(how, pull.seconds, run.seconds, proxy.downstream_bytes, run.output.strip())


def run_overlayfs(workdir: Path, proxy: ByteProxy, ref: str, keep: bool = False) -> Result:
    """Full pull through containerd's own overlayfs snapshotter."""
    with Node(workdir / "node-overlayfs", proxy.host, lazysnap=False, keep=keep) as node:
        return _once(node, proxy, ref, lazy=False, how="containerd overlayfs (full pull)")


def publish(workdir: Path, registry_host: str, ref: str) -> str:
    """The publisher's one-off step: ``lazysnap index REF --push`` (layer indexes as an
    OCI artifact next to the image), so nodes need not stream a layer to index it."""
    if not lazysnap_has("index"):
        raise Skip("`lazysnap index` is not available in this checkout")
    hosts = write_hosts(workdir / "publisher-hosts", registry_host)
    return publish_index(ref, hosts, workdir / "publisher-root", timeout=STEP_TIMEOUT)


def run_lazysnap(workdir: Path, proxy: ByteProxy, ref: str, compressed: int, keep: bool = False) -> Result:
    """Lazy start through ``lazysnap serve`` (CLI contract only); Skip if not possible yet."""
    if not (lazysnap_has("serve") and lazysnap_has("health")):
        raise Skip("`lazysnap serve` is not available in this checkout")
    with Node(workdir / "node-lazysnap", proxy.host, lazysnap=True, keep=keep) as node:
        try:
            res = _once(node, proxy, ref, lazy=True, how="lazysnap (lazy, no profile)")
        except subprocess.TimeoutExpired as exc:
            tail = node.daemon.log_tail(5) if node.daemon else ""
            raise NodeError(f"`{' '.join(map(str, exc.cmd[-4:]))}` timed out after {exc.timeout:.0f}s; "
                            f"lazysnap log: {tail}") from None
        if res.bytes > 0.9 * compressed:
            raise Skip(f"lazysnap fetched {res.bytes / 1e6:.1f} of {compressed / 1e6:.1f} MB: "
                       "it fell back to a full pull (lazy layers not available yet)")
        return res


def _print(results: list[Result], compressed: int) -> None:
    print()
    print(f"{'how':38} {'pull s':>7} {'run s':>7} {'total s':>8} {'registry MB':>12}")
    for r in results:
        print(f"{r.how:38} {r.pull:7.2f} {r.run:7.2f} {r.pull + r.run:8.2f} {r.bytes / 1e6:12.2f}")
    print(f"(image: {compressed / 1e6:.2f} MB compressed; the start reads 1 of {MODEL_FILES} model shards)")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) on exit")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (containerd, overlayfs, FUSE): run `sudo ./scripts/demo`", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="lazysnap-demo-", dir="/var/tmp"))
    reg = proxy = None
    status = 0
    try:
        print(f"state: {workdir}")
        reg = start_registry(workdir / "registry")
        proxy = ByteProxy(reg.host)
        t = time.monotonic()
        img = build_sample(workdir / "image", reg.host)
        ref = img.ref.replace(reg.host, proxy.host, 1)
        print(f"registry {reg.url} (counted via {proxy.host}); pushed {ref} "
              f"({img.compressed_size / 1e6:.2f} MB, {len(img.layer_digests)} layers) "
              f"in {time.monotonic() - t:.1f}s")
        results = [run_overlayfs(workdir, proxy, ref, args.keep)]
        print(f"overlayfs: {results[0].output}")
        try:
            t = time.monotonic()
            summary = publish(workdir, reg.host, img.ref)
            size = summary.partition("index_bytes=")[2].split(" ")[0]
            print(f"published the layer indexes (lazysnap index --push, {int(size or 0) / 1e6:.2f} MB) "
                  f"in {time.monotonic() - t:.1f}s")
            lazy = run_lazysnap(workdir, proxy, ref, img.compressed_size, args.keep)
            print(f"lazysnap:  {lazy.output}")
            results.append(lazy)
        except (Skip, RuntimeError) as exc:  # NodeError, ContainerdError
            print(f"lazysnap:  not measured: {exc}")
        _print(results, img.compressed_size)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        status = 130
    except (RuntimeError, subprocess.SubprocessError) as exc:  # NodeError, ImageBuildError, timeouts
        print(f"demo failed: {exc}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let cleanup finish
        if proxy is not None:
            proxy.stop()
        if reg is not None:
            reg.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
