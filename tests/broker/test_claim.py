"""Claim and release through the broker with the fake kernel and the lab's fake sysfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.broker.journal import Journal
from iommud.errors import (
    BusyError,
    GroupSplitError,
    NotViableError,
    PermissionDeniedError,
    QuotaExceededError,
)
from iommud.protocol import messages as m
from tests.broker.support import (
    ALICE,
    BOB,
    BR_EDU1,
    BR_EDU2,
    E1000,
    EDU,
    MALLORY,
    PAGE,
    Client,
    memfd,
)
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys


def driver(fs: FakeSys, bdf: str) -> str | None:
    link = fs.sys_root / "bus" / "pci" / "devices" / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def override(fs: FakeSys, bdf: str) -> str:
    return (fs.sys_root / "bus" / "pci" / "devices" / bdf / "driver_override").read_text().strip()


async def test_claim_1to1_iommufd_dma_and_release(
    broker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """The edu alone in its group: vfio-pci bound, cdev bound+attached, a DMA lands, all undone."""
    c = Client(broker, ALICE)
    reply = await c.claim(EDU)
    assert (reply.backend, reply.group_id, reply.fds) == ("iommufd", 3, 1)
    # The IOAS (id 1) is allocated before the bind: one id space per iommufd.
    assert reply.devices == (m.ClaimedDevice(bdf=EDU, fd_index=0, devid=2),)
    assert len(c.received) == 1
    assert driver(fs, EDU) == "vfio-pci"
    assert override(fs, EDU) == "vfio-pci"
    assert kernel.ops("bind_iommufd", "attach_ioas") == [
        ("bind_iommufd", EDU, 2),
        ("attach_ioas", EDU, 1),
    ]

    ram = memfd(4 * PAGE, data=b"hello from the guest")
    mapped = await c.map(
        reply.ioas_id, ram, m.MapRange(fd_index=0, offset=PAGE, length=2 * PAGE, iova=0x100000)
    )
    assert mapped.mappings == (m.MappedRange(iova=0x100000, length=2 * PAGE),)
    ictx = c.session.iommufd
    assert ictx is not None
    # A device write lands in the client's memfd, at offset PAGE + 16.
    kernel.dma_write(ictx, 1, 0x100000 + 16, b"DMA!")  # type: ignore[arg-type]
    assert os.pread(ram, 4, PAGE + 16) == b"DMA!"
    os.pwrite(ram, b"to device", PAGE)
    assert kernel.dma_read(ictx, 1, 0x100000, 9) == b"to device"  # type: ignore[arg-type]

    c.close_received()  # the VMM closes its device fd, then releases
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    assert driver(fs, EDU) is None
    assert override(fs, EDU) == "(null)"
    assert broker.pending_restores == {}
    calls = kernel.calls
    detach = kernel.index("detach_ioas", EDU)
    close = kernel.index("close", "device", EDU)
    unbind = kernel.index("unbind", EDU, "vfio-pci")
    assert kernel.index("reset", EDU) < close
    assert detach < close < unbind, calls
    # The IOAS stays with the session (release ends the lease, not the mappings).
    await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=reply.ioas_id, iova=0x100000, length=2 * PAGE))
    await c.close()
    os.close(ram)


async def test_claim_bridge_group_legacy_rebinds_e1000_and_restores(
    broker: Broker, kernel: FakeKernel, fs: FakeSys, tmp_path: Path
) -> None:
    """Two edus behind the bridge: legacy path; e1000 moved to vfio-pci, back to e1000 after."""
    c = Client(broker, ALICE)
    reply = await c.claim(BR_EDU1, BR_EDU2)
    assert (reply.backend, reply.group_id, reply.fds) == ("legacy", 4, 2)
    assert [d.bdf for d in reply.devices] == [BR_EDU1, BR_EDU2]
    assert driver(fs, E1000) == "vfio-pci"
    for bdf in ("0000:00:11.0", BR_EDU1, BR_EDU2, E1000):
        assert override(fs, bdf) == "vfio-pci", bdf
    assert kernel.ops("set_container", "set_iommu", "get_device_fd") == [
        ("set_container", 4),
        ("set_iommu", "container"),
        ("get_device_fd", BR_EDU1),
        ("get_device_fd", BR_EDU2),
    ]
    ram = memfd(2 * PAGE)
    mapped = await c.map(reply.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=2 * PAGE))
    assert mapped.mappings == (m.MappedRange(iova=0, length=2 * PAGE),)
    assert kernel.ops("map_dma") == [("map_dma", 0, 2 * PAGE)]

    c.close_received()
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    assert driver(fs, E1000) == "e1000"
    assert driver(fs, BR_EDU1) is None
    assert all(override(fs, b) == "(null)" for b in (BR_EDU1, BR_EDU2, E1000, "0000:00:11.0"))
    assert kernel.index("unmap_all") < kernel.index("close", "device", BR_EDU1)
    assert kernel.index("close", "group", "4") < kernel.index("bind", "e1000", E1000)
    assert Journal(tmp_path / "state").load() == []  # every device is back: nothing to replay
    await c.close()
    os.close(ram)


async def test_second_client_gets_busy_with_owner(broker: Broker) -> None:
    a, b = Client(broker, ALICE), Client(broker, BOB)
    reply = await a.claim(EDU)
    with pytest.raises(BusyError) as ei:
        await b.claim(EDU)
    assert ei.value.details == {
        "reason": "held",
        "group_id": 3,
        "uid": 1000,
        "pid": 4242,
        "lease_id": reply.lease_id,
    }
    assert len(b.received) == 0
    await a.close()
    await b.close()


async def test_uid_without_rule_is_denied_naming_the_rule(broker: Broker, fs: FakeSys) -> None:
    c = Client(broker, MALLORY)
    with pytest.raises(PermissionDeniedError) as ei:
        await c.claim(EDU)
    assert ei.value.details == {
        "bdf": EDU,
        "uid": 2000,
        "gid": 2000,
        "rule": None,
        "reason": "no rule matched uid 2000 gid 2000",
    }
    assert driver(fs, EDU) is None  # nothing was touched
    await c.close()


async def test_device_outside_the_rule_is_denied(broker: Broker, kernel: FakeKernel) -> None:
    """uid 1000 may claim edus only; the e1000 is refused by access[0]."""
    c = Client(broker, ALICE)
    with pytest.raises(PermissionDeniedError) as ei:
        await c.claim(E1000)
    assert ei.value.details["rule"] == 0
    assert kernel.ops("set_driver_override") == []
    await c.close()


async def test_group_split_into_two_ioases_is_refused(broker: Broker, fs: FakeSys) -> None:
    c = Client(broker, ALICE)
    first = await c.claim(BR_EDU1, backend="legacy")
    with pytest.raises(GroupSplitError) as ei:
        await c.claim(BR_EDU2)  # a new IOAS: the group would be split
    assert ei.value.details["reason"] == "different_ioas"
    # Into the same IOAS it is fine.
    second = await c.claim(BR_EDU2, ioas_id=first.ioas_id)
    assert (second.backend, second.ioas_id) == ("legacy", first.ioas_id)
    c.close_received()
    await c.close()
    assert driver(fs, E1000) == "e1000"


async def test_not_viable_when_offender_may_not_be_rebound(
    tmp_path: object, fs: FakeSys, kernel: FakeKernel, no_fd_leak: None
) -> None:
    """Without [manage] rebind for e1000 the bridge group stays not viable; details name it."""
    from pathlib import Path

    from tests.broker.support import make_config

    cfg = make_config(Path(str(tmp_path)), fs)
    cfg = cfg.model_copy(
        update={"manage": cfg.manage.model_copy(update={"rebind": ("1234:11e8",)})}
    )
    b = Broker(cfg, kernel, sysfs_timeout=1.0)
    await b.start()
    c = Client(b, ALICE)
    with pytest.raises(NotViableError) as ei:
        await c.claim(BR_EDU1, BR_EDU2)
    assert ei.value.details == {"group_id": 4, "offenders": [{"bdf": E1000, "driver": "e1000"}]}
    assert driver(fs, E1000) == "e1000"
    assert kernel.ops("set_driver_override", "unbind") == []
    await b.aclose()


async def test_claim_beyond_the_ioas_quota_touches_nothing(
    broker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """The quota is part of the plan: refused before any journal entry or sysfs write."""
    c = Client(broker, ALICE)
    for _ in range(4):
        await c.call(m.IoasCreate(id=c.next_id()))
    with pytest.raises(QuotaExceededError) as ei:
        await c.claim(EDU)
    assert ei.value.details == {"quota": "max_ioas", "limit": 4, "used": 4, "requested": 1}
    assert kernel.ops("set_driver_override", "unbind", "drivers_probe") == []
    assert driver(fs, EDU) is None
    await c.close()
