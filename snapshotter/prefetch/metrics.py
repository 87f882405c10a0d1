"""Prometheus metrics of profiles, prefetch and background fetch (daemon registry)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from snapshotter.store.metrics import REGISTRY

PROFILE_LOOKUPS = Counter("lazysnap_profile_lookups", "Profile look-ups at an image's first Prepare, by result "
                          "(local/registry/none/rejected)", ["result"], registry=REGISTRY)
PREFETCH_SECONDS = Histogram("lazysnap_prefetch_seconds", "Time to make one image's profile chunks local",
                             registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
PREFETCH_CHUNKS = Counter("lazysnap_prefetch_chunks", "Profile chunks by state when the prefetch reached them "
                          "(fetched/already_local/failed)", ["state"], registry=REGISTRY)
PREFETCH_BYTES = Counter("lazysnap_prefetch_bytes", "Uncompressed bytes of profile chunks the prefetch made local",
                         registry=REGISTRY)
STARTUP_READS = Counter("lazysnap_startup_chunk_reads", "First reads of a chunk while an image starts, by whether "
                        "the chunk was already local (hit) or had to be fetched (miss)", ["result"],
                        registry=REGISTRY)
BACKGROUND_LOCAL = Gauge("lazysnap_background_chunks_local", "Chunks of a layer already local (background fill)",
                         ["layer"], registry=REGISTRY)
BACKGROUND_TOTAL = Gauge("lazysnap_background_chunks_total", "Chunks of a layer (background fill)", ["layer"],
                         registry=REGISTRY)
BACKGROUND_BYTES = Counter("lazysnap_background_span_bytes", "Compressed span bytes requested by background fill",
                           registry=REGISTRY)
LAYERS_COMPLETE = Counter("lazysnap_layers_complete", "Layers made fully local and verified, by result "
                          "(verified/failed)", ["result"], registry=REGISTRY)
RECORDED_CHUNKS = Counter("lazysnap_recorded_chunks", "Chunk first-accesses recorded into profiles",
                          registry=REGISTRY)
PACK_CHUNKS = Counter("lazysnap_pack_chunks", "Chunks of a profile pack by outcome (stored/already_local/"
                      "rejected: wrong size or SHA-256 for this node's index)", ["state"], registry=REGISTRY)
PACKS = Counter("lazysnap_packs", "Profile packs streamed at an image's start, by result (done/rejected/failed)",
                ["result"], registry=REGISTRY)
