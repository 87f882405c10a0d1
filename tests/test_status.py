"""`lazysnap status` and `lazysnap prune` against a daemon and on a store no daemon owns.

The status document is validated against the JSON Schema in docs/status-json.md (which
forbids undocumented fields), so the documented schema and the daemon cannot drift apart.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest

from harness.containerd import LazysnapDaemon
from snapshotter.index.builder import index_file
from snapshotter.index.format import IndexFile, serialize_index
from snapshotter.layers.indexes import write_trusted
from snapshotter.service.server import ROOT_LOCK
from snapshotter.service.store import MetaStore
from snapshotter.store import ChunkStore

REPO = Path(__file__).resolve().parent.parent


def status_schema() -> dict[str, object]:
    text = (REPO / "docs" / "status-json.md").read_text()
    block = text.split("## JSON Schema", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)\n```", block, re.S).group(1))  # type: ignore[union-attr]


def validate_status(doc: dict[str, object]) -> None:
    jsonschema.validate(doc, status_schema())


def lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_schema_rejects_an_undocumented_field() -> None:
    doc = {"schema": 1, "daemon": {"version": "1", "pid": 1, "root": "/r", "address": "/s", "uptime_s": 1.0,
                                   "lazy": False},
           "images": [], "store": None, "fallbacks": [], "errors": []}
    validate_status(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_status({**doc, "surprise": 1})


@pytest.mark.root
def test_status_and_prune_of_a_daemon_without_remote_layers(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[remote]\nenabled = false\n")
    d = LazysnapDaemon(tmp_path, extra_args=["--config", str(tmp_path / "c.toml")], metrics=False)
    try:
        d.start()
        r = lazysnap("status", "--json", "--address", d.address)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        validate_status(doc)
        assert doc["daemon"]["pid"] == d.pid and doc["daemon"]["lazy"] is False and doc["store"] is None
        text = lazysnap("status", "--address", d.address)
        assert text.returncode == 0 and "remote layers are off" in text.stdout, text.stderr
        p = lazysnap("prune", "--address", d.address, "--root", str(d.root))
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no chunk store" in p.stderr
        # a daemon that holds the root but is not the one at --address: the store is not ours
        p = lazysnap("prune", "--address", str(tmp_path / "nobody.sock"), "--root", str(d.root), "--apply")
        assert p.returncode == 1 and "a running lazysnap daemon owns" in p.stderr, p.stderr
    finally:
        d.stop()


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    r = lazysnap("status", "--address", str(tmp_path / "none.sock"), "--timeout", "1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "UNAVAILABLE" in r.stderr, r.stderr


def _layer(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _blob(seed: str, n: int) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}{i}".encode()).digest() for i in range(n // 32))


def test_prune_without_a_daemon_keeps_what_snapshots_use(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shared = _blob("shared", 1 << 20)
    used = _layer({"a": _blob("used", 3 << 19), "s": shared})
    unused = _layer({"b": _blob("unused", 5 << 19), "s": shared})
    store = ChunkStore(root)
    digests = {}
    for name, blob in (("used", used), ("unused", unused)):
        (tmp_path / name).write_bytes(blob)
        built = index_file(str(tmp_path / name), chunk_size=256 << 10)
        digest = built.info.blob_digest
        idx = IndexFile.open(write_trusted(root, digest, serialize_index(built), "built"))
        tar = gzip.decompress(blob)
        store.put_many([(c.digest, tar[c.uncompressed_offset:c.uncompressed_offset + c.length])
                        for c in (idx.chunk(i) for i in range(idx.chunk_count))])
        digests[name] = {idx.chunk(i).digest: idx.chunk(i).length for i in range(idx.chunk_count)}
        idx.close()
    store.close()
    meta = MetaStore(root / "metadata.db")
    with meta.transaction() as tx:
        tx.create_remote("chain-used", "", {}, _digest(used), "/nowhere")
    meta.close()
    gone = {d: n for d, n in digests["unused"].items() if d not in digests["used"]}
    assert gone and len(gone) < len(digests["unused"])  # the shared file's chunks stay

    dry = lazysnap("prune", "--root", str(root), "--address", str(tmp_path / "no.sock"), "--json")
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert (out["applied"], out["chunks"], out["bytes"], out["via"]) == (False, len(gone), sum(gone.values()), "store")
    check = ChunkStore(root)
    assert all(check.path_of(d).exists() for d in gone)
    check.close()

    # refused while a daemon holds the root
    fd = os.open(root / ROOT_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        r = lazysnap("prune", "--root", str(root), "--address", str(tmp_path / "no.sock"), "--apply")
        assert r.returncode == 1 and "owns" in r.stderr
    finally:
        os.close(fd)

    r = lazysnap("prune", "--root", str(root), "--address", str(tmp_path / "no.sock"), "--apply")
    assert r.returncode == 0 and r.stdout.startswith(f"reclaimed {len(gone)} chunks"), r.stdout + r.stderr
    check = ChunkStore(root)
    assert not any(check.path_of(d).exists() for d in gone)
    assert all(check.path_of(d).exists() for d in digests["used"])
    assert check.usage().bytes == sum(digests["used"].values())
    check.close()


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()
