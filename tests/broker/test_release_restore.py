"""Release while the client still holds its device fd: nobody else waits for it.

vfio-pci's unbind blocks until every fd of the device is closed, and on the legacy path
the original driver of another member (e1000) cannot probe while the group is still
user-owned (EBUSY). The broker answers the release promptly, gives the group back in the
background, and answers claims of that group with busy until it is done.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from iommud.broker import Broker
from iommud.broker.drivers import UNBIND_WAIT
from iommud.errors import BusyError, PermissionDeniedError
from iommud.protocol import messages as m
from tests.broker.support import ALICE, BOB, BR_EDU1, E1000, EDU, MALLORY, Client
from tests.broker.test_claim import driver
from tests.fakesys import FakeSys

HANG = 30.0  # seconds: only a deadlock takes this long


async def _until(predicate: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return False


async def test_release_with_fd_open_answers_and_does_not_stall_others(
    broker: Broker, fs: FakeSys
) -> None:
    """The holder keeps its fd, so the restore cannot finish: release still answers,
    another group's claim goes through meanwhile, and the restore completes when the fd
    is closed. (No clock bounds: the fd keeps the restore blocked for as long as the test
    wants; the wait_for timeouts only turn a deadlock into a failure.)"""
    alice, bob = Client(broker, ALICE), Client(broker, BOB)
    lease = await alice.claim(EDU)
    release = m.Release(id=alice.next_id(), lease_id=lease.lease_id)
    reply = await asyncio.wait_for(alice.call(release), HANG)
    assert isinstance(reply, m.ReleaseReply)
    # Answered although the driver restore is still blocked on alice's open fd.
    assert broker.pending_restores == {EDU: UNBIND_WAIT}
    assert driver(fs, EDU) == "vfio-pci"

    # Another group: not held up by alice's pending restore (the claim lock is free).
    theirs = await asyncio.wait_for(bob.claim(BR_EDU1), HANG)
    assert broker.pending_restores == {EDU: UNBIND_WAIT}  # still blocked meanwhile

    with pytest.raises(BusyError) as ei:
        await bob.claim(EDU)  # the same group: busy until it is given back
    assert ei.value.details == {
        "reason": "restoring",
        "group_id": lease.group_id,
        "restoring": {EDU: UNBIND_WAIT},
    }

    alice.close_received()
    assert await _until(lambda: driver(fs, EDU) is None, HANG)
    # The driver is back before the loop hears the restore thread finish.
    assert await _until(lambda: broker.pending_restores == {}, HANG)
    again = await bob.claim(EDU)  # free again
    assert again.group_id == lease.group_id
    await bob.call(m.Release(id=bob.next_id(), lease_id=theirs.lease_id))
    await bob.close()
    await alice.close()


async def test_legacy_release_with_fd_open_gives_e1000_back_once_closed(
    broker: Broker, fs: FakeSys
) -> None:
    """Legacy group: e1000's probe is refused (EBUSY) while alice's fd owns the group;
    the restore keeps trying and e1000 is back once the fd is closed."""
    alice = Client(broker, ALICE)
    lease = await alice.claim(BR_EDU1)
    assert lease.backend == "legacy"
    assert driver(fs, E1000) == "vfio-pci"
    await alice.call(m.Release(id=alice.next_id(), lease_id=lease.lease_id))
    await asyncio.sleep(0.3)
    assert driver(fs, E1000) != "e1000"  # not yet: the group is still user-owned
    alice.close_received()
    assert await _until(lambda: driver(fs, E1000) == "e1000", HANG)
    assert await _until(lambda: broker.pending_restores == {}, HANG)
    await alice.close()


async def test_permission_is_checked_before_busy(broker: Broker) -> None:
    """A peer with no rule learns nothing about who holds a device."""
    alice, mallory = Client(broker, ALICE), Client(broker, MALLORY)
    await alice.claim(EDU)
    with pytest.raises(PermissionDeniedError) as ei:
        await mallory.claim(EDU)
    assert ei.value.details == {
        "bdf": EDU,
        "uid": MALLORY.uid,
        "gid": MALLORY.gid,
        "rule": None,
        "reason": "no rule matched uid 2000 gid 2000",
    }
    await mallory.close()
    await alice.close()
