"""Build the realistic inference image from Debian and PyPI packages only, push it.

Three gzip layers, like a typical PyTorch serving image:
  1. Debian bookworm minbase (``debootstrap --variant=minbase``, the mirror apt uses here)
  2. python3 + python3-pip (apt-get in a chroot over an overlayfs; the upper dir is the layer)
  3. torch 2.13 CPU + numpy (``pip install --target`` into /usr/local/lib/python3.11/dist-packages)
Default command: ``python3 -c "import torch; print(torch.__version__)"``.

Each stage's uncompressed layer tar is cached under ``bench/.cache/inference/`` keyed by
its inputs (and the inputs of the stages below it); the OCI layout is cached per variant,
so a rerun only pushes. ``--variant v1`` differs from ``v2`` (the benchmark image) only in
the numpy version: the "previous version" a warm node already has.

    python -m bench.build_inference_image --registry 127.0.0.1:5000            # build + push v2
    python -m bench.build_inference_image --build-only --variant v1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.images import LayerSpec, PushedImage, Tree, build_layout, push_layout, write_layer_tar

CACHE = Path(os.environ.get("LAZYSNAP_BENCH_CACHE", Path(__file__).resolve().parent / ".cache")) / "inference"
BUILDER_VERSION = "3"  # bump when a stage's recipe changes
SUITE = "bookworm"
APT_PACKAGES = ("python3", "python3-pip")
# apt's defaults (Recommends included: python3-dev, build-essential), as a Dockerfile
# `RUN apt-get install -y python3 python3-pip` would get them.
APT_FLAGS = ("-y", "-q")
PY_SITE = "usr/local/lib/python3.11/dist-packages"
CMD = ["python3", "-c", "import torch; print(torch.__version__)"]
EXPECTED_OUTPUT = "2.13.0+cpu"
VARIANTS: dict[str, tuple[str, ...]] = {
    "v2": ("torch==2.13.0", "numpy"),          # the benchmark image
    "v1": ("torch==2.13.0", "numpy==2.2.6"),   # its "previous version" (warm-node variant)
}
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


def log(event: str, **kv: object) -> None:
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"event={event} {fields}".rstrip(), file=sys.stderr, flush=True)


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The Debian mirror this machine's apt uses for ``SUITE`` (deb822 or one-line form)."""
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    return "http://deb.debian.org/debian"


def _mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [m for m in points if m == root or m.startswith(root + "/")]


def _safe_rmtree(path: Path) -> None:
    """rmtree that refuses to descend into mounts (a leftover bind of /dev, for one)."""
    left = _mounts_under(path)
    if left:
        raise SystemExit(f"build_inference_image: refusing to delete {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([BUILDER_VERSION, *parts]).encode()).hexdigest()[:16]


def _sh(argv: list[str], what: str, **kw: object) -> None:
    t = time.monotonic()
    log("run", step=what)
    cp = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if cp.returncode != 0:
        tail = " | ".join((cp.stderr or cp.stdout).strip().splitlines()[-8:])
        raise SystemExit(f"build_inference_image: {what} failed (exit {cp.returncode}): {tail}")
    log("done", step=what, seconds=f"{time.monotonic() - t:.1f}")


@dataclass(slots=True)
class Stage:
    """One cached layer: ``dir`` holds the tree, ``tar`` the finished uncompressed layer."""

    name: str
    key: str

    @property
    def root(self) -> Path:
        return CACHE / f"{self.name}-{self.key}"

    @property
    def tar(self) -> Path:
        return self.root / "layer.tar"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    def info(self) -> dict[str, int]:
        """Uncompressed bytes and entry count of the layer (recounted if not recorded)."""
        if not self.stats.exists():
            import tarfile
            with tarfile.open(self.tar) as tar:
                n = sum(1 for _ in tar)
            self.stats.write_text(json.dumps({"bytes": self.tar.stat().st_size, "entries": n}))
        return json.loads(self.stats.read_text())


def build_base(mirror: str) -> Stage:
    st = Stage("base", _key("base", SUITE, mirror))
    if st.tar.exists():
        return st
    rootfs = st.root / "rootfs"
    _safe_rmtree(st.root)
    st.root.mkdir(parents=True)
    _sh(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], "debootstrap")
    for junk in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        junk.unlink()
    for lst in (rootfs / "var/lib/apt/lists").glob("*"):
        if lst.is_file():
            lst.unlink()
    _tar(st, LayerSpec(trees=[Tree(rootfs)]))
    return st


