"""Tree identity of the inference image: overlayfs full pull vs lazysnap lazy pull, every file.

Issue 6 acceptance: "the same image run through overlayfs and through lazysnap yields
identical file trees". One node (private containerd + ``lazysnap serve``) pulls the image
both ways: ``ctr-remote images rpull --snapshotter lazysnap`` (after the publisher's
``lazysnap index --push``, so no layer is downloaded) and ``ctr images pull --snapshotter
overlayfs``. Each top-layer snapshot is mounted as a read-only view and both trees are
walked and diffed with :mod:`harness.trees` (type, mode, owners, size, SHA-256 of every
regular file, symlink targets, devices, hard-link groups, xattrs, mtime in ns). Hashing the
lazysnap tree reads the whole image on demand through FUSE (prefetch and background fetch
are off), so this takes minutes.

    sudo .venv/bin/python -m bench.tree_identity            # exit 1 on any mismatch
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.node import Node, NodeError, publish_index, write_hosts
from harness.containerd import unmount_under
from harness.registry import start_registry
from harness.trees import Policy, Tree, chain_id, diff, format_diff, mount_view, walk

BENCH = Path(__file__).resolve().parent
# every byte hashed from the lazysnap tree is an on-demand FUSE read
ON_DEMAND_ONLY = "[prefetch]\nprefetch = false\nbackground = false\nregistry_lookup = false\n"


def log(event: str, **kv: object) -> None:
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"event={event} {fields}".rstrip(), file=sys.stderr, flush=True)


def _walk(node: Node, snapshotter: str, parent: str, target: Path, workers: int) -> Tree:
    with mount_view(node.cd, snapshotter, f"tree-identity-{snapshotter}", parent, target) as root:
        tree = walk(root, workers=workers)
    log("walked", snapshotter=snapshotter, entries=len(tree.records), bytes=tree.bytes_hashed,
        seconds=f"{tree.seconds:.1f}")
    return tree


def run(args: argparse.Namespace) -> int:
    from bench.build_inference_image import ensure_pushed

    workdir: Path = args.workdir
    reg = start_registry(workdir / "registry")
    node: Node | None = None
    try:
        img = ensure_pushed(reg.host, args.variant)
        log("pushed", ref=img.ref, layers=len(img.layer_digests), compressed=img.compressed_size)
        t = time.monotonic()
        summary = publish_index(img.ref, write_hosts(workdir / "publisher-hosts", reg.host), workdir / "publisher")
        log("published", seconds=f"{time.monotonic() - t:.1f}", summary=summary.replace(" ", "_"))
        node = Node(workdir / "node", reg.host, lazysnap=True, keep=args.keep,
                    lazysnap_config="" if args.default_config else ON_DEMAND_ONLY)
        lazy = node.pull(img.ref, lazy=True)
        have = set(node.cd.ctr("content", "ls", "-q").stdout.split())
        if have & set(img.layer_digests):
            raise NodeError("lazysnap rpull downloaded layer blobs: not a lazy pull")
        full = node.pull(img.ref, lazy=False)
        log("pulled", lazysnap_s=f"{lazy.seconds:.1f}", overlayfs_s=f"{full.seconds:.1f}")
        top = chain_id(img.diff_ids)
        assert node.daemon is not None
        before = node.daemon.fetched_by_purpose()
        left = _walk(node, "overlayfs", top, workdir / "mnt-overlayfs", args.workers)
        right = _walk(node, "lazysnap", top, workdir / "mnt-lazysnap", args.workers)
        fetched = {k: v - before.get(k, 0) for k, v in node.daemon.fetched_by_purpose().items()}
        mismatches = diff(left, right, Policy(mtime=args.mtime))
    finally:
        if node is not None:
            node.close()
        reg.stop()
    files = sum(1 for r in left.records.values() if r.kind == "file")
    print(f"image: {img.ref} ({len(img.layer_digests)} layers, {img.compressed_size / 1e6:.1f} MB compressed)")
    print(f"entries compared: {len(left.records)} overlayfs / {len(right.records)} lazysnap "
          f"({files} regular files)")
    print(f"bytes hashed: {left.bytes_hashed} overlayfs / {right.bytes_hashed} lazysnap")
    by_purpose = ", ".join(f"{k}={v}" for k, v in sorted(fetched.items()) if v) or "none"
    print(f"registry bytes fetched by lazysnap during its walk: {by_purpose}")
    print(f"time: overlayfs walk {left.seconds:.1f} s, lazysnap walk {right.seconds:.1f} s "
          f"(mtime compared: {args.mtime})")
    print(f"mismatches: {len(mismatches)}")
    if mismatches:
        print(format_diff(mismatches, "overlayfs", "lazysnap", limit=200))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="v2", help="inference image variant (bench/build_inference_image.py)")
    ap.add_argument("--workers", type=int, default=4, help="threads hashing files of one tree")
    ap.add_argument("--mtime", default="ns", choices=["ns", "s", "off"], help="mtime precision compared")
    ap.add_argument("--default-config", action="store_true",
                    help="run lazysnap with its default config (prefetch + background fetch on)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (default bench/out/tree-identity-…)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("tree_identity: needs root (containerd, mounts)", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.workdir = args.workdir or BENCH / "out" / f"tree-identity-{stamp}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    try:
        rc = run(args)
    except (NodeError, OSError, RuntimeError) as exc:
        print(f"tree_identity: {exc}", file=sys.stderr)
        rc = 2
    print(f"total: {time.monotonic() - t:.1f} s")
    if not args.keep and not unmount_under(args.workdir):
        shutil.rmtree(args.workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
