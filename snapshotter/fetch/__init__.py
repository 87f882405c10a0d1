"""Read miss → fetch scheduler: spans from the registry, decoded, verified, stored."""
from __future__ import annotations

from snapshotter.fetch.scheduler import (
    BlobSource,
    FetchError,
    Fetcher,
    FetchOptions,
    LayerFetcher,
    Priority,
    PriorityGate,
    SpanCodec,
)

__all__ = ["BlobSource", "FetchError", "Fetcher", "FetchOptions", "LayerFetcher", "Priority",
           "PriorityGate", "SpanCodec"]
