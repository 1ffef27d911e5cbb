"""HostWatcher and the host view's owner on a fake sysfs tree: per-event group refresh,
viability flips, rescans. The watcher keeps nothing: ``view`` is the one snapshot.

The tree is tests/fakesys.lab_topology (the QEMU lab guest)::

    group 3:  0000:00:10.0  edu (alone)
    group 4:  0000:00:11.0  pci-bridge, 0000:01:01.0 edu, 0000:01:02.0 edu,
              0000:01:03.0  e1000 (bound to e1000: the group is not viable)
    groups 0, 5, 6: host bridge, lpc_ich + ahci, virtio-pci
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import topology
from topology import BRIDGE

import iommud.broker.hostview as hostview_mod
import iommud.host.snapshot as snapshot_mod
from iommud.broker.hostview import HostChange, HostView
from iommud.errors import SnapshotError
from iommud.host.snapshot import HostSnapshot
from iommud.watch import (
    HostAction,
    HostEvent,
    HostWatcher,
    Resync,
    SourceItem,
    UdevSource,
)
from tests.fakesys import CLASS_EDU, CLASS_ETHERNET, E1000, EDU, FakeSys, lab_topology
from tests.udev.fakemonitor import FakeMonitor, uevent
from tests.udev.views import view_of, wire

E1000_BDF = topology.NIC
A = HostAction


class Recorder:
    def __init__(self) -> None:
        self.changes: list[HostChange] = []

    async def __call__(self, change: HostChange) -> None:
        self.changes.append(change)

    def take(self) -> list[HostChange]:
        out, self.changes = self.changes, []
        return out


@pytest.fixture
def fs(tmp_path: Path) -> FakeSys:
    return lab_topology(tmp_path)


@pytest.fixture
def view(fs: FakeSys) -> HostView:
    return view_of(fs)


@pytest.fixture
async def watcher(view: HostView) -> tuple[HostWatcher, Recorder]:
    rec = Recorder()
    w = HostWatcher(view, rec)
    await w.rescan("startup")
    rec.take()
    return w, rec


async def items(*xs: SourceItem) -> AsyncIterator[SourceItem]:
    for x in xs:
        yield x


async def test_startup_rescan_reports_every_group(view: HostView) -> None:
    rec = Recorder()
    w = HostWatcher(view, rec)
    assert view.is_stale
    await w.run(items(Resync("startup")))
    assert [c.group_id for c in rec.changes] == [0, 3, 4, 5, 6]
    assert all(c.resync == "startup" for c in rec.changes)
    assert len(view.snapshot.devices) == 9
    g4 = next(c for c in rec.changes if c.group_id == 4)
    assert g4.before is None  # the group did not exist in the empty view
    assert wire([g4])[-1] == {
        "event": "viability_changed",
        "group_id": 4,
        "is_viable": False,
        "offenders": [{"bdf": E1000_BDF, "driver": "e1000"}],
    }


async def test_unbind_then_bind_flips_viability(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    """Unbinding e1000 makes the bridge group viable; binding it back breaks it again."""
    w, rec = watcher
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF, None, 100))
    changes = rec.take()
    assert [c.group_id for c in changes] == [4]
    # the kernel's unbind uevent has no DRIVER: the watcher fills it from its view
    assert changes[0].events == (HostEvent(A.UNBIND, E1000_BDF, "e1000", 100),)
    assert wire(changes) == [
        {"event": "driver_unbound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {"event": "viability_changed", "group_id": 4, "is_viable": True, "offenders": []},
    ]
    assert view.snapshot.devices[E1000_BDF].driver is None

    fs.bind(E1000_BDF, "e1000")
    await w.handle(HostEvent(A.BIND, E1000_BDF, "e1000", 101))
    assert wire(rec.take()) == [
        {"event": "driver_bound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {
            "event": "viability_changed",
            "group_id": 4,
            "is_viable": False,
            "offenders": [{"bdf": E1000_BDF, "driver": "e1000"}],
        },
    ]


async def test_safe_bind_keeps_viability_and_says_so(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    """vfio-pci on an edu of an unviable group: driver_bound only, no viability event."""
    w, rec = watcher
    fs.bind("0000:01:01.0", "vfio-pci")
    await w.handle(HostEvent(A.BIND, "0000:01:01.0", "vfio-pci", 7))
    assert wire(rec.take()) == [
        {"event": "driver_bound", "bdf": "0000:01:01.0", "driver": "vfio-pci", "group_id": 4}
    ]
    assert view.snapshot.devices["0000:01:01.0"].vfio_cdev == "vfio0"


async def test_removal_uses_the_last_view(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    """sysfs is gone on remove: the group comes from the previous snapshot."""
    w, rec = watcher
    fs.remove_device(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF, None, 1))
    await w.handle(HostEvent(A.REMOVE, E1000_BDF, None, 2))
    assert wire(rec.take()) == [
        {"event": "driver_unbound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {"event": "viability_changed", "group_id": 4, "is_viable": True, "offenders": []},
        {"event": "device_removed", "bdf": E1000_BDF, "group_id": 4},
    ]
    assert E1000_BDF not in view.snapshot.devices
    assert E1000_BDF not in view.snapshot.groups[4].devices


async def test_hot_add_into_a_group(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    w, rec = watcher
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF))
    rec.take()
    fs.add_device("0000:01:04.0", *E1000, CLASS_ETHERNET, parent=BRIDGE, group=4)
    await w.handle(HostEvent(A.ADD, "0000:01:04.0"))
    fs.bind("0000:01:04.0", "e1000")
    await w.handle(HostEvent(A.BIND, "0000:01:04.0", "e1000"))
    assert wire(rec.take()) == [
        {"event": "device_added", "bdf": "0000:01:04.0", "group_id": 4},
        {"event": "driver_bound", "bdf": "0000:01:04.0", "driver": "e1000", "group_id": 4},
        {
            "event": "viability_changed",
            "group_id": 4,
            "is_viable": False,
            "offenders": [{"bdf": "0000:01:04.0", "driver": "e1000"}],
        },
    ]
    assert "0000:01:04.0" in view.snapshot.groups[4].devices


async def test_change_event_refreshes_quietly(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    """A change uevent re-reads the group (driver_override here) but emits nothing."""
    w, rec = watcher
    fs.set_driver_override("0000:01:02.0", "vfio-pci")
    await w.handle(HostEvent(A.CHANGE, "0000:01:02.0"))
    assert wire(rec.take()) == []
    assert view.snapshot.devices["0000:01:02.0"].driver_override == "vfio-pci"


async def test_event_reads_only_its_group(
    fs: FakeSys,
    watcher: tuple[HostWatcher, Recorder],
    monkeypatch: pytest.MonkeyPatch,
    view: HostView,
) -> None:
    """Per-event work: one group_of and one read_group, never a full read_snapshot."""
    w, _ = watcher
    calls: list[tuple[str, object]] = []
    real_group, real_of = snapshot_mod.read_group, snapshot_mod.group_of

    def counting_group(sys_root: Path, gid: int) -> Any:
        calls.append(("read_group", gid))
        return real_group(sys_root, gid)

    def counting_of(sys_root: Path, bdf: str) -> int | None:
        calls.append(("group_of", bdf))
        return real_of(sys_root, bdf)

    def no_snapshot(*a: object) -> HostSnapshot:
        raise AssertionError("full rescan on a single event")

    monkeypatch.setattr(hostview_mod, "read_group", counting_group)
    monkeypatch.setattr(hostview_mod, "group_of", counting_of)
    monkeypatch.setattr(hostview_mod, "read_snapshot", no_snapshot)
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF))
    assert calls == [("group_of", E1000_BDF), ("read_group", 4)]


async def test_lost_events_resync_synthesizes_what_happened(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    """ENOBUFS after uevents were dropped: the rescan reports the same story."""
    w, rec = watcher
    fs.unbind(E1000_BDF)  # no uevent reaches us for these
    fs.add_device("0000:00:12.0", *EDU, CLASS_EDU, group=7)
    await w.run(items(Resync("enobufs")))
    changes = rec.take()
    assert [(c.group_id, c.resync) for c in changes] == [(4, "enobufs"), (7, "enobufs")]
    assert wire(changes) == [
        {"event": "driver_unbound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {"event": "viability_changed", "group_id": 4, "is_viable": True, "offenders": []},
        {"event": "device_added", "bdf": "0000:00:12.0", "group_id": 7},
        {"event": "viability_changed", "group_id": 7, "is_viable": True, "offenders": []},
    ]
    # nothing changed since: another rescan reports nothing
    await w.rescan("seqnum_gap")
    assert rec.take() == []


async def test_source_enobufs_and_gap_drive_rescans(
    fs: FakeSys, watcher: tuple[HostWatcher, Recorder], view: HostView
) -> None:
    """End to end: UdevSource(kernel) over a fake monitor feeding the watcher."""
    w, rec = watcher
    mon = FakeMonitor()
    try:
        async with UdevSource("kernel", monitor=mon) as src:
            task = asyncio.create_task(w.run(src))
            fs.unbind(E1000_BDF)
            mon.feed(uevent("unbind", E1000_BDF, 10))
            await wait_for(lambda: rec.changes)
            assert wire(rec.take())[0]["event"] == "driver_unbound"
            rescans = view.rescans
            fs.bind(E1000_BDF, "e1000")  # its uevent (seq 11) is lost: ENOBUFS
            mon.feed(OSError(errno.ENOBUFS, "No buffer space available"))
            await wait_for(lambda: view.rescans > rescans)
            assert [c.resync for c in rec.changes] == ["enobufs"]
            assert wire(rec.take())[0] == {
                "event": "driver_bound",
                "bdf": E1000_BDF,
                "driver": "e1000",
                "group_id": 4,
            }
            mon.feed(uevent("change", "0000:00:10.0", 20))  # first after reset: fine
            mon.feed(uevent("change", "0000:00:10.0", 25))  # 21..24 lost: gap
            await wait_for(lambda: src.resyncs["seqnum_gap"] == 1 and view.rescans > rescans + 1)
        await asyncio.wait_for(task, 2)  # the source ended: run() returns
    finally:
        mon.close()


async def wait_for(cond: Any) -> None:
    """Poll a condition the watcher task will make true (bounded by 2 s)."""
    async with asyncio.timeout(2):
        while not cond():  # noqa: ASYNC110 - the watcher offers no event to wait on
            await asyncio.sleep(0.005)


async def test_sink_failure_does_not_stop_the_watcher(view: HostView) -> None:
    seen: list[int] = []

    async def flaky(change: HostChange) -> None:
        seen.append(change.group_id)
        if change.group_id == 4:
            raise RuntimeError("broker bug")

    w = HostWatcher(view, flaky)
    await w.rescan("startup")
    assert seen == [0, 3, 4, 5, 6]


async def test_unreadable_group_falls_back_to_rescan(
    fs: FakeSys,
    watcher: tuple[HostWatcher, Recorder],
    monkeypatch: pytest.MonkeyPatch,
    view: HostView,
) -> None:
    w, rec = watcher

    def broken(sys_root: Path, gid: int) -> Any:
        raise SnapshotError("garbled", path="x", problem="not a hex number")

    monkeypatch.setattr(hostview_mod, "read_group", broken)
    rescans = view.rescans
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF))
    assert view.rescans == rescans + 1
    assert [c.resync for c in rec.take()] == ["unreadable_group"]
    assert view.snapshot.devices[E1000_BDF].driver is None


async def test_failed_rescan_leaves_view_stale_until_next_event(
    fs: FakeSys,
    watcher: tuple[HostWatcher, Recorder],
    monkeypatch: pytest.MonkeyPatch,
    view: HostView,
) -> None:
    w, rec = watcher
    real = snapshot_mod.read_snapshot

    def broken(*a: Any) -> HostSnapshot:
        raise SnapshotError("garbled", path="x", problem="missing")

    monkeypatch.setattr(hostview_mod, "read_snapshot", broken)
    await w.rescan("enobufs")
    assert view.is_stale
    monkeypatch.setattr(hostview_mod, "read_snapshot", real)
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF))
    assert not view.is_stale
    assert [c.resync for c in rec.take()] == ["stale"]
