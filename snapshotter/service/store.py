"""Snapshot metadata in SQLite, changed only through one :class:`Transaction` per operation.

Modelled on containerd's ``snapshots/storage`` metastore: the snapshotter opens a
transaction, calls a few methods that read like the API (create, commit, remove…), and the
whole change lands atomically or not at all. SQLite runs in WAL mode with
``synchronous=FULL``: a ``kill -9`` at any instant leaves either the old or the new state.

A connection belongs to the thread that opened it; the service runs every transaction
on one dedicated thread (see ``snapshotter.service.snapshotter``).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from snapshotter.fsutil import FILE_MODE, private_dirs
from snapshotter.service.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                        Unavailable)
from snapshotter.service.model import Info, Kind, Layer, RemoteRecord, Snapshot, Usage
from snapshotter.service.reserve import SpaceReserve, is_disk_full

T = TypeVar("T")


def _q(s: str) -> str:
    """Go's %q, so messages read exactly like containerd's."""
    return json.dumps(s, ensure_ascii=False)

__all__ = ["MetaStore", "Transaction", "SCHEMA_VERSION", "validate_labels"]

SCHEMA_VERSION = 1
MAX_LABEL_BYTES = 4096  # containerd's labels.Validate limit for key + value

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL UNIQUE,
    parent_id    INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
    kind         INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    created_ns   INTEGER NOT NULL,
    updated_ns   INTEGER NOT NULL,
    labels       TEXT    NOT NULL DEFAULT '{}',
    size         INTEGER NOT NULL DEFAULT 0,
    inodes       INTEGER NOT NULL DEFAULT 0,
    layer_digest TEXT,
    remote_dir   TEXT,
    CHECK ((layer_digest IS NULL) = (remote_dir IS NULL)),
    CHECK (layer_digest IS NULL OR kind = 3)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


def _now_ns() -> int:
    return time.time_ns()


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """containerd's label rules: key + value at most 4096 bytes; empty values are dropped."""
    out: dict[str, str] = {}
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label key and value length ({len(k) + len(v)} bytes) greater than maximum "
                                  f"size ({MAX_LABEL_BYTES} bytes), key: {k[:64]}")
        if v != "":
            out[k] = v
    return out


