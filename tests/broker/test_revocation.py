"""Revocation of delegated leases that a hostile client cannot undo (iommud.broker.revocation).

The fake kernel's files are memfds, so the holders here are REAL child processes that
inherited a dup of a fake device file (not the daemon's peer, which is this process),
and the daemon finds them with the real /proc scan (iommud.kernel.procs), lowers their
memlock limit and kills them through real pidfds. Only the kill failure is faked (a
wrapper around the real table). The same story runs against the real kernel and QEMU
in the lab (tests/lab/test_delegated_vm.py).
"""

from __future__ import annotations

import asyncio
import errno
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from iommud.broker import Broker
from iommud.broker.enforcement import DEVICE_REQUESTED
from iommud.broker.revocation import RELEASED_WHILE_HELD
from iommud.broker.state import LeaseState
from iommud.config import AccessRule, DelegationConfig
from iommud.errors import KernelError, RevokedError
from iommud.kernel.interface import FileKey, MapFlag, Scan
from iommud.kernel.procs import ProcessTable
from iommud.protocol import messages as m
from iommud.protocol.v2 import (
    ClaimMode,
    ClaimReplyV2,
    ClaimV2,
    EnforceOutcome,
    LeaseEnforced,
    LeaseRevokedV2,
    StatusReplyV2,
    StatusV2,
)
from iommud.watch import HostAction, HostEvent, HostWatcher, broker_sink
from tests.broker.support import ALICE, EDU, ROOT, Client, make_config
from tests.broker.test_delegated import driver
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys

RW = MapFlag.READABLE | MapFlag.WRITEABLE
GROUP = 3  # the 1:1 edu's group in the fake lab tree
WAIT = 60.0  # hang guard for conditions, never a timing assumption
E = TypeVar("E", bound=m.Event)


def broker_with(tmp_path: Path, fs: FakeSys, kernel: FakeKernel, **delegation: Any) -> Broker:
    config = make_config(tmp_path, fs).model_copy(
        update={
            "access": (AccessRule(uid=1000, devices=("1234:11e8",), delegate=True),),
            "delegation": DelegationConfig(**delegation),
        }
    )
    return Broker(config, kernel, sysfs_timeout=1.0, restore_retry_delay=0.01)


@pytest.fixture
async def make_broker(
    no_fd_leak: None, tmp_path: Path, fs: FakeSys, kernel: FakeKernel
) -> AsyncIterator[Any]:
    made: list[Broker] = []

    async def make(**delegation: Any) -> Broker:
        b = broker_with(tmp_path, fs, kernel, **delegation)
        await b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        await b.aclose(grace=5.0)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Holder processes; every one is reaped (killed if need be) at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)
        if p.stdin is not None:
            p.stdin.close()
        if p.stdout is not None:
            p.stdout.close()


def hold(
    children: list[subprocess.Popen[bytes]], *fds: int, mmap_only: bool = False
) -> subprocess.Popen[bytes]:
    """A child process holding ``fds`` (as a VMM the launcher passed them to) until its
    stdin closes. ``mmap_only``: it maps the first fd, closes every fd, holds the map."""
    if mmap_only:
        code = (
            "import mmap, os, sys\n"
            f"os.ftruncate({fds[0]}, 4096); held = mmap.mmap({fds[0]}, 4096)\n"
            f"for fd in {list(fds)}: os.close(fd)\n"
            "print('ready', flush=True); sys.stdin.read()\n"
        )
    else:
        code = "import sys; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    children.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def let_go(proc: subprocess.Popen[bytes]) -> None:
    """The holder closes its files and exits by itself."""
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(WAIT) == 0


