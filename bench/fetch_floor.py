"""The fewest registry bytes a start without a profile can fetch, replayed from a recording.

Issue 6 asks for ≤ 25 % of the image's bytes before the container exits with no profile.
What a miss must fetch is fixed by the index: a chunk is verified whole, so its bytes are
decoded from the checkpoint before it up to the end mark after it. This replays the
chunks a recorded start read (a lazysnap root's profile, as ``bench.coldstart --keep``
leaves in ``nodes/*-record/lazysnap``) against that root's indexes and prints:

- the floor with the index's own checkpoints (no read-ahead, every range merged);
- the floor if checkpoints sat every S compressed bytes, with each used checkpoint's
  window fetched on its own (the index would then carry no windows): where the bytes go
  as checkpoints get denser. Compressed positions come from the index's end marks and
  checkpoints, so these figures are estimates.

    .venv/bin/python -m bench.fetch_floor --root bench/out/<run>/nodes/001-record/lazysnap
"""
from __future__ import annotations

import argparse
import bisect
import sys
from collections.abc import Iterable
from pathlib import Path

from snapshotter.index.format import IndexFile
from snapshotter.prefetch import profile as profiles

WINDOW_BYTES = 13_700  # a checkpoint's 32 KiB window, zlib-compressed (inference image mean)
GRID = (1 << 20, 512 << 10, 256 << 10, 128 << 10, 64 << 10)


def merged_length(ranges: Iterable[tuple[int, int]]) -> int:
    total, cur = 0, None
    for a, b in sorted(ranges):
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur is not None else 0)


def layer_floor(idx: IndexFile, chunk_ids: list[int]) -> tuple[int, dict[int, tuple[int, int]]]:
    """(bytes with the index's checkpoints, {grid: (bytes, checkpoints used)})."""
    ck_u = [c.uncompressed_offset for c in idx.checkpoints()]
    ck_c = [c.compressed_offset for c in idx.checkpoints()]
    mu, mc = idx.mark_offsets()
    points = sorted(set(zip(ck_u, ck_c)) | set(zip(mu, mc)))
    pu, pc = [p[0] for p in points], [p[1] for p in points]
    size = idx.info.compressed_size

    def needed_to(u: int) -> int:  # compressed bytes that produce everything before u
        i = bisect.bisect_left(pu, u)
        return pc[i] if i < len(pc) else size

    own, grids = [], {g: ([], set()) for g in GRID}
    for cid in chunk_ids:
        ch = idx.chunk(cid)
        start, end = ch.uncompressed_offset, ch.uncompressed_offset + ch.length
        k = bisect.bisect_right(ck_u, start) - 1
        own.append((ck_c[k], needed_to(end)))
        known = pc[max(bisect.bisect_right(pu, start) - 1, 0)]  # a position at or before the chunk
        for g, (ranges, used) in grids.items():
            used.add(known // g)
            ranges.append((known // g * g, needed_to(end)))
    return merged_length(own), {g: (merged_length(r), len(u)) for g, (r, u) in grids.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="a lazysnap root holding profiles/ and indexes/")
    args = ap.parse_args(argv)
    found = sorted((args.root / "profiles").glob("*.json"))
    if not found:
        print(f"no profile under {args.root}/profiles", file=sys.stderr)
        return 2
    prof = profiles.loads(found[0].read_bytes())
    image = own_total = 0
    grid_total = {g: [0, 0] for g in GRID}
    for lp in prof.layers:
        idx = IndexFile.open(args.root / "indexes" / (lp.digest.replace(":", "-") + ".idx"))
        own, grids = layer_floor(idx, [a.chunk for a in lp.accesses])
        image += idx.info.compressed_size
        own_total += own
        for g, (n, used) in grids.items():
            grid_total[g][0] += n
            grid_total[g][1] += used
        print(f"layer {lp.digest[:19]}: {len(lp.accesses)} chunks read, {idx.checkpoint_count} checkpoints, "
              f"floor {own / 1e6:.1f} of {idx.info.compressed_size / 1e6:.1f} MB")
        idx.close()
    print(f"image: {image / 1e6:.1f} MB; floor with its checkpoints {own_total / 1e6:.1f} MB "
          f"({100 * own_total / image:.1f} %), before read-ahead and index artifacts")
    for g, (n, used) in grid_total.items():
        total = n + used * WINDOW_BYTES
        print(f"checkpoint every {g >> 10:4d} KiB: {n / 1e6:6.1f} MB of data + {used} windows "
              f"({used * WINDOW_BYTES / 1e6:.1f} MB) = {total / 1e6:6.1f} MB ({100 * total / image:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
