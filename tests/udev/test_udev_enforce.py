"""Prevention and enforcement on owned groups, driven by synthetic uevents and real
inotify on the fake sysfs tree (the real Broker; the kernel faked at its interface).

The lab tree (tests/fakesys.lab_topology)::

    group 3:  0000:00:10.0  edu (alone)                      iommufd path
    group 4:  0000:00:11.0  pci-bridge, 0000:01:01.0 edu, 0000:01:02.0 edu,
              0000:01:03.0  e1000 (bound at start; unbound before the claims here)

A root "monitor" session subscribes to everything; a uid-1000 session claims. The
BindGuard watches the real files of the fake tree, so opening ``drivers/e1000/bind``
for writing and closing it without a successful write is what a refused bind looks like
to inotify (measured on 6.12: IN_CLOSE_WRITE without IN_MODIFY).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import topology
from topology import BRIDGE, EDU0, NIC

from iommud.broker import Broker
from iommud.broker.core import DEVICE_REQUESTED
from iommud.broker.guard import (
    IN_CLOSE_WRITE,
    IN_IGNORED,
    IN_MODIFY,
    BindGuard,
    SysfsWrite,
    WriteKind,
)
from iommud.broker.state import LeaseState, Session
from iommud.config import AccessRule, Config, DaemonConfig, ManageConfig
from iommud.fds import FdSet
from iommud.kernel.uapi import VFIO_PCI_REQ_IRQ_INDEX
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.watch import HostAction, HostEvent, HostWatcher, broker_sink
from tests.fakekernel import FakeKernel
from tests.fakesys import CLASS_EDU, CLASS_ETHERNET, E1000, EDU, FakeSys, lab_topology
from tests.serving import FdSnapshot, Logs, logged

EDUS = topology.BRIDGE_EDUS
HOT = "0000:01:05.0"
A = HostAction


@dataclass
class Host:
    fs: FakeSys
    kernel: FakeKernel
    broker: Broker
    watcher: HostWatcher
    monitor: Session
    state_dir: Path

    def override(self, bdf: str) -> str:
        return (self.fs.device_dir(bdf) / "driver_override").read_text().strip()

    async def claim(self, *devices: str) -> tuple[Session, m.ClaimReply]:
        client = self.broker.open_session(Identity(uid=1000, gid=1000, pid=4242))
        outcome = await self.broker.handle(client, m.Claim(id=5, devices=devices), FdSet())
        for fd in outcome.fds:
            fd.close()
        assert isinstance(outcome.reply, m.ClaimReply)
        return client, outcome.reply


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    before = FdSnapshot.take()
    fs = lab_topology(tmp_path / "root")
    state = tmp_path / "state"
    config = Config(
        daemon=DaemonConfig(sys_root=fs.sys_root, dev_root=fs.dev_root, state_dir=state),
        manage=ManageConfig(rebind=("1234:11e8",)),
        access=(AccessRule(uid=1000, devices=("1234:11e8",)),),
    )
    kernel = FakeKernel(fs)
    broker = Broker(config, kernel, restore_retry_delay=0.01)
    await broker.start()
    watcher = HostWatcher(broker.view, broker_sink(broker))
    monitor = broker.open_session(Identity(uid=0, gid=0, pid=1))
    await broker.handle(monitor, m.Subscribe(id=1), FdSet())
    fs.unbind(NIC)
    await watcher.handle(HostEvent(A.UNBIND, NIC))
    yield Host(fs, kernel, broker, watcher, monitor, state)
    await broker.aclose()
    before.assert_unchanged()


def drain(broker: Broker, session: Session) -> list[dict[str, Any]]:
    q = broker.events(session)
    out = []
    while not q.empty():
        out.append(q.get_nowait().event.model_dump(mode="json", exclude={"ts", "seq", "op", "fds"}))
    return out


async def next_event(broker: Broker, session: Session, name: str) -> dict[str, Any]:
    q = broker.events(session)
    async with asyncio.timeout(3):
        while True:
            ev = (await q.get()).event.model_dump(mode="json", exclude={"ts", "seq", "op", "fds"})
            if ev["event"] == name:
                return ev


async def status_of(broker: Broker, session: Session) -> m.StatusReply:
    reply = (await broker.handle(session, m.Status(id=1), FdSet())).reply
    assert isinstance(reply, m.StatusReply)
    return reply


async def settle(broker: Broker) -> None:
    """Let the guard's reader and the audit tasks it spawned run to the end."""
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not broker.state.tasks:
            return


