"""The benchmark's registry link: it must count exactly and shape to the asked rate."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.byteproxy import ByteProxy, parse_rate


@pytest.mark.parametrize("text,bps", [
    ("1gbit", 125e6), ("100mbit", 12.5e6), ("800kbit", 1e5), ("8", 1.0),
    ("50mb", 50e6), ("2MBps", 2e6), ("none", None), (None, None),
])
def test_parse_rate(text: str | None, bps: float | None) -> None:
    assert parse_rate(text) == bps


def test_parse_rate_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate("fast")


@pytest.fixture
def source() -> Iterator[tuple[str, bytes]]:
    """A TCP server that sends a fixed payload to each client after reading one line."""
    payload = bytes(range(256)) * (4096 * 4)  # 4 MiB
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(100)
                conn.sendall(payload)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}", payload
    stop.set()
    srv.close()


def _fetch(host: str) -> bytes:
    h, _, p = host.rpartition(":")
    with socket.create_connection((h, int(p))) as c:
        c.sendall(b"GET\n")
        out = bytearray()
        while chunk := c.recv(1 << 16):
            out += chunk
    return bytes(out)


def test_counts_every_byte_both_ways(source: tuple[str, bytes]) -> None:
    host, payload = source
    with ByteProxy(host) as px:
        assert _fetch(px.host) == payload
        assert _fetch(px.host) == payload
        deadline = time.monotonic() + 5
        while px.downstream_bytes < 2 * len(payload) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert px.downstream_bytes == 2 * len(payload)
        assert px.upstream_bytes == 8 and px.connections == 2
        px.reset()
        assert px.downstream_bytes == 0


def test_shapes_to_rate(source: tuple[str, bytes]) -> None:
    host, payload = source
    with ByteProxy(host, rate=parse_rate("16mbit")) as px:  # 2 MB/s: 4 MiB ≈ 2.1 s
        t = time.monotonic()
        assert _fetch(px.host) == payload
        elapsed = time.monotonic() - t
    assert 1.8 < elapsed < 4.0
