"""A TCP relay that counts registry bytes and can shape them to a link rate.

The benchmark needs two things ``harness.proxy`` (an HTTP-level fault injector) does
not give: negligible overhead at hundreds of MB/s, and a shared token bucket so a
"1 Gbit/s" or "100 Mbit/s" node link can be emulated on loopback. Relaying bytes at the
TCP level (one thread per direction, syscalls release the GIL) does both; the count
covers every byte the registry sent, headers included, which is what a link carries.

    with ByteProxy("127.0.0.1:5000", rate=parse_rate("1gbit")) as px:
        ... pull from px.host ...
        px.downstream_bytes
"""
from __future__ import annotations

import re
import socket
import threading
import time

__all__ = ["ByteProxy", "TokenBucket", "parse_rate"]

_BUF = 256 << 10


def parse_rate(text: str | None) -> float | None:
    """Rate in tc's units → bytes per second; None = unshaped.

    ``kbit``/``mbit``/``gbit`` (and a bare number) are bits per second; ``kb``/``mb``/
    ``gb`` and ``…bps`` are bytes per second, as in ``tc``.
    """
    if not text or text in ("none", "0"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|b|bps)?", text.strip().lower())
    if m is None:
        raise ValueError(f"bad rate {text!r} (examples: 1gbit, 100mbit, 50MB)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return value / 8 if (m.group(3) or "bit") == "bit" else value


class TokenBucket:
    """Bytes-per-second limiter shared by every connection (one node link)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 50, _BUF)  # 20 ms of link
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until ``n`` bytes may pass."""
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n or self.tokens >= self.burst:
                    self.tokens -= n  # may go negative for one large buffer: repaid by waiting
                    return
                wait = (min(n, self.burst) - self.tokens) / self.rate
            time.sleep(wait)


class ByteProxy:
    """Listen on a free loopback port, relay to ``upstream`` (``host:port``)."""

    def __init__(self, upstream: str, *, rate: float | None = None) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.bucket = TokenBucket(rate) if rate else None
        self._lock = threading.Lock()
        self.downstream_bytes = 0  # registry → client
        self.upstream_bytes = 0    # client → registry
        self.connections = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="byteproxy", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.downstream_bytes = self.upstream_bytes = self.connections = 0

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            # Relay each write at once, as a router or load balancer does: with Nagle on, a
            # response's last small segment waited for the client's delayed ACK, adding
            # ~40 ms to about one ranged read in twenty (seen in lazysnap's fetch timings).
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            for src, dst, down in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pipe, args=(src, dst, down), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        buf = bytearray(_BUF)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                if down and self.bucket is not None:
                    self.bucket.take(n)
                dst.sendall(view[:n])
                with self._lock:
                    if down:
                        self.downstream_bytes += n
                    else:
                        self.upstream_bytes += n
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                for s in (src, dst):
                    if s in self._open:
                        self._open.discard(s)
                        s.close()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self._open.clear()

    def __enter__(self) -> ByteProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
