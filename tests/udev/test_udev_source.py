"""UdevSource on the real asyncio loop, fed by a fake monitor whose fd is a real pipe."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator

import pytest
import topology

from iommud.watch import (
    HostAction,
    HostEvent,
    Resync,
    SourceFailedError,
    SourceItem,
    UdevSource,
)
from tests.udev.fakemonitor import FakeMonitor, uevent


async def take(src: UdevSource, n: int) -> list[SourceItem]:
    out: list[SourceItem] = []
    async with asyncio.timeout(2):
        for _ in range(n):
            out.append(await anext(src))
    return out


async def drain_until_error(src: UdevSource) -> None:
    async with asyncio.timeout(2):
        while True:
            await anext(src)


@pytest.fixture
def monitor() -> Iterator[FakeMonitor]:
    m = FakeMonitor()
    yield m
    m.close()


BDF = topology.NIC


async def test_startup_resync_then_events_in_order(monitor: FakeMonitor) -> None:
    async with UdevSource("kernel", monitor=monitor) as src:
        monitor.feed(
            uevent("unbind", BDF, 1),
            uevent("add", "0000:00:14.0", 2, subsystem="usb"),
            uevent("bind", BDF, 3, "vfio-pci"),
        )
        items = await take(src, 3)
        assert items == [
            Resync("startup"),
            HostEvent(HostAction.UNBIND, BDF, None, 1),
            HostEvent(HostAction.BIND, BDF, "vfio-pci", 3),
        ]
        assert src.received == 3  # the usb uevent was read (for seqnums), then ignored


async def test_enobufs_resyncs_and_drops_what_it_subsumes(monitor: FakeMonitor) -> None:
    """ENOBUFS: queued events are dropped (the rescan covers them), the source carries on."""
    async with UdevSource("kernel", monitor=monitor) as src:
        assert await take(src, 1) == [Resync("startup")]
        monitor.feed(uevent("unbind", BDF, 1), OSError(errno.ENOBUFS, "No buffer space"))
        monitor.feed(uevent("bind", BDF, 9, "e1000"))
        items = await take(src, 2)
        # no seqnum_gap for 1 -> 9: ENOBUFS reset the tracker
        assert items == [Resync("enobufs"), HostEvent(HostAction.BIND, BDF, "e1000", 9)]
        assert src.resyncs["enobufs"] == 1


async def test_kernel_source_seqnum_gap_resyncs(monitor: FakeMonitor) -> None:
    """Events read in the same batch before the gap are dropped: the rescan covers them."""
    async with UdevSource("kernel", monitor=monitor) as src:
        assert await take(src, 1) == [Resync("startup")]
        monitor.feed(uevent("bind", BDF, 5, "e1000"), uevent("unbind", BDF, 7))
        assert await take(src, 2) == [
            Resync("seqnum_gap"),
            HostEvent(HostAction.UNBIND, BDF, None, 7),
        ]
        assert src.resyncs["seqnum_gap"] == 1


async def test_udev_source_tolerates_seqnum_gaps(monitor: FakeMonitor) -> None:
    """udevd filters and reorders: gaps there are normal and trigger nothing."""
    async with UdevSource("udev", monitor=monitor) as src:
        monitor.feed(uevent("bind", BDF, 5, "e1000"), uevent("unbind", BDF, 70))
        items = await take(src, 3)
        assert items == [
            Resync("startup"),
            HostEvent(HostAction.BIND, BDF, "e1000", 5),
            HostEvent(HostAction.UNBIND, BDF, None, 70),
        ]
        assert set(src.resyncs) == {"startup"}


async def test_backlog_collapses_into_one_resync(monitor: FakeMonitor) -> None:
    async with UdevSource("udev", monitor=monitor, max_pending=3) as src:
        monitor.feed(*(uevent("change", BDF, i) for i in range(10)))
        await asyncio.sleep(0.05)  # let the reader drain without a consumer
        items = await take(src, 1)
        assert items == [Resync("backlog")]
        assert src.resyncs["backlog"] >= 1


async def test_pyudev_errors_never_escape(monitor: FakeMonitor) -> None:
    """Any exception from the monitor becomes a Resync; the source keeps going."""
    async with UdevSource("udev", monitor=monitor) as src:
        assert await take(src, 1) == [Resync("startup")]
        monitor.feed(ValueError("pyudev confusion"))
        assert await take(src, 1) == [Resync("receive_error")]
        monitor.feed(uevent("remove", BDF, 3))
        assert await take(src, 1) == [HostEvent(HostAction.REMOVE, BDF, None, 3)]


async def test_persistent_failure_ends_with_kernel_error(monitor: FakeMonitor) -> None:
    async with UdevSource("kernel", monitor=monitor) as src:
        monitor.feed(*(OSError(errno.EBADF, "bad fd") for _ in range(40)))
        with pytest.raises(SourceFailedError) as info:
            await drain_until_error(src)
        assert info.value.errno == errno.EBADF
        assert info.value.details["op"] == "udev_monitor_receive"
        assert info.value.details["source"] == "kernel"


async def test_aclose_ends_iteration_and_unregisters(monitor: FakeMonitor) -> None:
    src = UdevSource("udev", monitor=monitor)
    await src.start()
    assert await take(src, 1) == [Resync("startup")]
    waiter = asyncio.ensure_future(anext(src))
    await asyncio.sleep(0)
    await src.aclose()
    with pytest.raises(StopAsyncIteration):
        await waiter
    loop = asyncio.get_running_loop()
    assert loop.remove_reader(monitor.r) is False  # nothing registered any more
