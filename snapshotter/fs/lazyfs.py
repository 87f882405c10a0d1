"""ONE FUSE filesystem for the whole daemon; each layer is ``<mnt>/<layer digest hex>``.

Binding: pyfuse3 on the daemon's asyncio loop (``pyfuse3.asyncio``), so FUSE requests and
the gRPC server share one loop and a read miss simply awaits the fetch scheduler. The
cached-read path is kept out of Python as much as possible: layers are immutable, so
entries/attributes are cached by the kernel for a long time, files are opened with
``keep_cache`` (page cache survives close/open), and requests are up to 1 MiB
(libfuse 3.14 negotiates max_pages=256), so Python runs once per MiB, not per page.

Inode numbers: FUSE root = 1; layer slot s (1, 2, …) owns ``s << 32 | local``; slots are
never reused while the process lives, so a stale kernel inode can never alias a new layer.
"""
from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3

from snapshotter.fs.data import LayerData
from snapshotter.fs.metrics import OPS
from snapshotter.fs.tree import LayerTree, Node
from snapshotter.log import get_logger

log = get_logger("lazysnap.fs")

ROOT = pyfuse3.ROOT_INODE
_SLOT_SHIFT = 32
_LOCAL_MASK = (1 << _SLOT_SHIFT) - 1
IMMUTABLE_TIMEOUT = 86400.0  # layers never change while registered
ROOT_TIMEOUT = 1.0  # the top directory changes as layers come and go
_asyncio_enabled = False


def _negative_entry() -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = IMMUTABLE_TIMEOUT
    return a


_NEGATIVE = _negative_entry()


@dataclass(slots=True)
class MountedLayer:
    name: str
    slot: int
    tree: LayerTree
    data: LayerData
    attrs: dict[int, pyfuse3.EntryAttributes] = field(default_factory=dict)


