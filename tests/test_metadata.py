"""Invariants of the SQLite metadata store (containerd metastore semantics) and crash safety."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from snapshotter.service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from snapshotter.service.model import Info, Kind, Usage
from snapshotter.service.store import MetaStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path):
    s = MetaStore(tmp_path / "meta.db")
    yield s
    s.close()


def _chain(store: MetaStore, name: str, n: int) -> list[str]:
    """Build committed c0 ← c1 ← … ← c{n-1}; return names."""
    names: list[str] = []
    parent = ""
    for i in range(n):
        with store.transaction() as tx:
            tx.create_snapshot(Kind.ACTIVE, f"{name}-a{i}", parent, {})
            tx.commit_active(f"{name}-a{i}", f"{name}{i}", Usage(10 * i, i), {"i": str(i)})
        parent = f"{name}{i}"
        names.append(parent)
    return names


def test_parent_chain_nearest_first(store: MetaStore) -> None:
    names = _chain(store, "c", 4)
    with store.transaction() as tx:
        snap = tx.create_snapshot(Kind.ACTIVE, "top", names[-1], {"a": "b"})
    assert [p.name for p in snap.parents] == list(reversed(names))
    with store.transaction(write=False) as tx:
        again = tx.get_snapshot("top")
        _, info, _ = tx.get_info("top")
    assert again == snap
    assert (info.kind, info.parent, info.labels) == (Kind.ACTIVE, "c3", {"a": "b"})


def test_create_rules(store: MetaStore) -> None:
    with store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "", {})
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.create_snapshot(Kind.VIEW, "a", "", {})
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "b", "missing", {})
    with pytest.raises(InvalidArgument, match="not committed"), store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "b", "a", {})  # parent is active
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create_snapshot(Kind.COMMITTED, "b", "", {})
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "", "", {})
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "big", "", {"k": "v" * 5000})
    with store.transaction(write=False) as tx:
        assert [i.name for i in tx.walk()] == ["a"]  # failed creates left nothing


def test_commit_rules(store: MetaStore) -> None:
    with store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "", {"old": "x"})
        tx.create_snapshot(Kind.VIEW, "v", "", {})
        tx.create_snapshot(Kind.ACTIVE, "b", "", {})
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.commit_active("nope", "n", Usage(), {})
    with pytest.raises(FailedPrecondition, match="not active"), store.transaction() as tx:
        tx.commit_active("v", "n", Usage(), {})
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.commit_active("a", "b", Usage(), {})  # name taken (checked first, like bolt)
    with store.transaction() as tx:
        sid_before = tx.get_info("a")[0]
        sid = tx.commit_active("a", "c", Usage(4096, 3), {"new": "y"})
    assert sid == sid_before
    with store.transaction(write=False) as tx:
        with pytest.raises(NotFound):
            tx.get_info("a")
        _, info, usage = tx.get_info("c")
        with pytest.raises(FailedPrecondition):
            tx.get_snapshot("c")  # Mounts of a committed snapshot
    assert (info.kind, info.labels, usage) == (Kind.COMMITTED, {"new": "y"}, Usage(4096, 3))
    with pytest.raises(FailedPrecondition), store.transaction() as tx:
        tx.commit_active("c", "d", Usage(), {})  # committed is not active


def test_remove_rules(store: MetaStore) -> None:
    names = _chain(store, "c", 2)
    with store.transaction() as tx:
        tx.create_snapshot(Kind.VIEW, "v", names[1], {})
    for name in names:
        with pytest.raises(FailedPrecondition, match="child"), store.transaction() as tx:
            tx.remove(name)
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.remove("nope")
    for name in ["v", names[1], names[0]]:
        with store.transaction() as tx:
            _, kind, digest = tx.remove(name)
            assert digest is None
    with store.transaction(write=False) as tx:
        assert list(tx.walk()) == [] and tx.ids() == set()


def test_label_updates(store: MetaStore) -> None:
    with store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "", {"keep": "1", "drop": "2"})
        created = tx.get_info("a")[1]

    def upd(labels: dict[str, str], paths: list[str]) -> Info:
        with store.transaction() as tx:
            return tx.update_info(Info("a", "ignored", Kind.VIEW, 0, 0, labels), paths)

    info = upd({"x": "1"}, ["labels.x"])
    assert info.labels == {"keep": "1", "drop": "2", "x": "1"}
    assert (info.kind, info.parent) == (Kind.ACTIVE, "")  # only labels change
    assert info.updated_ns >= created.updated_ns and info.created_ns == created.created_ns
    assert upd({}, ["labels.drop"]).labels == {"keep": "1", "x": "1"}  # absent value removes
    assert upd({"only": "me"}, ["labels"]).labels == {"only": "me"}
    assert upd({"empty": "mask"}, []).labels == {"empty": "mask"}  # empty mask replaces labels
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.update_info(Info("a", "", Kind.ACTIVE, 0, 0, {}), ["parent"])
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.update_info(Info("zz", "", Kind.ACTIVE, 0, 0, {}), [])


def test_remote_records(store: MetaStore) -> None:
    _chain(store, "c", 1)
    with store.transaction() as tx:
        rec = tx.create_remote("sha256:chain", "c0", {"containerd.io/snapshot.ref": "sha256:chain"},
                               "sha256:layer", "/layers/x")
        snap = tx.create_snapshot(Kind.ACTIVE, "run", "sha256:chain", {})
    assert snap.parents[0].remote and snap.parents[0].remote_dir == "/layers/x"
    assert not snap.parents[1].remote
    with store.transaction(write=False) as tx:
        _, info, _ = tx.get_info("sha256:chain")
        assert (info.kind, info.parent) == (Kind.COMMITTED, "c0")
        assert [r.id for r in tx.remote_records()] == [rec.id]
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.create_remote("sha256:chain", "c0", {}, "sha256:layer", "/layers/x")
    with store.transaction() as tx:
        tx.remove("run")
        assert tx.remove("sha256:chain")[2] == "sha256:layer"
        assert not tx.digest_in_use("sha256:layer")


def test_error_rolls_back_whole_transaction(store: MetaStore) -> None:
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.create_snapshot(Kind.ACTIVE, "x", "", {})
        tx.create_snapshot(Kind.ACTIVE, "y", "", {})
        tx.create_snapshot(Kind.ACTIVE, "x", "", {})
    with store.transaction(write=False) as tx:
        assert list(tx.walk()) == []


def test_state_survives_reopen(tmp_path: Path) -> None:
    s = MetaStore(tmp_path / "m.db")
    _chain(s, "c", 3)
    s.close()
    s2 = MetaStore(tmp_path / "m.db")
    with s2.transaction(write=False) as tx:
        assert [(i.name, i.parent, i.kind) for i in tx.walk()] == [
            ("c0", "", Kind.COMMITTED), ("c1", "c0", Kind.COMMITTED), ("c2", "c1", Kind.COMMITTED)]
    s2.close()


def test_probe_reports_locked_database(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "m.db", busy_timeout=0.5)
    store.probe(0.2)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Unavailable):
            store.probe(0.2)
        with pytest.raises(Unavailable):
            with store.transaction():
                pass
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.probe(0.2)
    store.close()


_CRASH_WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from snapshotter.service.store import MetaStore
    from snapshotter.service.model import Kind, Usage
    s = MetaStore(Path(sys.argv[1]))
    i = 0
    print("ready", flush=True)
    while True:
        with s.transaction() as tx:
            parent = f"c{i - 1}" if i else ""
            tx.create_snapshot(Kind.ACTIVE, f"a{i}", parent, {"n": str(i)})
            tx.commit_active(f"a{i}", f"c{i}", Usage(i, i), {"n": str(i)})
            tx.create_snapshot(Kind.VIEW, f"v{i}", f"c{i}", {})
            if i >= 2:
                tx.remove(f"v{i - 2}")
        i += 1
""")