class _Chroot:
    """An overlayfs over ``lower`` with /proc and /dev mounted, unmounted on exit."""

    def __init__(self, lower: Path, root: Path) -> None:
        self.lower, self.upper = lower, root / "upper"
        self.work, self.merged = root / "work", root / "merged"
        self.mounts: list[Path] = []

    def __enter__(self) -> _Chroot:
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        _sh(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)], "mount overlay")
        self.mounts.append(self.merged)
        _sh(["mount", "-t", "proc", "proc", str(self.merged / "proc")], "mount proc")
        self.mounts.append(self.merged / "proc")
        _sh(["mount", "--bind", "/dev", str(self.merged / "dev")], "mount dev")
        self.mounts.append(self.merged / "dev")
        return self

    def run(self, script: str, what: str) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
               "LANG": "C.UTF-8", "HOME": "/root"}
        _sh(["chroot", str(self.merged), "/bin/sh", "-ec", script], what, env=env)

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self.mounts):
            if subprocess.run(["umount", str(m)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
        self.mounts.clear()


def build_python(base: Stage) -> Stage:
    st = Stage("python", _key("python", base.key, APT_PACKAGES, APT_FLAGS))
    if st.tar.exists():
        return st
    _safe_rmtree(st.root)
    st.root.mkdir(parents=True)
    with _Chroot(base.root / "rootfs", st.root) as ch:
        ch.run("apt-get update -q && apt-get install " + " ".join(APT_FLAGS + APT_PACKAGES)
               + " && apt-get clean && rm -rf /var/lib/apt/lists/*",
               "apt-get install python3")
    # The upper dir holds only changes; whiteouts/opaque dirs become OCI markers.
    _tar(st, LayerSpec(trees=[Tree(st.root / "upper", overlay_upper=True)]))
    for d in ("upper", "work", "merged"):  # the tar is the cache; the trees are scratch
        _safe_rmtree(st.root / d)
    return st


def build_torch(python: Stage, requirements: tuple[str, ...]) -> Stage:
    st = Stage("torch", _key("torch", python.key, requirements))
    if st.tar.exists():
        return st
    shutil.rmtree(st.root, ignore_errors=True)
    tree = st.root / "tree"
    site = tree / PY_SITE
    site.mkdir(parents=True)
    _sh([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "--disable-pip-version-check",
         "--target", str(site), *requirements], "pip install " + " ".join(requirements))
    _move_scripts(site, tree / "usr/local/bin")
    _tar(st, LayerSpec(trees=[Tree(tree)]))
    shutil.rmtree(tree, ignore_errors=True)
    return st


def _move_scripts(site: Path, bindir: Path) -> None:
    """pip --target leaves console scripts in <site>/bin with the host's interpreter."""
    src = site / "bin"
    if not src.is_dir():
        return
    bindir.mkdir(parents=True, exist_ok=True)
    for script in sorted(src.iterdir()):
        data = script.read_bytes()
        if data.startswith(b"#!"):
            nl = data.find(b"\n")
            data = b"#!/usr/bin/python3" + data[nl:]
        dest = bindir / script.name
        dest.write_bytes(data)
        st = script.stat()
        dest.chmod(0o755)
        os.utime(dest, (st.st_atime, st.st_mtime))
    shutil.rmtree(src)


def _tar(stage: Stage, spec: LayerSpec) -> None:
    tmp = stage.tar.with_suffix(".tmp")
    t = time.monotonic()
    entries = write_layer_tar(spec, tmp)
    stage.stats.write_text(json.dumps({"bytes": tmp.stat().st_size, "entries": entries}))
    tmp.rename(stage.tar)
    log("layer", stage=stage.name, bytes=stage.tar.stat().st_size, entries=entries,
        seconds=f"{time.monotonic() - t:.1f}")


def build(variant: str = "v2") -> Path:
    """The cached OCI layout of ``variant`` (building the missing stages)."""
    if variant not in VARIANTS:
        raise SystemExit(f"build_inference_image: unknown variant {variant!r} ({', '.join(VARIANTS)})")
    mirror = debian_mirror()
    base = build_base(mirror)
    python = build_python(base)
    torch = build_torch(python, VARIANTS[variant])
    out = CACHE / f"image-{variant}-{_key(base.key, python.key, torch.key, CMD, ENV)}"
    layout = out / "oci"
    info = {"layers": [s.info() for s in (base, python, torch)], "cmd": CMD,
            "expected": EXPECTED_OUTPUT, "variant": variant}
    if (out / "done").exists():
        if not (out / "info.json").exists():
            (out / "info.json").write_text(json.dumps(info))
        return layout
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.monotonic()
    build_layout(layout, [base.tar, python.tar, torch.tar], cmd=CMD, env=ENV, tmpdir=out,
                 history=["debootstrap --variant=minbase " + SUITE,
                          "apt-get install " + " ".join(APT_PACKAGES),
                          "pip install " + " ".join(VARIANTS[variant])])
    (out / "info.json").write_text(json.dumps(info))
    (out / "done").write_text("ok\n")
    log("layout", variant=variant, path=layout, seconds=f"{time.monotonic() - t:.1f}")
    return layout


def layout_info(layout: Path) -> dict[str, object]:
    """What :func:`build` recorded about a layout (layer sizes, entries, expected output)."""
    return json.loads((layout.parent / "info.json").read_text())


def ensure_pushed(registry_host: str, variant: str = "v2", repo: str = "bench/inference",
                  tag: str | None = None) -> PushedImage:
    """Build (or reuse) ``variant`` and push it to ``registry_host``; returns the pushed image."""
    layout = build(variant)
    return push_layout(layout, f"{registry_host}/{repo}:{tag or variant}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", help="HOST:PORT of a plain-HTTP registry to push to")
    ap.add_argument("--repo", default="bench/inference")
    ap.add_argument("--variant", default="v2", choices=sorted(VARIANTS))
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("build_inference_image: needs root (debootstrap, chroot, mounts)")
    layout = build(args.variant)
    if args.build_only or not args.registry:
        print(layout)
        return 0
    img = ensure_pushed(args.registry, args.variant, args.repo)
    print(json.dumps({"ref": img.ref, "manifest_digest": img.manifest_digest,
                      "layers": img.layer_digests, "sizes": img.layer_sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