class LazyFS(pyfuse3.Operations):
    """The daemon's filesystem. ``add_layer``/``remove_layer`` may be called while mounted."""

    enable_writeback_cache = False

    def __init__(self, mountpoint: Path | str, *, allow_other: bool = True,
                 read_ahead_kb: int = 1024) -> None:
        super().__init__()
        self.read_ahead_kb = read_ahead_kb
        self.mountpoint = Path(mountpoint)
        self.allow_other = allow_other
        self._layers: dict[str, MountedLayer] = {}
        self._slots: dict[int, MountedLayer] = {}
        self._next_slot = 1
        self._task: asyncio.Task[None] | None = None
        self._mounted = False
        self._started_ns = time.time_ns()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Mount and run the FUSE loop as a task of the running asyncio loop."""
        global _asyncio_enabled
        if not _asyncio_enabled:
            import pyfuse3.asyncio as pa

            pa.enable()
            _asyncio_enabled = True
        _lazy_unmount_stale(self.mountpoint)  # before mkdir: a dead mount fails it with ENOTCONN
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        opts = set(pyfuse3.default_options)
        opts |= {"fsname=lazysnap", "subtype=lazysnap", "ro"}
        if self.allow_other:
            opts.add("allow_other")
        pyfuse3.init(self, str(self.mountpoint), opts)
        self._mounted = True
        self._task = asyncio.get_running_loop().create_task(pyfuse3.main(), name="fuse-main")
        log.info("fuse_mounted", mountpoint=self.mountpoint)

    async def stop(self) -> None:
        if not self._mounted:
            return
        self._mounted = False
        try:
            pyfuse3.terminate()
        except Exception:  # noqa: BLE001 - loop may already be gone
            pass
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                self._task.cancel()
        pyfuse3.close(unmount=True)
        log.info("fuse_unmounted", mountpoint=self.mountpoint)

    def init(self) -> None:
        # FUSE INIT is being answered; its reply caps readahead, so raise it right after
        asyncio.get_running_loop().call_soon(_set_readahead, self.mountpoint, self.read_ahead_kb)

    # -- layers ---------------------------------------------------------------------------------
    def add_layer(self, name: str, tree: LayerTree, data: LayerData) -> Path:
        """Expose a layer as ``<mnt>/<name>``; returns that directory."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad layer directory name {name!r}")
        if name in self._layers:
            return self.mountpoint / name
        layer = MountedLayer(name, self._next_slot, tree, data)
        self._next_slot += 1
        self._layers[name] = layer
        self._slots[layer.slot] = layer
        log.info("layer_registered", layer=name, slot=layer.slot, inodes=len(tree.nodes) - 1, files=tree.files)
        return self.mountpoint / name

    async def remove_layer(self, name: str) -> None:
        """Unregister a layer and make the kernel forget ``<mnt>/<name>`` before returning."""
        layer = self._layers.pop(name, None)
        if layer is None:
            return
        del self._slots[layer.slot]
        if self._mounted:
            # blocking notify: run it off the loop, which must keep answering FUSE requests
            try:
                await asyncio.to_thread(pyfuse3.invalidate_entry, ROOT, name.encode())
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("invalidate_failed", layer=name, error=str(exc))
        log.info("layer_unregistered", layer=name)

    def layer(self, name: str) -> MountedLayer | None:
        return self._layers.get(name)

    def layer_names(self) -> list[str]:
        return list(self._layers)

    # -- inode helpers --------------------------------------------------------------------------
    def _resolve(self, inode: int) -> tuple[MountedLayer, Node]:
        layer = self._slots.get(inode >> _SLOT_SHIFT)
        if layer is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = layer.tree.node(inode & _LOCAL_MASK)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return layer, node

    def _attrs(self, layer: MountedLayer, node: Node) -> pyfuse3.EntryAttributes:
        ino = (layer.slot << _SLOT_SHIFT) | node.local
        a = layer.attrs.get(ino)
        if a is None:
            a = layer.attrs[ino] = self._make_attrs(ino, node)
        return a

    @staticmethod
    def _make_attrs(ino: int, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes never change while a layer is registered: built once per inode."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = IMMUTABLE_TIMEOUT
        a.attr_timeout = IMMUTABLE_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = node.mtime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.mtime_ns
        return a

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.entry_timeout = ROOT_TIMEOUT
        a.attr_timeout = ROOT_TIMEOUT
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self._layers)
        a.st_size = 4096
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started_ns
        return a

    # -- metadata operations ------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        OPS["lookup"].inc()
        if parent_inode == ROOT:
            if name == b"..":
                return self._root_attrs()
            layer = self._layers.get(name.decode("utf-8", "surrogateescape"))
            if layer is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(layer, layer.tree.root)
        layer, node = self._resolve(parent_inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs(layer, node)
        if name == b"..":
            if node.local == 1:
                return self._root_attrs()
            parent = layer.tree.node(node.parent)
            assert parent is not None
            return self._attrs(layer, parent)
        local = node.children.get(name)
        if local is None:
            # inode 0 + a timeout: the kernel caches the negative entry (raising ENOENT
            # would not). Python's import probes thousands of absent names, and overlayfs
            # asks every lower layer for each of them.
            return _NEGATIVE
        child = layer.tree.node(local)
        assert child is not None
        return self._attrs(layer, child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        OPS["getattr"].inc()
        if inode == ROOT:
            return self._root_attrs()
        layer, node = self._resolve(inode)
        return self._attrs(layer, node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        OPS["readlink"].inc()
        _, node = self._resolve(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes live as long as their layer is registered

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        OPS["opendir"].inc()
        if inode != ROOT:
            _, node = self._resolve(inode)
            if node.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        OPS["readdir"].inc()
        if fh == ROOT:
            items = sorted(self._layers.items())
            for i, (dirname, layer) in enumerate(items[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, dirname.encode(), self._attrs(layer, layer.tree.root), i):
                    return
            return
        layer, node = self._resolve(fh)
        names = layer.tree.listing(node.local)
        for i in range(start_id, len(names)):
            name, local = names[i]
            child = layer.tree.node(local)
            assert child is not None
            if not pyfuse3.readdir_reply(token, name, self._attrs(layer, child), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        OPS["statfs"].inc()
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        total = sum(layer.tree.total_size for layer in self._layers.values())
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = sum(len(layer.tree.nodes) - 1 for layer in self._layers.values()) + 1
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        OPS["getxattr"].inc()
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.ENODATA)
        _, node = self._resolve(inode)
        value = node.xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        OPS["listxattr"].inc()
        if inode == ROOT:
            return []
        _, node = self._resolve(inode)
        return list(node.xattrs)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks modes itself

    # -- data ----------------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        OPS["open"].inc()
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        _, node = self._resolve(inode)
        if not stat.S_ISREG(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        OPS["read"].inc()
        layer, node = self._resolve(fh)
        if node.entry is None:
            return b""
        try:
            return await layer.data.read(node.entry, off, size)
        except OSError as exc:
            log.error("read_failed", layer=layer.name, path=node.entry.path, off=off, size=size, error=exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def release(self, fh: int) -> None:
        return None


def _set_readahead(mountpoint: Path, kb: int) -> None:
    """Raise the mount's readahead window so sequential reads reach us as 1 MiB requests.

    The kernel starts FUSE mounts at 128 KiB; measured on a warm store, 1 MiB requests
    cut the per-request Python cost by 8x (see bench/fuse_reads.py).
    """
    # never stat the mountpoint here: we run on the loop that must answer that stat
    try:
        dev = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == os.path.abspath(mountpoint):
                    dev = fields[2]
        if dev is None:
            raise OSError(errno.ENOENT, "mount not found in mountinfo")
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.warning("readahead_not_set", mountpoint=mountpoint, error=exc)


def _lazy_unmount_stale(mountpoint: Path) -> None:
    """A previous daemon that died leaves a dead FUSE mount ('Transport endpoint is not connected')."""
    try:
        os.stat(mountpoint)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
    import subprocess

    log.warning("stale_mount", mountpoint=mountpoint, action="lazy_unmount")
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)
