"""The snapshotter: one small type whose async methods read like the Snapshots API.

Every metadata change is one :class:`~snapshotter.service.store.Transaction`, run on a
dedicated single thread. Why a thread: SQLite calls block (fsync on every commit with
``synchronous=FULL``, waits on a busy lock), and the event loop also serves health checks,
other RPCs and, later, FUSE-backed reads; one thread also serialises all metadata changes
so directory renames and rows never interleave between operations. Tree walks (Usage,
commit size) and ``rmtree`` run on the loop's default executor instead, so a big walk does
not hold up metadata.

Directories follow containerd's overlayfs snapshotter: ``<root>/snapshots/<id>/fs`` and
``work``. A new snapshot is built in a staging dir ``snapshots/new-*`` and renamed into
place inside the transaction, before it commits; removal commits first and deletes after.
A crash therefore leaves at worst an orphan directory with no row, removed at start and
by Cleanup — never a row without its directory.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from snapshotter import metrics
from snapshotter.log import get_logger
from snapshotter.service.errors import AlreadyExists, NotFound, Unavailable
from snapshotter.service.filters import compile_filters
from snapshotter.service.model import Info, Kind, Layer, Snapshot, Usage
from snapshotter.service.mounts import Mount, SnapshotPaths, compute_mounts, overlay_index_off
from snapshotter.service.provider import (LayerProvider, NoRemoteProvider, ProviderError, RemoteLayerRequest,
                                          parse_remote_request)
from snapshotter.service.recent import Fallbacks
from snapshotter.service.store import MetaStore, Transaction
from snapshotter.service.usage import disk_usage

__all__ = ["Snapshotter"]

T = TypeVar("T")
log = get_logger("lazysnap.service")


class Snapshotter:
    """containerd snapshotter semantics over :class:`MetaStore` and per-snapshot directories."""

    def __init__(self, root: Path, provider: LayerProvider | None = None, *, busy_timeout: float = 5.0) -> None:
        self.root = Path(root)
        self.paths = SnapshotPaths(self.root / "snapshots")
        self.db_path = self.root / "metadata.db"
        self.provider: LayerProvider = provider if provider is not None else NoRemoteProvider()
        self._busy_timeout = busy_timeout
        self._meta = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lazysnap-meta")
        self._store: MetaStore | None = None
        self._remote_dirs: dict[str, str] = {}  # layer digest → directory the provider serves
        self._remote_broken: dict[str, str] = {}  # layer digest → why it could not be restored
        self._index_off = overlay_index_off()
        self.fallbacks = Fallbacks()  # the newest remote-layer fallbacks (lazysnap status)

    # -- plumbing ----------------------------------------------------------------------
    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the metadata thread."""
        return await asyncio.get_running_loop().run_in_executor(self._meta, functools.partial(fn, *args))

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a slow filesystem job (walk, rmtree) on the default executor."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    def _tx(self, write: bool = True):  # noqa: ANN202 - context manager from the store
        return self._meta_store.transaction(write)

    @property
    def _meta_store(self) -> MetaStore:
        if self._store is None:
            raise Unavailable("metadata store is closed")
        return self._store

    def _lower_dir(self, layer: Layer) -> str:
        """The directory of a committed parent; remote layers must be live, never an empty dir."""
        if not layer.remote:
            return str(self.paths.upper(layer.id))
        assert layer.layer_digest is not None
        broken = self._remote_broken.get(layer.layer_digest)
        if broken is not None:
            raise Unavailable(f"remote layer {layer.layer_digest} of snapshot {layer.name!r} is unavailable: {broken}")
        path = self._remote_dirs.get(layer.layer_digest) or layer.remote_dir or ""
        if not path or not os.path.isdir(path):
            raise Unavailable(f"remote layer {layer.layer_digest} directory {path!r} is missing")
        return path

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        return compute_mounts(snap, self.paths, self._lower_dir, index_off=self._index_off)

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Create the root (0700), open the DB, remove crash leftovers, restore remote layers."""
        await self._db(self._open_sync)
        removed = await self.cleanup()
        if removed:
            log.info("reconciled", removed_dirs=removed)
        await self._restore_remote()

    def _open_sync(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.paths.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self._store = MetaStore(self.db_path, busy_timeout=self._busy_timeout)

    async def close(self) -> None:
        """Close the provider (if it has ``close()``: unmount, stop fetches), then the DB."""
        closer = getattr(self.provider, "close", None)
        if closer is not None:
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - shutdown continues regardless
                log.warning("provider_close_failed", error=f"{type(exc).__name__}: {exc}")

        def _close() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None
        await self._db(_close)
        self._meta.shutdown(wait=True)

    async def probe(self, timeout: float = 1.0) -> None:
        """Raise :class:`Unavailable` unless the metadata DB answers within ``timeout``."""
        def _probe() -> None:
            if self._store is None:
                raise Unavailable("metadata store is closed")
            self._store.probe(timeout)
        try:
            await asyncio.wait_for(self._db(_probe), timeout + 1.0)
        except TimeoutError as exc:
            raise Unavailable("metadata database probe timed out") from exc

    async def _restore_remote(self) -> None:
        records = await self._db(lambda: self._read(lambda tx: tx.remote_records()))
        seen: dict[str, str] = {}
        for rec in records:
            if rec.layer_digest in seen:
                continue
            try:
                path = str(await self.provider.restore(rec.layer_digest, rec.labels))
                if not await self._work(os.path.isdir, path):
                    raise ProviderError(f"restored path {path} is not a directory", reason="not_a_directory")
                self._remote_dirs[rec.layer_digest] = path
                self._remote_broken.pop(rec.layer_digest, None)
                seen[rec.layer_digest] = path
                log.info("remote_restored", layer_digest=rec.layer_digest, dir=path)
            except Exception as exc:  # noqa: BLE001 - any provider failure marks the layer unavailable
                reason = exc.reason if isinstance(exc, ProviderError) else type(exc).__name__
                self._remote_broken[rec.layer_digest] = f"{reason}: {exc}"
                seen[rec.layer_digest] = ""
                log.warning("remote_restore_failed", layer_digest=rec.layer_digest, snapshot=rec.name,
                            reason=reason, error=str(exc))
        await self.provider.restore_finished(set(seen))
        changed = [(r.id, seen[r.layer_digest]) for r in records
                   if seen.get(r.layer_digest) and seen[r.layer_digest] != r.remote_dir]
        if changed:
            def _upd(tx: Transaction) -> None:
                for sid, path in changed:
                    tx.set_remote_dir(sid, path)
            await self._db(lambda: self._write(_upd))

    def _read(self, fn: Callable[[Transaction], T]) -> T:
        with self._tx(write=False) as tx:
            return fn(tx)

    def _write(self, fn: Callable[[Transaction], T]) -> T:
        def once() -> T:
            with self._tx(write=True) as tx:
                return fn(tx)
        return self._meta_store.writing(once)

    # -- API ---------------------------------------------------------------------------
    async def prepare(self, key: str, parent: str, labels: Mapping[str, str], *,
                      namespace: str = "") -> list[Mount]:
        req = parse_remote_request(key, parent, labels)
        if req is not None:
            await self._try_remote(req, namespace)  # raises AlreadyExists when served remotely
        return await self._db(self._create, Kind.ACTIVE, key, parent, dict(labels))

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return await self._db(self._create, Kind.VIEW, key, parent, dict(labels))

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._meta_store.writing(lambda: self._create_sync(kind, key, parent, labels))

    def _create_sync(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.paths.snapshots_dir))
        placed: Path | None = None
        committed = False
        try:
            # containerd's modes, whatever the daemon's umask: a container's root directory
            # is 0755 (a non-root process in it must reach its files), overlayfs's work 0711
            (staging / "fs").mkdir()
            os.chmod(staging / "fs", 0o755)
            if kind == Kind.ACTIVE:
                (staging / "work").mkdir()
                os.chmod(staging / "work", 0o711)
            with self._tx() as tx:
                snap = tx.create_snapshot(kind, key, parent, labels)
                mounts = self._mounts(snap)  # a parent that is unavailable aborts the transaction
                if snap.parents:
                    st = os.stat(self._lower_dir(snap.parents[0]))
                    os.lchown(staging / "fs", st.st_uid, st.st_gid)
                dest = self.paths.dir(snap.id)
                if os.path.lexists(dest):  # orphan of a crashed create that reused this id
                    shutil.rmtree(dest)
                os.rename(staging, dest)
                placed = dest
            committed = True
            return mounts
        finally:
            if not committed:
                shutil.rmtree(placed or staging, ignore_errors=True)
                if placed is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    async def _try_remote(self, req: RemoteLayerRequest, namespace: str) -> None:
        """The remote-snapshot handshake; returns only when containerd must download the layer."""
        def _check(tx: Transaction) -> tuple[Info | None, bool]:
            existing = tx.lookup(req.chain_id)
            parent = tx.lookup(req.parent) if req.parent else None
            parent_ok = not req.parent or (parent is not None and parent[0].kind == Kind.COMMITTED)
            return (existing[0] if existing else None), parent_ok

        existing, parent_ok = await self._db(lambda: self._read(_check))
        if existing is not None:
            if existing.kind == Kind.COMMITTED and existing.parent == req.parent:
                raise AlreadyExists(f"target snapshot {json.dumps(req.chain_id)}: already exists")
            self._fallback(req, "chain_conflict", f"{req.chain_id} exists with another parent or kind", namespace)
            return
        if not parent_ok:
            return  # the normal Prepare answers with containerd's error for a bad parent
        try:
            path = str(await self.provider.provide(req))
            if not await self._work(os.path.isdir, path):  # a FUSE dir: never stat it on the loop
                raise ProviderError(f"provider returned {path}, not a directory", reason="not_a_directory")
        except ProviderError as exc:
            self._fallback(req, exc.reason, str(exc), namespace)
            return
        except Exception as exc:  # noqa: BLE001 - a provider bug must not fail the pull
            self._fallback(req, "provider_error", f"{type(exc).__name__}: {exc}", namespace)
            return

        def _commit(tx: Transaction) -> None:
            tx.create_remote(req.chain_id, req.parent, req.labels, req.layer_digest, path)

        try:
            await self._db(lambda: self._write(_commit))
        except AlreadyExists:
            pass  # committed concurrently by another namespace's pull: same answer
        self._remote_dirs[req.layer_digest] = path
        self._remote_broken.pop(req.layer_digest, None)
        metrics.REMOTE_SNAPSHOTS.inc()
        log.info("remote_snapshot", namespace=namespace, key=req.key, chain_id=req.chain_id,
                 layer_digest=req.layer_digest, image_ref=req.image_ref, dir=path)
        raise AlreadyExists(f"target snapshot {json.dumps(req.chain_id)}: already exists")

    def _fallback(self, req: RemoteLayerRequest, reason: str, detail: str, namespace: str) -> None:
        metrics.REMOTE_FALLBACKS.labels(reason=reason).inc()
        self.fallbacks.add(req.image_ref, req.layer_digest, reason, detail)
        log.warning("remote_fallback", namespace=namespace, key=req.key, chain_id=req.chain_id,
                    layer_digest=req.layer_digest, image_ref=req.image_ref, reason=reason, detail=detail)

    async def mounts(self, key: str) -> list[Mount]:
        def _run() -> list[Mount]:
            with self._tx(write=False) as tx:
                return self._mounts(tx.get_snapshot(key))
        return await self._db(_run)

    async def commit(self, name: str, key: str, labels: Mapping[str, str], parent: str = "") -> None:
        try:
            sid, info, _ = await self._db(lambda: self._read(lambda tx: tx.get_info(key)))
        except NotFound:
            sid, info = -1, None
        usage = Usage()
        if info is not None and info.kind == Kind.ACTIVE:
            usage = await self._work(disk_usage, self.paths.upper(sid))
        await self._db(lambda: self._write(lambda tx: tx.commit_active(key, name, usage, dict(labels), parent)))

    async def remove(self, key: str) -> None:
        def _run() -> tuple[Path | None, str | None, bool]:
            with self._tx() as tx:
                sid, _kind, digest = tx.remove(key)
                in_use = digest is not None and tx.digest_in_use(digest)
            src = self.paths.dir(sid)
            if not os.path.lexists(src):
                return None, digest, in_use
            trash = self.paths.snapshots_dir / f"rm-{sid}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(src, trash)
            return trash, digest, in_use
        trash, digest, in_use = await self._db(lambda: self._meta_store.writing(_run))
        if trash is not None:
            await self._work(shutil.rmtree, trash, True)
        if digest is not None and not in_use:
            self._remote_dirs.pop(digest, None)
            self._remote_broken.pop(digest, None)
            try:
                await self.provider.release(digest)
            except Exception as exc:  # noqa: BLE001 - release failure only leaks cache
                log.warning("remote_release_failed", layer_digest=digest, error=str(exc))

    async def stat(self, key: str) -> Info:
        return (await self._db(lambda: self._read(lambda tx: tx.get_info(key))))[1]

    async def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        return await self._db(lambda: self._write(lambda tx: tx.update_info(info, list(fieldpaths))))

    async def walk(self, filters: Sequence[str]) -> list[Info]:
        """List: every snapshot matching any of containerd's ``filters``."""
        match = compile_filters(filters)
        return await self._db(lambda: self._read(lambda tx: [i for i in tx.walk() if match(i)]))

    async def usage(self, key: str) -> Usage:
        sid, info, stored = await self._db(lambda: self._read(lambda tx: tx.get_info(key)))
        if info.kind == Kind.ACTIVE:
            return await self._work(disk_usage, self.paths.upper(sid))
        return stored

    async def cleanup(self) -> list[str]:
        """Remove directories that belong to no snapshot (crash leftovers, removals)."""
        def _collect() -> list[Path]:
            with self._tx(write=False) as tx:
                ids = tx.ids()
            out: list[Path] = []
            for entry in os.scandir(self.paths.snapshots_dir):
                if entry.name.isdigit() and int(entry.name) in ids:
                    continue
                trash = entry.path if entry.name.startswith("rm-") else \
                    os.path.join(self.paths.snapshots_dir, f"rm-{entry.name}")
                if trash != entry.path:
                    shutil.rmtree(trash, ignore_errors=True)
                    os.rename(entry.path, trash)
                out.append(Path(trash))
            return out
        trash = await self._db(_collect)
        for t in trash:
            await self._work(shutil.rmtree, t, True)
        return [t.name.removeprefix("rm-") for t in trash]
