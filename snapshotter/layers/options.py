"""Options of the lazy layer provider (plain data, filled from the daemon config)."""
from __future__ import annotations

from dataclasses import dataclass, field

TRUST_MODES = ("same-repository", "pinned", "local-only")
STORE_POLICIES = ("lru", "drop-unreferenced")


@dataclass(slots=True)
class LazyOptions:
    """Knobs of the lazy path; defaults are what ``lazysnap serve`` uses.

    ``small_layer_bytes``: layers up to this compressed size are fetched whole at Prepare.
    Default 4 MiB: a few spans; the first misses in a layer that small fetch most of it
    anyway, so laziness would only add round trips.
    ``readahead_spans``: an on-demand miss also fetches the next checkpoint span at
    background priority (a package's files are adjacent in the tar). Off: measured on the
    inference image with no profile (bench/RESULTS.md, 2026-11-27), it saved no time
    (6.3 s with it, 6.5 s without, medians of 3) and cost 50 MB (212 against 163 MB). A
    miss itself fetches from the checkpoint before the chunk up to the index's end mark
    after it; a miss on a small file takes the rest of its span (``IndexCodec.span_mates``).
    ``span_size`` (layers indexed here): 1 MiB, measured on the inference image
    (python3 -c 'import torch', every layer lazy, no profile): 4 MiB spans 271 MB fetched,
    index 4.1 MB; 1 MiB spans 172 MB fetched, cold start ~20 % shorter, index 9.0 MB (1.8 %
    of the compressed image).
    ``index_trust``: where a published index may come from — ``same-repository`` (the
    referrers of the image manifest in the image's own repository), ``pinned`` (only index
    blobs whose digest is listed in ``pinned_indexes``: layer digest → index blob digest),
    ``local-only`` (never use published indexes; build locally).
    ``keep_streamed_blobs``: when an index has to be built by streaming the layer, keep
    the blob on disk and serve reads from it instead of fetching ranges again.
    ``fuse_threads``: C threads answering FUSE requests; a read of a chunk file that is not
    in the page cache waits for the disk on one of them, so a few let readahead overlap.
    ``verify_complete_layers``: when every chunk of a lazily read layer is local, stream
    the blob once more in the background, check its digest and that it indexes to the
    same entries/chunks; a mismatch quarantines the index and fails reads loudly.
    """

    small_layer_bytes: int = 4 << 20
    store_limit_bytes: int | None = None
    store_policy: str = "lru"
    fsync: str = "none"
    fetch_deadline_s: float = 30.0
    max_concurrency: int = 8
    index_trust: str = "same-repository"
    pinned_indexes: dict[str, str] = field(default_factory=dict)
    publish_built_indexes: bool = False
    keep_streamed_blobs: bool = True
    verify_complete_layers: bool = True
    layer_parallel: int = 3
    span_size: int = 1 << 20
    chunk_size: int = 1 << 20
    max_index_bytes: int = 512 << 20
    read_ahead_kb: int = 1024
    readahead_spans: bool = False
    fuse_threads: int = 8

    def validate(self) -> LazyOptions:
        if self.index_trust not in TRUST_MODES:
            raise ValueError(f"index_trust must be one of {', '.join(TRUST_MODES)}, got {self.index_trust!r}")
        if self.store_policy not in STORE_POLICIES:
            raise ValueError(f"store_policy must be one of {', '.join(STORE_POLICIES)}, got {self.store_policy!r}")
        if self.fsync not in ("none", "file", "full"):
            raise ValueError(f"fsync must be none|file|full, got {self.fsync!r}")
        if not 1 <= self.fuse_threads <= 16:
            raise ValueError(f"fuse_threads must be 1..16, got {self.fuse_threads}")
        if self.fetch_deadline_s <= 0 or self.max_concurrency < 1:
            raise ValueError("fetch_deadline_s must be > 0 and max_concurrency >= 1")
        return self
