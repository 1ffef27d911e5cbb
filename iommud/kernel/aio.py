"""The one place that decides whether a kernel call leaves the event loop.

Coroutines call the kernel as ``await aio.call(op, fn, *args)``. ``COSTS`` names every
``op`` the daemon makes from a coroutine and what it costs:

- ``INSTANT``: an ioctl that only touches the kernel's bookkeeping (allocate an id,
  look one up, register an eventfd): microseconds, so it runs inline on the loop;
- ``PIN``: pinning or unpinning pages (mm/gup.c pin_user_pages, plus the IOMMU page
  table writes): proportional to the range. Callers say how many bytes (``aio.pin``);
  up to ``INLINE_PIN_BYTES`` it runs inline (a 4 KiB map is microseconds, and a worker
  hand-off cost 55-100 us on the host, ~8 ms in the emulated lab), above that on the
  ``work`` pool. A pin of pages known to be resident and already mapped by the daemon,
  and every unpin, allocate and fault nothing (``pin_resident``): up to
  ``INLINE_RESIDENT_PIN_BYTES`` they stay on the loop;
- ``BLOCKING``: work bounded by its size (a device reset, reading the whole sysfs tree,
  the journal's fsync): it runs on the ``work`` pool;
- ``SYSFS``: a sysfs driver write, which can block for as long as a client holds a
  device (unbinding vfio-pci waits for every holder: drivers/vfio/vfio_main.c
  vfio_unregister_group_dev): it runs on the ``sysfs`` pool, so a stuck unbind never
  takes a worker that a pin needs.

An op missing from ``COSTS`` is a KeyError: the table is the decision, not the caller.

The pools are fixed sets of daemon threads, all started when this module is imported
(at daemon start-up, before the loop runs); nothing ever starts a thread on demand.
They are daemon threads, never the loop's default executor: asyncio.Runner.close()
joins that executor without a timeout on Python 3.11, so one unbind stuck behind a
client's open device fd would hang SIGTERM forever. Work that finds every worker of its
pool busy waits in the pool's queue (unbounded: its callers are themselves bounded,
one per request or restore); a caller that must not wait forever puts a timeout on the
future (iommud.broker.drivers does). A busy worker is named ``iommud-<pool>:<op>``.

Cancelling the awaiting task does not stop the thread (nothing can interrupt a call
sleeping in the kernel); a result that arrives after that, or after the loop closed,
is dropped. No policy here and no knowledge of what the calls do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Final, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class Cost(enum.Enum):
    INSTANT = "instant"
    PIN = "pin"
    BLOCKING = "work"
    SYSFS = "sysfs"


COSTS: Final[Mapping[str, Cost]] = {
    # ioctls on kernel bookkeeping only
    "IOMMU_IOAS_ALLOC": Cost.INSTANT,
    "IOMMU_DESTROY": Cost.INSTANT,
    "IOMMU_IOAS_IOVA_RANGES": Cost.INSTANT,
    "IOMMU_IOAS_MAP_FILE probe": Cost.INSTANT,
    "VFIO_DEVICE_GET_INFO": Cost.INSTANT,
    "VFIO_DEVICE_SET_IRQS": Cost.INSTANT,
    # pin or unpin pages: proportional to the range (mm/gup.c pin_user_pages); the
    # daemon's own bulk fault-in of a range before its pin (MADV_POPULATE_*)
    "IOMMU_IOAS_MAP": Cost.PIN,
    "IOMMU_IOAS_MAP_FILE": Cost.PIN,
    "IOMMU_IOAS_UNMAP": Cost.PIN,
    "VFIO_IOMMU_MAP_DMA": Cost.PIN,
    "VFIO_IOMMU_UNMAP_DMA": Cost.PIN,
    "populate+map": Cost.PIN,
    # a function-level reset waits for the device (up to seconds: drivers/pci/pci.c)
    "VFIO_DEVICE_RESET": Cost.BLOCKING,
    # sysfs reads of a whole tree or group, the journal's write-and-fsync
    "read_snapshot": Cost.BLOCKING,
    "read_group": Cost.BLOCKING,
    "journal_read": Cost.BLOCKING,
    "journal_write": Cost.BLOCKING,
    # a walk of every process's fd tables and maps (iommud.kernel.procs), and waiting
    # for a killed process's files to close
    "holder_scan": Cost.BLOCKING,
    # sysfs driver writes (iommud.kernel.sysfs_bind): may block indefinitely
    "driver_override": Cost.SYSFS,
    "rebind": Cost.SYSFS,
    "restore": Cost.SYSFS,
}

# Chosen, not measured: a few pins at a time keep both cores of a small host busy
# without starving the loop; eight sysfs writers allow several restores stuck behind
# held device fds before a new driver change queues.
POOL_SIZES: Final[Mapping[Cost, int]] = {Cost.BLOCKING: 4, Cost.SYSFS: 8}
# Up to 1 MiB (256 pages) a pin or unpin stays on the loop: on real hardware that is
# tens of microseconds, about a ping; larger ranges go to the work pool.
INLINE_PIN_BYTES: Final = 1 << 20
# A pin of resident, already-mapped pages (mm/gup.c: the PTE is there, no fault, no
# zeroing) or an unpin walks page tables and writes IOMMU PTEs only: 16 MiB (4,096 pages)
# costs about what 1 MiB of first-touch faults does. Measured in the lab: a 16 MiB
# resident IOMMU_IOAS_MAP took 1.7 ms under TCG, the worker hand-off around it 2-5 ms.
INLINE_RESIDENT_PIN_BYTES: Final = 16 << 20

_Job = tuple[str, Callable[[], object], asyncio.AbstractEventLoop, "asyncio.Future[object]"]


class WorkerPool:
    """``size`` daemon threads started at once, taking jobs from one queue."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"iommud-{name}-idle", daemon=True)
            for _ in range(size)
        ]
        for t in self.threads:
            t.start()

    def submit(self, op: str, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``fn``; its outcome completes the returned future on the running loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        # Like asyncio.to_thread: the job sees the caller's context (structlog's bindings).
        ctx = contextvars.copy_context()
        self._jobs.put((op, lambda: ctx.run(fn), loop, fut))  # type: ignore[arg-type]
        return fut

    def _work(self) -> None:
        me = threading.current_thread()
        idle = me.name
        while True:
            op, fn, loop, fut = self._jobs.get()
            me.name = f"iommud-{self.name}:{op}"
            value: object = None
            error: BaseException | None = None
            try:
                value = fn()
            except BaseException as exc:
                error = exc
            me.name = idle
            # RuntimeError: the loop closed while this thread was blocked (daemon stopped).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, value, error)
            # Hold nothing of a finished job while idle (it may own fds).
            del op, fn, loop, fut, value, error


def _settle(fut: asyncio.Future[object], value: object, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


_POOLS: Final = {cost: WorkerPool(cost.value, n) for cost, n in POOL_SIZES.items()}


def submit(op: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
    """Start ``op`` on the pool ``COSTS`` names and return its future (for timeouts).

    An INSTANT op runs here and returns a completed future.
    """
    cost = COSTS[op]
    if cost is Cost.INSTANT:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut
    return _POOLS[_pool(cost)].submit(op, lambda: fn(*args, **kwargs))


async def call(op: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` inline or on a worker, as ``COSTS[op]`` says (a PIN op
    through here always leaves the loop: use :func:`pin` when the size is known)."""
    cost = COSTS[op]
    if cost is Cost.INSTANT:
        return fn(*args, **kwargs)
    return await _POOLS[_pool(cost)].submit(op, lambda: fn(*args, **kwargs))


async def pin(op: str, nbytes: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """A PIN op over ``nbytes``: inline up to INLINE_PIN_BYTES, else on the work pool."""
    return await _pin(op, nbytes, INLINE_PIN_BYTES, lambda: fn(*args, **kwargs))


async def pin_resident(
    op: str, nbytes: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """A PIN op over ``nbytes`` of pages that fault nothing: an unpin, or a pin of pages
    the caller checked are resident and already mapped. Inline up to
    INLINE_RESIDENT_PIN_BYTES, else on the work pool."""
    return await _pin(op, nbytes, INLINE_RESIDENT_PIN_BYTES, lambda: fn(*args, **kwargs))


async def _pin(op: str, nbytes: int, inline: int, thunk: Callable[[], T]) -> T:
    if COSTS[op] is not Cost.PIN:
        raise KeyError(f"{op} is not a PIN op")
    if nbytes <= inline:
        return thunk()
    return await _POOLS[Cost.BLOCKING].submit(op, thunk)


def _pool(cost: Cost) -> Cost:
    return Cost.BLOCKING if cost is Cost.PIN else cost


def pool_threads() -> list[threading.Thread]:
    """Every worker thread (for tests and status): the set never grows."""
    return [t for p in _POOLS.values() for t in p.threads]
