"""Free memory of the daemon's C heap (glibc malloc) handed back to the system.

Why: glibc keeps freed memory in its arenas for reuse. After a burst (a background fill
decodes a whole layer through megabyte buffers on several threads) the daemon would
otherwise keep that memory resident for its whole life, on top of what the next start
needs. A no-op without glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim() -> None:
    """``malloc_trim(0)``: walks every arena, so call it from a worker thread."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)  # type: ignore[operator]
