"""The udev glue driving the real Broker (fake kernel only at the kernel interface).

Synthetic uevents on the lab tree (tests/fakesys.lab_topology)::

    group 3:  0000:00:10.0  edu (alone)
    group 4:  0000:00:11.0  pci-bridge, 0000:01:01.0 edu, 0000:01:02.0 edu,
              0000:01:03.0  e1000 (bound: the group starts not viable)

A root "monitor" session subscribes to everything; a uid-1000 client claims edus.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import topology

from iommud.broker import Broker
from iommud.broker.events import Delivery
from iommud.broker.state import Session
from iommud.config import AccessRule, Config, DaemonConfig, ManageConfig
from iommud.fds import FdSet
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.watch import (
    HostAction,
    HostEvent,
    HostWatcher,
    Resync,
    UdevSource,
    broker_sink,
    watch_host,
)
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, lab_topology
from tests.serving import FdSnapshot
from tests.udev.fakemonitor import FakeMonitor, uevent

E1000_BDF = topology.NIC
EDUS = topology.BRIDGE_EDUS
A = HostAction


@dataclass
class Host:
    fs: FakeSys
    broker: Broker
    watcher: HostWatcher
    monitor: Session


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    before = FdSnapshot.take()
    fs = lab_topology(tmp_path / "root")
    config = Config(
        daemon=DaemonConfig(
            sys_root=fs.sys_root, dev_root=fs.dev_root, state_dir=tmp_path / "state"
        ),
        manage=ManageConfig(rebind=("1234:11e8",)),
        access=(AccessRule(uid=1000, devices=("1234:11e8",)),),
    )
    broker = Broker(config, FakeKernel(fs))
    await broker.start()
    watcher = HostWatcher(broker.view, broker_sink(broker))
    monitor = broker.open_session(Identity(uid=0, gid=0, pid=1))
    await broker.handle(monitor, m.Subscribe(id=1), FdSet())
    yield Host(fs, broker, watcher, monitor)
    await broker.aclose()
    before.assert_unchanged()


def deliveries(broker: Broker, session: Session) -> list[Delivery]:
    q = broker.events(session)
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def dump(event: m.Event) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude={"ts", "seq", "op", "fds"})


def drain(broker: Broker, session: Session) -> list[dict[str, Any]]:
    """The events queued for ``session``; none of them marked for a lease holder."""
    got = deliveries(broker, session)
    assert not any(d.for_holder for d in got)
    return [dump(d.event) for d in got]


async def test_startup_resync_against_the_brokers_view_is_silent(host: Host) -> None:
    """Seeded with the broker's snapshot, the startup rescan finds nothing to report."""
    await host.watcher.run(aiter_of(Resync("startup")))
    assert drain(host.broker, host.monitor) == []


async def test_bind_and_unbind_flip_viability_for_subscribers(host: Host) -> None:
    fs, w = host.fs, host.watcher
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF, None, 1))
    assert drain(host.broker, host.monitor) == [
        {"event": "driver_unbound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {"event": "viability_changed", "group_id": 4, "is_viable": True, "offenders": []},
    ]
    fs.bind(E1000_BDF, "e1000")
    await w.handle(HostEvent(A.BIND, E1000_BDF, "e1000", 2))
    assert drain(host.broker, host.monitor) == [
        {"event": "driver_bound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {
            "event": "viability_changed",
            "group_id": 4,
            "is_viable": False,
            "offenders": [{"bdf": E1000_BDF, "driver": "e1000"}],
        },
    ]
    assert host.broker.snapshot.devices[E1000_BDF].driver == "e1000"


async def test_unsafe_bind_on_an_owned_group_revokes_the_lease(host: Host) -> None:
    """The violation trigger: a DMA-unsafe bind the kernel let through ends the lease."""
    fs, w, broker = host.fs, host.watcher, host.broker
    fs.unbind(E1000_BDF)
    await w.handle(HostEvent(A.UNBIND, E1000_BDF))
    client = broker.open_session(Identity(uid=1000, gid=1000, pid=4242))
    outcome = await broker.handle(client, m.Claim(id=5, devices=EDUS), FdSet())
    reply = outcome.reply
    assert isinstance(reply, m.ClaimReply)
    for fd in outcome.fds:
        fd.close()
    drain(broker, host.monitor)

    fs.bind(E1000_BDF, "e1000")  # as if the kernel had not refused the probe
    await w.handle(HostEvent(A.BIND, E1000_BDF, "e1000", 9))
    reason = f"viability lost: {E1000_BDF} (e1000)"
    revoked = {"event": "lease_revoked", "lease_id": reply.lease_id, "group_id": 4}
    v2 = {"mode": "brokered", "grace_s": None}  # the daemon's events are v2's (v1 downgrades)
    assert drain(broker, host.monitor) == [
        {"event": "driver_bound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {
            "event": "viability_changed",
            "group_id": 4,
            "is_viable": False,
            "offenders": [{"bdf": E1000_BDF, "driver": "e1000"}],
        },
        {**revoked, "reason": reason, **v2},
    ]
    # the client hears it without subscribing: it is its own lease, so the queued
    # delivery says so (the connection lets it through any filter); no one else's does
    last = deliveries(broker, client)[-1]
    assert last.for_holder
    assert dump(last.event) == {**revoked, "reason": reason, **v2}
    await broker.close_session(client)


async def test_device_removal_is_reported(host: Host) -> None:
    host.fs.remove_device("0000:00:10.0")
    await host.watcher.handle(HostEvent(A.REMOVE, "0000:00:10.0"))
    assert drain(host.broker, host.monitor) == [
        {"event": "device_removed", "bdf": "0000:00:10.0", "group_id": 3},
    ]
    assert "0000:00:10.0" not in host.broker.snapshot.devices


async def aiter_of(*items: Any) -> AsyncIterator[Any]:
    for x in items:
        yield x


async def test_watch_host_wires_source_watcher_and_broker(host: Host) -> None:
    """The daemon's task: sets event_source, follows uevents, closes its source on cancel."""
    mon = FakeMonitor()
    try:
        src = UdevSource("kernel", monitor=mon)
        task = asyncio.create_task(watch_host(host.broker, source=src))
        await asyncio.sleep(0)
        assert host.broker.event_source == "kernel"
        host.fs.unbind(E1000_BDF)
        mon.feed(uevent("unbind", E1000_BDF, 40))
        q = host.broker.events(host.monitor)
        async with asyncio.timeout(2):
            first = (await q.get()).event
        assert isinstance(first, m.DriverUnbound)
        assert (first.bdf, first.driver, first.group_id) == (E1000_BDF, "e1000", 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert asyncio.get_running_loop().remove_reader(mon.r) is False
    finally:
        mon.close()