async def claim_and_bind(client: Client, kernel: FakeKernel) -> tuple[ClaimReplyV2, int, int]:
    """A delegated claim; the "VMM" binds, attaches and maps as QEMU does."""
    reply = await client.call(
        ClaimV2(id=client.next_id(), devices=(EDU,), mode=ClaimMode.DELEGATED)
    )
    assert isinstance(reply, ClaimReplyV2)
    iommufd_fd, cdev_fd = client.received
    kernel.client_bind(cdev_fd, iommufd_fd)
    ictx = kernel.iommufd_of_fd(iommufd_fd)
    ioas = ictx.ioas_alloc()
    kernel.client_attach(cdev_fd, ioas)
    ictx.ioas_map(ioas, 0x7F0000000000, 0x10000, 0, RW)
    return reply, iommufd_fd, cdev_fd


async def next_event(client: Client, cls: type[E]) -> E:
    """The session's next event of type ``cls`` (others are skipped)."""
    async with asyncio.timeout(WAIT):
        while True:
            item = await client.session.sink.queue.get()
            if isinstance(item.event, cls):
                return item.event


def memlock_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max locked memory"):
            return " ".join(line.split()[3:5])
    raise AssertionError("no memlock line")


async def wait_for(predicate: Any) -> None:
    """Poll a sysfs condition (the fake binder writes files: nothing to wait on)."""
    async with asyncio.timeout(WAIT):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_revoke_blocks_at_once_then_kills_a_holder_that_is_not_the_peer(
    make_broker: Any, kernel: FakeKernel, fs: FakeSys, children: list[subprocess.Popen[bytes]]
) -> None:
    """revoke: detach, memlock clamped, unmap, lease_revoked with grace_s, all before the
    revoke returns; after the grace period the child holding the device file is killed,
    then the device is reset, the daemon's files closed and the driver restored."""
    broker = await make_broker(grace_s=1.0)
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    client.close_received()  # the launcher passed them on; only the VMM holds them

    t0 = time.monotonic()
    assert await broker.revoke_group(GROUP, "maintenance") == [reply.lease_id]
    assert kernel.ops("detach_ioas") == [("detach_ioas", EDU)]
    assert [c[0] for c in kernel.ops("ioas_unmap_all")] == ["ioas_unmap_all"]
    assert memlock_limit(vmm.pid) == "0 0"
    assert vmm.poll() is None  # not yet: the grace period runs
    revoked = await next_event(client, LeaseRevokedV2)
    assert (revoked.lease_id, revoked.mode, revoked.grace_s) == (
        reply.lease_id,
        ClaimMode.DELEGATED,
        1.0,
    )
    assert broker.state.sessions[client.session.session_id].leases[reply.lease_id].state is (
        LeaseState.REVOKED
    )

    enforced = await next_event(client, LeaseEnforced)
    assert time.monotonic() - t0 >= 1.0  # never before the grace period ran out
    assert enforced.outcome is EnforceOutcome.RETURNED
    assert [(h.pid, h.comm) for h in enforced.killed] == [(vmm.pid, Path(sys.executable).name[:15])]
    assert vmm.wait(WAIT) == -signal.SIGKILL
    assert kernel.index("reset", EDU) > kernel.index("detach_ioas", EDU)
    assert reply.lease_id not in client.session.leases
    await wait_for(lambda: driver(fs, EDU) is None)
    await client.close()


async def test_holder_that_lets_go_during_the_grace_period_is_not_killed(
    make_broker: Any, kernel: FakeKernel, fs: FakeSys, children: list[subprocess.Popen[bytes]]
) -> None:
    """The VMM unplugs in time: enforcement finds nobody, kills nobody, gives back."""
    broker = await make_broker(grace_s=0.5)
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    client.close_received()
    await broker.revoke_group(GROUP, "maintenance")
    let_go(vmm)
    enforced = await next_event(client, LeaseEnforced)
    assert (enforced.outcome, enforced.killed) == (EnforceOutcome.RETURNED, ())
    assert reply.lease_id not in client.session.leases
    await wait_for(lambda: driver(fs, EDU) is None)
    await client.close()


