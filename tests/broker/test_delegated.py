"""Delegated claims (protocol v2) against the fake kernel: a fresh per-process-accounted
iommufd and unbound cdevs out, the host side as for any claim, and the take-back
(detach through the daemon's copies, unmap every IOAS, close, restore)."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.broker.delegation import unmap_every_ioas
from iommud.config import AccessRule
from iommud.errors import (
    InvalidStateError,
    KernelError,
    NotDelegableError,
    NotFoundError,
    PermissionDeniedError,
)
from iommud.kernel.interface import MapFlag
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.protocol.v2 import ClaimMode, ClaimReplyV2, ClaimV2
from tests.broker.support import (
    ALICE,
    BR_EDU1,
    BR_EDU2,
    E1000,
    EDU,
    ROOT,
    Client,
    make_config,
)
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys

DELEGATED = ClaimMode.DELEGATED
RW = MapFlag.READABLE | MapFlag.WRITEABLE
VM_RAM = 0x10000


@pytest.fixture
async def dbroker(
    no_fd_leak: None, tmp_path: Path, fs: FakeSys, kernel: FakeKernel
) -> AsyncIterator[Broker]:
    """A broker whose uid 1000 rule grants ``delegate``."""
    config = make_config(tmp_path, fs)
    config = config.model_copy(
        update={"access": (AccessRule(uid=1000, devices=("1234:11e8",), delegate=True),)}
    )
    b = Broker(config, kernel, sysfs_timeout=1.0, restore_retry_delay=0.01)
    await b.start()
    yield b
    await b.aclose(grace=5.0)


async def claim_delegated(client: Client, *devices: str, **kw: object) -> ClaimReplyV2:
    reply = await client.call(ClaimV2(id=client.next_id(), devices=devices, mode=DELEGATED, **kw))
    assert isinstance(reply, ClaimReplyV2)
    return reply


def driver(fs: FakeSys, bdf: str) -> str | None:
    link = fs.sys_root / "bus" / "pci" / "devices" / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.exists() else None


async def test_delegated_claim_hands_out_a_fresh_iommufd_and_an_unbound_cdev(
    dbroker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """RLIMIT_MODE is per-process before the fd leaves; the cdev is not bound; the
    daemon makes no IOAS; the device is on vfio-pci, journalled as for any claim."""
    client = Client(dbroker, ALICE)
    reply = await claim_delegated(client, EDU)
    assert (reply.mode, reply.iommufd_id, reply.iommufd_fd_index, reply.ioas_id) == (
        DELEGATED,
        1,
        0,
        None,
    )
    assert [(d.bdf, d.fd_index, d.devid) for d in reply.devices] == [(EDU, 1, None)]
    iommufd_fd, cdev_fd = client.received
    ictx = kernel.iommufd_of_fd(iommufd_fd)
    assert ictx.rlimit_per_process
    assert kernel.device_of_fd(cdev_fd).bound_to is None
    assert kernel.ops("bind_iommufd", "ioas_alloc", "attach_ioas") == []
    assert driver(fs, EDU) == "vfio-pci"
    await client.close()


async def test_vmm_binds_maps_and_release_takes_it_all_back(
    dbroker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """The VMM binds, allocates its IOAS, attaches and maps; release detaches through the
    daemon's copy, unmaps every IOAS of the iommufd and gives the device back."""
    client = Client(dbroker, ALICE)
    reply = await claim_delegated(client, EDU)
    iommufd_fd, cdev_fd = client.received
    kernel.client_bind(cdev_fd, iommufd_fd)
    ictx = kernel.iommufd_of_fd(iommufd_fd)
    ioas = ictx.ioas_alloc()
    kernel.client_attach(cdev_fd, ioas)
    assert ictx.ioas_map(ioas, 0x7F0000000000, VM_RAM, 0, RW) == 0

    await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
    assert kernel.ops("detach_ioas") == [("detach_ioas", EDU)]
    assert kernel.ops("ioas_unmap_all") == [("ioas_unmap_all", ioas)]
    assert ictx.ioas[ioas].space.areas == {}  # the VMM's pages are unpinned
    assert dbroker.state.sessions[client.session.session_id].delegated == {}
    client.close_received()  # the VMM exits: the binding ends, vfio-pci can let go
    await client.close()
    await dbroker.aclose(grace=5.0)  # waits for the background restore
    assert driver(fs, EDU) is None


