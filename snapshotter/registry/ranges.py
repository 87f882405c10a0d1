"""Range arithmetic: coalescing nearby reads into fewer HTTP requests, Content-Range."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from snapshotter.registry.errors import ProtocolError

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


@dataclass(slots=True)
class Span:
    """One request covering ``[start, end)``; ``parts`` are (index, start, end) of callers."""

    start: int
    end: int
    parts: list[tuple[int, int, int]] = field(default_factory=list)


def check_range(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ProtocolError(f"invalid byte range [{start}, {end})")


def coalesce(ranges: list[tuple[int, int]], gap: int, max_len: int) -> list[Span]:
    """Merge ranges that overlap or lie within ``gap`` bytes, up to ``max_len`` per span.

    Empty ranges get a zero-length part in whichever span they fall near (or their own).
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    spans: list[Span] = []
    for i in order:
        s, e = ranges[i]
        check_range(s, e)
        cur = spans[-1] if spans else None
        if cur is not None and s <= cur.end + gap and max(e, cur.end) - cur.start <= max_len:
            cur.end = max(cur.end, e)
            cur.parts.append((i, s, e))
        else:
            spans.append(Span(s, e, [(i, s, e)]))
    return spans


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` → (a, b + 1, total or None)."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise ProtocolError(f"unparseable Content-Range {value!r}")
    a, b = int(m[1]), int(m[2])
    if b < a:
        raise ProtocolError(f"invalid Content-Range {value!r}")
    return a, b + 1, None if m[3] == "*" else int(m[3])
