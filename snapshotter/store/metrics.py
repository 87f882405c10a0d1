"""Prometheus metrics of the chunk store.

Registered in the daemon-wide registry (``snapshotter.metrics.REGISTRY``) when the
service package provides one, otherwise in prometheus-client's default registry.
"""
from __future__ import annotations

from prometheus_client import REGISTRY as _DEFAULT, CollectorRegistry, Counter, Gauge

try:  # the service engineer's registry, if present
    from snapshotter.metrics import REGISTRY as _SHARED  # type: ignore[attr-defined]
except Exception:  # noqa: BLE001 - any import problem means "no shared registry"
    _SHARED = None

REGISTRY: CollectorRegistry = _SHARED if isinstance(_SHARED, CollectorRegistry) else _DEFAULT

CACHE_HITS = Counter("lazysnap_chunk_cache_hits", "Chunk reads answered from the local store",
                     registry=REGISTRY)
CACHE_MISSES = Counter("lazysnap_chunk_cache_misses", "Chunk reads that needed a fetch",
                       registry=REGISTRY)
DEDUP_HITS = Counter("lazysnap_chunk_dedup_hits",
                     "Chunks offered to the store that were already stored (fetched once per node)",
                     registry=REGISTRY)
CORRUPT = Counter("lazysnap_chunk_corrupt", "Stored chunk files that failed verification and were dropped",
                  registry=REGISTRY)
WRITE_ERRORS = Counter("lazysnap_chunk_write_errors", "Chunk writes that failed for lack of space, by errno",
                       ["errno"], registry=REGISTRY)
EVICTIONS = Counter("lazysnap_chunk_evictions", "Chunks evicted to respect the store size limit",
                    registry=REGISTRY)
STORED_BYTES = Gauge("lazysnap_chunk_store_bytes", "Bytes held by the chunk store", registry=REGISTRY)
PRUNED = Counter("lazysnap_chunk_pruned", "Chunks no layer pinned that prune or the drop-unreferenced policy deleted",
                 registry=REGISTRY)
