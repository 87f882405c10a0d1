"""`lazysnap index` timed as the whole command against `gzip -dc` / `zstd -dc` of the same
layer, with the command's peak RSS, on generated many-small-files layers (a Python tree's
shape: packages of modules, sources and bytecode-like files of a few KB).

Layers are generated deterministically and cached under bench/.cache/index_command/:
``--files`` sets how many files each layer has (default 60000 and 500000). Each layer is
compressed with `gzip -6` (one member, as docker and buildkit push it) and with zstd level 3
in 8 MiB frames (multi-frame, so random access works). Runs alternate baseline and command
(medians of ``--runs``); one thread of decompression each (`lazysnap index` runs its scanner
with its hash thread, as the command does).

The package's modules are byte-compiled first (`compileall`), as `pip install` leaves an
installed lazysnap: with PYTHONDONTWRITEBYTECODE set (as in this project's shells) every
run would otherwise compile the modules it imports from source, ~30 ms of each run.

The last column is the daemon's path: the same layer through ``index_stream_bytes`` (what
the streaming pass of an unindexed layer runs, fed 4 MiB blocks from an async stream, a
second read possible), in a process of its own: its peak RSS is what indexing adds to a
daemon.

``--blobs`` adds layer blobs of your own (e.g. the cold-start bench's torch layer from
bench/.cache/inference/*/oci/blobs): the big-file shape next to the generated small-file
ones.

Usage: .venv/bin/python bench/index_command.py [--files 60000,500000] [--blobs PATH,...] [--runs 3]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synthetic import add_parent_dirs  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "index_command"
LAZYSNAP = [str(Path(sys.executable).parent / "lazysnap")]  # the installed command, as users run it
ZSTD_FRAME = 8 << 20


def _words(rng: random.Random, n: int) -> list[bytes]:
    letters = "abcdefghijklmnopqrstuvwxyz_"
    keywords = [b"def", b"return", b"self", b"import", b"from", b"class", b"if", b"else", b"for", b"in",
                b"None", b"True", b"raise", b"with", b"as", b"yield", b"lambda", b"not", b"and"]
    return keywords + [("".join(rng.choice(letters) for _ in range(rng.randint(3, 12)))).encode()
                       for _ in range(n)]


def generate(files: int) -> Path:
    """A tar of ``files`` files (plus their directories): 70 % source-like text (~4:1 under
    gzip), 30 % bytecode-like (half random bytes), sizes log-normal around 1.5 KB."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"tree-{files}.tar"
    if out.exists():
        return out
    rng = random.Random(files)
    words = _words(rng, 3000)
    seps = [b" ", b" ", b" ", b"\n", b"(", b"):\n    ", b", ", b".", b" = "]
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        made: set[str] = set()
        for i in range(files):
            d = f"usr/lib/python3/site-packages/pkg{i // 1500:04d}/sub{(i // 60) % 25:02d}"
            size = min(int(rng.lognormvariate(7.3, 1.1)), 1 << 20)
            if rng.random() < 0.7:
                buf = bytearray()
                while len(buf) < size:
                    buf += rng.choice(words) + rng.choice(seps)
                data, name = bytes(buf[:size]), f"{d}/mod_{i:06d}.py"
            else:
                half = size // 2
                text = b" ".join(rng.choice(words) for _ in range(half // 6 + 1))[:size - half]
                data, name = rng.randbytes(half) + text, f"{d}/__pycache__/mod_{i:06d}.cpython-311.pyc"
            add_parent_dirs(tf, name, made)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    tmp.rename(out)
    return out


def compressed(tar: Path) -> dict[str, Path]:
    gz, zst = tar.with_suffix(".tar.gz"), tar.with_suffix(".tar.zst")
    if not gz.exists():
        with open(gz.with_suffix(".tmp"), "wb") as f:
            subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], stdout=f, check=True)
        gz.with_suffix(".tmp").rename(gz)
    if not zst.exists():
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        with open(tar, "rb") as src, open(zst.with_suffix(".tmp"), "wb") as dst:
            while block := src.read(ZSTD_FRAME):
                dst.write(cctx.compress(block))
        zst.with_suffix(".tmp").rename(zst)
    return {"gzip": gz, "zstd": zst}


#: The daemon's streaming pass over a local blob (argv[1]), as a program of its own.
STREAMED = """
import asyncio, sys
from snapshotter.index.builder import index_stream_bytes

async def blocks():
    with open(sys.argv[1], "rb") as f:
        while block := f.read(4 << 20):
            yield block

async def main():  # as build_by_streaming: the index written, then dropped
    data = await index_stream_bytes(blocks(), again=blocks)
    with open(sys.argv[2], "wb") as f:
        f.write(data)

asyncio.run(main())
"""


def run(cmd: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {err.strip()[-300:]}")
    return wall, usage.ru_maxrss


def _tar_bytes(base_cmd: list[str]) -> int:
    """Bytes the baseline decompresses (one run: it warms the page cache too)."""
    p = subprocess.Popen(base_cmd, stdout=subprocess.PIPE, cwd=ROOT)
    assert p.stdout is not None
    n = 0
    while block := p.stdout.read(1 << 20):
        n += len(block)
    if p.wait():
        raise RuntimeError(f"{base_cmd[0]} exited {p.returncode}")
    return n


def measure(label: str, fmt: str, blob: Path, out: Path, runs: int) -> None:
    """One row: the baseline and the command alternated, medians of ``runs``."""
    base_cmd = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dc"], "tar": ["cat"]}[fmt] + [str(blob)]
    cmd = [*LAZYSNAP, "index", "-o", str(out), str(blob)]
    tar_bytes = _tar_bytes(base_cmd)
    base, ours, rss = [], [], []
    for _ in range(runs):
        base.append(run(base_cmd)[0])
        wall, peak = run(cmd)
        ours.append(wall)
        rss.append(peak)
    b, o = statistics.median(base), statistics.median(ours)
    streamed = run([sys.executable, "-c", STREAMED, str(blob), str(out)])[1]
    print(f"{label} | {fmt} | {blob.stat().st_size / 1e6:.0f} | {tar_bytes / 1e6:.0f} | "
          f"{b:.2f} | {o:.2f} | {b / o:.2f} | {tar_bytes / 1e6 / o:.0f} | "
          f"{max(rss) / 1024:.0f} | {streamed / 1024:.0f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="60000,500000", help="generated layers (comma list; empty: none)")
    ap.add_argument("--blobs", default="", help="layer blobs of your own (comma list of paths: gzip, zstd or tar)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "snapshotter")], check=True,
                   stdout=subprocess.DEVNULL)
    print("layer | format | blob MB | tar MB | baseline s | `lazysnap index` s | ratio | MB/s (tar) | peak RSS MB "
          "| daemon path peak RSS MB")
    print("---|---|---|---|---|---|---|---|---|---")
    with tempfile.TemporaryDirectory(prefix="lazysnap-index-bench-") as work:
        out = Path(work) / "layer.idx"
        for files in (int(x) for x in args.files.split(",") if x):
            for fmt, blob in compressed(generate(files)).items():
                measure(f"{files} files", fmt, blob, out, args.runs)
        for path in (Path(x) for x in args.blobs.split(",") if x):
            with open(path, "rb") as f:
                head = f.read(4)
            fmt = "gzip" if head[:2] == b"\x1f\x8b" else "zstd" if head == b"\x28\xb5\x2f\xfd" else "tar"
            measure(path.name[:16], fmt, path, out, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
