"""Mounting the daemon's FUSE filesystem: options, readahead, a dead mount left behind.

Shared by the in-process session (``lazyfs``) and the FUSE holder (``holder``).
"""
from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from snapshotter import _fuse
from snapshotter.log import get_logger

log = get_logger("lazysnap.fs")

MOUNT_OPTIONS = "fsname=lazysnap,subtype=lazysnap,ro,default_permissions"
INIT_TIMEOUT_S = 10.0
HOLDER_LOCK = "fuse-holder.lock"  # beside the mountpoint; a FUSE holder holds it while it serves
HOLDER_SOCKET = "fuse.sock"  # in the root: where the FUSE holder listens for its daemon
DAEMON_SOCKET = "daemon.sock"  # in the root: the daemon's gRPC socket while a FUSE holder holds the public one
# filesystems that stack on another: the kernel refuses their files as passthrough backing
# (our sessions agree to passthrough with max_stack_depth 1, see docs/design/passthrough.md)
STACKED_FILESYSTEMS = ("overlay", "ecryptfs")


@dataclass(slots=True, frozen=True)
class SessionOptions:
    """How a FUSE session is made: by the daemon (``lazyfs.LocalSession``) or by the FUSE
    holder it starts (``holder_args`` are that holder's flags)."""

    threads: int = 8
    read_ahead_kb: int = 1024
    passthrough: bool = False  # ask the kernel for FUSE passthrough at INIT

    def holder_args(self) -> list[str]:
        return ["--threads", str(self.threads), "--read-ahead-kb", str(self.read_ahead_kb),
                *(["--passthrough"] if self.passthrough else [])]


async def wait_initialized(session: _fuse.Session, mountpoint: Path, read_ahead_kb: int) -> None:
    """Wait for the kernel's INIT (sent right after the mount), then raise readahead."""
    deadline = time.monotonic() + INIT_TIMEOUT_S
    while not session.initialized():
        if time.monotonic() > deadline:
            log.warning("fuse_init_slow", mountpoint=mountpoint, seconds=INIT_TIMEOUT_S)
            break
        await asyncio.sleep(0.001)
    # INIT's reply caps readahead at 128 KiB; raise it now that the bdi exists
    await asyncio.to_thread(set_readahead, mountpoint, read_ahead_kb)


async def release_layer(session: _fuse.Session, slot: int, name: str) -> None:
    """Unregister a layer (waits for its requests in flight) and make the kernel forget
    ``<mnt>/<name>``."""
    await asyncio.to_thread(session.remove_layer, slot)
    try:
        await asyncio.to_thread(session.invalidate_entry, name.encode())
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("invalidate_failed", layer=name, error=str(exc))


def set_readahead(mountpoint: Path, kb: int) -> None:
    """Raise the mount's readahead window so sequential reads reach us as 1 MiB requests.

    The kernel starts FUSE mounts at 128 KiB; measured on a warm store, 1 MiB requests
    cut the per-request Python cost by 8x (see bench/fuse_reads.py).
    """
    # never stat the mountpoint here: we run on the loop that must answer that stat
    try:
        dev = mount_device(mountpoint)
        if dev is None:
            raise OSError(errno.ENOENT, "mount not found in mountinfo")
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.warning("readahead_not_set", mountpoint=mountpoint, error=exc)


def mount_device(mountpoint: Path) -> str | None:
    """The ``major:minor`` of what is mounted at ``mountpoint`` (the topmost), from
    /proc/self/mountinfo: unlike a stat, never waits for a FUSE server that does not answer."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.abspath(mountpoint):
                dev = fields[2]
    return dev


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (the deepest mount above it), from
    /proc/self/mountinfo."""
    target = os.path.realpath(path)
    best, fstype = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[fields.index("-") + 1]
    return fstype


def unmount_stale(mountpoint: Path) -> None:
    """A previous daemon that died leaves a dead FUSE mount ('Transport endpoint is not connected')."""
    try:
        os.stat(mountpoint)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
    log.warning("stale_mount", mountpoint=mountpoint, action="lazy_unmount")
    detach(mountpoint)


def detach(mountpoint: str | Path) -> None:
    """Lazy unmount (MNT_DETACH): files containers hold open stay readable while their
    server lives; never stats the mountpoint, which hangs when nobody serves it."""
    subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
