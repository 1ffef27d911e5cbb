"""iommud.kernel.aio: the one adapter that decides what leaves the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path

import pytest

from iommud.kernel import aio

PACKAGE = Path(aio.__file__).resolve().parents[1]


def test_no_other_module_leaves_the_loop_on_its_own() -> None:
    """Every thread hop of the daemon goes through iommud.kernel.aio."""
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p != Path(aio.__file__).resolve()
        and any(
            word in p.read_text()
            for word in (
                "to_thread(",
                "run_in_executor(",
                "threading.Thread(",
                "ThreadPoolExecutor(",
                "_thread.start",
                "MonitorObserver(",  # pyudev's observer is a thread of its own
            )
        )
    ]
    assert offenders == []


def test_the_pools_exist_from_import_and_never_grow() -> None:
    """Daemon threads, started at import, and no new thread for any call."""
    workers = aio.pool_threads()
    assert len(workers) == sum(aio.POOL_SIZES.values())
    assert all(t.daemon and t.is_alive() for t in workers)
    before = set(threading.enumerate())

    async def many() -> None:
        await asyncio.gather(*(aio.call("read_snapshot", sum, [i, 1]) for i in range(50)))
        await asyncio.gather(*(aio.call("restore", sum, [i, 1]) for i in range(50)))

    asyncio.run(many())
    assert set(threading.enumerate()) <= before | set(workers)


async def test_instant_ops_run_inline_and_blocking_ones_on_a_worker() -> None:
    loop_thread = threading.get_ident()
    assert await aio.call("IOMMU_IOAS_ALLOC", threading.get_ident) == loop_thread
    worker = await aio.call("IOMMU_IOAS_MAP", threading.get_ident)
    assert worker != loop_thread
    assert worker in {t.ident for t in aio.pool_threads()}


async def test_small_pins_run_inline_and_large_ones_on_a_worker() -> None:
    """One place decides: up to INLINE_PIN_BYTES a pin is an ioctl of microseconds."""
    loop_thread = threading.get_ident()
    small = await aio.pin("IOMMU_IOAS_MAP", aio.INLINE_PIN_BYTES, threading.get_ident)
    assert small == loop_thread
    large = await aio.pin("VFIO_IOMMU_MAP_DMA", aio.INLINE_PIN_BYTES + 1, threading.get_ident)
    assert large in {t.ident for t in aio.pool_threads()}
    with pytest.raises(KeyError):
        await aio.pin("read_snapshot", 1, threading.get_ident)  # not a pin


async def test_resident_pins_run_inline_up_to_their_own_limit() -> None:
    """Pages that fault nothing (an unpin, a pin of resident, daemon-mapped pages) stay on
    the loop up to INLINE_RESIDENT_PIN_BYTES, larger ones leave it."""
    loop_thread = threading.get_ident()
    assert aio.INLINE_RESIDENT_PIN_BYTES > aio.INLINE_PIN_BYTES
    n = aio.INLINE_RESIDENT_PIN_BYTES
    assert await aio.pin_resident("IOMMU_IOAS_UNMAP", n, threading.get_ident) == loop_thread
    large = await aio.pin_resident("IOMMU_IOAS_MAP", n + 1, threading.get_ident)
    assert large in {t.ident for t in aio.pool_threads()}
    with pytest.raises(KeyError):
        await aio.pin_resident("read_snapshot", 1, threading.get_ident)  # not a pin


async def test_errors_and_context_cross_back() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("bound in the caller")
    assert await aio.call("journal_write", var.get) == "bound in the caller"

    def boom() -> None:
        raise OSError(5, "EIO")

    with pytest.raises(OSError, match="EIO"):
        await aio.call("VFIO_DEVICE_RESET", boom)
    with pytest.raises(KeyError):
        await aio.call("not an op", boom)


async def test_a_stuck_sysfs_write_does_not_hold_up_a_pin() -> None:
    """The sysfs pool and the work pool are separate: an unbind that waits for a client
    (here: for an event) leaves every pin worker free."""
    release = threading.Event()
    stuck = [aio.submit("rebind", release.wait, 30) for _ in range(aio.POOL_SIZES[aio.Cost.SYSFS])]
    try:
        # Every sysfs worker must hold its stuck write before the pin is tried (workers
        # pick their jobs up asynchronously; on a loaded machine that takes a while).
        for _ in range(3000):  # hang guard only: 30 s
            if _busy_sysfs() == ["iommud-sysfs:rebind"] * len(stuck):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"the sysfs workers never all took their job: {_busy_sysfs()}")
        assert await asyncio.wait_for(aio.call("IOMMU_IOAS_MAP", lambda: 7), 30) == 7
        assert _busy_sysfs() == ["iommud-sysfs:rebind"] * len(stuck)  # still stuck
    finally:
        release.set()
    assert await asyncio.gather(*stuck) == [True] * len(stuck)


def _busy_sysfs() -> list[str]:
    return [t.name for t in aio.pool_threads() if t.name.startswith("iommud-sysfs:rebind")]