async def test_release_before_the_vmm_bound(dbroker: Broker, kernel: FakeKernel) -> None:
    """A device the VMM never bound: the detach answers EINVAL and nothing is unmapped."""
    client = Client(dbroker, ALICE)
    reply = await claim_delegated(client, EDU)
    client.close_received()
    await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
    assert kernel.ops("detach_ioas", "ioas_unmap_all") == []
    await client.close()


async def test_client_exit_takes_the_devices_back(dbroker: Broker, kernel: FakeKernel) -> None:
    """Session end does what release does: detach and unmap through the daemon's copies."""
    client = Client(dbroker, ALICE)
    await claim_delegated(client, EDU)
    iommufd_fd, cdev_fd = client.received
    kernel.client_bind(cdev_fd, iommufd_fd)
    ictx = kernel.iommufd_of_fd(iommufd_fd)
    ioas = ictx.ioas_alloc()
    kernel.client_attach(cdev_fd, ioas)
    ictx.ioas_map(ioas, 0x7F0000000000, VM_RAM, 0, RW)
    await client.close()
    # blocked when the session ends, then again as each lease is released
    assert set(kernel.ops("detach_ioas")) == {("detach_ioas", EDU)}
    assert set(kernel.ops("ioas_unmap_all")) == {("ioas_unmap_all", ioas)}


async def test_delegate_needs_its_own_right(broker: Broker) -> None:
    """The default test config lets uid 1000 claim the edu brokered, not delegated."""
    client = Client(broker, ALICE)
    with pytest.raises(PermissionDeniedError) as exc:
        await claim_delegated(client, EDU)
    assert exc.value.details == {
        "bdf": EDU,
        "uid": 1000,
        "gid": 1000,
        "rule": 0,
        "reason": "delegate_not_allowed",
    }
    await client.close()


async def test_legacy_only_group_is_not_delegable(dbroker: Broker, kernel: FakeKernel) -> None:
    """One edu of the bridge group alone would go the legacy way: refused, untouched."""
    client = Client(dbroker, ALICE)
    with pytest.raises(NotDelegableError) as exc:
        await claim_delegated(client, BR_EDU1)
    assert exc.value.details["reason"] == "legacy_only"
    assert exc.value.details["group_id"] == 4
    assert kernel.ops("open_iommufd", "open_cdev") == []
    await client.close()


