"""A daemon SIGKILLed while a client holds a legacy group: nothing is lost.

The client keeps its device fd across the crash (the fd is the client's; its DMA keeps
working). The restarted daemon replays the journal: vfio-pci's unbind of the held device
blocks and e1000's probe is refused (EBUSY) while the group is user-owned, so the restore
waits, for as long as it takes, keeps every journal entry, answers claims of the group
with busy saying what it waits for, and gives e1000 back once the client closes its fd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.broker.claim import close_request_fd
from iommud.broker.journal import Journal, JournalEntry
from iommud.errors import BusyError
from iommud.protocol import messages as m
from iommud.protocol.v2 import PendingRestore, StatusReplyV2, StatusV2
from tests.broker.support import ALICE, BOB, BR_EDU1, E1000, Client, make_config
from tests.broker.test_claim import driver
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys

HANG = 30.0  # seconds: only a deadlock takes this long
GROUP = 4
MEMBERS = {"0000:00:11.0", BR_EDU1, "0000:01:02.0", E1000}
# The bridge only had its override pinned: put back at once unless queued behind e1000.
MOVED = MEMBERS - {"0000:00:11.0"}


async def _until(predicate: Callable[[], bool], seconds: float = HANG) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


async def crash(b: Broker) -> None:
    """What SIGKILL does to a daemon: its work stops where it is, the kernel closes
    every fd it had; nothing of sysfs is restored and the journal stays as it was.

    Its restore tasks are stopped too: left running, they would go on writing the
    journal from their own (by then stale) copy of it beside the next daemon's, which
    no killed process can do.
    """
    st = b.state
    tasks = [*st.tasks, *st.drivers._tasks]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    b._audit.close()  # its inotify fd; a dead daemon enforces nothing
    for hold in st.holds.values():
        for lease in hold.leases.values():
            for ld in lease.devices:
                close_request_fd(ld)
                ld.device.close()
        if hold.group is not None:
            hold.group.close()
    for session in st.sessions.values():
        for ioas in session.ioases.values():
            if ioas.container is not None:
                ioas.container.close()
        if session.iommufd is not None:
            session.iommufd.close()


async def _restores(c: Client) -> tuple[PendingRestore, ...]:
    reply = await c.call(StatusV2(id=c.next_id()))
    assert isinstance(reply, StatusReplyV2)
    return reply.restores


class Host:
    """The kernel and sysfs that outlive the daemons started on them."""

    def __init__(self, tmp_path: Path, fs: FakeSys) -> None:
        self.config = make_config(tmp_path, fs)
        # Unbinding a held vfio device blocks as long as the fd stays open, as in Linux.
        self.kernel = FakeKernel(fs, unbind_block_limit=3600.0)
        self.started: list[Broker] = []

    async def start(self) -> Broker:
        b = Broker(self.config, self.kernel, sysfs_timeout=0.5, restore_retry_delay=0.01)
        await b.start()
        self.started.append(b)
        return b

    def journal(self) -> set[str]:
        return {e.bdf for e in Journal(self.config.daemon.state_dir).load()}


@pytest.fixture
async def host(tmp_path: Path, fs: FakeSys) -> AsyncIterator[Host]:
    h = Host(tmp_path, fs)
    yield h
    for b in h.started:
        await b.aclose(grace=5.0)


async def _held_across_a_crash(host: Host, fs: FakeSys) -> Client:
    first = await host.start()
    alice = Client(first, ALICE)
    lease = await alice.claim(BR_EDU1)
    assert lease.backend == "legacy"
    assert driver(fs, E1000) == "vfio-pci"
    await crash(first)
    host.started.remove(first)
    return alice  # still holds its copy of 01:01.0's device fd


@pytest.mark.parametrize("e1000_last", [False, True])
async def test_restore_after_a_restart_while_held_gives_e1000_back_when_the_fd_closes(
    host: Host, fs: FakeSys, e1000_last: bool
) -> None:
    """Whatever the journal's order, e1000 goes first: its bind is refused EBUSY again
    and again (far more than the old limit of five attempts) until the fd is closed, and
    the held device's unbind (which would block) is not even tried before that."""
    alice = await _held_across_a_crash(host, fs)
    if e1000_last:
        j = Journal(host.config.daemon.state_dir)
        entries = sorted(j.load(), key=lambda e: e.bdf == E1000)
        j.drop([e.bdf for e in entries])
        j.record(entries)
    b = await host.start()
    # Still held: nothing given back, nothing forgotten, and it says why it waits.
    assert driver(fs, E1000) != "e1000"
    assert MOVED <= host.journal() <= MEMBERS
    assert MOVED <= set(b.pending_restores) <= MEMBERS
    assert any("holder" in why or "in use" in why for why in b.pending_restores.values())
    bob = Client(b, BOB)
    with pytest.raises(BusyError) as ei:
        await bob.claim(BR_EDU1)
    assert ei.value.details["group_id"] == GROUP
    assert MOVED <= set(ei.value.details["restoring"]) <= MEMBERS
    await asyncio.sleep(0.5)  # well past the old five attempts
    assert driver(fs, E1000) != "e1000"
    assert MOVED <= host.journal() <= MEMBERS

    assert [c for c in host.kernel.ops("unbind") if c[1] == BR_EDU1] == []
    assert any(why.startswith("bind to e1000") for why in b.pending_restores.values())
    # v2 status shows every pending restore and why it waits, to any peer.
    restores = await _restores(bob)
    assert MOVED <= {r.bdf for r in restores} <= MEMBERS
    assert any(r.bdf == E1000 and "holds a device fd" in r.waiting_for for r in restores)

    alice.close_received()
    assert await _until(lambda: driver(fs, E1000) == "e1000")
    assert await _until(lambda: b.pending_restores == {})
    assert host.journal() == set()
    assert driver(fs, BR_EDU1) is None
    assert await _restores(bob) == ()
    await bob.close()


