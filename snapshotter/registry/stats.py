"""Counters the caller can read (and a hook to export them, e.g. to Prometheus).

``registry_bytes`` counts response body bytes received from any registry/storage/auth
server; ``requests`` counts HTTP requests sent. Both are also split per purpose
("manifest", "blob", "range", "auth", "push", "referrers", "size").
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RegistryStats:
    registry_bytes: int = 0
    requests: int = 0
    bytes_by_purpose: Counter[str] = field(default_factory=Counter)
    requests_by_purpose: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    redirects: int = 0
    range_ignored: int = 0
    mirror_fallbacks: int = 0
    observer: Callable[[str, str, int], None] | None = None  # (event, purpose, value)

    def request(self, purpose: str) -> None:
        self.requests += 1
        self.requests_by_purpose[purpose] += 1
        if self.observer:
            self.observer("request", purpose, 1)

    def received(self, purpose: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.registry_bytes += nbytes
        self.bytes_by_purpose[purpose] += nbytes
        if self.observer:
            self.observer("bytes", purpose, nbytes)

    def snapshot(self) -> dict[str, Any]:
        return {"registry_bytes": self.registry_bytes, "requests": self.requests,
                "bytes_by_purpose": dict(self.bytes_by_purpose),
                "requests_by_purpose": dict(self.requests_by_purpose),
                "retries": self.retries, "redirects": self.redirects,
                "range_ignored": self.range_ignored, "mirror_fallbacks": self.mirror_fallbacks}
