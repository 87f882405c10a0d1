"""Prometheus metrics of the FUSE filesystem (daemon registry).

The C workers count requests themselves (no Python per request); this collector reads
their counters at scrape time.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from snapshotter.store.metrics import CACHE_HITS, REGISTRY

OPS = ("lookup", "getattr", "readlink", "opendir", "readdir", "statfs", "getxattr", "listxattr", "open", "read")
READ_PATHS = {"read_local": "local", "read_forwarded": "daemon"}


class FuseCounters(Collector):
    """Sums the counters of every mounted session plus those of sessions already closed."""

    def __init__(self) -> None:
        self._live: dict[int, Callable[[], dict[str, int]]] = {}
        self._closed: Counter[str] = Counter()

    def attach(self, key: int, counters: Callable[[], dict[str, int]]) -> None:
        self._live[key] = counters

    def detach(self, key: int, final: dict[str, int]) -> None:
        self._live.pop(key, None)
        self._closed.update(final)

    def totals(self) -> Counter[str]:
        out = Counter(self._closed)
        for counters in list(self._live.values()):
            out.update(counters())
        return out

    def collect(self) -> Iterator[Metric]:
        totals = self.totals()
        requests = CounterMetricFamily(
            "lazysnap_fuse_requests", "FUSE requests answered, by operation: every one is a round trip "
            "through the kernel and the daemon, so their number is the FUSE path's cost", labels=["op"])
        for op in OPS:
            requests.add_metric([op], totals[op])
        yield requests
        reads = CounterMetricFamily(
            "lazysnap_fuse_reads", "FUSE reads by who answered: the C workers from verified local chunks, "
            "or the daemon's loop (a fetch, a sparse file, a quarantined layer)", labels=["path"])
        for key, path in READ_PATHS.items():
            reads.add_metric([path], totals[key])
        yield reads
        yield CounterMetricFamily("lazysnap_fuse_access_records_dropped",
                                  "Reads the recorder never saw because the daemon fell behind",
                                  value=totals["access_dropped"])
        yield CounterMetricFamily("lazysnap_fuse_passthrough_opens",
                                  "Opens answered with a backing file: the kernel reads it, no request reaches us",
                                  value=totals["open_passthrough"])
        yield CounterMetricFamily("lazysnap_fuse_resent_requests",
                                  "Requests the kernel sent again because the FUSE holder that read them died "
                                  "before answering (FUSE_NOTIFY_RESEND)", value=totals["resent"])
        yield CounterMetricFamily("lazysnap_fuse_waited_reads",
                                  "Reads that waited in the FUSE holder for a daemon (stopped, killed, restarting) "
                                  "and were then answered", value=totals["waited_reads"])
        yield CounterMetricFamily("lazysnap_fuse_waited_seconds",
                                  "How long those reads waited, in total", value=totals["waited_ms"] / 1000)


FUSE = FuseCounters()
REGISTRY.register(FUSE)
__all__ = ["BACKING_BYTES", "BACKING_MADE", "CACHE_HITS", "FUSE", "HOLDER_ATTACHES", "HOLDER_DIRECT_REPLIES",
           "HOLDER_HANDED_READS", "HOLDER_REHOMES", "OPS", "PASSTHROUGH"]
HOLDER_ATTACHES = PromCounter("lazysnap_fuse_holder_attaches_total",
                              "Times this daemon attached to a FUSE holder, by whether it started it",
                              ["started"], registry=REGISTRY)
HOLDER_HANDED_READS = PromCounter("lazysnap_fuse_holder_handed_reads_total",
                                  "Reads that waited in the FUSE holder for a daemon and were handed to this one",
                                  registry=REGISTRY)
HOLDER_DIRECT_REPLIES = PromCounter("lazysnap_fuse_holder_direct_replies_total",
                                    "Reads behind the FUSE holder that this daemon answered on its own copy of "
                                    "the session's fd (the bytes did not travel back through the holder)",
                                    registry=REGISTRY)
HOLDER_REHOMES = PromCounter("lazysnap_fuse_holder_rehomes_total",
                             "Times a FUSE holder died and this daemon brought the session to the next one "
                             "(taken_over: the mount lived on; new_mount: it could not be kept)",
                             ["how"], registry=REGISTRY)
PASSTHROUGH = Gauge("lazysnap_fuse_passthrough",
                    "With [lazy] fuse_passthrough: 1 while files whose bytes are all local are passed to the "
                    "kernel as backing files, 0 when it was asked for and is unavailable (the log says why)",
                    registry=REGISTRY)
BACKING_BYTES = Gauge("lazysnap_fuse_backing_bytes",
                      "Bytes of the backing files on disk (counted in the chunk store's limit)", registry=REGISTRY)
BACKING_MADE = PromCounter("lazysnap_fuse_backing_materialized_bytes_total",
                           "Bytes copied from verified chunks into backing files", registry=REGISTRY)
