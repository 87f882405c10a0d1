"""Disk usage of a directory tree the way containerd's ``fs.DiskUsage`` counts it.

Allocated blocks × 512 and the number of distinct inodes (hard links counted once, the
root included). Runs in a worker thread: it walks the whole upper directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from snapshotter.service.model import Usage

__all__ = ["disk_usage"]


def disk_usage(root: Path) -> Usage:
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [os.fspath(root)]
    try:
        st = os.lstat(stack[0])
    except FileNotFoundError:
        return Usage()
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                k = (st.st_dev, st.st_ino)
                if k not in seen:
                    seen.add(k)
                    size += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return Usage(size=size, inodes=len(seen))
