"""Coroutines that run their first step at once, as Python 3.12's eager tasks do.

Most of the daemon's work never waits: a ping, a list page, a 4 KiB map or unmap run
from start to end on the loop. Wrapping such a coroutine in a task (``create_task``,
``asyncio.shield``) costs a task object and at least one more turn of the loop before the
caller sees its result. Here the coroutine's first step runs inline; only one that
really waits goes on as a task, from where it stopped (:func:`resume`).

- :func:`resume`: go on with a started coroutine as a task's body;
- :func:`shielded`: ``await asyncio.shield(coro)`` without the task when ``coro``
  finishes in its first step. The step runs in the caller's context (a shield's task
  would run in a copy: nothing here sets context variables).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], step: Any) -> Generator[Any, Any, T]:
    """Go on with ``coro`` after its first step (which yielded ``step``), as a task.

    Passes what the coroutine yields (the future it waits on, or None for a bare
    yield) to the task and the task's answers (a value or a thrown exception, such as
    a cancellation) back: the task protocol of asyncio.tasks.Task.__step, unchanged.
    """
    while True:
        try:
            sent = yield step
        except BaseException as exc:
            try:
                step = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                step = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """``await asyncio.shield(coro)``: cancelling the caller does not stop ``coro``.

    Its first step runs here, where no cancellation can reach it; if that step waits,
    the rest goes on in a task that the caller's cancellation leaves running.
    """
    try:
        step = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return await asyncio.shield(asyncio.ensure_future(resume(coro, step)))