class Transaction:
    """Metadata operations inside one SQLite transaction (see :meth:`MetaStore.transaction`)."""

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self._c = conn
        self.writable = writable

    # -- helpers ---------------------------------------------------------------------
    def _row(self, name: str) -> sqlite3.Row | None:
        return self._c.execute(
            "SELECT s.*, p.name AS parent_name FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
            "WHERE s.name = ?", (name,)).fetchone()

    def _need(self, name: str) -> sqlite3.Row:
        row = self._row(name)
        if row is None:
            raise NotFound(f"snapshot {name}: not found")
        return row

    @staticmethod
    def _info(row: sqlite3.Row) -> Info:
        return Info(name=row["name"], parent=row["parent_name"] or "", kind=Kind(row["kind"]),
                    created_ns=row["created_ns"], updated_ns=row["updated_ns"], labels=json.loads(row["labels"]))

    def _chain(self, parent_id: int | None) -> tuple[Layer, ...]:
        """The parent chain starting at ``parent_id``, nearest first."""
        if parent_id is None:
            return ()
        rows = self._c.execute(
            "WITH RECURSIVE chain(id, depth) AS (SELECT ?, 0 UNION ALL "
            " SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id "
            " WHERE s.parent_id IS NOT NULL) "
            "SELECT s.id, s.name, s.layer_digest, s.remote_dir FROM chain c JOIN snapshots s ON s.id = c.id "
            "ORDER BY c.depth", (parent_id,)).fetchall()
        return tuple(Layer(id=r["id"], name=r["name"], layer_digest=r["layer_digest"], remote_dir=r["remote_dir"])
                     for r in rows)

    def _write(self) -> None:
        if not self.writable:
            raise RuntimeError("write in a read-only transaction")

    def _parent_id(self, parent: str) -> int | None:
        if not parent:
            return None
        prow = self._row(parent)
        if prow is None:
            raise NotFound(f"missing parent {_q(parent)} bucket: not found")
        if prow["kind"] != Kind.COMMITTED:
            raise InvalidArgument(f"parent {_q(parent)} is not committed snapshot: invalid argument")
        return int(prow["id"])

    # -- operations ------------------------------------------------------------------
    def create_snapshot(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        """A new active or view snapshot; the parent must exist (NotFound) and be committed
        (InvalidArgument, as containerd's metastore answers)."""
        self._write()
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot type {kind.name} invalid; only snapshots of type Active or View "
                                  "can be created: invalid argument")
        if not key:
            raise InvalidArgument("snapshot key must not be empty: invalid argument")
        clean = validate_labels(labels)
        if self._row(key) is not None:
            raise AlreadyExists(f"snapshot {key}: already exists")
        parent_id = self._parent_id(parent)
        now = _now_ns()
        cur = self._c.execute(
            "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, labels) VALUES (?,?,?,?,?,?)",
            (key, parent_id, int(kind), now, now, json.dumps(clean, sort_keys=True)))
        assert cur.lastrowid is not None
        return Snapshot(id=cur.lastrowid, name=key, kind=kind, parents=self._chain(parent_id))

    def create_remote(self, name: str, parent: str, labels: Mapping[str, str], layer_digest: str,
                      remote_dir: str) -> RemoteRecord:
        """A committed snapshot whose content is a provider directory (remote-snapshot hook)."""
        self._write()
        if not name:
            raise InvalidArgument("snapshot name must not be empty: invalid argument")
        clean = validate_labels(labels)
        if self._row(name) is not None:
            raise AlreadyExists(f"snapshot {name}: already exists")
        parent_id = self._parent_id(parent)
        now = _now_ns()
        cur = self._c.execute(
            "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, labels, layer_digest, remote_dir)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (name, parent_id, int(Kind.COMMITTED), now, now, json.dumps(clean, sort_keys=True), layer_digest,
             remote_dir))
        assert cur.lastrowid is not None
        return RemoteRecord(id=cur.lastrowid, name=name, layer_digest=layer_digest, remote_dir=remote_dir,
                            labels=clean)

    def get_info(self, key: str) -> tuple[int, Info, Usage]:
        row = self._need(key)
        return int(row["id"]), self._info(row), Usage(size=row["size"], inodes=row["inodes"])

    def get_snapshot(self, key: str) -> Snapshot:
        """An active or view snapshot with its parents (Mounts); committed ones are an error."""
        row = self._need(key)
        kind = Kind(row["kind"])
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {key} not active or view: failed precondition")
        return Snapshot(id=int(row["id"]), name=key, kind=kind, parents=self._chain(row["parent_id"]))

    def lookup(self, name: str) -> tuple[Info, Layer] | None:
        """The snapshot called ``name`` (any kind) and its layer reference, or None."""
        row = self._row(name)
        if row is None:
            return None
        return self._info(row), Layer(id=row["id"], name=name, layer_digest=row["layer_digest"],
                                      remote_dir=row["remote_dir"])

    def update_info(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        """containerd's UpdateInfo: only labels may change; no paths replaces all labels."""
        self._write()
        row = self._need(info.name)
        labels: dict[str, str] = json.loads(row["labels"])
        if not fieldpaths:
            labels = dict(info.labels)
        for path in fieldpaths:
            if path.startswith("labels."):
                k = path[len("labels."):]
                labels[k] = info.labels.get(k, "")
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise InvalidArgument(f"cannot update {_q(path)} field on snapshot {_q(info.name)}: invalid argument")
        clean = validate_labels(labels)
        now = _now_ns()
        self._c.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                        (json.dumps(clean, sort_keys=True), now, row["id"]))
        return Info(name=row["name"], parent=row["parent_name"] or "", kind=Kind(row["kind"]),
                    created_ns=row["created_ns"], updated_ns=now, labels=clean)

    def remove(self, key: str) -> tuple[int, Kind, str | None]:
        """Delete a snapshot without children → (id, kind, remote layer digest or None)."""
        self._write()
        row = self._need(key)
        child = self._c.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)).fetchone()
        if child is not None:
            raise FailedPrecondition("cannot remove snapshot with child: failed precondition")
        self._c.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        return int(row["id"]), Kind(row["kind"]), row["layer_digest"]

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str],
                      parent: str = "") -> int:
        """Turn active ``key`` into committed ``name`` (same id and directory)."""
        self._write()
        if not name:
            raise InvalidArgument("snapshot name must not be empty: invalid argument")
        clean = validate_labels(labels)
        if self._row(name) is not None:
            raise AlreadyExists(f"committed snapshot {name}: already exists")
        row = self._row(key)
        if row is None:
            raise NotFound(f"failed to get active snapshot {_q(key)}: not found")
        if row["kind"] != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {_q(key)} is not active: failed precondition")
        if parent and parent != (row["parent_name"] or ""):
            raise FailedPrecondition(f"rebase of {_q(key)} onto {_q(parent)} is not supported: failed precondition")
        now = _now_ns()
        self._c.execute(
            "UPDATE snapshots SET name = ?, kind = ?, labels = ?, size = ?, inodes = ?, created_ns = ?, "
            "updated_ns = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), json.dumps(clean, sort_keys=True), usage.size, usage.inodes, now, now,
             row["id"]))
        return int(row["id"])

    def walk(self) -> Iterator[Info]:
        for row in self._c.execute(
                "SELECT s.*, p.name AS parent_name FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
                "ORDER BY s.id"):
            yield self._info(row)

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self._c.execute("SELECT id FROM snapshots")}

    def remote_records(self) -> list[RemoteRecord]:
        return [RemoteRecord(id=r["id"], name=r["name"], layer_digest=r["layer_digest"], remote_dir=r["remote_dir"],
                             labels=json.loads(r["labels"]))
                for r in self._c.execute("SELECT * FROM snapshots WHERE layer_digest IS NOT NULL ORDER BY id")]

    def digest_in_use(self, layer_digest: str) -> bool:
        return self._c.execute("SELECT 1 FROM snapshots WHERE layer_digest = ? LIMIT 1",
                               (layer_digest,)).fetchone() is not None

    def set_remote_dir(self, snapshot_id: int, remote_dir: str) -> None:
        self._write()
        self._c.execute("UPDATE snapshots SET remote_dir = ? WHERE id = ? AND layer_digest IS NOT NULL",
                        (remote_dir, snapshot_id))


