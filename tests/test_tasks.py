"""TaskSet: background tasks held until done, failures said once, closed together."""
from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from snapshotter.tasks import TaskSet


async def test_a_failure_is_one_log_line_unless_its_awaiter_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazysnap.tasks")
    tasks = TaskSet("owner")

    async def fail(why: str) -> None:
        raise RuntimeError(why)

    loud = tasks.spawn(fail("loud"), name="loud-task")
    quiet = tasks.spawn(fail("quiet"), name="quiet-task", report=False)
    await asyncio.gather(loud, quiet, return_exceptions=True)
    await asyncio.sleep(0)  # done-callbacks run on the next turn
    failed = [r for r in caplog.records if r.getMessage() == "task_failed"]
    assert len(failed) == 1
    assert failed[0].fields == {"owner": "owner", "task": "loud-task", "error": "RuntimeError: loud"}
    assert len(tasks) == 0


async def test_tasks_are_held_until_done_and_closed_together() -> None:
    tasks = TaskSet("owner")
    started, cancelled = asyncio.Event(), []

    async def forever(i: int) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    for i in range(3):
        tasks.spawn(forever(i), name=f"t{i}")
    gc.collect()  # the loop holds tasks weakly: the set keeps them
    await started.wait()
    assert len(tasks) == 3 and sorted(t.get_name() for t in tasks) == ["t0", "t1", "t2"]
    await tasks.aclose()
    assert sorted(cancelled) == [0, 1, 2]
    assert len(tasks) == 0


async def test_cancel_without_waiting() -> None:
    tasks = TaskSet("owner")
    task = tasks.spawn(asyncio.Event().wait(), name="waits")
    await asyncio.sleep(0)
    tasks.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
