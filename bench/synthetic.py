"""Large synthetic images: N GB of layers with a configurable hot set.

Shows how cold start scales with image size: a full pull grows with the image, a lazy
start should grow with what the start command reads. Everything is derived from a seed,
so the same spec gives the same bytes and digests; built layouts are cached under
``bench/.cache/synthetic/``.

Content: files of mixed sizes (90% 0.5–64 KiB, 9% up to 4 MiB, 1% 16–128 MiB) in 64 KiB blocks;
half the blocks are pseudo-random (incompressible for gzip), half are text-like
(a 16-letter alphabet, ~50% compressible). Blocks are slices at unrelated offsets of one
seeded 64 MiB pool, so no two chunks repeat (no accidental dedup).

Start command (busybox): read the hot list ``/bench/hot.list`` (``path offset length``
lines: whole random directories, as imports read packages; large files in scattered 1–4
MiB ranges; in a fixed order) with ``dd``,
then print ``synthetic-ok``. ``previous()`` is the same image with ~10% of the files
rewritten: the "previous version" a warm node already holds.

    python -m bench.synthetic --size-gb 2 --hot 0.05 --registry 127.0.0.1:5000
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harness.images import (
    PushedImage, busybox_rootfs, build_layout, push_layout, write_layer_tar, File,
)

CACHE = Path(os.environ.get("LAZYSNAP_BENCH_CACHE", Path(__file__).resolve().parent / ".cache")) / "synthetic"
GENERATOR_VERSION = "2"
BLOCK = 64 << 10
POOL = 64 << 20
EXPECTED = "synthetic-ok"
START_SH = b"""#!/bin/sh
# Read the hot set in order: "path offset length" per line, 4 KiB granularity.
while read p o l; do
  dd if="$p" of=/dev/null bs=4096 skip=$((o / 4096)) count=$(((l + 4095) / 4096)) 2>/dev/null
