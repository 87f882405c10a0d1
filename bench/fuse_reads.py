"""Read throughput through the lazysnap FUSE mount vs the same files on local disk.

Three measurements (medians of ``--runs``):
1. sequential read of one big file (default 1 GiB): page-cache warm, and page-cache cold
   with every chunk already in the store (``posix_fadvise(DONTNEED)`` on the FUSE file,
   the chunk files and the local file — no global cache drop on a shared machine);
2. ``find | stat`` over a tree of many small files (os.walk + lstat of every entry), on a
   fresh mount (kernel dentry/attr caches empty) and again (warm);
3. cold read through a real docker-registry: an empty store, the layer (gzip) fetched
   lazily in spans while a file is read sequentially;
4. FUSE passthrough (``--pt-size-mb``, default 1024; ``--model-size-mb``, default 2048):
   a layer mounted without passthrough and by the daemon's filesystem with it (backing
   files made from the verified chunks); sequential warm and cold, random 4 KiB ``pread``
   and random ``mmap`` page faults with the page cache dropped, and a "model load" (read
   whole, then mmap and touch every page, as safetensors does), each against ext4.

Usage: ``.venv/bin/python bench/fuse_reads.py [--size-mb 1024] [--files 20000] [--runs 3]``
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import mmap
import os
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapshotter.fetch import Fetcher, FetchOptions  # noqa: E402
from snapshotter.fetch.sources import FileBlobSource, IndexCodec, RegistryBlobSource  # noqa: E402
from snapshotter.fs import LayerData, LayerTree  # noqa: E402
from snapshotter.fs.thread import FuseThread  # noqa: E402
from snapshotter.index.builder import index_file  # noqa: E402
from snapshotter.index.format import IndexFile, write_index  # noqa: E402
from snapshotter.store import ChunkStore  # noqa: E402

BUF = 1 << 20


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED only drops clean pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path) -> tuple[int, float]:
    buf = bytearray(BUF)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n, time.perf_counter() - t0


def walk_stat(root: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for dp, dns, fns in os.walk(root):
        for name in dns + fns:
            os.lstat(os.path.join(dp, name))
            n += 1
    return n, time.perf_counter() - t0


def mbps(n: int, s: float) -> float:
    return n / s / 1e6


def write_big_tar(path: Path, size: int) -> Path:
    """A tar with one incompressible file; returns the local copy of that file."""
    local = path.parent / "big.bin"
    with open(local, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    with tarfile.open(path, "w") as tf:
        tf.add(local, arcname="big.bin")
    return local


def write_tree_tar(path: Path, files: int, local: Path) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(files):
            name = f"d{i // 500:03d}/s{(i // 50) % 10}/f{i:06d}.txt"
            data = b"x" * (i % 2000)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    local.mkdir()
    with tarfile.open(path) as tf:
        tf.extractall(local, filter="data")


def mount_layer(ft: FuseThread, store: ChunkStore, fetcher: Fetcher, name: str, blob: Path, idx_path: Path,
                source: object | None = None) -> tuple[Path, IndexFile]:
    write_index(idx_path, index_file(str(blob)))
    index = IndexFile.open(idx_path)
    lf = fetcher.layer(name, IndexCodec(index), source or FileBlobSource(blob),
                       sequential_only=index.info.sequential_only)
    tree = LayerTree.build(index.entries())
    d = ft.run(lambda: ft.fs.add_layer(name, tree, LayerData(index, store, lf)))
    if source is None:
        ft.run(lf.fetch_all)  # warm store: every chunk local
    return d, index


def bench_sequential(work: Path, ft: FuseThread, store: ChunkStore, fetcher: Fetcher, size: int, runs: int) -> None:
    tar = work / "big.tar"
    local = write_big_tar(tar, size)
    d, index = mount_layer(ft, store, fetcher, "big", tar, work / "big.idx")
    f = d / "big.bin"
    chunk_files = [store.path_of(index.chunk(i).digest) for i in range(index.chunk_count)]
    res: dict[str, list[float]] = {k: [] for k in ("fuse_warm", "local_warm", "fuse_cold", "local_cold")}
    read_all(f)
    read_all(local)
    for _ in range(runs):
        res["fuse_warm"].append(mbps(*read_all(f)))
        res["local_warm"].append(mbps(*read_all(local)))
        drop_file_cache(f)  # FUSE: fsync is a no-op here, DONTNEED drops the mount's pages
        for c in chunk_files:
            drop_file_cache(c)
        res["fuse_cold"].append(mbps(*read_all(f)))
        drop_file_cache(local)
        res["local_cold"].append(mbps(*read_all(local)))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"sequential {size >> 20} MiB file, MB/s (median of {runs}):")
    print(f"  page cache warm : fuse {med['fuse_warm']:8.0f}  local {med['local_warm']:8.0f}  "
          f"ratio {med['fuse_warm'] / med['local_warm']:.2f}")
    print(f"  page cache cold : fuse {med['fuse_cold']:8.0f}  local {med['local_cold']:8.0f}  "
          f"ratio {med['fuse_cold'] / med['local_cold']:.2f}  (all chunks in the store)")
    index.close()
    ft.run(lambda: ft.fs.remove_layer("big"))
    os.unlink(local)
    os.unlink(tar)


def rand_pread(path: Path, n: int, seed: int) -> float:
    """Seconds for ``n`` 4 KiB preads at random page-aligned offsets."""
    rng = random.Random(seed)
    offs = [rng.randrange(path.stat().st_size // 4096) * 4096 for _ in range(n)]
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offs:
            os.pread(fd, 4096, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def rand_mmap(path: Path, n: int, seed: int) -> float:
    """Seconds for ``n`` page faults at random pages of the mapped file."""
    rng = random.Random(seed)
    offs = [rng.randrange(path.stat().st_size // 4096) * 4096 for _ in range(n)]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        m.madvise(mmap.MADV_RANDOM)  # one page per fault, as a model's scattered reads
        t0 = time.perf_counter()
        total = 0
        for off in offs:
            total += m[off]
        return time.perf_counter() - t0


def model_load(path: Path) -> float:
    """Seconds to load a weights file as safetensors does: read it whole (header and
    metadata parsing reads too), then map it and touch every page in order."""
    t0 = time.perf_counter()
    read_all(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        total = 0
        for off in range(0, len(m), 4096):
            total += m[off]
    return time.perf_counter() - t0


VARIANTS = ("ext4", "backing", "served", "through")


def bench_passthrough(work: Path, size: int, model_size: int, runs: int, samples: int = 20000) -> None:
    """One layer with a file of ``size`` and a weights-like file of ``model_size``, every
    chunk in the store, mounted twice: ``served`` by the C session (no passthrough) and
    ``through`` by a daemon filesystem with ``passthrough`` on, which gives each file a
    backing file made from the verified chunks (``snapshotter.fs.backing``); both against
    the same files on ext4, and against the backing files themselves read on ext4. The four
    are measured in turn within each run, starting with a different one each run (the disk is a noisy virtual one: what ran just before matters);
    the page cache of every file involved is dropped before cold reads."""
    pt = work / "pt"
    pt.mkdir()
    tar = pt / "layer.tar"
    local = write_big_tar(tar, size)
    model = pt / "local-model.bin"
    with open(model, "wb") as f:
        block = os.urandom(BUF)
        for _ in range(model_size // BUF):
            f.write(block[:1024] + os.urandom(1024) + block[2048:])
    with tarfile.open(tar, "a") as tf:
        tf.add(model, arcname="model.safetensors")
    store = ChunkStore(pt / "store")
    fetcher = Fetcher(store, FetchOptions(max_concurrency=4))
    served_ft = FuseThread(pt / "mnt-served")
    # a store of its own: passthrough lodges a backed file's chunks in its backing file and
    # deletes their chunk files, which the served mount reads
    through_ft = FuseThread(pt / "store-pt" / "mnt", passthrough=True)
    results: dict[str, dict[str, list[float]]] = {
        k: {"warm": [], "cold": [], "pread": [], "mmap": [], "model": []} for k in VARIANTS}
    try:
        d_served, index = mount_layer(served_ft, store, fetcher, "L", tar, pt / "layer.idx")
        # fetch_all answers once every chunk is verified; some may still be on their way to
        # disk (write-behind): link them only once all are there
        chunk_paths = [store.path_of(index.chunk(i).digest) for i in range(index.chunk_count)]
        t_wait = time.monotonic()
        while not all(p.exists() for p in chunk_paths):
            if time.monotonic() - t_wait > 60:
                raise RuntimeError("the chunks were not all written within 60 s")
            time.sleep(0.1)
        shutil.copytree(pt / "store" / "chunks", pt / "store-pt" / "chunks", copy_function=os.link)
        pt_store = ChunkStore(pt / "store-pt")
        d_through = through_ft.run(lambda: through_ft.fs.add_layer(
            "L", LayerTree.build(index.entries()), LayerData(index, pt_store, None)))
        if through_ft.fs.passthrough_unavailable:
            print(f"passthrough: unavailable ({through_ft.fs.passthrough_unavailable}); skipped")
            return
        t0 = time.monotonic()
        while through_ft.fs.counters().get("backing_files", 0) < 2:
            if time.monotonic() - t0 > 600:
                raise RuntimeError("the backing files were not made within 600 s")
            time.sleep(0.1)
        made_s = time.monotonic() - t0
        backing = [p for p in (pt / "store-pt" / "files").rglob("*")
                   if p.is_file() and ".tmp" not in p.parts and p.suffix != ".chunks"]
        chunk_files = [store.path_of(index.chunk(i).digest) for i in range(index.chunk_count)]
        by_size = {p.stat().st_size: p for p in backing}
        # "backing": the very blocks passthrough reads, read on ext4 without FUSE. The ext4
        # copy and the backing file lie at different places of a virtual disk whose cold
        # reads differ by place; against the backing file, what is left is passthrough's cost.
        paths = {"ext4": (local, model), "backing": (by_size[size], by_size[model_size]),
                 "served": (d_served / "big.bin", d_served / "model.safetensors"),
                 "through": (d_through / "big.bin", d_through / "model.safetensors")}

        def drop() -> None:
            for p in (*[q for pair in paths.values() for q in pair], *backing, *chunk_files):
                drop_file_cache(p)

        for r in range(runs):
            kinds = list(paths.items())
            for kind, (path, weights) in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # none always after another
                out = results[kind]
                read_all(path)  # into the page cache
                out["warm"].append(mbps(*read_all(path)))
                drop()
                out["cold"].append(mbps(*read_all(path)))
                drop()
                out["pread"].append(samples / rand_pread(path, samples, r))
                drop()
                out["mmap"].append(samples / rand_mmap(path, samples, r))
                drop()
                out["model"].append(model_load(weights))
        c = through_ft.fs.counters()
        assert c["open_passthrough"] > 0, "nothing was passed through"
        print(f"  (backing files made in {made_s:.1f} s after the chunks were local; "
              f"opens passed through: {c['open_passthrough']}, FUSE READs reaching the passthrough mount: {c['read']})")
        index.close()
    finally:
        through_ft.stop()
        served_ft.stop()
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    print("  model load s per run: " + "; ".join(
        f"{k} " + " ".join(f"{x:.2f}" for x in results[k]["model"]) for k in VARIANTS))
    print(f"passthrough: a {size >> 20} MiB file and a {model_size >> 20} MiB model (median of {runs}; "
          f"ratio to ext4, for the model load ext4's time over ours):")
    heads = ("seq warm MB/s", "seq cold MB/s", "4K pread/s", "mmap faults/s", "model load s")
    print("  " + " ".join(f"{h:>20}" for h in ("", *heads)))
    for k in VARIANTS:
        cells = [f"{med[k][m]:9.0f} ({med[k][m] / med['ext4'][m]:.2f})" for m in ("warm", "cold", "pread", "mmap")]
        cells.append(f"{med[k]['model']:9.2f} ({med['ext4']['model'] / med[k]['model']:.2f})")
        print("  " + f"{k:>20} " + " ".join(f"{c:>20}" for c in cells))
    per_run = [b / t for b, t in zip(results["backing"]["model"], results["through"]["model"])]
    print(f"  through against its own backing file read on ext4: cold {med['through']['cold'] / med['backing']['cold']:.2f}, "
          f"model load {med['backing']['model'] / med['through']['model']:.2f} (median of per-run ratios "
          f"{statistics.median(per_run):.2f})")
    shutil.rmtree(pt)


def bench_tree(work: Path, store: ChunkStore, fetcher: Fetcher, files: int, runs: int) -> None:
    tar = work / "tree.tar"
    local = work / "tree-local"
    write_tree_tar(tar, files, local)
    cold, warm, lcold, lwarm = [], [], [], []
    for r in range(runs):
        ft = FuseThread(work / f"mnt-tree-{r}")  # fresh mount: empty kernel caches
        try:
            d, index = mount_layer(ft, store, fetcher, "tree", tar, work / "tree.idx")
            n, s = walk_stat(d)
            cold.append(s)
            warm.append(walk_stat(d)[1])
            index.close()
        finally:
            ft.stop()
        for p in (local,):
            lcold.append(walk_stat(p)[1])
            lwarm.append(walk_stat(p)[1])
    print(f"find|stat over {n} entries, seconds (median of {runs}):")
    print(f"  fuse first walk {statistics.median(cold):.3f}  fuse warm {statistics.median(warm):.3f}  "
          f"local {statistics.median(lwarm):.3f}")
    shutil.rmtree(local)


def bench_registry(work: Path, size: int, runs: int) -> None:
    from harness.proxy import start_proxy
    from harness.registry import push_image, start_registry
    from snapshotter.registry import RegistryClient, RegistryConfig

    tar = work / "cold.tar"
    local = write_big_tar(tar, size)
    blob = work / "cold.tar.gz"
    with open(tar, "rb") as src, gzip.open(blob, "wb", 1) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    reg = start_registry(work / "reg")
    proxy = start_proxy(reg.url)
    results = []
    try:
        ref = f"{proxy.host}/bench/cold:v1"
        loop = asyncio.new_event_loop()

        async def push() -> dict[str, object]:
            async with RegistryClient(RegistryConfig()) as c:
                return await push_image(c, ref, [blob.read_bytes()])

        digest = loop.run_until_complete(push())["layer_digests"][0]  # type: ignore[index]
        loop.close()
        write_index(work / "cold.idx", index_file(str(blob)))
        for r in range(runs):
            store = ChunkStore(work / f"cold-store-{r}")
            fetcher = Fetcher(store, FetchOptions(max_concurrency=4, deadline_s=60))
            ft = FuseThread(work / f"mnt-cold-{r}")
            try:
                client = ft.call(lambda: RegistryClient(RegistryConfig()))
                index = IndexFile.open(work / "cold.idx")
                lf = fetcher.layer("cold", IndexCodec(index), RegistryBlobSource(client, ref, digest))
                tree = LayerTree.build(index.entries())
                d = ft.run(lambda: ft.fs.add_layer("cold", tree, LayerData(index, store, lf)))
                proxy.reset_stats()
                n, s = read_all(d / "big.bin")
                results.append((mbps(n, s), proxy.stats.body_bytes))
                ft.run(client.close)
                index.close()
            finally:
                ft.stop()
                shutil.rmtree(work / f"cold-store-{r}", ignore_errors=True)
    finally:
        proxy.stop()
        reg.stop()
    print(f"cold sequential read via registry ({size >> 20} MiB file, gzip blob {blob.stat().st_size >> 20} MiB), "
          f"median of {runs}: {statistics.median(r[0] for r in results):.0f} MB/s, "
          f"registry bytes {statistics.median(r[1] for r in results) / 1e6:.0f} MB")
    os.unlink(local)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--cold-size-mb", type=int, default=256)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pt-size-mb", type=int, default=1024)
    ap.add_argument("--model-size-mb", type=int, default=2048)
    ap.add_argument("--skip", default="", help="comma list of: seq,tree,registry,passthrough")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-", dir="/var/tmp"))
    try:
        store = ChunkStore(work / "store")
        fetcher = Fetcher(store, FetchOptions(max_concurrency=4))
        if "seq" not in skip:
            ft = FuseThread(work / "mnt")
            try:
                bench_sequential(work, ft, store, fetcher, args.size_mb << 20, args.runs)
            finally:
                ft.stop()
        if "tree" not in skip:
            bench_tree(work, store, fetcher, args.files, args.runs)
        if "registry" not in skip:
            bench_registry(work, args.cold_size_mb << 20, args.runs)
        if "passthrough" not in skip:
            bench_passthrough(work, args.pt_size_mb << 20, args.model_size_mb << 20, args.runs)
    finally:
        from harness.containerd import unmount_under

        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