async def test_hot_added_device_is_pinned_and_the_group_stays_owned(host: Host) -> None:
    """A device joining an owned group gets driver_override=vfio-pci at once, is
    journalled, and the lease stays active; once it leaves it is forgotten, and the
    release restores only the devices still there."""
    client, reply = await host.claim(*EDUS)
    drain(host.broker, host.monitor)
    host.fs.add_device(HOT, *EDU, CLASS_EDU, parent=BRIDGE, group=4)
    await host.watcher.handle(HostEvent(A.ADD, HOT))
    assert host.override(HOT) == "vfio-pci"
    # still viable, same offenders (none): no viability_changed
    assert drain(host.broker, host.monitor) == [
        {"event": "device_added", "bdf": HOT, "group_id": 4},
    ]
    status = await status_of(host.broker, client)
    assert [(le.lease_id, le.group_id) for le in status.leases] == [(reply.lease_id, 4)]
    assert HOT in (host.state_dir / "rebind-journal.json").read_text()
    assert host.broker.state.guard is not None
    assert str(host.fs.sys_root / "bus/pci/devices" / HOT / "driver_override") in (
        host.broker.state.guard.watches
    )

    host.fs.remove_device(HOT)
    await host.watcher.handle(HostEvent(A.REMOVE, HOT))
    assert HOT not in (host.state_dir / "rebind-journal.json").read_text()
    await host.broker.handle(client, m.Release(id=6, lease_id=reply.lease_id), FdSet())
    assert host.broker.pending_restores == {}
    assert [host.override(b) for b in (*EDUS, NIC)] == ["(null)"] * 3
    assert ("set_driver_override", HOT, None) not in host.kernel.calls
    await host.broker.close_session(client)


async def test_hot_added_device_already_on_an_unsafe_driver_revokes(host: Host) -> None:
    """The enforcement trigger: a new member that came up with e1000 before we could
    pin it ends the lease (DMA blocked), and it is pinned anyway."""
    client, reply = await host.claim(*EDUS)
    drain(host.broker, host.monitor)
    host.fs.add_device(HOT, *E1000, CLASS_ETHERNET, parent=BRIDGE, group=4, driver="e1000")
    await host.watcher.handle(HostEvent(A.ADD, HOT))
    await host.watcher.handle(HostEvent(A.BIND, HOT, "e1000"))
    reason = f"viability lost: {HOT} (e1000)"
    assert await next_event(host.broker, client, "lease_revoked") == {
        "event": "lease_revoked",
        "lease_id": reply.lease_id,
        "group_id": 4,
        "reason": reason,
        "mode": "brokered",  # the daemon's events are v2's (a v1 connection downgrades)
        "grace_s": None,
    }
    assert host.override(HOT) == "vfio-pci"
    (lease,) = client.leases.values()
    assert (lease.state, lease.revoke_reason) == (LeaseState.REVOKED, reason)
    await host.broker.close_session(client)
    host.fs.remove_device(HOT)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_WRONLY | os.O_TRUNC], ids=["write", "echo"])
