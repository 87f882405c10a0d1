"""Progress of `lazysnap index REF --push` on a terminal (through a pty), plain lines when
stderr is not one, and never anything new on stdout.

The image is a tar of one file of zeros stored as many small gzip members (a valid
multi-member gzip layer): 4 GiB uncompressed in ~4 MiB, so the 4 GiB run costs the
indexer's inflate and hashing only.
"""
from __future__ import annotations

import asyncio
import fcntl
import gzip
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tarfile
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.registry import Registry, push_image, start_registry

REPO = Path(__file__).resolve().parent.parent
MEMBER = 64 << 20


def zeros_layer(size: int) -> bytes:
    """A gzip tar layer holding ``data/zeros.bin`` of ``size`` zero bytes (multi-member)."""
    ti = tarfile.TarInfo("data/zeros.bin")
    ti.size = size
    header = ti.tobuf(format=tarfile.PAX_FORMAT)
    zeros = size + (-size % 512) + 1024  # the data, its padding, the end-of-archive blocks
    parts = [gzip.compress(header, mtime=0)]
    full, rest = divmod(zeros, MEMBER)
    parts += [gzip.compress(bytes(MEMBER), compresslevel=9, mtime=0)] * full
    parts.append(gzip.compress(bytes(rest), mtime=0))
    return b"".join(parts)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("progress") / "reg")
    yield reg
    reg.stop()


def push(reg: Registry, name: str, size: int) -> str:
    from snapshotter.registry import RegistryClient

    ref = f"{reg.host}/progress/{name}:v1"

    async def go() -> None:
        async with RegistryClient() as client:
            await push_image(client, ref, [zeros_layer(size)])

    asyncio.run(go())
    return ref


def index_through_pty(ref: str, root: Path) -> tuple[int, str, str]:
    """Run `lazysnap index REF --push` with stderr on a pty; (status, stdout, terminal output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "LAZYSNAP_PROGRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "snapshotter", "index", ref, "--push", "--root", str(root),
                             "--hosts-dir", str(root / "none")], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    os.close(slave)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("no output for 120 s")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    return proc.wait(timeout=60), out, seen.decode(errors="replace")


def check_terminal(status: int, out: str, term: str, size: int) -> None:
    assert status == 0, term
    # stdout: exactly what scripts parse, one line per layer and the summary
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("layer sha256:") and lines[1].startswith("indexed "), out
    assert "\r" not in out and "%|" not in out
    assert "lazysnap index" in term and "%|" in term and "B/s" in term, term[-2000:]
    assert "2/2 steps" in term and "100%" in term, term[-2000:]
    assert "indexes published as sha256:" in term
    assert re.search(r"\[\d+:\d+<", term), "no elapsed/remaining (ETA) shown"


def test_index_push_shows_progress_on_a_terminal(registry: Registry, tmp_path: Path) -> None:
    size = 256 << 20
    ref = push(registry, "small", size)
    check_terminal(*index_through_pty(ref, tmp_path / "root"), size)


def test_index_push_progress_is_plain_lines_without_a_terminal(registry: Registry, tmp_path: Path) -> None:
    ref = push(registry, "plain", 8 << 20)
    env = {k: v for k, v in os.environ.items() if k != "LAZYSNAP_PROGRESS"}
    r = subprocess.run([sys.executable, "-m", "snapshotter", "index", ref, "--push", "--root", str(tmp_path / "r"),
                        "--hosts-dir", str(tmp_path / "none")], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    steps = [line for line in r.stderr.splitlines() if line.startswith("lazysnap index: ")]
    assert len(steps) == 2, r.stderr
    assert re.match(r"lazysnap index: 1/2 steps: layer sha256:[0-9a-f]{12} indexed \(.* of .*, .*/s, .* s\)$",
                    steps[0]), steps
    assert steps[1].startswith("lazysnap index: 2/2 steps: indexes published as sha256:")
    assert "\r" not in r.stderr and "%|" not in r.stderr
    assert len(r.stdout.splitlines()) == 2


@pytest.mark.slow
def test_index_push_of_a_4gib_image_shows_progress_on_a_terminal(registry: Registry, tmp_path: Path) -> None:
    size = 4 << 30
    ref = push(registry, "four-gib", size)
    status, out, term = index_through_pty(ref, tmp_path / "root")
    check_terminal(status, out, term, size)
    assert re.search(r"size=\d+ index_bytes=\d+ built", out)
    percents = {int(p) for p in re.findall(r"(\d+)%\|", term)}
    assert len(percents) >= 3, f"the bar moved through {sorted(percents)} only"
