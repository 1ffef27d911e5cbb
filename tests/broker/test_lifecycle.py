"""Teardown, crash recovery and enforcement: disconnect, peer exit, journal replay, revoke."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.broker.drivers import UNBIND_WAIT
from iommud.broker.journal import Journal, JournalEntry
from iommud.errors import PermissionDeniedError, RevokedError
from iommud.protocol import messages as m
from tests.broker.support import (
    ALICE,
    BOB,
    BR_EDU1,
    E1000,
    EDU,
    PAGE,
    ROOT,
    Client,
    make_config,
    memfd,
)
from tests.broker.test_claim import driver, override
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys
from tests.serving import Logs, logged


async def test_disconnect_blocks_dma_before_close_before_driver_restore(
    broker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    c = Client(broker, ALICE)
    reply = await c.claim(EDU)
    ram = memfd(2 * PAGE)
    await c.map(reply.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=2 * PAGE, iova=0x4000))
    c.close_received()
    kernel.calls.clear()
    await broker.close_session(c.session)  # what the server does on EOF
    unmap = kernel.index("ioas_unmap_all", 1)
    detach = kernel.index("detach_ioas", EDU)
    close_dev = kernel.index("close", "device", EDU)
    restore = kernel.index("unbind", EDU, "vfio-pci")
    assert unmap < close_dev, kernel.calls
    assert detach < close_dev < restore, kernel.calls
    assert kernel.index("close", "iommufd", "iommu") > close_dev
    assert driver(fs, EDU) is None
    assert override(fs, EDU) == "(null)"
    status = await Client(broker, ROOT).call(m.Status(id=1))
    assert isinstance(status, m.StatusReply)
    assert (status.clients, status.leases) == (1, ())
    os.close(ram)


async def test_peer_exit_on_pidfd_tears_the_session_down(
    broker: Broker, kernel: FakeKernel, fs: FakeSys, logs: Logs
) -> None:
    """A SIGKILLed client is cleaned up from its pidfd even though no one closed the session."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # noqa: ASYNC220
    try:
        c = Client(broker, ALICE, pidfd=os.pidfd_open(child.pid))
        reply = await c.claim(EDU)
        ram = memfd(PAGE)
        await c.map(reply.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE))
        c.close_received()
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(c.session.closed.wait(), 5.0)
        assert kernel.ops("ioas_unmap_all", "detach_ioas")[:2] == [
            ("ioas_unmap_all", 1),
            ("detach_ioas", EDU),
        ]
        assert driver(fs, EDU) is None
        assert c.session.pidfd is not None
        assert c.session.pidfd.closed
        assert logged(logs, "session.peer_exited", pid=ALICE.pid)
        os.close(ram)
    finally:
        child.kill()
        child.wait()


async def test_release_waits_for_the_client_to_close_its_device_fd(
    broker: Broker, fs: FakeSys
) -> None:
    """Unbinding vfio-pci blocks while the client holds the fd: reported pending, then done."""
    c = Client(broker, ALICE)
    reply = await c.claim(EDU)
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))  # fd still held
    assert broker.pending_restores == {EDU: UNBIND_WAIT}
    assert driver(fs, EDU) == "vfio-pci"
    c.close_received()
    for _ in range(200):
        if not broker.pending_restores:
            break
        await asyncio.sleep(0.01)
    assert broker.pending_restores == {}
    assert driver(fs, EDU) is None
    await c.close()


async def test_journal_replay_restores_a_crashed_run(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None
) -> None:
    """A previous run died with e1000 on vfio-pci and overrides pinned: start() undoes it."""
    # The state a crash leaves: journal written, sysfs changed, no one to restore it.
    state = tmp_path / "state"
    Journal(state).record(
        [
            JournalEntry(E1000, 4, "e1000", None, rebound=True),
            JournalEntry(BR_EDU1, 4, None, None, rebound=False),
        ]
    )
    fs.set_driver_override(E1000, "vfio-pci")
    fs.set_driver_override(BR_EDU1, "vfio-pci")
    fs.unbind(E1000)
    fs.bind(E1000, "vfio-pci")
    kernel = FakeKernel(fs)
    b = Broker(make_config(tmp_path, fs), kernel)
    await b.start()
    assert driver(fs, E1000) == "e1000"
    assert override(fs, E1000) == "(null)"
    assert override(fs, BR_EDU1) == "(null)"
    assert Journal(state).load() == []
    # And the group is claimable again, through the rebind path as usual.
    c = Client(b, ALICE)
    await c.claim(BR_EDU1, "0000:01:02.0")
    assert driver(fs, E1000) == "vfio-pci"
    await c.close()
    await b.aclose()
    assert driver(fs, E1000) == "e1000"


async def test_claim_journals_before_touching_sysfs(broker: Broker) -> None:
    """While owned, the journal names every device of the group with its original state."""
    c = Client(broker, ALICE)
    await c.claim(BR_EDU1, "0000:01:02.0")
    entries = {e.bdf: e for e in Journal(broker.state.config.daemon.state_dir).load()}
    assert entries[E1000] == JournalEntry(E1000, 4, "e1000", None, rebound=True)
    assert entries["0000:00:11.0"] == JournalEntry("0000:00:11.0", 4, None, None, rebound=False)
    assert set(entries) == {"0000:00:11.0", BR_EDU1, "0000:01:02.0", E1000}
    await c.close()
    assert Journal(broker.state.config.daemon.state_dir).load() == []


