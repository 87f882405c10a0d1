"""Run the daemon filesystem on its own event loop in a thread.

The daemon runs ``LazyFS`` on the layer provider's loop thread. The C workers answer most
requests, but a read that needs a fetch is answered by that loop: tools that touch the
mount with blocking calls from the same process (benchmarks, tests) must not block it,
so they run the filesystem here instead.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from snapshotter.fs.lazyfs import LazyFS

T = TypeVar("T")


class FuseThread:
    def __init__(self, mountpoint: Path | str, **fs_options: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.fs = LazyFS(mountpoint, **fs_options)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self.loop.run_forever, name="lazysnap-fuse", daemon=True)
        self._thread.start()
        try:
            self.run(self.fs.start)
        except BaseException:
            self._stop_loop()
            raise

    def run(self, fn: Callable[[], Awaitable[T]], timeout: float = 120) -> T:
        """Run a coroutine function on the filesystem's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], T], timeout: float = 120) -> T:
        """Run a plain function on the loop (e.g. ``fs.add_layer``)."""

        async def wrap() -> T:
            return fn()

        return self.run(wrap, timeout)

    def stop(self) -> None:
        try:
            self.run(self.fs.stop, timeout=30)
            self.run(self._cancel_rest, timeout=30)
        finally:
            self._stop_loop()

    @staticmethod
    async def _cancel_rest() -> None:
        """Cancel what still runs on the loop (e.g. a fetcher's read-ahead) and let it unwind,
        so no task is destroyed pending when the loop goes."""
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FuseThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

