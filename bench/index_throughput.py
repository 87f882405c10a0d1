"""Index throughput of the C core on a ≈1 GB real-world layer, against the baselines.

Builds once (cached under bench/.cache/): a site-packages tree from real PyPI wheels
(torch 2.13 CPU, numpy, scipy, pandas) installed with `pip install --target`, tarred
deterministically (GNU tar, PAX format, sorted names, fixed owner and mtime), then
  * layer.tar.gz   — `gzip -6` (one member, like docker/buildkit layers),
  * layer.tar.zst  — python-zstandard level 3, one frame per 8 MiB of tar (multi-frame,
                     so random access works; the zstd CLI would write a single frame).
Then reports medians of --runs runs, in one table:
  * MB/s (uncompressed) of snapshotter.native.Scanner on one thread and with its hash
    thread, `gzip -dc >/dev/null` / `zstd -dc >/dev/null`, and a pure-Python pipeline
    (zlib / zstandard + tarfile + hashlib, with blob digest and 1 MiB chunk hashes);
  * index size as % of the blob (the real on-disk index when snapshotter.index builds
    it, else an estimate with zlib-compressed windows);
  * median latency of a 4 KiB read at a random offset of a random file through the index
    (snapshotter.index reader over a local file when available, else decompress_range);
  * several layers indexed concurrently (threads), aggregate MB/s.
Usage: .venv/bin/python bench/index_throughput.py [--runs 3] [--python-runs 1] [--reads 200]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import mmap
import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snapshotter import native  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "index_throughput"
PACKAGES = ["torch==2.13.0", "numpy", "scipy", "pandas"]
ZSTD_FRAME = 8 << 20
FEED = 4 << 20


# ------------------------------------------------------------------ dataset

def build_dataset() -> dict[str, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    site = CACHE / "site"
    tar_path, gz_path, zst_path = CACHE / "layer.tar", CACHE / "layer.tar.gz", CACHE / "layer.tar.zst"
    if not (site / "torch").is_dir():
        print(f"# pip install --target {site} {' '.join(PACKAGES)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        *PACKAGES], check=True)
    if not tar_path.exists():
        tmp = tar_path.with_suffix(".tmp")
        subprocess.run(["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner",
                        "--format=posix", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                        "-cf", str(tmp), "-C", str(site), "."], check=True)
        tmp.rename(tar_path)
    if not gz_path.exists():
        tmp = gz_path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            subprocess.run(["gzip", "-6", "-n", "-c", str(tar_path)], stdout=out, check=True)
        tmp.rename(gz_path)
    if not zst_path.exists():
        tmp = zst_path.with_suffix(".tmp")
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        with open(tar_path, "rb") as src, open(tmp, "wb") as out:
            while block := src.read(ZSTD_FRAME):
                out.write(cctx.compress(block))
        tmp.rename(zst_path)
    return {"gzip": gz_path, "zstd": zst_path, "tar": tar_path}


# ------------------------------------------------------------------ measurements

@dataclass(slots=True)
class Timing:
    wall: float  # median seconds
    cpu: float  # median CPU seconds (this process and its children)
    bound: float  # median critical path on 2 free cores (Scanner: max(producer, hash thread))


def median_time(fn: Callable[[], object], runs: int) -> tuple[Timing, object]:
    """Wall and CPU medians: the machine is shared, so CPU time is the steadier figure."""
    return paired_times([fn], runs)[0]


def paired_times(fns: list[Callable[[], object]], runs: int) -> list[tuple[Timing, object]]:
    """Medians of ``runs`` timings of each function, taken in turns (a, b, a, b, ...) after
    one untimed call of each: two pipelines compared this way see the same machine (the
    first block of runs after another program was measurably slower in one-after-another
    timing)."""
    samples: list[tuple[list[float], list[float], list[float]]] = [([], [], []) for _ in fns]
    last: list[object] = [fn() for fn in fns]
    for _ in range(runs):
        for k, fn in enumerate(fns):
            r0, c0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
            t = time.perf_counter()
            last[k] = fn()
            walls, cpus, bounds = samples[k]
            walls.append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = time.process_time() - c0 + (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            cpus.append(cpu)
            th = getattr(last[k], "hash_thread_cpu_ns", 0) / 1e9
            bounds.append(max(cpu - th, th) if th else cpu)
    return [(Timing(statistics.median(w), statistics.median(c), statistics.median(b)), r)
            for (w, c, b), r in zip(samples, last)]


def scan_file(path: Path, hash_thread: bool, span: int = 4 << 20, sparse: bool = True) -> native.ScanResult:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        sc = native.Scanner(span_size=span, hash_thread=hash_thread, sparse_windows=sparse)
        try:
            for i in range(0, len(m), FEED):
                sc.feed(view[i:i + FEED])
            return sc.finish()
        finally:
            view.release()


def cli_decompress(cmd: list[str]) -> None:
    with open(os.devnull, "wb") as null:
        subprocess.run(cmd, stdout=null, check=True)


class _DecompressingReader(io.RawIOBase):
    """Compressed file → uncompressed bytes for tarfile's stream mode; hashes the blob."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.f = open(path, "rb")
        self.fmt = fmt
        self.blob = hashlib.sha256()
        self.buf = b""
        self.d = zlib.decompressobj(31) if fmt == "gzip" else zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def _more(self) -> bool:
        while True:
            data = self.d.unused_data if self.d.eof else b""
            if self.d.eof:  # next gzip member / zstd frame
                self.d = zlib.decompressobj(31) if self.fmt == "gzip" else \
                    zstandard.ZstdDecompressor().decompressobj()
            if not data:
                data = self.f.read(1 << 20)
                if not data:
                    return False
                self.blob.update(data)
            out = self.d.decompress(data)
            if out:
                self.buf += out
                return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        while not self.buf:
            if not self._more():
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def python_pipeline(path: Path, fmt: str) -> int:
    """The best plain-Python indexer: stream-decompress, tarfile, hashlib per 1 MiB chunk."""
    raw = _DecompressingReader(path, fmt)
    stream = io.BufferedReader(raw, 1 << 20)
    n_chunks = 0
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                while block := f.read(1 << 20):
                    hashlib.sha256(block).digest()
                    n_chunks += 1
    while raw._more():  # rest of the stream: blob digest covers every byte
        raw.buf = b""
    raw.blob.digest()
    return n_chunks


