"""iommud.eager: a coroutine's first step runs inline; only one that waits becomes a
task, and ``shielded`` keeps asyncio.shield's promise (the caller's cancellation does
not stop the work) either way."""

from __future__ import annotations

import asyncio

import pytest

from iommud.eager import resume, shielded


def _tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks()


async def test_a_coroutine_that_never_waits_makes_no_task() -> None:
    seen: list[set[asyncio.Task[object]]] = []

    async def work() -> int:
        seen.append(_tasks())
        return 7

    before = _tasks()
    assert await shielded(work()) == 7
    assert seen == [before]  # ran in the caller's task, no other task existed meanwhile
    assert _tasks() == before


async def test_an_error_in_the_first_step_reaches_the_caller() -> None:
    async def work() -> None:
        raise KeyError("first step")

    with pytest.raises(KeyError, match="first step"):
        await shielded(work())


async def test_a_coroutine_that_waits_goes_on_and_returns_its_value() -> None:
    gate = asyncio.Event()

    async def work() -> str:
        await gate.wait()
        return "done"

    caller = asyncio.ensure_future(shielded(work()))
    await asyncio.sleep(0)
    assert len(_tasks()) == 3  # this test, the caller and the work's own task
    gate.set()
    assert await caller == "done"


async def test_cancelling_the_caller_does_not_stop_the_work() -> None:
    gate = asyncio.Event()
    finished = asyncio.Event()
    steps: list[str] = []

    async def work() -> None:
        steps.append("started")  # the inline step
        await gate.wait()
        steps.append("finished")
        finished.set()

    caller = asyncio.ensure_future(shielded(work()))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert steps == ["started"]
    gate.set()
    await asyncio.wait_for(finished.wait(), 60)  # a hang guard: a cancelled work never sets it
    assert steps == ["started", "finished"]


async def test_an_error_after_waiting_reaches_the_caller() -> None:
    async def work() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    with pytest.raises(ValueError, match="later"):
        await shielded(work())


async def test_resume_passes_values_and_thrown_errors_through() -> None:
    """resume() is the task protocol: a task driving it sees the coroutine's waits, its
    result, and a cancellation thrown into it."""

    async def waits_then_returns() -> int:
        await asyncio.sleep(0)
        return 5

    coro = waits_then_returns()
    step = coro.send(None)
    assert await asyncio.ensure_future(resume(coro, step)) == 5

    gate = asyncio.Event()
    cleaned: list[bool] = []

    async def waits_forever() -> None:
        try:
            await gate.wait()
        finally:
            cleaned.append(True)

    coro2 = waits_forever()
    task = asyncio.ensure_future(resume(coro2, coro2.send(None)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]