async def test_refused_bind_on_an_owned_device_is_reported(
    host: Host, logs: Logs, flags: int
) -> None:
    """drivers/e1000/bind opened for writing and closed with nothing bound (the kernel
    refused it): bind_refused names the NIC (e1000 drove it), e1000, group 4. Also when
    opened as a shell's ``echo >`` does, with O_TRUNC, which raises IN_MODIFY by itself."""
    client, _ = await host.claim(*EDUS)
    await settle(host.broker)
    drain(host.broker, host.monitor)
    bind = host.fs.sys_root / "bus/pci/drivers/e1000/bind"
    os.close(os.open(bind, flags))
    ev = await next_event(host.broker, host.monitor, "bind_refused")
    assert ev == {
        "event": "bind_refused",
        "bdf": NIC,
        "driver": "e1000",
        "group_id": 4,
        "reason": f"a write to {bind} was refused: driver_override of {NIC} is pinned to "
        "vfio-pci while IOMMU group 4 is owned",
    }
    await settle(host.broker)
    assert drain(host.broker, host.monitor) == []  # one attempt, one report
    assert len(logged(logs, "guard.bind_refused", bdf=NIC, driver="e1000", group_id=4)) == 1
    await host.broker.close_session(client)


async def test_refused_bind_is_reported_for_a_device_never_seen_on_its_driver(
    tmp_path: Path,
) -> None:
    """F2: the NIC was driver-less when the daemon started (as a crash can leave it), so
    the daemon never saw it on e1000; another NIC of the same model is on e1000. Root
    clears the owned NIC's override and tries e1000: bind_refused names the NIC."""
    before = FdSnapshot.take()
    fs = lab_topology(tmp_path / "root")
    fs.unbind(NIC)
    fs.add_device("0000:00:04.0", *E1000, CLASS_ETHERNET, group=7, driver="e1000")
    config = Config(
        daemon=DaemonConfig(
            sys_root=fs.sys_root, dev_root=fs.dev_root, state_dir=tmp_path / "state"
        ),
        manage=ManageConfig(rebind=("1234:11e8",)),
        access=(AccessRule(uid=1000, devices=("1234:11e8",)),),
    )
    broker = Broker(config, FakeKernel(fs), restore_retry_delay=0.01)
    await broker.start()
    try:
        monitor = broker.open_session(Identity(uid=0, gid=0, pid=1))
        client = broker.open_session(Identity(uid=1000, gid=1000, pid=4242))
        outcome = await broker.handle(client, m.Claim(id=5, devices=EDUS), FdSet())
        for fd in outcome.fds:
            fd.close()
        await settle(broker)
        assert "e1000" not in broker.view.seen_drivers.get(NIC, set())
        drain(broker, monitor)
        (fs.device_dir(NIC) / "driver_override").write_text("\n")
        bind = fs.sys_root / "bus/pci/drivers/e1000/bind"
        os.close(os.open(bind, os.O_WRONLY))
        ev = await next_event(broker, monitor, "bind_refused")
        assert (ev["bdf"], ev["driver"], ev["group_id"]) == (NIC, "e1000", 4)
        await settle(broker)
        assert [e["event"] for e in drain(broker, monitor)] == []  # only the NIC
        await broker.close_session(client)
    finally:
        await broker.aclose()
    before.assert_unchanged()


async def test_accepted_bind_and_unknown_driver_are_not_reported(host: Host) -> None:
    """A bind write that succeeded (IN_MODIFY) is the uevent's business; a refused one
    by a driver never seen on an owned device cannot be attributed: neither is an event."""
    client, _ = await host.claim(*EDUS)
    await settle(host.broker)
    drain(host.broker, host.monitor)
    host.fs.unbind("0000:00:1f.0")
    host.fs.bind("0000:00:1f.0", "e1000")  # what the kernel does inside the write below
    (host.fs.sys_root / "bus/pci/drivers/e1000/bind").write_text("0000:00:1f.0")
    host.fs.driver_dir("nvme")
    await host.broker.on_host_change(4)  # a re-check picks up a driver registered since
    os.close(os.open(host.fs.sys_root / "bus/pci/drivers/nvme/bind", os.O_WRONLY))
    await settle(host.broker)
    assert host.broker.state.guard is not None
    assert host.broker.state.guard.seen >= 2
    assert drain(host.broker, host.monitor) == []
    await host.broker.close_session(client)


async def test_tampered_override_is_pinned_again(host: Host) -> None:
    client, _ = await host.claim(*EDUS)
    await settle(host.broker)
    (host.fs.device_dir(NIC) / "driver_override").write_text("e1000\n")
    for _ in range(100):
        await asyncio.sleep(0.01)
        if host.override(NIC) == "vfio-pci":
            break
    assert host.override(NIC) == "vfio-pci"
    await host.broker.close_session(client)