class FailingKills:
    """The real process table, but SIGKILL is refused (EPERM: no CAP_KILL)."""

    def __init__(self) -> None:
        self.real = ProcessTable()
        self.attempts = 0

    def file_key(self, fd: int) -> FileKey:
        return self.real.file_key(fd)

    def parents(self) -> dict[int, int]:
        return self.real.parents()

    def scan(
        self, wanted: frozenset[FileKey], *, exclude: Iterable[int] = (), vm_pin: bool = False
    ) -> Scan:
        scan = self.real.scan(wanted, exclude=exclude, vm_pin=vm_pin)
        for h in scan.holders:
            h.kill = self._refuse  # type: ignore[method-assign]
        return scan

    def _refuse(self) -> None:
        self.attempts += 1
        raise KernelError("pidfd_send_signal", errno.EPERM)


async def test_a_holder_that_cannot_be_killed_leaves_the_group_stuck(
    make_broker: Any, kernel: FakeKernel, fs: FakeSys, children: list[subprocess.Popen[bytes]]
) -> None:
    """Every pass fails: lease_enforced stuck, the daemon keeps its files (DMA stays
    blocked, the device on vfio-pci); once the holder is gone the session end returns it."""
    table = FailingKills()
    kernel.process_table = table
    broker = await make_broker(grace_s=0.0, kill_passes=2, kill_wait_s=0.1)
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    client.close_received()
    await broker.revoke_group(GROUP, "maintenance")
    enforced = await next_event(client, LeaseEnforced)
    assert (enforced.outcome, enforced.killed) == (EnforceOutcome.STUCK, ())
    assert table.attempts == 2
    lease = client.session.leases[reply.lease_id]
    assert lease.state is LeaseState.ENFORCING
    assert not any(ld.device.closed for ld in lease.devices)
    assert driver(fs, EDU) == "vfio-pci"
    assert vmm.poll() is None
    let_go(vmm)
    await client.close()
    await wait_for(lambda: driver(fs, EDU) is None)


async def test_release_while_held_is_refused_and_becomes_a_revocation(
    make_broker: Any, kernel: FakeKernel, fs: FakeSys, children: list[subprocess.Popen[bytes]]
) -> None:
    """release with QEMU still holding the device: DMA blocked, revoked with grace,
    release answers revoked (holders_exit); once QEMU let go, release finishes."""
    broker = await make_broker(grace_s=300.0)
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    client.close_received()
    with pytest.raises(RevokedError) as exc:
        await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
    details = exc.value.details
    assert details["waiting_for"] == "holders_exit"
    assert [h["pid"] for h in details["holders"]] == [vmm.pid]
    assert details["reason"] == RELEASED_WHILE_HELD
    assert kernel.ops("detach_ioas") == [("detach_ioas", EDU)]
    assert (await next_event(client, LeaseRevokedV2)).grace_s == 300.0
    assert memlock_limit(vmm.pid) == "0 0"

    let_go(vmm)
    await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
    assert reply.lease_id not in client.session.leases
    await wait_for(lambda: driver(fs, EDU) is None)
    await client.close()


async def test_session_end_kills_an_orphaned_vmm_at_once(
    make_broker: Any, kernel: FakeKernel, fs: FakeSys, children: list[subprocess.Popen[bytes]]
) -> None:
    """The launcher dies, QEMU lives: no grace (nobody is left to tell); an admin
    subscribed to lease_enforced sees who was killed."""
    broker = await make_broker(grace_s=300.0)
    admin = Client(broker, ROOT)
    await admin.call(m.Subscribe(id=admin.next_id(), events=(m.EventName.LEASE_ENFORCED,)))
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    await client.close()
    assert vmm.wait(WAIT) == -signal.SIGKILL
    enforced = await next_event(admin, LeaseEnforced)
    assert (enforced.lease_id, enforced.outcome) == (reply.lease_id, EnforceOutcome.RETURNED)
    assert [h.pid for h in enforced.killed] == [vmm.pid]
    await wait_for(lambda: driver(fs, EDU) is None)
    await admin.close()


