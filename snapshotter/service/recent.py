"""Recent trouble for ``lazysnap status``: remote-layer fallbacks and the last warnings.

``Fallbacks`` is filled by the snapshotter when a layer goes to containerd for a normal
download; ``RecentErrors`` is a logging handler on the ``lazysnap`` logger that keeps the
newest warning and error events (their fields passed through the same redaction as the
log, so a status answer can never carry a credential the log would not).
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

from snapshotter.log import RedactFilter, redact

__all__ = ["Fallback", "Fallbacks", "RecentError", "RecentErrors"]

KEEP = 50


@dataclass(slots=True, frozen=True)
class Fallback:
    time: float  # unix time
    image_ref: str
    layer_digest: str
    reason: str  # short and machine-readable (metrics label lazysnap_remote_fallbacks_total)
    detail: str


@dataclass(slots=True)
class Fallbacks:
    """The newest ``KEEP`` fallbacks, oldest first."""

    items: collections.deque[Fallback] = field(default_factory=lambda: collections.deque(maxlen=KEEP))

    def add(self, image_ref: str, layer_digest: str, reason: str, detail: str) -> None:
        self.items.append(Fallback(time.time(), image_ref, layer_digest, reason, redact(detail)[:500]))

    def list(self) -> list[Fallback]:
        return list(self.items)


@dataclass(slots=True, frozen=True)
class RecentError:
    time: float
    level: str
    logger: str
    event: str
    fields: dict[str, str]


class RecentErrors(logging.Handler):
    """Keeps the newest ``KEEP`` warning/error events logged below ``lazysnap``."""

    def __init__(self, keep: int = KEEP) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(RedactFilter())
        self._items: collections.deque[RecentError] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        raw = record.__dict__.get("fields")
        fields = {str(k): str(v)[:300] for k, v in raw.items()} if isinstance(raw, dict) else {}
        self._items.append(RecentError(record.created, record.levelname.lower(), record.name,
                                       record.getMessage(), fields))

    def list(self) -> list[RecentError]:
        return list(self._items)

    def install(self) -> None:
        logging.getLogger("lazysnap").addHandler(self)

    def uninstall(self) -> None:
        logging.getLogger("lazysnap").removeHandler(self)