async def test_guard_watches_only_while_a_group_is_owned(host: Host) -> None:
    guard = host.broker.state.guard
    assert guard is not None
    assert guard.watches == {}
    client, _ = await host.claim(EDU0)
    kinds = sorted(set(guard.watches.values()))
    assert kinds == ["bind", "driver_override", "drivers_probe"]
    assert [p for p, k in guard.watches.items() if k == "driver_override"] == [
        str(host.fs.sys_root / "bus/pci/devices" / EDU0 / "driver_override")
    ]
    assert not any("vfio-pci" in p for p in guard.watches)  # DMA-safe drivers are not watched
    await host.broker.close_session(client)
    assert guard.watches == {}


def test_parse_folds_modify_into_close_and_drops_ignored(tmp_path: Path) -> None:
    """Raw inotify records: MODIFY then CLOSE_WRITE with a device newly bound to the
    driver is an accepted write; CLOSE_WRITE alone, or MODIFY (an O_TRUNC open) with no
    new device, a refused one; IN_IGNORED forgets the watch."""
    import struct

    got: list[SysfsWrite] = []
    g = BindGuard(tmp_path, got.append)
    drv = tmp_path / "bus/pci/drivers/e1000"
    drv.mkdir(parents=True)
    g._by_wd = {1: g_target("e1000", str(drv / "bind"))}  # type: ignore[dict-item]
    g._by_path = {"p": 1}

    def rec(wd: int, mask: int) -> bytes:
        return struct.pack("iIII", wd, mask, 0, 16) + b"\0" * 16

    (drv / NIC).symlink_to(tmp_path)  # the kernel bound the NIC during the write
    out = g.parse(rec(1, IN_MODIFY) + rec(1, IN_CLOSE_WRITE) + rec(1, IN_CLOSE_WRITE))
    out += g.parse(rec(1, IN_MODIFY) + rec(1, IN_CLOSE_WRITE))  # O_TRUNC, nothing bound
    assert [(w.kind, w.name, w.accepted) for w in out] == [
        (WriteKind.BIND, "e1000", True),
        (WriteKind.BIND, "e1000", False),
        (WriteKind.BIND, "e1000", False),
    ]
    assert g.parse(rec(1, IN_IGNORED) + rec(1, IN_CLOSE_WRITE)) == []
    assert g._by_wd == {}


def g_target(driver: str, path: str) -> object:
    from iommud.broker.guard import _Target

    return _Target(WriteKind.BIND, driver, path)


async def test_kernel_request_revokes_and_gives_the_device_back(host: Host) -> None:
    """vfio-pci's REQ irq (hot-unplug): lease_revoked with the reason, the daemon's
    device fd closed; the remove uevent then ends the lease and forgets the device."""
    client, reply = await host.claim(EDU0)
    assert ("set_irq_eventfd", EDU0, VFIO_PCI_REQ_IRQ_INDEX) in host.kernel.calls
    assert host.kernel.signal_irq(EDU0, VFIO_PCI_REQ_IRQ_INDEX)
    assert await next_event(host.broker, client, "lease_revoked") == {
        "event": "lease_revoked",
        "lease_id": reply.lease_id,
        "group_id": 3,
        "reason": DEVICE_REQUESTED,
        "mode": "brokered",
        "grace_s": None,
    }
    await settle(host.broker)
    (lease,) = client.leases.values()
    assert all(ld.device.closed and ld.request_fd is None for ld in lease.devices)
    assert (EDU0, VFIO_PCI_REQ_IRQ_INDEX) not in host.kernel.irq_eventfds

    host.fs.remove_device(EDU0)
    await host.watcher.handle(HostEvent(A.REMOVE, EDU0))
    assert client.leases == {}
    assert (await status_of(host.broker, client)).leases == ()
    assert host.broker.pending_restores == {}
    assert EDU0 not in (host.state_dir / "rebind-journal.json").read_text()
    await host.broker.close_session(client)