async def test_two_restarts_while_held_then_close(host: Host, fs: FakeSys) -> None:
    alice = await _held_across_a_crash(host, fs)
    second = await host.start()
    assert driver(fs, E1000) != "e1000"
    await crash(second)
    host.started.remove(second)
    third = await host.start()
    assert MOVED <= host.journal() <= MEMBERS
    alice.close_received()
    assert await _until(lambda: driver(fs, E1000) == "e1000")
    assert await _until(lambda: third.pending_restores == {})
    assert host.journal() == set()


async def test_claim_and_release_after_the_close_still_ends_on_e1000(
    host: Host, fs: FakeSys
) -> None:
    """The claim that follows sees e1000 where the restore left it, never a driver-less
    device recorded as its original."""
    alice = await _held_across_a_crash(host, fs)
    b = await host.start()
    alice.close_received()
    assert await _until(lambda: b.pending_restores == {})
    bob = Client(b, BOB)
    lease = await bob.claim(BR_EDU1)
    assert driver(fs, E1000) == "vfio-pci"
    await bob.call(m.Release(id=bob.next_id(), lease_id=lease.lease_id))
    bob.close_received()
    assert await _until(lambda: driver(fs, E1000) == "e1000")
    assert await _until(lambda: b.pending_restores == {})
    assert host.journal() == set()
    await bob.close()


def test_the_first_recorded_original_stays_the_truth(tmp_path: Path) -> None:
    """A device still in the journal was not given back: a later record keeps its original."""
    j = Journal(tmp_path / "state")
    j.record([JournalEntry(E1000, GROUP, "e1000", None, rebound=True)])
    j.record([JournalEntry(E1000, GROUP, None, "vfio-pci", rebound=True)])
    assert j.get(E1000) == JournalEntry(E1000, GROUP, "e1000", None, rebound=True)
    j.record([JournalEntry(BR_EDU1, GROUP, None, None, rebound=False)])
    j.record([JournalEntry(BR_EDU1, GROUP, "vfio-pci", "vfio-pci", rebound=True)])
    assert j.get(BR_EDU1) == JournalEntry(BR_EDU1, GROUP, "vfio-pci", None, rebound=True)
    assert Journal(tmp_path / "state").load() == [j.get(E1000), j.get(BR_EDU1)]