done < /bench/hot.list
echo synthetic-ok
"""
_TEXT = bytes.maketrans(bytes(range(256)), (b"etaoinshrdlu \n,." * 16))


@dataclass(slots=True, frozen=True)
class SyntheticSpec:
    size_gb: float = 2.0
    hot: float = 0.05
    seed: int = 1
    layers: int = 4
    version: int = 2  # 1 = the previous version (10% of files differ)

    def __post_init__(self) -> None:
        if not 0.001 <= self.size_gb <= 200:
            raise ValueError("size_gb must be between 0.001 and 200")
        if not 0.0 <= self.hot <= 1.0:
            raise ValueError("hot must be a fraction between 0 and 1")
        if not 1 <= self.layers <= 64:
            raise ValueError("layers must be between 1 and 64")

    @property
    def label(self) -> str:
        return f"{self.size_gb:g}g-hot{self.hot:g}-s{self.seed}-v{self.version}"

    def key(self) -> str:
        return hashlib.sha256(json.dumps([GENERATOR_VERSION, self.size_gb, self.hot, self.seed,
                                          self.layers, self.version]).encode()).hexdigest()[:16]

    def previous(self) -> SyntheticSpec:
        return replace(self, version=1)


@dataclass(slots=True, frozen=True)
class SynFile:
    index: int
    layer: int
    path: str
    size: int


def plan_files(spec: SyntheticSpec) -> list[SynFile]:
    """Deterministic file list totalling ``size_gb`` (sizes do not depend on version)."""
    rng = random.Random(spec.seed)
    total = int(spec.size_gb * 1e9)
    sizes: list[int] = []
    acc = 0
    while acc < total:
        r = rng.random()
        if r < 0.90:
            s = rng.randint(512, 64 << 10)
        elif r < 0.99:
            s = rng.randint(64 << 10, 4 << 20)
        else:
            s = rng.randint(16 << 20, 128 << 20)
        s = min(s, total - acc) or 1
        sizes.append(s)
        acc += s
    per_layer = max(1, -(-len(sizes) // spec.layers))
    return [SynFile(i, i // per_layer, f"data/l{i // per_layer}/d{(i // 64) % 1000:03d}/f{i:06d}.bin", s)
            for i, s in enumerate(sizes)]


def plan_hot(spec: SyntheticSpec, files: list[SynFile]) -> list[tuple[str, int, int]]:
    """Hot reads ``(path, offset, length)`` totalling ``hot`` of the bytes.

    Start-up reads cluster the way imports do: whole directories (64 files, a "package")
    picked at random, every small file in them read whole, large ones in 1–4 MiB ranges.
    """
    rng = random.Random(spec.seed * 7919 + 1)
    target = int(spec.hot * sum(f.size for f in files))
    dirs: dict[str, list[SynFile]] = {}
    for f in files:
        dirs.setdefault(f.path.rsplit("/", 1)[0], []).append(f)
    order = sorted(dirs)
    rng.shuffle(order)
    reads: list[tuple[str, int, int]] = []
    got = 0
    for d in order:
        for f in dirs[d]:
            if got >= target:
                return reads
            if f.size <= 8 << 20:
                reads.append((f.path, 0, f.size))
                got += f.size
            else:
                for _ in range(rng.randint(1, 4)):
                    length = min(f.size, rng.randint(1, 4) << 20)
                    off = rng.randrange(0, max(1, f.size - length)) & ~4095
                    reads.append((f.path, off, length))
                    got += length
    return reads


class _Content(io.RawIOBase):
    """File bytes generated on read: block k is a pool slice chosen by a hash."""

    def __init__(self, pool: memoryview, spec: SyntheticSpec, f: SynFile) -> None:
        self.pool, self.f, self.pos = pool, f, 0
        # ~10% of files are rewritten in version 2 relative to version 1
        changed = random.Random(spec.seed * 31 + f.index).random() < 0.10
        self.salt = f"{spec.seed}:{f.index}:{spec.version if changed else 0}".encode()

    def readable(self) -> bool:
        return True

    def _block(self, k: int) -> bytes:
        h = hashlib.blake2b(self.salt + b":%d" % k, digest_size=8).digest()
        v = int.from_bytes(h, "little")
        off = v % (POOL - BLOCK)
        data = self.pool[off:off + BLOCK]
        return bytes(data).translate(_TEXT) if (v >> 63) & 1 else bytes(data)

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        n = min(len(view), self.f.size - self.pos)
        done = 0
        while done < n:
            k, within = divmod(self.pos, BLOCK)
            chunk = self._block(k)[within:within + n - done]
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return n


def add_parent_dirs(tar: tarfile.TarFile, path: str, made: set[str]) -> int:
    """Directory entries (0755, fixed mtime) for the parents of ``path`` not in ``made`` yet,
    as image builders write them before a file; how many were added."""
    count = 0
    parts = path.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d not in made:
            made.add(d)
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(ti)
            count += 1
    return count


def _write_data_layer(path: Path, spec: SyntheticSpec, files: list[SynFile], pool: memoryview) -> int:
    count = 0
    made: set[str] = set()
    with open(path, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            count += add_parent_dirs(tar, f.path, made)
            ti = tarfile.TarInfo(f.path)
            ti.size, ti.mode, ti.mtime = f.size, 0o644, 1_700_000_000
            tar.addfile(ti, io.BufferedReader(_Content(pool, spec, f), 1 << 20))
            count += 1
    return count


def build(spec: SyntheticSpec) -> tuple[Path, dict[str, object]]:
    """The cached OCI layout for ``spec`` and its info (bytes, entries, hot bytes)."""
    out = CACHE / f"{spec.label}-{spec.key()}"
    layout = out / "oci"
    if (out / "info.json").exists():
        return layout, json.loads((out / "info.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    pool = memoryview(random.Random(spec.seed).randbytes(POOL))
    files = plan_files(spec)
    hot = plan_hot(spec, files)
    hot_list = "".join(f"/{p} {o} {n}\n" for p, o, n in hot).encode()
    tars: list[Path] = []
    entries = 0
    nbytes = 0
    boot = out / "layer-boot.tar"
    entries += write_layer_tar(busybox_rootfs([File("bench/start.sh", START_SH, mode=0o755),
                                               File("bench/hot.list", hot_list)]), boot)
    tars.append(boot)
    for layer in range(spec.layers):
        tar = out / f"layer-{layer}.tar"
        entries += _write_data_layer(tar, spec, [f for f in files if f.layer == layer], pool)
        tars.append(tar)
    nbytes = sum(t.stat().st_size for t in tars)
    print(f"event=synthetic_tars label={spec.label} bytes={nbytes} seconds={time.monotonic() - t0:.1f}",
          file=sys.stderr, flush=True)
    build_layout(layout, tars, cmd=["/bin/sh", "/bench/start.sh"], tmpdir=out)
    for t in tars:
        t.unlink()
    info = {"bytes": nbytes, "entries": entries, "files": len(files), "expected": EXPECTED,
            "hot_bytes": sum(n for _, _, n in hot), "hot_reads": len(hot), "spec": spec.label}
    (out / "info.json").write_text(json.dumps(info))
    print(f"event=synthetic_layout label={spec.label} seconds={time.monotonic() - t0:.1f}",
          file=sys.stderr, flush=True)
    return layout, info


def ensure_pushed(registry_host: str, spec: SyntheticSpec,
                  repo: str = "bench/synthetic") -> tuple[PushedImage, dict[str, object]]:
    layout, info = build(spec)
    return push_layout(layout, f"{registry_host}/{repo}:{spec.label}"), info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--hot", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--previous", action="store_true", help="build the previous version")
    ap.add_argument("--registry", help="HOST:PORT to push to (plain HTTP)")
    args = ap.parse_args(argv)
    try:
        spec = SyntheticSpec(args.size_gb, args.hot, args.seed, args.layers)
    except ValueError as exc:
        ap.error(str(exc))
    if args.previous:
        spec = spec.previous()
    if args.registry:
        img, info = ensure_pushed(args.registry, spec)
        print(json.dumps({"ref": img.ref, "manifest_digest": img.manifest_digest, **info}))
    else:
        layout, info = build(spec)
        print(json.dumps({"layout": str(layout), **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
