"""Prometheus metrics of the fetch path (daemon registry from ``snapshotter.metrics``)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from snapshotter.store.metrics import REGISTRY

REGISTRY_BYTES = Counter("lazysnap_registry_bytes_fetched",
                         "Compressed bytes fetched from the registry, by purpose (on_demand/prefetch/background)",
                         ["purpose"], registry=REGISTRY)
FETCH_SECONDS = Histogram("lazysnap_fetch_seconds", "Time a read waited for missing chunks, by purpose",
                          ["purpose"], registry=REGISTRY,
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
SPAN_SECONDS = Histogram("lazysnap_span_fetch_seconds", "One span: range request + decode + store",
                         ["purpose"], registry=REGISTRY,
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SPAN_ERRORS = Counter("lazysnap_span_fetch_errors", "Span fetch attempts that failed, by error type",
                      ["error"], registry=REGISTRY)
FETCH_FAILURES = Counter("lazysnap_fetch_failures", "Reads that got EIO after the fetch deadline",
                         ["purpose"], registry=REGISTRY)
READAHEAD_SPANS = Counter("lazysnap_readahead_spans", "Spans fetched ahead of an on-demand miss (background priority)",
                          registry=REGISTRY)
CORRUPT_RANGES = Counter("lazysnap_fetch_corrupt_ranges",
                         "Fetched ranges whose bytes failed verification (never served): retried once, then failed",
                         ["outcome"], registry=REGISTRY)