async def test_daemon_stop_blocks_dma_but_kills_no_vmm(
    no_fd_leak: None,
    tmp_path: Path,
    fs: FakeSys,
    kernel: FakeKernel,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """A daemon restart must not kill every VM: at stop the devices are detached and the
    memory unpinned, the daemon's files closed, and the VMM lives on."""
    broker = broker_with(tmp_path, fs, kernel, grace_s=300.0)
    await broker.start()
    client = Client(broker, ALICE)
    _, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    client.close_received()
    await broker.aclose(grace=5.0)
    assert vmm.poll() is None
    assert ("detach_ioas", EDU) in kernel.ops("detach_ioas")
    assert kernel.ops("ioas_unmap_all")
    assert all(d.closed for d in kernel.devices)
    let_go(vmm)


async def test_a_bar_mapping_alone_keeps_a_process_a_holder(
    make_broker: Any, kernel: FakeKernel, children: list[subprocess.Popen[bytes]]
) -> None:
    """A process that mmapped the device file and closed every fd still holds the file
    (and the binding): found through /proc/P/maps, killed."""
    broker = await make_broker(grace_s=0.0)
    client = Client(broker, ALICE)
    _, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, cdev_fd, iommufd_fd, mmap_only=True)
    client.close_received()
    await broker.revoke_group(GROUP, "maintenance")
    enforced = await next_event(client, LeaseEnforced)
    assert [h.pid for h in enforced.killed] == [vmm.pid]
    assert vmm.wait(WAIT) == -signal.SIGKILL
    await client.close()


async def test_host_removal_of_a_delegated_device_revokes_it(
    make_broker: Any, kernel: FakeKernel, children: list[subprocess.Popen[bytes]]
) -> None:
    """The vfio-dev remove uevent (the VMM's REQ eventfd replaced the daemon's) revokes
    the lease like an admin revoke: detach at once, lease_revoked, kill after grace."""
    broker = await make_broker(grace_s=0.0)
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    client.close_received()
    watcher = HostWatcher(broker.view, broker_sink(broker))
    await watcher.handle(HostEvent(HostAction.CDEV_REMOVE, EDU))
    assert kernel.ops("detach_ioas") == [("detach_ioas", EDU)]
    revoked = await next_event(client, LeaseRevokedV2)
    assert (revoked.lease_id, revoked.reason) == (reply.lease_id, DEVICE_REQUESTED)
    enforced = await next_event(client, LeaseEnforced)
    assert [h.pid for h in enforced.killed] == [vmm.pid]
    assert vmm.wait(WAIT) == -signal.SIGKILL
    await client.close()


async def test_status_v2_reports_what_the_vmm_pinned_and_v1_is_unchanged(
    make_broker: Any, kernel: FakeKernel, children: list[subprocess.Popen[bytes]]
) -> None:
    """pinned_pids: the process holding the lease's iommufd AND a device file of it (the
    VMM, not the peer); a process holding only some /dev/iommu, outside the peer's tree,
    is not counted. pinned_bytes is their VmPin (0 here: nothing real is pinned)."""
    broker = await make_broker()
    client = Client(broker, ALICE)
    reply, iommufd_fd, cdev_fd = await claim_and_bind(client, kernel)
    vmm = hold(children, iommufd_fd, cdev_fd)
    stranger = hold(children, iommufd_fd)
    v2 = await client.call(StatusV2(id=client.next_id()))
    assert isinstance(v2, StatusReplyV2)
    (info,) = v2.leases
    assert (info.mode, info.state, info.iommufd_id) == (ClaimMode.DELEGATED, "active", 1)
    assert (info.pinned_pids, info.pinned_bytes) == ((vmm.pid,), 0)
    assert stranger.pid not in info.pinned_pids
    v1 = await client.call(m.Status(id=client.next_id()))
    assert type(v1) is m.StatusReply
    assert v1.leases[0].model_dump() == info.model_dump(include=set(m.LeaseInfo.model_fields))
    let_go(vmm)
    let_go(stranger)
    await client.call(m.Release(id=client.next_id(), lease_id=reply.lease_id))
    await client.close()
