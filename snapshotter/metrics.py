"""The daemon-wide Prometheus registry and its HTTP exposition (``--metrics-address``).

Every package registers its metrics in :data:`REGISTRY` (not prometheus-client's global
one) so a test can start several daemons in one process without name clashes being
hidden, and so the exposition shows exactly lazysnap's metrics.
"""
from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["REGISTRY", "BUILD_INFO", "RPC_REQUESTS", "RPC_LATENCY", "REMOTE_FALLBACKS", "REMOTE_SNAPSHOTS",
           "MetricsServer", "start_metrics_server", "parse_host_port"]

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD_INFO = Gauge("lazysnap_build_info", "Always 1; the labels say which build the daemon runs",
                   ["version", "python"], registry=REGISTRY)
RPC_REQUESTS = Counter("lazysnap_grpc_requests_total", "Snapshots API calls by method and gRPC status code",
                       ["method", "code"], registry=REGISTRY)
RPC_LATENCY = Histogram("lazysnap_grpc_request_seconds", "Snapshots API call latency by method",
                        ["method"], registry=REGISTRY,
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
REMOTE_FALLBACKS = Counter("lazysnap_remote_fallbacks_total",
                           "Remote-layer Prepares that fell back to a normal download, by reason",
                           ["reason"], registry=REGISTRY)
REMOTE_SNAPSHOTS = Counter("lazysnap_remote_snapshots_total",
                           "Layers served by the remote provider instead of being downloaded",
                           registry=REGISTRY)
METADATA_RESERVE_RELEASES = Counter("lazysnap_metadata_reserve_releases_total",
                                    "Times the disk was full and the space held for the metadata "
                                    "database was given back so its writes could go on",
                                    registry=REGISTRY)


def parse_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); a clear ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class MetricsServer:
    """A running exposition endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = server.server_address[:2]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(address: str) -> MetricsServer:
    """Serve :data:`REGISTRY` at ``http://HOST:PORT/metrics`` from a daemon thread."""
    host, port = parse_host_port(address)
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    return MetricsServer(server, thread)
