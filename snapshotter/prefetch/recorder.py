"""Chunk first-accesses seen by the FUSE read path: recordings and start-up hit/miss counts.

The filesystem calls one hook per layer on every read, before it looks in the store, with
the chunk ids the read touches (``snapshotter.fs.data.AccessHook``). The hook costs two
dict look-ups when nothing listens. While a recording is active every chunk's *first*
access is kept with its time since the recording started; while an image is starting
(``startup_window_s`` after its first Prepare) each chunk's first read is counted as a hit
(already in the store) or a miss (must be fetched): the share of hits is what a profile's
prefetch buys.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapshotter.log import get_logger
from snapshotter.prefetch import metrics
from snapshotter.prefetch.profile import ChunkAccess, LayerProfile, Profile

log = get_logger("lazysnap.prefetch")

Hook = Callable[[Any, int, int, Sequence[int], "float | None"], None]


@dataclass(slots=True)
class Recording:
    """One active recording of one image: per layer, chunk id → first access."""

    id: str
    manifest: str
    layers: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    seen: dict[str, dict[int, ChunkAccess]] = field(default_factory=dict)

    def profile(self, chunk_counts: dict[str, int]) -> Profile:
        out = []
        for digest in self.layers:
            acc = list(self.seen.get(digest, {}).values())
            acc.sort(key=lambda a: (a.first_us, a.chunk))
            out.append(LayerProfile(digest, chunk_counts.get(digest, 0), acc))
        return Profile(self.manifest, out, 1)


@dataclass(slots=True)
class _Window:
    until: float
    seen: set[int] = field(default_factory=set)
    hits: int = 0
    misses: int = 0


class AccessRecorder:
    """Daemon-wide; every method runs on the filesystem's event loop (no locking needed)."""

    def __init__(self, has_chunk: Callable[[bytes], bool]) -> None:
        self._has = has_chunk
        self._recordings: dict[str, Recording] = {}
        self._by_layer: dict[str, list[Recording]] = {}
        self._windows: dict[str, _Window] = {}
        self._ids = itertools.count(1)
        self.last_startup_read = 0.0  # monotonic time of the newest read inside a start-up window

    # -- the hook ---------------------------------------------------------------------------
    def hook(self, layer_digest: str, index: Any) -> Hook:
        """The ``on_access`` callback of one layer's ``LayerData``."""
        by_layer, windows = self._by_layer, self._windows

        def on_access(entry: Any, off: int, size: int, ids: Sequence[int], at: float | None = None) -> None:
            recs = by_layer.get(layer_digest)
            win = windows.get(layer_digest)
            if recs is None and win is None:
                return
            now = time.monotonic() if at is None else at
            if recs:
                for rec in recs:
                    seen = rec.seen.setdefault(layer_digest, {})
                    t_us = int((now - rec.started) * 1e6)
                    for cid in ids:
                        if cid not in seen:
                            seen[cid] = ChunkAccess(cid, index.chunk(cid).length, entry.path, off, size, [t_us])
                            metrics.RECORDED_CHUNKS.inc()
            if win is not None:
                self.last_startup_read = now
                if now > win.until:
                    self._close_window(layer_digest)
                    return
                for cid in ids:
                    if cid not in win.seen:
                        win.seen.add(cid)
                        if self._has(index.chunk(cid).digest):
                            win.hits += 1
                            metrics.STARTUP_READS.labels("hit").inc()
                        else:
                            win.misses += 1
                            metrics.STARTUP_READS.labels("miss").inc()

        return on_access

    # -- recordings ---------------------------------------------------------------------------
    def start(self, manifest: str, layers: Iterable[str]) -> Recording:
        rec = Recording(f"rec-{next(self._ids)}-{int(time.time())}", manifest, tuple(dict.fromkeys(layers)))
        self._recordings[rec.id] = rec
        for d in rec.layers:
            self._by_layer.setdefault(d, []).append(rec)
        log.info("recording_started", recording=rec.id, manifest=manifest, layers=len(rec.layers))
        return rec

    def stop(self, rec_id: str) -> Recording:
        rec = self._recordings.pop(rec_id, None)
        if rec is None:
            raise KeyError(rec_id)
        for d in rec.layers:
            lst = self._by_layer.get(d, [])
            if rec in lst:
                lst.remove(rec)
            if not lst:
                self._by_layer.pop(d, None)
        log.info("recording_stopped", recording=rec.id, manifest=rec.manifest,
                 chunks=sum(len(v) for v in rec.seen.values()),
                 seconds=round(time.monotonic() - rec.started, 3))
        return rec

    # -- start-up windows ------------------------------------------------------------------------
    def open_windows(self, layers: Iterable[str], seconds: float) -> None:
        """Count first reads of these layers as start-up reads for ``seconds`` from now."""
        until = time.monotonic() + seconds
        for d in layers:
            if d not in self._windows:
                self._windows[d] = _Window(until)

    def _close_window(self, digest: str) -> None:
        win = self._windows.pop(digest, None)
        if win is not None and win.hits + win.misses:
            log.info("startup_reads", layer=digest, hits=win.hits, misses=win.misses,
                     hit_share=round(win.hits / (win.hits + win.misses), 4))

    def close_windows(self) -> None:
        for d in list(self._windows):
            self._close_window(d)
