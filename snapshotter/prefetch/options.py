"""Knobs of prefetch and background fetch (plain data, filled from the daemon config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PrefetchOptions:
    """``prefetch``: replay the image's start-up profile at its first Prepare.
    ``prefetch_window``: prefetch batches in flight at once (kept small so an on-demand
    read never queues behind many prefetch jobs). ``batch_bytes``: uncompressed bytes of
    profile chunks asked for in one batch (the fetcher merges a batch into checkpoint spans).
    ``background``: after the prefetch, make every layer of the image fully local, then
    verify it; ``background_concurrency`` spans at once, at most ``background_bytes_per_s``
    compressed bytes per second (0: unlimited), paused while an image is starting and for
    ``pause_after_start_s`` after its prefetch, and until reads of starting images have been
    quiet for ``idle_before_background_s``. ``startup_window_s``: how long after the
    first Prepare reads count as start-up reads (metrics). ``registry_lookup``: look for a
    published profile when there is no local one. ``pack``: when the published profile
    carries a pack of its chunks (``lazysnap profile push``), stream that one blob first
    (each chunk verified against the layer index) instead of decoding every chunk from its
    layer's checkpoint; at most ``max_pack_bytes`` uncompressed. ``record_first_start``:
    when an image starts with no profile found (local or published), record its reads for
    ``record_first_start_s`` and save them as its local profile, so the next start of it on
    this node prefetches without anyone running ``lazysnap record``.
    ``publish_recorded_profiles``: then push it as an artifact of the image with a pack of
    its chunks, signed with ``[lazy] publish_sign_key``, as ``lazysnap profile push`` does,
    so other nodes trusting that key prefetch it on their first start.
    """

    prefetch: bool = True
    prefetch_window: int = 4
    batch_bytes: int = 8 << 20
    background: bool = True
    background_concurrency: int = 2
    background_bytes_per_s: int = 0
    pause_after_start_s: float = 2.0
    idle_before_background_s: float = 3.0
    startup_window_s: float = 120.0
    registry_lookup: bool = True
    pack: bool = True
    max_pack_bytes: int = 8 << 30
    record_first_start: bool = False
    record_first_start_s: float = 30.0
    publish_recorded_profiles: bool = False

    def validate(self) -> PrefetchOptions:
        if min(self.prefetch_window, self.background_concurrency, self.batch_bytes, self.max_pack_bytes) < 1:
            raise ValueError("prefetch_window, background_concurrency, batch_bytes and max_pack_bytes must be >= 1")
        if self.record_first_start_s <= 0:
            raise ValueError("record_first_start_s must be > 0")
        if min(self.background_bytes_per_s, self.pause_after_start_s, self.startup_window_s,
               self.idle_before_background_s) < 0:
            raise ValueError("background_bytes_per_s, pause_after_start_s, startup_window_s must be >= 0")
        return self
