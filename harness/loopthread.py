"""Run aiohttp servers on a private event loop in a daemon thread.

Test servers (token server, fault proxy) must work from sync and async tests alike,
and must not share the test's event loop (a blocking test would stall them).
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)  # type: ignore[arg-type]

    def serve(self, app: web.Application, port: int = 0) -> int:
        """Start ``app`` on 127.0.0.1 (a free port unless given); return the port."""

        async def start() -> int:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            self._runners.append(runner)
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        return self.call(start)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def cleanup() -> None:
            for runner in self._runners:
                await runner.cleanup()

        try:
            self.call(cleanup, timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
