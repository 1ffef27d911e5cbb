"""A revoke freezes the session's iommufd (iommud.broker.freeze): every IOAS unmapped,
maps refused until the revoked lease is released AND every copy of its device fd is
closed, because a still-bound device fd can be re-attached to any IOAS by the client."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from typing import Any

import pytest

from iommud.broker import Broker
from iommud.errors import KernelError, RevokedError
from iommud.kernel import aio
from iommud.kernel.linux import HwInfo, LinuxIommuFd
from iommud.protocol import messages as m
from tests.broker.support import ALICE, EDU, PAGE, Client, memfd
from tests.fakekernel import FakeIommuFd, FakeKernel
from tests.fakesys import CLASS_EDU, FakeSys
from tests.fakesys import EDU as EDU_IDS

EDU2 = "0000:00:12.0"
FROZEN = (
    "lease {lease} (IOMMU group 3) was revoked: this session's iommufd takes no maps "
    "until that lease is released and every copy of its device fds is closed"
)


async def _two_ioases(c: Client) -> tuple[m.ClaimReply, int, int]:
    """EDU claimed into IOAS A, a second IOAS B; one page of ``ram`` mapped in each."""
    reply = await c.claim(EDU)
    created = await c.call(m.IoasCreate(id=c.next_id()))
    assert isinstance(created, m.IoasCreateReply)
    ram = memfd(4 * PAGE, data=b"guest")
    await c.map(reply.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x7000))
    await c.map(created.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x9000))
    return reply, created.ioas_id, ram


def _frozen(
    ioas_id: int, lease: int, waiting_for: str, devices: list[str]
) -> tuple[str, dict[str, Any]]:
    return FROZEN.format(lease=lease), {
        "lease_id": lease,
        "group_id": 3,
        "reason": "admin says so",
        "waiting_for": waiting_for,
        "devices": devices,
        "ioas_id": ioas_id,
    }


# IOAS B's id in the session's iommufd: IOAS A is 1 and the bound device 2 (the kernel
# numbers IOASes and devices in one id space per iommufd).
B_KID = 3


async def _refused_map(c: Client, ioas_id: int, ram: int) -> RevokedError:
    with pytest.raises(RevokedError) as ei:
        await c.map(ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0xB000))
    return ei.value


async def test_revoke_unmaps_every_ioas_and_a_reattached_device_gets_no_dma(
    broker: Broker, kernel: FakeKernel
) -> None:
    """Both IOASes are emptied; the client re-attaching its revoked device fd to IOAS B
    (VFIO_DEVICE_ATTACH_IOMMUFD_PT on its own copy) finds nothing mapped there."""
    c = Client(broker, ALICE)
    reply, _b_id, ram = await _two_ioases(c)
    ictx = c.session.iommufd
    assert isinstance(ictx, FakeIommuFd)
    assert kernel.dma_read(ictx, B_KID, 0x9000, 5) == b"guest"  # B maps the guest's memory
    kernel.calls.clear()
    assert await broker.revoke_group(3, "admin says so") == [reply.lease_id]
    assert kernel.ops("detach_ioas", "ioas_unmap_all") == [
        ("detach_ioas", EDU),
        ("ioas_unmap_all", 1),
        ("ioas_unmap_all", B_KID),
    ]
    assert [i.mappings for i in c.session.ioases.values()] == [{}, {}]
    ev = broker.events(c.session).get_nowait().event
    assert isinstance(ev, m.LeaseRevoked)
    assert (ev.lease_id, ev.group_id, ev.reason) == (reply.lease_id, 3, "admin says so")
    # The attack: the device fd is still bound to the iommufd, so attaching works...
    (dev_fd,) = c.received
    kernel.client_attach(dev_fd, B_KID)
    assert EDU in ictx.ioas[B_KID].attached
    # ...but there is nothing to reach.
    with pytest.raises(KeyError):
        kernel.dma_read(ictx, B_KID, 0x9000, 5)
    assert ictx.ioas[1].space.areas == {}
    assert ictx.ioas[B_KID].space.areas == {}
    await c.close()
    os.close(ram)


async def test_maps_stay_refused_until_released_and_every_device_fd_is_closed(
    broker: Broker, kernel: FakeKernel
) -> None:
    """Refused in both IOASes while the lease exists, still refused after release while
    the client keeps its device fd, accepted once that fd is closed."""
    c = Client(broker, ALICE)
    reply, b_id, ram = await _two_ioases(c)
    lease = reply.lease_id
    await broker.revoke_group(3, "admin says so")
    for ioas_id in (reply.ioas_id, b_id):
        err = await _refused_map(c, ioas_id, ram)
        assert (err.message, err.details) == _frozen(ioas_id, lease, "release", [EDU])
    kernel.calls.clear()
    await c.call(m.Release(id=c.next_id(), lease_id=lease))
    # Released, but the client still holds its copy: the device is bound.
    assert c.session.leases == {}
    err = await _refused_map(c, b_id, ram)
    assert (err.message, err.details) == _frozen(b_id, lease, "device_fds_closed", [EDU])
    assert kernel.ops("ioas_map", "ioas_map_file") == []
    assert len(c.session.freezes) == 1
    c.close_received()  # the last copy of the device fd
    done = await c.map(b_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0xB000))
    assert done.mappings == (m.MappedRange(iova=0xB000, length=PAGE),)
    assert c.session.freezes == {}
    ictx = c.session.iommufd
    assert isinstance(ictx, FakeIommuFd)
    assert kernel.dma_read(ictx, B_KID, 0xB000, 5) == b"guest"  # DMA works again
    await c.close()
    os.close(ram)


async def test_release_after_closing_the_fd_lifts_the_freeze_at_once(broker: Broker) -> None:
    """A client that closes its device fds before releasing is unfrozen by the release."""
    c = Client(broker, ALICE)
    reply, b_id, ram = await _two_ioases(c)
    await broker.revoke_group(3, "admin says so")
    c.close_received()
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    assert c.session.freezes == {}
    await c.map(b_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0xB000))
    await c.close()
    os.close(ram)


async def test_iommufd_claims_are_refused_while_frozen(
    broker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """A new bind into the frozen iommufd could reuse the revoked device's id: refused."""
    fs.add_device(EDU2, *EDU_IDS, CLASS_EDU, group=7)
    c = Client(broker, ALICE)
    reply, _b_id, ram = await _two_ioases(c)
    await broker.revoke_group(3, "admin says so")
    with pytest.raises(RevokedError) as ei:
        await c.claim(EDU2)
    assert ei.value.message == FROZEN.format(lease=reply.lease_id)
    assert ei.value.details == {
        "lease_id": reply.lease_id,
        "group_id": 3,
        "reason": "admin says so",
        "waiting_for": "release",
        "devices": [EDU],
        "claim_group_id": 7,
    }
    assert kernel.ops("bind_iommufd") == [("bind_iommufd", EDU, 2)]  # IOAS A is 1
    c.close_received()
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    again = await c.claim(EDU2)  # thawed: claims work again
    assert again.group_id == 7
    await c.close()
    os.close(ram)