def _check_consistent(db: Path) -> int:
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    rows = c.execute("SELECT name, kind, parent_id FROM snapshots").fetchall()
    names = {r[0] for r in rows}
    committed = sorted(int(n[1:]) for n in names if n.startswith("c"))
    assert committed == list(range(len(committed)))  # whole chain, no gaps
    assert not any(n.startswith("a") for n in names)  # no half-done transaction visible
    views = sorted(int(n[1:]) for n in names if n.startswith("v"))
    last = len(committed) - 1
    assert views == [v for v in (last - 1, last) if v >= 0]
    c.close()
    return len(committed)


@pytest.mark.timeout(120)
def test_kill9_mid_transaction_leaves_consistent_db(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _CRASH_WORKER, str(db)], stdout=subprocess.PIPE,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(0.2 + 0.13 * round_)  # let it run; the kill lands at an arbitrary point
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        n = _check_consistent(db)
        assert n > 0  # the worker made progress before the kill
        # the worker restarts from i = 0 and must not find its names free: reset for the next round
        c = sqlite3.connect(db)
        c.execute("DELETE FROM snapshots WHERE name LIKE 'v%'")
        for i in range(n - 1, -1, -1):
            c.execute("DELETE FROM snapshots WHERE name = ?", (f"c{i}",))
        c.commit()
        c.close()


