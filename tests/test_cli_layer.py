"""``python -m snapshotter index | inspect | cat | ls`` as subprocesses: outputs, exit codes,
one-line errors for bad input (never a traceback)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run([sys.executable, "-m", "snapshotter", *map(str, args)], cwd=ROOT, capture_output=True,
                       timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr.decode()
    else:
        assert p.returncode != 0
        err = p.stderr.decode()
        assert "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    return p


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("layer")
    rnd = random.Random(11)
    files = {
        "usr/bin/tool": rnd.randbytes(300_000),
        "usr/lib/libbig.so": rnd.randbytes(200_000) + b"A" * 2_500_000 + rnd.randbytes(100_000),
        "etc/conf é.txt": b"key=value\n",
        "empty": b"",
        "x" * 120 + "/long": b"long name",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
        for name, kind, target in (("usr/bin/sh", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("usr/bin/tool2", tarfile.LNKTYPE, "usr/bin/tool")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mtime = kind, target, 1_700_000_000
            tf.addfile(ti)
    raw = buf.getvalue()
    paths = {"tar": d / "l.tar", "gzip": d / "l.tar.gz", "zstd": d / "l.tar.zst"}
    paths["tar"].write_bytes(raw)
    paths["gzip"].write_bytes(gzip.compress(raw, 6))
    paths["zstd"].write_bytes(b"".join(zstandard.ZstdCompressor().compress(raw[i:i + (1 << 20)])
                                       for i in range(0, len(raw), 1 << 20)))
    return {"dir": d, "files": files, "raw": raw, "paths": paths}


@pytest.mark.parametrize("fmt", ["tar", "gzip", "zstd"])
def test_index_inspect_cat(layer: dict, tmp_path: Path, fmt: str) -> None:
    blob_path: Path = layer["paths"][fmt]
    idx = tmp_path / "l.idx"
    out = run("index", blob_path, "-o", idx, "--diff-id", "--span", str(64 << 10), "--chunk-size", str(256 << 10))
    assert b"entries=" in out.stdout
    info = json.loads(run("inspect", idx, "--json").stdout)
    blob = blob_path.read_bytes()
    assert info["format"] == fmt
    assert info["files"] == 5 and info["entries"] == 13  # 6 directories (root, etc, usr, usr/bin, usr/lib, xxx..) + 7
    assert info["compressed_size"] == len(blob)
    assert info["uncompressed_size"] == len(layer["raw"])
    assert info["blob_digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert info["diff_id"] == "sha256:" + hashlib.sha256(layer["raw"]).hexdigest()
    assert info["index_bytes"] == idx.stat().st_size
    assert info["chunk_size"] == 256 << 10 and info["span_size"] == 64 << 10
    assert info["checkpoints"] >= 1 and info["chunks"] >= 5
    assert isinstance(info["sequential_only"], bool)
    assert b"entries" in run("inspect", idx).stdout
    for name, data in layer["files"].items():
        assert run("cat", idx, blob_path, name).stdout == data
    big = layer["files"]["usr/lib/libbig.so"]
    p = run("cat", idx, blob_path, "/usr/lib/libbig.so", "--offset", "2750000", "--length", "5000", "--stats")
    assert p.stdout == big[2_750_000:2_755_000]
    stats = json.loads(p.stderr.decode().strip().splitlines()[-1])
    assert stats["bytes_out"] == 5000 and stats["compressed_bytes_read"] > 0 and stats["spans_decoded"] >= 1
    if fmt == "tar":
        assert stats["compressed_bytes_read"] <= 256 << 10
    assert run("cat", idx, blob_path, "usr/bin/tool2").stdout == layer["files"]["usr/bin/tool"]


def test_diff_id_null_unless_requested(layer: dict, tmp_path: Path) -> None:
    idx = tmp_path / "l.idx"
    run("index", layer["paths"]["gzip"], "-o", idx)
    assert json.loads(run("inspect", idx, "--json").stdout)["diff_id"] is None


def test_ls(layer: dict, tmp_path: Path) -> None:
    idx = tmp_path / "l.idx"
    run("index", layer["paths"]["tar"], "-o", idx)
    lines = run("ls", idx).stdout.decode().splitlines()
    assert len(lines) == 12
    assert any(line.startswith("lrw-r--r-- 0/0") and line.endswith("usr/bin/sh -> /etc/passwd") for line in lines)
    assert any(line.startswith("h") and line.endswith("usr/bin/tool2 link to usr/bin/tool") for line in lines)
    # as applied: the hard link's header (mode 0644) re-stamps the inode it shares, like containerd does
    assert any(line.startswith("-rw-r--r-- 0/0     300000 2023-11-14 22:13 usr/bin/tool") for line in lines)
    assert any(line.startswith("drwxr-xr-x") and line.endswith(" usr/") for line in lines)
    sub = run("ls", idx, "usr/bin").stdout.decode().splitlines()
    assert [s.split()[-1] for s in sub] == ["usr/bin/", "/etc/passwd", "usr/bin/tool", "usr/bin/tool"]
    run("ls", idx, "nope", ok=False)


def test_errors_are_one_line(layer: dict, tmp_path: Path) -> None:
    idx = tmp_path / "l.idx"
    blob = layer["paths"]["gzip"]
    run("index", blob, "-o", idx)
    # symlinks and directories are not catted
    assert b"symlink" in run("cat", idx, blob, "usr/bin/sh", ok=False).stderr
    assert b"directory" in run("cat", idx, blob, "usr", ok=False).stderr
    assert b"no such file" in run("cat", idx, blob, "missing", ok=False).stderr
    assert b"escapes" in run("cat", idx, blob, "../x", ok=False).stderr
    # wrong layer for this index
    assert b"bytes but the index" in run("cat", idx, layer["paths"]["tar"], "empty", ok=False).stderr
    # corrupt and truncated index files
    bad = tmp_path / "bad.idx"
    data = bytearray(idx.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    assert b"checksum" in run("inspect", bad, "--json", ok=False).stderr
    bad.write_bytes(idx.read_bytes()[:-7])
    assert b"truncated" in run("ls", bad, ok=False).stderr
    assert b"cannot open index" in run("inspect", tmp_path / "none.idx", ok=False).stderr
    # a path is never taken for an image reference; no directory is created unasked
    assert b"no such file" in run("index", tmp_path / "none.tar.gz", "-o", tmp_path / "n.idx", ok=False).stderr
    assert b"not a regular file" in run("index", "/dev/null", "-o", tmp_path / "n.idx", ok=False).stderr
    out = run("index", blob, "-o", tmp_path / "nodir" / "x.idx", ok=False).stderr
    assert b"does not exist" in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "nodir").exists()
    # unknown, truncated and corrupt layers
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a layer" * 100)
    assert b"format" in run("index", junk, "-o", tmp_path / "j.idx", ok=False).stderr
    trunc = tmp_path / "t.tar.gz"
    trunc.write_bytes(blob.read_bytes()[:-100])
    run("index", trunc, "-o", tmp_path / "t.idx", ok=False)
    assert not (tmp_path / "t.idx").exists()
    # a corrupted blob read through a good index: error, never wrong bytes
    corrupt = tmp_path / "c.tar.gz"
    cdata = bytearray(blob.read_bytes())
    for i in range(200, len(cdata) - 100, 997):
        cdata[i] ^= 0xFF
    corrupt.write_bytes(bytes(cdata))
    p = run("cat", idx, corrupt, "usr/lib/libbig.so", ok=False)
    assert p.stdout == b"" or layer["files"]["usr/lib/libbig.so"].startswith(p.stdout)


def test_hostile_layer_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("../../etc/cron.d/evil")
        tf.addfile(ti, io.BytesIO(b""))
    blob = tmp_path / "evil.tar"
    blob.write_bytes(buf.getvalue())
    p = run("index", blob, "-o", tmp_path / "e.idx", ok=False)
    assert b"escapes the layer root" in p.stderr


def test_cat_usage(tmp_path: Path) -> None:
    p = run("cat", "a", "b", "c", "d", ok=False)
    assert p.returncode == 2
    assert os.path.exists(ROOT / "snapshotter" / "cli" / "layer_cmds.py")


def test_indexing_a_local_layer_loads_no_registry_or_event_loop_code(layer: dict, tmp_path: Path) -> None:
    """`lazysnap index FILE` is timed as a whole command against `gzip -dc`: the registry
    client (aiohttp, ~0.2 s to import) and asyncio have no part in it."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "snapshotter", "index",
                        str(layer["paths"]["gzip"]), "-o", str(tmp_path / "l.idx")],  # type: ignore[index]
                       cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("aiohttp", "asyncio")}
    assert "snapshotter.registry.client" not in imported