async def test_a_map_pinning_while_the_revoke_lands_is_undone(
    broker: Broker, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoke while a map request is inside the kernel: the map is unmapped again and
    the request answers revoked, so nothing stays mapped after the revoke."""
    # Only a pin on a worker can be overtaken; small pins run inline (iommud.kernel.aio).
    monkeypatch.setattr(aio, "INLINE_PIN_BYTES", 0)
    c = Client(broker, ALICE)
    reply, b_id, ram = await _two_ioases(c)
    ictx = c.session.iommufd
    assert isinstance(ictx, FakeIommuFd)
    entered, go = threading.Event(), threading.Event()
    real_map = ictx.ioas_map

    def slow_map(*args: Any) -> int:
        entered.set()
        go.wait(5)
        return real_map(*args)

    monkeypatch.setattr(ictx, "ioas_map", slow_map)
    task = asyncio.create_task(
        c.map(b_id, ram, m.MapRange(fd_index=0, offset=PAGE, length=PAGE, iova=0xC000))
    )
    assert await asyncio.to_thread(entered.wait, 5)
    await broker.revoke_group(3, "admin says so")
    go.set()
    with pytest.raises(RevokedError) as ei:
        await task
    assert (ei.value.message, ei.value.details) == _frozen(b_id, reply.lease_id, "release", [EDU])
    assert ictx.ioas[B_KID].space.areas == {}
    assert c.session.ioases[b_id].mappings == {}
    await c.close()
    os.close(ram)


async def test_a_failing_probe_keeps_the_freeze(broker: Broker, kernel: FakeKernel) -> None:
    """Fail closed: a bound-probe error other than 'unbound' leaves the iommufd frozen."""
    c = Client(broker, ALICE)
    reply, b_id, ram = await _two_ioases(c)
    await broker.revoke_group(3, "admin says so")
    c.close_received()
    kernel.fail_next("is_device_bound", errno.EIO)
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))  # probes, fails
    assert list(c.session.freezes) == [reply.lease_id]
    await c.map(b_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0xB000))
    assert c.session.freezes == {}  # the next probe works: thawed
    await c.close()
    os.close(ram)


def test_linux_is_device_bound_maps_enoent_to_unbound(monkeypatch: pytest.MonkeyPatch) -> None:
    """IOMMU_GET_HW_INFO: success = bound, ENOENT = unbound, anything else is raised."""
    ictx = LinuxIommuFd(-1)
    outcomes: list[KernelError | None] = [
        None,
        KernelError("IOMMU_GET_HW_INFO", errno.ENOENT),
        KernelError("IOMMU_GET_HW_INFO", errno.ENOTTY),
    ]

    def get_hw_info(dev_id: int) -> HwInfo:
        assert dev_id == 7
        exc = outcomes.pop(0)
        if exc is not None:
            raise exc
        return HwInfo(data_type=1, capabilities=0, max_pasid_log2=0, data=b"")

    monkeypatch.setattr(ictx, "get_hw_info", get_hw_info)
    assert ictx.is_device_bound(7) is True
    assert ictx.is_device_bound(7) is False
    with pytest.raises(KernelError) as ei:
        ictx.is_device_bound(7)
    assert (ei.value.op, ei.value.errno) == ("IOMMU_GET_HW_INFO", errno.ENOTTY)