async def test_rlimit_mode_refused_is_not_delegable_and_unwinds(
    dbroker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """EPERM on IOMMU_OPTION (no CAP_SYS_RESOURCE): not_delegable, drivers given back."""
    client = Client(dbroker, ALICE)
    kernel.fail_next("option", errno.EPERM)
    with pytest.raises(NotDelegableError) as exc:
        await claim_delegated(client, EDU)
    assert exc.value.details["reason"] == "no_rlimit_mode"
    assert client.session.delegated == {}
    assert driver(fs, EDU) is None
    assert client.received == []
    await client.close()


async def test_two_groups_share_one_iommufd(
    dbroker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """The bridge group joins the edu's iommufd: only cdev fds come back; releasing
    one group detaches it and leaves the shared IOAS mapped for the other."""
    client = Client(dbroker, ROOT)
    first = await claim_delegated(client, EDU)
    second = await claim_delegated(client, BR_EDU1, BR_EDU2, E1000, iommufd_id=first.iommufd_id)
    assert (second.iommufd_id, second.iommufd_fd_index, second.fds) == (1, None, 3)
    assert driver(fs, E1000) == "vfio-pci"
    iommufd_fd, edu_fd, *bridge_fds = client.received
    ictx = kernel.iommufd_of_fd(iommufd_fd)
    ioas = ictx.ioas_alloc()
    for fd in (edu_fd, *bridge_fds):
        kernel.client_bind(fd, iommufd_fd)
        kernel.client_attach(fd, ioas)
    ictx.ioas_map(ioas, 0x7F0000000000, VM_RAM, 0, RW)

    await client.call(m.Release(id=client.next_id(), lease_id=second.lease_id))
    assert kernel.ops("ioas_unmap_all") == []  # the edu still works from that IOAS
    assert len(kernel.ops("detach_ioas")) == 3
    await client.call(m.Release(id=client.next_id(), lease_id=first.lease_id))
    assert kernel.ops("ioas_unmap_all") == [("ioas_unmap_all", ioas)]
    await client.close()


async def test_unknown_iommufd_id_is_not_found(dbroker: Broker, kernel: FakeKernel) -> None:
    """An iommufd_id of no delegated claim of this session: refused before any change."""
    other = Client(dbroker, Identity(uid=1000, gid=1000, pid=7))
    mine = await claim_delegated(other, EDU)
    client = Client(dbroker, ROOT)
    with pytest.raises(NotFoundError) as exc:
        await claim_delegated(client, BR_EDU1, BR_EDU2, E1000, iommufd_id=mine.iommufd_id)
    assert exc.value.details == {"iommufd_id": mine.iommufd_id}
    await client.close()
    await other.close()


async def test_device_reset_of_a_delegated_device_is_refused(dbroker: Broker) -> None:
    client = Client(dbroker, ALICE)
    reply = await claim_delegated(client, EDU)
    with pytest.raises(InvalidStateError) as exc:
        await client.call(m.DeviceReset(id=client.next_id(), bdf=EDU))
    assert exc.value.details == {"reason": "delegated", "bdf": EDU, "lease_id": reply.lease_id}
    await client.close()


async def test_v1_claim_on_the_same_broker_stays_brokered(dbroker: Broker) -> None:
    """A v1 Claim: bound, attached, a daemon IOAS, the v1 reply."""
    client = Client(dbroker, ALICE)
    reply = await client.claim(EDU)
    assert isinstance(reply, m.ClaimReply)
    assert reply.devices[0].devid is not None
    await client.close()


def test_unmap_scan_skips_what_is_not_an_ioas(kernel: FakeKernel) -> None:
    """ENOENT for ids that are no IOAS; every IOAS found is emptied."""
    ictx = kernel.open_iommufd()
    a, b = ictx.ioas_alloc(), ictx.ioas_alloc()
    ictx.destroy(a)
    ictx.ioas_map(b, 0x7F0000000000, VM_RAM, 0, RW)
    assert unmap_every_ioas(ictx, ids=8) == {b: VM_RAM}
    kernel.fail_next("ioas_unmap", errno.EIO)
    assert unmap_every_ioas(ictx, ids=8) == {b: 0}  # id 1's failure is logged, not fatal
    ictx.close()
    with pytest.raises(KernelError):
        ictx.fileno()


async def test_admin_revoke_blocks_a_delegated_lease(dbroker: Broker, kernel: FakeKernel) -> None:
    """revoke: detach through the daemon's copy and unmap the VMM's IOAS at once; the
    lease stays (revoked) until the client releases it."""
    client = Client(dbroker, ALICE)
    reply = await claim_delegated(client, EDU)
    iommufd_fd, cdev_fd = client.received
    kernel.client_bind(cdev_fd, iommufd_fd)
    ictx = kernel.iommufd_of_fd(iommufd_fd)
    ioas = ictx.ioas_alloc()
    kernel.client_attach(cdev_fd, ioas)
    ictx.ioas_map(ioas, 0x7F0000000000, VM_RAM, 0, RW)
    assert await dbroker.revoke_group(3, "maintenance") == [reply.lease_id]
    assert kernel.ops("detach_ioas") == [("detach_ioas", EDU)]
    assert kernel.ops("ioas_unmap_all") == [("ioas_unmap_all", ioas)]
    assert ictx.ioas[ioas].space.areas == {}
    assert kernel.device_of_fd(cdev_fd).attached_to is None
    await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
    await client.close()