def index_size(res: native.ScanResult, blob_size: int) -> tuple[float, str]:
    try:
        from snapshotter.index.builder import build_index
        from snapshotter.index.format import serialize_index

        data = serialize_index(build_index(res))
        return 100.0 * len(data) / blob_size, "on-disk index (snapshotter.index.format)"
    except Exception as exc:  # index package not ready: estimate
        est = sum(24 + len(zlib.compress(c.window, 6)) for c in res.checkpoints)
        est += len(res.chunks) + sum(64 + len(e.path) + len(e.linkname) for e in res.entries)
        return 100.0 * est / blob_size, f"estimate ({type(exc).__name__}: index package unavailable)"


@dataclass(slots=True)
class ReadLatency:
    median_ms: float
    p90_ms: float
    how: str


def read_latency(path: Path, res: native.ScanResult, reads: int, seed: int = 1) -> ReadLatency:
    rnd = random.Random(seed)
    files = [e for e in res.entries if e.type == 0 and e.stored_size >= 4096 and e.sparse is None]
    picks = [(e, rnd.randrange(0, e.stored_size - 4096 + 1)) for e in
             (rnd.choice(files) for _ in range(reads))]
    times: list[float] = []
    try:
        from snapshotter.index.builder import build_index
        from snapshotter.index.format import IndexFile, serialize_index
        from snapshotter.index.reader import FileRangeSource, LayerReader

        with tempfile.TemporaryDirectory() as td:
            ipath = Path(td) / "index"
            ipath.write_bytes(serialize_index(build_index(res)))
            with IndexFile.open(ipath) as idx, FileRangeSource(path) as src:
                for e, off in picks:
                    reader = LayerReader(idx, src, cache_chunks=0) if _accepts_cache(LayerReader) else \
                        LayerReader(idx, src)
                    t = time.perf_counter()
                    got = reader.read_file(e.path.decode("utf-8", "surrogateescape").strip("/").removeprefix("./"),
                                           off, 4096)
                    times.append(time.perf_counter() - t)
                    assert len(got) == 4096
        how = "snapshotter.index LayerReader, local file, cold chunk cache, verified"
    except Exception as exc:
        times = []
        starts = [c.uncompressed_offset for c in res.checkpoints]
        import bisect

        with open(path, "rb") as f:
            for e, off in picks:
                t = time.perf_counter()
                u = e.data_offset + off
                i = bisect.bisect_right(starts, u) - 1
                c = res.checkpoints[i]
                end = res.checkpoints[i + 1].compressed_offset + 64 if i + 1 < len(starts) else res.compressed_size
                f.seek(c.compressed_offset)
                data = f.read(end - c.compressed_offset)
                got = native.decompress_range(res.format, c.kind, c.bits, c.window, data,
                                              u - c.uncompressed_offset, 4096)
                times.append(time.perf_counter() - t)
                assert len(got) == 4096
        how = f"decompress_range from nearest checkpoint, no chunk verify ({type(exc).__name__})"
    times.sort()
    return ReadLatency(statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3, how)


def _accepts_cache(cls: type) -> bool:
    import inspect

    return "cache_chunks" in inspect.signature(cls).parameters


