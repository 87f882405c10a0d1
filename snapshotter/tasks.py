"""Background tasks of one component, held in one place.

A task nobody awaits has three ways to go wrong: the event loop keeps only a weak
reference to it (it can be collected mid-flight), its exception is printed as a traceback
when it is collected ("Task exception was never retrieved") instead of as one log line,
and at shutdown it is cancelled by nobody or cancelled and never awaited. ``TaskSet``
holds each task until it is done, names it, says how it failed, and cancels and awaits
the rest on ``aclose``. Work whose failure its awaiter reports (a layer's Prepare, a fetch
a reader waits on) is spawned with ``report=False``: marked retrieved, not logged twice.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from snapshotter.log import get_logger

log = get_logger("lazysnap.tasks")

T = TypeVar("T")


class TaskSet:
    """The background tasks of ``owner`` (a name for the log). Loop thread only."""

    __slots__ = ("owner", "_tasks")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str, report: bool = True) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this set. ``report``: log its exception as one error
        line (``task_failed``); otherwise its awaiter reports it."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reported if report else self._retrieved)
        return task

    def _retrieved(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()

    def _reported(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_failed", owner=self.owner, task=task.get_name(),
                      error=f"{type(exc).__name__}: {exc}"[:300])

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def cancel(self) -> None:
        """Cancel every task (they finish on the loop's next turns)."""
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every task and wait until all have finished."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
