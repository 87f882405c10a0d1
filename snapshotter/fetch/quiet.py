"""Futures whose failure is reported elsewhere."""
from __future__ import annotations

import asyncio
from typing import Any


def quiet_failure(fut: asyncio.Future[Any]) -> None:
    """A done-callback marking a future's exception retrieved: the waiter that owns the
    work (``LayerFetcher.ensure``, ``WindowCache.ensure``) reports the failure, so asyncio
    must not log it again as never retrieved when nobody else awaited the future."""
    if not fut.cancelled():
        fut.exception()