class MetaStore:
    """The metadata database file; open, use and close it from one thread."""

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.reserve = SpaceReserve(self.path.with_name(self.path.name + ".reserve"))
        try:
            private_dirs(self.path.parent)
            # created 0600 before SQLite opens it: its -wal and -shm files copy the database's mode
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"cannot open metadata database {self.path}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        c = self._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise Unavailable(f"metadata database {self.path} has schema {version}, newer than {SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:
            # executescript commits on its own; every statement is idempotent, so a crash
            # half-way through is repaired by the next start.
            c.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        self._inode = os.stat(self.path).st_ino
        self.reserve.take()

    def writing(self, fn: Callable[[], T]) -> T:
        """``fn()`` (one or more write transactions, each undone whole if it fails), run once
        more with the reserve's space given back if it failed because the disk is full;
        the reserve is taken again once the filesystem has room."""
        try:
            out = fn()
        except (Unavailable, OSError) as exc:
            if not is_disk_full(exc) or not self.reserve.release():
                raise
            out = fn()
        if not self.reserve.held:
            self.reserve.take()
        return out

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Transaction]:
        """One atomic unit: committed when the block ends normally, rolled back otherwise."""
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"metadata database unavailable: {exc}") from exc
        try:
            yield Transaction(c, write)
        except sqlite3.OperationalError as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise Unavailable(f"metadata database unavailable: {exc}") from exc
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        try:
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise Unavailable(f"metadata commit failed: {exc}") from exc

    def probe(self, timeout: float = 1.0) -> None:
        """Raise :class:`Unavailable` unless the database file is ours and writable now."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise Unavailable(f"metadata database missing: {exc.strerror}") from exc
        if st.st_ino != self._inode:
            raise Unavailable("metadata database was replaced")
        c = self._conn
        c.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute("SELECT count(*) FROM snapshots").fetchone()
            c.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise Unavailable(f"metadata database unavailable: {exc}") from exc
        finally:
            c.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    def close(self) -> None:
        self._conn.close()
