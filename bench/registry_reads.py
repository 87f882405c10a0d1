"""Registry read benchmark: RegistryClient vs curl against one loopback docker-registry.

Measures, in one run and on the same blob:
  * ranged-read latency (sequential single reads of 64 KiB / 1 MiB / 4 MiB at random
    offsets; curl's own ``time_total`` per request, so process start-up is excluded),
  * ranged-read throughput (N concurrent 1 MiB reads; curl ``--parallel`` with the same
    ranges),
  * full-blob download MB/s (client ``stream_blob`` verifies SHA-256 on the fly; curl
    writes to /dev/null without verifying).
Medians over ``--runs``. Prints a Markdown table.

    .venv/bin/python bench/registry_reads.py [--blob-mib 128] [--runs 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.registry import start_registry  # noqa: E402
from snapshotter.registry import RegistryClient, RegistryConfig  # noqa: E402
from snapshotter.registry.manifest import sha256_digest  # noqa: E402

CURL = shutil.which("curl") or "curl"


def curl_range(url: str, start: int, end: int) -> float:
    """Seconds curl reports for one ranged GET (time_total)."""
    out = subprocess.run([CURL, "-s", "-o", "/dev/null", "-r", f"{start}-{end - 1}",
                          "-w", "%{time_total} %{size_download}", url],
                         check=True, capture_output=True, text=True).stdout.split()
    if int(out[1]) != end - start:
        raise RuntimeError(f"curl got {out[1]} bytes for a {end - start}-byte range")
    return float(out[0])


def curl_parallel(url: str, ranges: list[tuple[int, int]], parallel: int) -> float:
    args = [CURL, "-s", "--no-progress-meter", "--parallel", "--parallel-max", str(parallel)]
    for i, (s, e) in enumerate(ranges):
        if i:
            args.append("--next")
        args += ["-s", "-r", f"{s}-{e - 1}", "-o", "/dev/null", url]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def curl_full(url: str, size: int) -> float:
    out = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url],
                         check=True, capture_output=True, text=True).stdout.split()
    if int(out[1]) != size:
        raise RuntimeError("curl full download size mismatch")
    return float(out[0])


def curl_full_sha256(url: str, digest: str) -> float:
    """curl piped into sha256sum: the fair comparison for a verified download."""
    t0 = time.perf_counter()
    out = subprocess.run(f"{CURL} -s {url} | sha256sum", shell=True, check=True, capture_output=True,
                         text=True).stdout
    took = time.perf_counter() - t0
    if "sha256:" + out.split()[0] != digest:
        raise RuntimeError("curl | sha256sum digest mismatch")
    return took


async def run(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-"))
    size = args.blob_mib << 20
    data = os.urandom(size)
    digest = sha256_digest(data)
    rng = random.Random(7)
    rows: list[tuple[str, str, str, str]] = []
    with start_registry(work / "reg") as reg:
        cfg = work / "docker.json"
        cfg.write_text("{}")
        ref = f"{reg.host}/bench/blob"
        url = f"{reg.url}/v2/bench/blob/blobs/{digest}"
        async with RegistryClient(RegistryConfig(docker_config=cfg, per_host_concurrency=args.parallel)) as c:
            await c.push_blob(ref, data)
            assert await c.read_range(ref, digest, 0, 16) == data[:16]  # warm the pool
            for label, n in (("64 KiB", 64 << 10), ("1 MiB", 1 << 20), ("4 MiB", 4 << 20)):
                offs = [rng.randrange(0, size - n) for _ in range(args.runs * 4)]
                mine, theirs = [], []
                for o in offs:
                    t0 = time.perf_counter()
                    got = await c.read_range(ref, digest, o, o + n)
                    mine.append(time.perf_counter() - t0)
                    if got != data[o:o + n]:
                        raise RuntimeError("client returned wrong bytes")
                    theirs.append(curl_range(url, o, o + n))
                rows.append((f"ranged read {label}, latency (median)", f"{statistics.median(mine) * 1e3:.2f} ms",
                             f"{statistics.median(theirs) * 1e3:.2f} ms",
                             f"{statistics.median(theirs) / statistics.median(mine):.2f}x"))
            rows.append(await _cpu_per_request(c, reg, ref, url, digest, size, rng, args.runs * 60))
            n = 1 << 20
            mine_t, theirs_t = [], []
            for _ in range(args.runs):
                ranges = [(o, o + n) for o in (rng.randrange(0, size - n) for _ in range(args.reads))]
                t0 = time.perf_counter()
                got = await asyncio.gather(*(c.read_range(ref, digest, s, e) for s, e in ranges))
                mine_t.append(time.perf_counter() - t0)
                if any(g != data[s:e] for g, (s, e) in zip(got, ranges)):
                    raise RuntimeError("client returned wrong bytes")
                theirs_t.append(curl_parallel(url, ranges, args.parallel))
            total = args.reads * n / 1e6
            rows.append((f"{args.reads} x 1 MiB ranged reads, {args.parallel} in flight (MB/s, median)",
                         f"{total / statistics.median(mine_t):.0f}", f"{total / statistics.median(theirs_t):.0f}",
                         f"{statistics.median(theirs_t) / statistics.median(mine_t):.2f}x"))
            mine_f, theirs_f, theirs_v = [], [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                got_n = 0
                async for chunk in c.stream_blob(ref, digest):
                    got_n += len(chunk)
                mine_f.append(time.perf_counter() - t0)
                if got_n != size:
                    raise RuntimeError("short download")
                theirs_f.append(curl_full(url, size))
                theirs_v.append(curl_full_sha256(url, digest))
            mb = size / 1e6
            rows.append((f"full blob {args.blob_mib} MiB download (MB/s, median; client verifies sha256, "
                         "curl -o /dev/null)",
                         f"{mb / statistics.median(mine_f):.0f}", f"{mb / statistics.median(theirs_f):.0f}",
                         f"{statistics.median(theirs_f) / statistics.median(mine_f):.2f}x"))
            rows.append((f"full blob {args.blob_mib} MiB, verified (MB/s, median; curl piped to sha256sum)",
                         f"{mb / statistics.median(mine_f):.0f}", f"{mb / statistics.median(theirs_v):.0f}",
                         f"{statistics.median(theirs_v) / statistics.median(mine_f):.2f}x"))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/PID/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _cpu_per_request(c: RegistryClient, reg: object, ref: str, url: str, digest: str, size: int,
                           rng: random.Random, n: int) -> tuple[str, str, str, str]:
    """CPU one small ranged read costs the registry and the client: on a node that runs the
    registry too (this bench machine), every request a lazy start makes takes it from the
    container (an index with its windows apart makes one more per decoded span)."""
    pid = reg.pid  # type: ignore[attr-defined]
    offs = [rng.randrange(0, size - (16 << 10)) for _ in range(n)]
    r0, u0 = _cpu_seconds(pid), time.process_time()
    for o in offs:
        await c.read_range(ref, digest, o, o + (16 << 10))
    mine_reg, mine_client = (_cpu_seconds(pid) - r0) / n, (time.process_time() - u0) / n
    r0 = _cpu_seconds(pid)
    for o in offs[:n // 4]:
        curl_range(url, o, o + (16 << 10))
    theirs_reg = (_cpu_seconds(pid) - r0) / (n // 4)
    return ("CPU per 16 KiB ranged read: registry process (client process)",
            f"{mine_reg * 1e3:.2f} ms ({mine_client * 1e3:.2f} ms)", f"{theirs_reg * 1e3:.2f} ms (—)", "—")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blob-mib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reads", type=int, default=64, help="concurrent 1 MiB reads per throughput run")
    ap.add_argument("--parallel", type=int, default=8)
    args = ap.parse_args()
    rows = asyncio.run(run(args))
    print("| measurement | lazysnap RegistryClient | curl | client speed vs curl |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