def concurrent(paths: list[Path], hash_thread: bool) -> tuple[float, float]:
    """Several layers at once, one Python thread each (the C core releases the GIL)."""
    results: list[native.ScanResult | None] = [None] * len(paths)

    def work(i: int) -> None:
        results[i] = scan_file(paths[i], hash_thread)

    t = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    total = sum(r.uncompressed_size for r in results if r)
    return dt, total / dt / 1e6


# ------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python-runs", type=int, default=1)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--skip-python", action="store_true")
    args = ap.parse_args()

    paths = build_dataset()
    usize = paths["tar"].stat().st_size
    mb = usize / 1e6
    print(f"# layer: {mb:.0f} MB tar, gzip {paths['gzip'].stat().st_size / 1e6:.0f} MB, "
          f"zstd {paths['zstd'].stat().st_size / 1e6:.0f} MB ({ZSTD_FRAME >> 20} MiB frames); "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []

    def row(fmt: str, what: str, t: Timing, base: Timing | None = None, two_core: bool = False) -> None:
        wall, cpu = mb / t.wall, mb / t.cpu
        x = f" ({wall / (mb / base.wall):.1f}×)" if base else ""
        xc = f" ({cpu / (mb / base.cpu):.1f}×)" if base else ""
        bound = f"{mb / t.bound:.0f} ({mb / t.bound / (mb / base.cpu):.1f}×)" if two_core and base else ""
        rows.append((fmt, what, f"{wall:.0f}{x}", f"{cpu:.0f}{xc}", bound))

    for fmt in ("gzip", "zstd"):
        p = paths[fmt]
        cli = ["gzip", "-dc", str(p)] if fmt == "gzip" else ["zstd", "-qdc", str(p)]
        t_cli, _ = median_time(lambda: cli_decompress(cli), args.runs)
        (t1, res), (t2, _) = paired_times([lambda: scan_file(p, False), lambda: scan_file(p, True)], args.runs)
        assert isinstance(res, native.ScanResult)
        row(fmt, f"`{' '.join(cli[:2])} >/dev/null`", t_cli)
        row(fmt, "Scanner, 1 thread", t1, t_cli)
        row(fmt, "Scanner + hash thread (2 threads)", t2, t_cli, two_core=True)
        if not args.skip_python:
            tp, _ = median_time(lambda: python_pipeline(p, fmt), args.python_runs)
            row(fmt, "pure Python (zlib/zstandard + tarfile + hashlib)", tp, t_cli)
        pct, how = index_size(res, p.stat().st_size)
        rows.append((fmt, f"index size, % of blob ({len(res.checkpoints)} checkpoints, "
                          f"{res.chunk_count} chunks, {len(res.entries)} entries)", f"{pct:.2f} %", "", ""))
        notes.append(f"{fmt} index size: {how}")
        if fmt == "gzip":  # what sparse windows cost the scan and save the index
            span = 256 << 10
            (t_4, _), (tw, _), (t_s, dense), (t_w, dense_w) = paired_times(
                [lambda: scan_file(p, False), lambda: scan_file(p, False, sparse=False),
                 lambda: scan_file(p, False, span), lambda: scan_file(p, False, span, sparse=False)], args.runs)
            row(fmt, "Scanner, 1 thread (again, in turns with the three below)", t_4, t_cli)
            row(fmt, "Scanner, 1 thread, whole windows (`sparse_windows=False`)", tw, t_cli)
            row(fmt, "Scanner, 1 thread, 256 KiB spans (the `--push` default)", t_s, t_cli)
            row(fmt, "Scanner, 1 thread, 256 KiB spans, whole windows", t_w, t_cli)
            assert isinstance(dense, native.ScanResult) and isinstance(dense_w, native.ScanResult)
            rows.append((fmt, f"index size at 256 KiB spans, % of blob ({len(dense.checkpoints)} checkpoints): "
                              "sparse / whole windows",
                         f"{index_size(dense, p.stat().st_size)[0]:.2f} % / "
                         f"{index_size(dense_w, p.stat().st_size)[0]:.2f} %", "", ""))
        lat = read_latency(p, res, args.reads)
        rows.append((fmt, "4 KiB read at a random offset of a random file: median / p90 ms",
                     f"{lat.median_ms:.1f} / {lat.p90_ms:.1f}", "", ""))
        notes.append(f"{fmt} read latency: {lat.how}")
    for ht in (False, True):
        t, agg = concurrent([paths["gzip"], paths["zstd"], paths["gzip"]], ht)
        rows.append(("gzip+zstd+gzip", f"3 layers concurrently (threads), {'with' if ht else 'no'} "
                                       "hash threads, aggregate", f"{agg:.0f}", "", ""))
    print("\n| format | what | wall MB/s | MB/s per CPU-second | 2 free cores (critical path) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    for n in notes:
        print(f"- {n}")
    print(f"- medians of {args.runs} runs (pure Python: {args.python_runs}); load average at start "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs shared with other work")


if __name__ == "__main__":
    main()
