"""What the layer provider can tell about itself: one typed snapshot for ``lazysnap status``.

``LazyLayerProvider.status()`` builds a ``ProviderStatus`` on the provider's loop; the
service turns it into the status JSON (docs/status-json.md) without reaching into the
provider. Counts are taken from the chunk store's in-memory index, so a status call costs
one pass over each layer's chunk list and no disk access.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.store import StoreUsage


@dataclass(slots=True, frozen=True)
class FillStatus:
    """The layer's background fill (``snapshotter.prefetch.background.FillProgress``)."""

    state: str
    chunks_done: int
    chunks_total: int
    bytes_fetched: int
    bytes_per_s: float
    started: float | None  # unix time of the first span
    finished: float | None


@dataclass(slots=True, frozen=True)
class LayerStatus:
    digest: str
    state: str  # lazy (served) | preparing | failed (containerd downloads it: a fallback)
    image_ref: str = ""
    index_source: str = ""  # local | referrer | built | whole
    format: str = ""
    sequential_only: bool = False
    verified: bool = False  # the whole blob was checked against its digest
    complete: bool = False  # every chunk local and verified (a marker under <root>/complete)
    quarantined: str | None = None  # why reads of this layer fail
    reason: str | None = None  # state failed: why it is not served lazily
    chunks_total: int = 0
    chunks_local: int = 0
    chunks_verified: int = 0  # local chunks this daemon has hashed (the C filesystem serves those)
    bytes_total: int = 0  # uncompressed file data (the sum of the chunk sizes)
    bytes_local: int = 0
    compressed_bytes: int = 0
    registry_bytes: int = 0  # fetched from the registry for this layer by this daemon
    fill: FillStatus | None = None
    passthrough_files: int | None = None  # files served by FUSE passthrough (None: not supported)


@dataclass(slots=True, frozen=True)
class ImageStatus:
    ref: str
    manifest_digest: str | None
    layers: list[str] = field(default_factory=list)  # digests, bottom first


@dataclass(slots=True, frozen=True)
class ProviderStatus:
    images: list[ImageStatus]
    layers: list[LayerStatus]  # every layer named by an image, each once
    store: StoreUsage
    store_policy: str
