"""Revocation of delegated leases that a hostile client cannot undo (protocol v2).

A delegated lease's VMM holds the BOUND device file: after a detach it may re-attach
(VFIO_DEVICE_ATTACH_IOMMUFD_PT takes no privilege, drivers/vfio/device_cdev.c) and map
again, and nothing in 6.12 makes a revocation sticky (no vfio revoke; the binding ends
only at the LAST close of the file, drivers/vfio/vfio_main.c vfio_device_fops_release).
So taking a device back is, in order:

1. block DMA now: detach every device through the daemon's own fds; lower the
   RLIMIT_MEMLOCK of every process holding a device file to 0:0 (defence in depth: under
   per-process accounting a new pin is then ENOMEM, iommufd/pages.c
   update_mm_locked_vm, and an unprivileged process cannot raise a hard limit); then
   empty every IOAS of the iommufd (unpins the VMM's memory) unless a healthy lease of
   the same session still uses it;
2. tell the holder: ``lease_revoked`` with ``grace_s`` (the VMM's own REQ eventfd could
   be rung too, ``VfioDevice.trigger_irq``: not done, QEMU would then unplug before the
   launcher's ``device_del``, which iommuctl vm's lab test expects to be accepted);
3. after the grace period (config ``[delegation] grace_s``), or at once when the
   session ends: find every process holding one of the lease's device files
   (iommud.kernel.procs: fds can be passed on) and SIGKILL it through a pidfd; wait
   for it to exit; rescan; at most ``kill_passes`` rounds;
4. nobody left: reset through the daemon's fd (it is the only binding now), close the
   daemon's fds (the last close unbinds), give the devices back to their drivers
   (journal), ``lease_enforced`` ``returned``. Holders survived every pass:
   ``lease_enforced`` ``stuck``; the group stays owned, on vfio-pci and detached
   until an admin acts (a file parked in a socket queue is invisible to any scan).

The daemon's fds are kept until nobody else holds the files: they are how it detaches,
and closing them would not unbind anything while a VMM holds its copy. A ``release``
of a delegated lease whose devices someone still holds is refused (``revoked``,
``waiting_for: "holders_exit"``) and turns into a revocation with grace; a release
once the VMM let go finishes at once. A session's end enforces at once (nobody is left
to tell), so a dead launcher's QEMU is killed and the devices come back promptly; a
daemon stop blocks DMA but kills nobody (a restart must not kill every VM).

Kills run under the claim lock (bounded: ``kill_passes`` x ``kill_wait_s``); the grace
wait does not. Decides nothing about viability or policy; touches processes only
through the kernel layer (``Kernel.processes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import structlog

from iommud.broker import delegation
from iommud.broker.claim import ClaimManager
from iommud.broker.state import BrokerState, Lease, LeaseState
from iommud.errors import KernelError, RevokedError
from iommud.kernel import aio
from iommud.kernel.interface import FileKey, Processes, ProcessHolder, Scan
from iommud.protocol import messages as m
from iommud.protocol.v2 import ClaimMode, EnforceOutcome

log = structlog.get_logger(__name__)

RELEASED_WHILE_HELD: Final = "released while its devices are still held"


class Revoker:
    """Revoke, release and end delegated leases (see the module docstring)."""

    def __init__(
        self,
        state: BrokerState,
        claims: ClaimManager,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._claims = claims
        self._config = state.config.delegation
        self._wall_clock = wall_clock

    @property
    def _procs(self) -> Processes:
        return self._state.kernel.processes

    # ------------------------------------------------------------------ revoke
    async def revoke_locked(self, lease: Lease, reason: str) -> None:
        """Steps 1-2 (claim lock held) and the timer for step 3."""
        await self._block(lease)
        self._mark_revoked(lease, reason)

    async def _block(self, lease: Lease) -> None:
        delegation.detach_delegated(lease)
        await self._clamp(lease)
        if not delegation.shares_healthy_lease(lease):
            await delegation.unmap_delegated(lease, self._config.unmap_scan_ids)

    def _mark_revoked(self, lease: Lease, reason: str) -> None:
        grace = self._config.grace_s
        lease.state = LeaseState.REVOKED
        lease.revoke_reason = reason
        lease.enforce_at = self._wall_clock() + grace
        self._state.publish(
            m.EventName.LEASE_REVOKED,
            holder=lease.session,
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            reason=reason,
            mode=ClaimMode.DELEGATED,
            grace_s=grace,
        )
        log.warning(
            "group.revoked",
            group_id=lease.group_id,
            lease_id=lease.lease_id,
            session=lease.session.session_id,
            uid=lease.session.identity.uid,
            reason=reason,
            grace_s=grace,
        )
        self._state.spawn(self._after_grace(lease, grace))

    async def _clamp(self, lease: Lease) -> None:
        """RLIMIT_MEMLOCK 0:0 for every process holding a device file of the lease."""
        scan = await self._scan(lease)
        try:
            for h in scan.holders:
                try:
                    h.clamp_memlock()
                    log.info("holder.memlock_clamped", pid=h.pid, uid=h.uid, comm=h.comm)
                except KernelError as exc:
                    log.warning("holder.memlock_clamp_failed", pid=h.pid, errno=exc.errno)
        finally:
            scan.close()

    async def _after_grace(self, lease: Lease, grace: float) -> None:
        """Step 3 once the grace period ran out, unless the lease ended (or was
        enforced) before: a release, the session's end or the daemon's stop set
        ``hurry``."""
        # wait_for, not asyncio.timeout: nothing under the server asks for its task
        # (tests/server/test_bounds.py); this runs in a task of its own anyway
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lease.hurry.wait(), grace)

        async def work() -> None:
            async with self._claims.held():
                if (
                    lease.state is LeaseState.REVOKED
                    and lease.session.leases.get(lease.lease_id) is lease
                ):
                    await self.enforce_locked(lease, why="grace expired")

        await asyncio.shield(work())

    # ------------------------------------------------------------------ release, end
    async def release_locked(self, lease: Lease) -> None:
        """A client's ``release`` (claim lock held): nobody else holds the devices:
        release as any lease (block DMA, reset, close, restore); otherwise block DMA,
        revoke with grace and refuse."""
        scan = await self._scan(lease)
        try:
            held = [_who(h) for h in scan.holders]
        finally:
            scan.close()
        if not held:
            lease.hurry.set()  # a pending grace timer finds the lease gone
            await self._claims.release_lease(lease, why="release", reset=True)
            return
        if lease.state is LeaseState.ACTIVE:
            await self._block(lease)  # clamp the holders, unmap what slipped in
            self._mark_revoked(lease, RELEASED_WHILE_HELD)
        raise RevokedError(
            f"lease {lease.lease_id} is revoked: its devices are still held by "
            + ", ".join(f"pid {h['pid']}" for h in held),
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            reason=lease.revoke_reason,
            waiting_for="holders_exit",
            enforce_at=lease.enforce_at,
            holders=held,
        )

    async def end_locked(self, lease: Lease) -> None:
        """The lease's session ends (claim lock held): block, enforce at once, finish.

        Not when the daemon stops: a restart must not kill every VM. Then DMA stays
        blocked, the daemon's files are closed and the restore waits (journalled, also
        across the restart) for the VMM to let go; meanwhile the device stays on
        vfio-pci, so a re-attach reaches only the VMM's own memory."""
        if lease.state is LeaseState.ACTIVE:
            await self._block(lease)
        lease.hurry.set()
        if self._state.stopping:
            log.warning("enforce.skipped_at_stop", lease_id=lease.lease_id)
            await self._claims.release_lease(lease, why="daemon stop")
            return
        await self.enforce_locked(lease, why="disconnect")

    # ------------------------------------------------------------------ enforce
    async def enforce_locked(self, lease: Lease, *, why: str) -> EnforceOutcome:
        """Step 3-4 (claim lock held): kill every holder of the lease's device files,
        then give the devices back; ``stuck`` if holders survive every pass."""
        lease.state = LeaseState.ENFORCING
        killed: dict[int, dict[str, Any]] = {}
        clean = False
        for attempt in range(1, self._config.kill_passes + 1):
            scan = await self._scan(lease)
            try:
                if scan.unreadable:
                    log.warning("enforce.unreadable", lease_id=lease.lease_id, pids=scan.unreadable)
                if not scan.holders:
                    clean = True
                    break
                for h in scan.holders:
                    try:
                        h.kill()
                    except KernelError as exc:
                        log.exception(
                            "enforce.kill_failed",
                            lease_id=lease.lease_id,
                            pid=h.pid,
                            errno=exc.errno,
                        )
                        continue
                    killed.setdefault(h.pid, _who(h))
                    log.warning(
                        "enforce.killed",
                        lease_id=lease.lease_id,
                        group_id=lease.group_id,
                        pass_=attempt,
                        **_who(h),
                    )
                # pidfds turn readable after exit_files closed the fds (kernel/exit.c)
                await wait_exited(scan.holders, self._config.kill_wait_s)
            finally:
                scan.close()
        outcome = EnforceOutcome.RETURNED if clean else EnforceOutcome.STUCK
        if clean:
            await self._claims.release_lease(lease, why=why, reset=True)
        else:
            log.error(
                "enforce.stuck",
                lease_id=lease.lease_id,
                group_id=lease.group_id,
                passes=self._config.kill_passes,
            )
        if killed or not clean or why != "disconnect":
            # a clean disconnect is news to nobody; anything else is to the holder
            self._state.publish(
                m.EventName.LEASE_ENFORCED,
                holder=lease.session,
                lease_id=lease.lease_id,
                group_id=lease.group_id,
                outcome=outcome,
                killed=tuple(killed.values()),
            )
        log.info(
            "lease.enforced",
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            outcome=str(outcome),
            killed=list(killed.values()),
            why=why,
        )
        return outcome

    async def _scan(self, lease: Lease) -> Scan:
        keys = device_keys(self._procs, lease)
        return await aio.call("holder_scan", self._procs.scan, keys)


def device_keys(procs: Processes, lease: Lease) -> frozenset[FileKey]:
    """The keys of the daemon's own fds of the lease's devices (still open ones)."""
    out: set[FileKey] = set()
    for ld in lease.devices:
        if not ld.device.closed:
            out.add(procs.file_key(ld.device.fileno()))
    return frozenset(out)


def _who(h: ProcessHolder) -> dict[str, Any]:
    return {"pid": h.pid, "uid": h.uid, "comm": h.comm}


async def wait_exited(holders: Iterable[ProcessHolder], bound: float) -> None:
    """Wait (bounded) until every holder's pidfd is readable: the process exited."""
    loop = asyncio.get_running_loop()
    waits: list[tuple[int, asyncio.Future[None]]] = []
    try:
        for h in holders:
            fut: asyncio.Future[None] = loop.create_future()
            fd = h.pidfd()
            loop.add_reader(fd, _resolve, fut)
            waits.append((fd, fut))
        if waits:
            await asyncio.wait([f for _, f in waits], timeout=bound)
    finally:
        for fd, fut in waits:
            loop.remove_reader(fd)
            fut.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