_SNAPSHOTTER_WORKER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from snapshotter.service.snapshotter import Snapshotter

    async def main():
        sn = Snapshotter(Path(sys.argv[1]))
        await sn.open()
        print("ready", flush=True)
        i = 0
        while True:
            parent = f"c{i - 1}" if i else ""
            mounts = await sn.prepare(f"a{i}", parent, {})
            Path(mounts[0].source if mounts[0].type == "bind" else
                 [o for o in mounts[0].options if o.startswith("upperdir=")][0][9:], "f").write_text(str(i))
            await sn.commit(f"c{i}", f"a{i}", {})
            await sn.view(f"v{i}", f"c{i}", {})
            if i >= 1:
                await sn.remove(f"v{i - 1}")
            i += 1

    asyncio.run(main())
""")


@pytest.mark.timeout(120)
async def test_kill9_snapshotter_keeps_rows_and_dirs_in_step(tmp_path: Path) -> None:
    """Rows and per-snapshot directories agree after a SIGKILL at any point (after reconcile)."""
    from snapshotter.service.snapshotter import Snapshotter

    root = tmp_path / "root"
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SNAPSHOTTER_WORKER, str(root)], stdout=subprocess.PIPE,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(0.3 + 0.17 * round_)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        sn = Snapshotter(root)
        await sn.open()  # reconciles crash leftovers
        try:
            infos = await sn.walk([])
            c = sqlite3.connect(root / "metadata.db")
            id_of = dict(c.execute("SELECT name, id FROM snapshots").fetchall())
            c.close()
            assert set(os.listdir(root / "snapshots")) == {str(i) for i in id_of.values()}
            committed = sorted(int(i.name[1:]) for i in infos if i.kind == Kind.COMMITTED)
            assert committed and committed == list(range(len(committed)))
            for i in committed:  # every committed layer kept its content
                assert (root / "snapshots" / str(id_of[f"c{i}"]) / "fs" / "f").read_text() == str(i)
        finally:
            await sn.close()
        shutil.rmtree(root)  # the next round starts a fresh chain


def _fill(directory: Path) -> int:
    """Write into ``directory`` until the filesystem is full; bytes written."""
    n = 0
    block = b"\xa5" * (1 << 20)
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                n += f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return n


@pytest.mark.root
@pytest.mark.parametrize("reserve", [True, False])
async def test_full_disk_never_stops_metadata_writes(tmp_path: Path, reserve: bool,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A container fills the root's filesystem: Prepare, Commit and Remove still change the
    metadata (the space held back for it is given back, said once), the removed snapshot's
    bytes are freed, nothing is left behind, and the space is held again once there is
    room. Without the reserve the same writes fail (the test proves the disk is full enough)."""
    import logging

    from snapshotter.service.reserve import SpaceReserve
    from snapshotter.service.snapshotter import Snapshotter
    from tests.test_layers import _sample

    caplog.set_level(logging.INFO, logger="lazysnap")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "lzs-meta-full", str(root)], check=True)
    if not reserve:
        monkeypatch.setattr(SpaceReserve, "take", lambda self: False)
    sn = Snapshotter(root)
    try:
        await sn.open()
        if reserve:
            assert os.stat(root / "metadata.db.reserve").st_blocks * 512 >= 8 << 20
        releases = _sample("lazysnap_metadata_reserve_releases_total")
        await sn.prepare("big", "", {})
        big_dir = next((root / "snapshots").iterdir())
        assert _fill(big_dir / "fs") > 8 << 20
        labels = {f"containerd.io/gc.ref.content.l.{i}": "x" * 3000 for i in range(40)}

        async def writes() -> None:
            for i in range(12):
                await sn.prepare(f"a{i}", "", labels)
                await sn.commit(f"c{i}", f"a{i}", labels)
            for i in range(12):
                await sn.remove(f"c{i}")
            await sn.remove("big")

        if not reserve:
            with pytest.raises(Unavailable, match="full"):
                await writes()
            return
        await writes()
        assert await sn.walk([]) == []
        assert os.listdir(root / "snapshots") == []  # the filler went with its snapshot
        assert _sample("lazysnap_metadata_reserve_releases_total") == releases + 1
        events = [r.getMessage() for r in caplog.records]
        assert events.count("metadata_disk_full") == 1, events
        # room again: the next write takes the reserve back
        await sn.prepare("after", "", {})
        assert os.stat(root / "metadata.db.reserve").st_blocks * 512 >= 8 << 20
        assert [r.getMessage() for r in caplog.records].count("metadata_reserve_restored") == 1
    finally:
        await sn.close()
        subprocess.run(["umount", "-l", str(root)], check=False)