async def test_revoke_group_blocks_dma_and_tells_the_owner(
    broker: Broker, kernel: FakeKernel
) -> None:
    c = Client(broker, ALICE)
    reply = await c.claim(EDU)
    ram = memfd(PAGE)
    await c.map(reply.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x7000))
    kernel.calls.clear()
    revoked = await broker.revoke_group(3, "admin says so")
    assert revoked == [reply.lease_id]
    assert kernel.ops("detach_ioas", "ioas_unmap_all") == [
        ("detach_ioas", EDU),
        ("ioas_unmap_all", 1),
    ]
    ev = broker.events(c.session).get_nowait().event
    assert isinstance(ev, m.LeaseRevoked)
    assert (ev.lease_id, ev.group_id, ev.reason) == (reply.lease_id, 3, "admin says so")
    # No way back in: maps refused, the group stays owned, a second claim is refused.
    with pytest.raises(RevokedError):
        await c.map(reply.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE))
    with pytest.raises(RevokedError):
        await c.claim(EDU)
    assert await broker.revoke_group(3, "again") == []
    c.close_received()
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    again = await c.claim(EDU)  # released: claimable again
    assert again.lease_id != reply.lease_id
    await c.close()
    os.close(ram)


async def test_revoke_op_is_root_only(broker: Broker) -> None:
    owner, user, admin = Client(broker, ALICE), Client(broker, BOB), Client(broker, ROOT)
    reply = await owner.claim(EDU)
    with pytest.raises(PermissionDeniedError) as ei:
        await user.call(m.Revoke(id=1, group_id=3, reason="mine now"))
    assert ei.value.details == {"uid": 1000, "rule": "revoke", "reason": "revoke is root-only"}
    out = await admin.call(m.Revoke(id=2, group_id=3, reason="maintenance"))
    assert out == m.RevokeReply(id=2, revoked_leases=(reply.lease_id,))
    for c in (owner, user, admin):
        await c.close()


async def test_on_host_change_revokes_when_viability_is_lost(broker: Broker, fs: FakeSys) -> None:
    """An unsafe driver appears on an owned group (synthetic): the lease is revoked."""
    c = Client(broker, ALICE)
    reply = await c.claim(BR_EDU1, "0000:01:02.0")
    fs.unbind(E1000)
    fs.bind(E1000, "e1000")  # as if the kernel had let e1000 probe
    await broker.on_host_change(4)
    ev = broker.events(c.session).get_nowait().event
    assert isinstance(ev, m.LeaseRevoked)
    assert ev.lease_id == reply.lease_id
    assert ev.reason == "viability lost: 0000:01:03.0 (e1000)"
    await c.close()


async def test_list_groups_shows_owner_and_path(broker: Broker) -> None:
    c = Client(broker, ALICE)
    await c.claim(EDU)
    reply = await c.call(m.ListGroups(id=9))
    assert isinstance(reply, m.ListGroupsReply)
    groups = {g.group_id: g for g in reply.groups}
    assert groups[3].owner == m.Owner(uid=1000, pid=4242)
    assert groups[3].path == "iommufd"
    assert groups[4].is_viable is False
    assert groups[4].offenders == (m.Offender(bdf=E1000, driver="e1000"),)
    assert groups[4].owner is None
    devs = await c.call(m.ListDevices(id=10))
    assert isinstance(devs, m.ListDevicesReply)
    edu = next(d for d in devs.devices if d.bdf == EDU)
    assert (edu.driver, edu.driver_override) == ("vfio-pci", "vfio-pci")
    await c.close()


async def test_a_restore_step_that_crashes_is_retried_and_recorded(
    tmp_path: Path, fs: FakeSys, logs: Logs, no_fd_leak: None
) -> None:
    """L5: a restore step failing with something other than KernelError (a bug, no worker
    thread left) is logged with its traceback and retried like a kernel error, never left
    as a task's unretrieved exception; the device is given back."""
    Journal(tmp_path / "state").record([JournalEntry(BR_EDU1, 4, None, None, rebound=False)])
    fs.set_driver_override(BR_EDU1, "vfio-pci")
    kernel = FakeKernel(fs)
    real = kernel.binder.set_driver_override
    crashes = [RuntimeError("can't start new thread")]

    def flaky(bdf: str, driver: str | None) -> None:
        if crashes:
            raise crashes.pop()
        real(bdf, driver)

    kernel.binder.set_driver_override = flaky  # type: ignore[method-assign]
    b = Broker(make_config(tmp_path, fs), kernel, restore_retry_delay=0.01)
    await b.start()
    for _ in range(1000):  # hang guard: the retry comes after 0.01 s
        if not b.pending_restores:
            break
        await asyncio.sleep(0.01)
    assert override(fs, BR_EDU1) == "(null)"
    assert Journal(tmp_path / "state").load() == []
    assert [e["attempt"] for e in logged(logs, "driver.restore_crashed", bdf=BR_EDU1)] == [1]
    await b.aclose()
