"""Claim and release: from "give me these devices" to bound device fds, and back.

Claim: re-read the devices' (single) IOMMU group, decide everything with the pure
iommud.broker.plan.plan_claim (policy, busy, revoked, path, rebind set, quota), then
carry the plan out: journal, pin driver_override=vfio-pci on every device of the group,
rebind, re-read the group, and open the kernel objects (iommufd: cdev, bind, attach;
legacy: group, container, type1v2, device fds; delegated, protocol v2: a fresh /dev/iommu
and unbound cdevs for the client's VMM, iommud.broker.delegation). Any failure unwinds
what this claim did, shielded from cancellation.

Release (or disconnect, revoke): block DMA first (detach, or unmap a container only this
group uses), reset the devices where they can be reset, close the daemon's fds, then put
drivers and overrides back (off-loop, see drivers.py).

Owns the groups' ownership (``BrokerState.holds``) and the claim lock; every change
of ownership happens under that lock and is announced to the bind guard when the lock
is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from iommud.broker import delegation
from iommud.broker.freeze import claim_refusal
from iommud.broker.journal import JournalEntry
from iommud.broker.plan import Claimant, ClaimPlan, GroupOwner, plan_claim
from iommud.broker.state import (
    BrokerState,
    DelegatedIommufd,
    GroupHold,
    IoasState,
    Lease,
    LeasedDevice,
    LeaseState,
    Session,
)
from iommud.errors import (
    KernelError,
    NotFoundError,
)
from iommud.fds import OwnedFd
from iommud.host.snapshot import HostSnapshot
from iommud.host.viability import (
    ClaimPath,
    ExistingClaim,
)
from iommud.kernel import aio
from iommud.protocol.messages import Claim, ClaimedDevice, ClaimReply
from iommud.protocol.v2 import ClaimMode, ClaimReplyV2, ClaimV2

log = structlog.get_logger(__name__)

RELEASE_WAIT = 1.5
"""Seconds a release waits for the drivers to come back before it answers anyway."""


class ClaimManager:
    """The owner of ownership: ``state.holds`` changes here only, under the claim lock."""

    def __init__(self, state: BrokerState) -> None:
        self._state = state
        self._config = state.config
        self._kernel = state.kernel
        self._drivers = state.drivers
        self._ioas = state.ioas
        self._holds = state.holds
        self._lock = asyncio.Lock()  # one claim/release changes ownership at a time
        # group id -> the background task giving a released group back to its drivers;
        # claims of that group get BusyError until it is done.
        self._restoring: dict[int, asyncio.Task[None]] = {}
        self._next_lease = 1

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the claim lock: ``async with claims.held():``. Ownership changes (claim,
        release, revoke, enforcement, teardown) happen only under it, so racing clients
        and host events see one owner per group. Leaving it is the one place the owners
        are announced (:meth:`_owners_changed`)."""
        async with self._lock:
            try:
                yield
            finally:
                self._owners_changed()

    def _owners_changed(self) -> None:
        """Point the bind guard at exactly the devices of the owned groups (iommud.broker.guard)."""
        guard = self._state.guard
        if guard is not None:
            guard.guard(b for hold in self._holds.values() for b in hold.pinned)

    # ------------------------------------------------------------------ claim
    async def claim(
        self, session: Session, req: Claim
    ) -> tuple[ClaimReply | ClaimReplyV2, list[OwnedFd]]:
        """Read the group, plan the claim (iommud.broker.plan), carry the plan out."""
        async with self.held():
            snap, group_id = await self._state.view.refresh_groups(list(req.devices))
            plan = plan_claim(
                snap,
                group_id,
                self._config,
                Claimant(
                    session.session_id,
                    session.identity,
                    session.quota,
                    {i.ioas_id: i.backend for i in session.ioases.values()},
                    claim_refusal(session, group_id),
                    frozenset(session.delegated),
                    self._ioas.ledger.refusal(session.identity.uid, session.quota, ioas=1),
                ),
                req,
                owner=_owner(self._holds.get(group_id)),
                restoring=self._restoring_now(group_id),
            )
            if plan.delegate:
                lease, fds = await self._execute_delegated(session, plan)
            else:
                lease, fds = await self._execute(session, plan)
        return _reply(req, lease, new_iommufd=plan.delegate and plan.iommufd_id is None), fds

    def _restoring_now(self, group_id: int) -> dict[str, str] | None:
        task = self._restoring.get(group_id)
        return None if task is None or task.done() else dict(self._drivers.pending)

    async def _execute(self, session: Session, plan: ClaimPlan) -> tuple[Lease, list[OwnedFd]]:
        """Journal, pin, rebind, re-read the group, open the kernel objects, grant the
        lease; returns it with the client's copies of the device fds. A failure unwinds
        what this claim did, shielded from cancellation."""
        group_id = plan.group_id
        hold = self._holds.get(group_id) or GroupHold(group_id, session, plan.backend)
        created: IoasState | None = None
        target: IoasState | None = None
        lease_devices: list[LeasedDevice] = []
        fds: list[OwnedFd] = []
        try:
            await self._prepare_drivers(hold, plan)
            self._holds[group_id] = hold
            # cdev names appear after the rebind
            snap, _ = await self._state.view.refresh_groups(list(plan.devices))
            if plan.ioas_id is None:
                target = created = self._ioas.create(session, plan.backend)
            else:
                target = self._ioas.get(session, plan.ioas_id)
            if plan.backend is ClaimPath.IOMMUFD:
                await self._open_iommufd(session, target, snap, plan.devices, lease_devices)
            else:
                await self._open_legacy(hold, target, plan.devices, lease_devices)
            for ld in lease_devices:
                fds.append(OwnedFd(ld.device.dup_fd()))
        except BaseException:
            for fd in fds:
                fd.close()
            if target is not None:
                target.forget_ranges()  # a device may have attached and detached again
            await asyncio.shield(self._unwind(session, hold, plan.new_hold, lease_devices, created))
            raise
        if created is not None:
            created.by_claim = True
        return self._grant(session, hold, plan, target, lease_devices), fds

    async def _execute_delegated(
        self, session: Session, plan: ClaimPlan
    ) -> tuple[Lease, list[OwnedFd]]:
        """The host side as for any claim (journal, pin, rebind), then a fresh
        /dev/iommu (or the one the claim names) and unbound cdevs (iommud.broker.delegation).
        The client's fds: the new iommufd first (index 0), then one per device."""
        group_id = plan.group_id
        hold = self._holds.get(group_id) or GroupHold(group_id, session, plan.backend)
        created: DelegatedIommufd | None = None
        lease_devices: list[LeasedDevice] = []
        fds: list[OwnedFd] = []
        try:
            await self._prepare_drivers(hold, plan)
            self._holds[group_id] = hold
            snap, _ = await self._state.view.refresh_groups(list(plan.devices))
            if plan.iommufd_id is None:
                delegated = created = delegation.open_fresh_iommufd(self._kernel, session)
                fds.append(OwnedFd(delegated.ictx.dup_fd()))
            else:
                delegated = delegation.delegated_iommufd(session, plan.iommufd_id)
            delegation.open_unbound(self._kernel, snap, plan.devices, lease_devices)
            for ld in lease_devices:
                fds.append(OwnedFd(ld.device.dup_fd()))
        except BaseException:
            for fd in fds:
                fd.close()
            await asyncio.shield(self._unwind(session, hold, plan.new_hold, lease_devices, None))
            if created is not None:
                session.delegated.pop(created.iommufd_id, None)
                created.ictx.close()
            raise
        lease = self._grant(session, hold, plan, None, lease_devices)
        lease.delegated = delegated
        delegated.leases.add(lease.lease_id)
        return lease, fds

    def _grant(
        self,
        session: Session,
        hold: GroupHold,
        plan: ClaimPlan,
        ioas: IoasState | None,
        devices: list[LeasedDevice],
    ) -> Lease:
        """Record the new lease in the hold, the session and the IOAS."""
        lease = Lease(self._next_lease, session, plan.group_id, plan.backend, ioas, devices)
        self._next_lease += 1
        hold.leases[lease.lease_id] = lease
        session.leases[lease.lease_id] = lease
        if ioas is not None:
            ioas.groups.add(plan.group_id)
        log.info(
            "device.claimed",
            session=session.session_id,
            uid=session.identity.uid,
            pid=session.identity.pid,
            lease_id=lease.lease_id,
            group_id=plan.group_id,
            devices=list(plan.devices),
            backend=str(plan.backend),
            ioas_id=None if ioas is None else ioas.ioas_id,
            delegated=plan.delegate,
            reason=plan.path.reason,
            rebound=[d.bdf for d in plan.rebind],
        )
        return lease

    async def _prepare_drivers(self, hold: GroupHold, plan: ClaimPlan) -> None:
        """Journal first, then pin every member's override, then rebind."""
        if plan.journal:
            await self._drivers.journal(list(plan.journal))
        for d in plan.pin:
            hold.pinned[d.bdf] = d.driver_override
            await self._drivers.pin(d.bdf)
        for d in plan.rebind:
            hold.rebound[d.bdf] = d.driver
            await self._drivers.to_vfio(d.bdf)

    async def _open_iommufd(
        self,
        session: Session,
        ioas: IoasState,
        snap: HostSnapshot,
        devices: tuple[str, ...],
        out: list[LeasedDevice],
    ) -> None:
        ictx = self._ioas.iommufd(session)
        assert ioas.kernel_id is not None
        for bdf in devices:
            cdev = snap.devices[bdf].vfio_cdev
            if cdev is None:
                raise KernelError("open_cdev", errno.ENOENT, f"{bdf} has no VFIO cdev", bdf=bdf)
            dev = self._kernel.open_cdev(cdev)
            ld = LeasedDevice(bdf, dev)
            out.append(ld)
            ld.devid = dev.bind_iommufd(ictx)
            dev.attach_ioas(ioas.kernel_id)
            ioas.forget_ranges()  # the device's reserved regions narrow them
            ld.attached = True

    async def _open_legacy(
        self,
        hold: GroupHold,
        ioas: IoasState,
        devices: tuple[str, ...],
        out: list[LeasedDevice],
    ) -> None:
        assert ioas.container is not None
        if hold.group is None:
            hold.group = self._kernel.open_group(hold.group_id)
        status = hold.group.get_status()
        if not status.is_viable:
            raise KernelError(
                "group_status",
                errno.EBUSY,
                f"the kernel says group {hold.group_id} is not viable",
                group_id=hold.group_id,
            )
        if not status.is_container_set:
            hold.group.set_container(ioas.container)
        if not ioas.container_ready:
            ioas.container.set_iommu_type1v2()
            ioas.container_ready = True
        for bdf in devices:
            out.append(LeasedDevice(bdf, hold.group.get_device(bdf), attached=True))

    async def _unwind(
        self,
        session: Session,
        hold: GroupHold,
        new_hold: bool,
        devices: list[LeasedDevice],
        created: IoasState | None,
    ) -> None:
        await self._close_devices(hold, devices, reset=False)
        if new_hold:
            self._holds.pop(hold.group_id, None)
            if hold.group is not None:
                hold.group.close()
                hold.group = None
        if created is not None:
            await self._ioas.destroy(session, created, force=True)
        if new_hold:
            await self._restore(hold)

    # ------------------------------------------------------------------ release
    async def release(
        self,
        session: Session,
        lease_id: int,
        *,
        via: Callable[[Lease], Awaitable[object]] | None = None,
    ) -> None:
        """Release a lease of ``session``: :meth:`release_lease`, or ``via`` (a
        delegated lease's, iommud.broker.revocation), under the claim lock."""
        lease = session.leases.get(lease_id)
        if lease is None:
            raise NotFoundError(f"no lease {lease_id} in this session", lease_id=lease_id)
        async with self.held():
            if via is None:
                await asyncio.shield(self.release_lease(lease, why="release"))
                if lease.ioas is not None:
                    await asyncio.shield(self._ioas.drop_if_unused(session, lease.ioas))
            else:
                await asyncio.shield(via(lease))
        # Outside the lock: a restore stalled by this client's own open device fd must
        # not hold up anyone else. Wait briefly so a well-behaved client (fds closed
        # first) gets its answer after the drivers are back; never longer.
        await self.wait_restored([lease.group_id], RELEASE_WAIT)

    async def wait_restored(self, group_ids: list[int], bound: float) -> None:
        """Wait (bounded, never cancelling them) for these groups' driver restores."""
        tasks = {t for g in group_ids if (t := self._restoring.get(g)) is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=bound)

    async def release_lease(
        self, lease: Lease, *, why: str, reset: bool | None = None
    ) -> list[str]:
        """Block DMA, reset, close, then start the driver restore in the background.

        ``reset`` defaults to brokered leases only: a delegated device is the VMM's to
        reset while it may use it; the enforcement resets it once nobody else holds it.
        Returns the BDFs whose restore had not finished when this returned."""
        hold = self._holds[lease.group_id]
        session = lease.session
        last = len(hold.leases) == 1
        await self.block_dma(lease, drop_shared_container=last)
        await self._close_devices(
            hold, lease.devices, reset=not lease.is_delegated if reset is None else reset
        )
        if lease.ioas is not None:
            lease.ioas.forget_ranges()
        hold.leases.pop(lease.lease_id, None)
        session.leases.pop(lease.lease_id, None)
        delegation.forget(lease)
        pending: list[str] = []
        if last:
            if lease.ioas is not None:
                lease.ioas.groups.discard(hold.group_id)
            if hold.group is not None:
                hold.group.close()
                hold.group = None
            del self._holds[hold.group_id]
            pending = self._start_restore(hold)
        log.info(
            "lease.released",
            session=session.session_id,
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            why=why,
            restore_pending=pending,
        )
        return pending

    async def block_dma(self, lease: Lease, *, drop_shared_container: bool) -> None:
        """Stop the lease's devices from reaching memory: detach (iommufd); on the legacy
        path unmap the container when no other group of the session uses it. Delegated:
        detach through the daemon's fds, and empty the VMM's IOASes once no healthy lease
        shares its iommufd (iommud.broker.delegation)."""
        if lease.delegated is not None:
            healthy = delegation.shares_healthy_lease(lease)
            ids = self._config.delegation.unmap_scan_ids
            await delegation.block_delegated(lease, unmap=not healthy, ids=ids)
        elif lease.backend is ClaimPath.IOMMUFD:
            for ld in lease.devices:
                if ld.attached:
                    try:
                        ld.device.detach_ioas()
                    except KernelError as exc:
                        log.exception("device.detach_failed", bdf=ld.bdf, errno=exc.errno)
                    ld.attached = False
            if lease.ioas is not None:
                lease.ioas.forget_ranges()
        elif (
            drop_shared_container
            and lease.ioas is not None
            and lease.ioas.groups <= {lease.group_id}
        ):
            await self._ioas.unmap_all(lease.session, lease.ioas)

    async def _close_devices(
        self, hold: GroupHold, devices: list[LeasedDevice], *, reset: bool
    ) -> None:
        for ld in devices:
            if ld.attached and hold.backend is ClaimPath.IOMMUFD:
                try:
                    ld.device.detach_ioas()
                except KernelError as exc:
                    log.exception("device.detach_failed", bdf=ld.bdf, errno=exc.errno)
                ld.attached = False
            if reset and not ld.device.closed:
                await _reset_quietly(ld)
            close_request_fd(ld)
            ld.device.close()

    def _restore_entries(self, hold: GroupHold) -> list[JournalEntry]:
        bdfs = list(hold.pinned) + [b for b in hold.rebound if b not in hold.pinned]
        return [
            JournalEntry(
                b, hold.group_id, hold.rebound.get(b), hold.pinned.get(b), rebound=b in hold.rebound
            )
            for b in bdfs
        ]

    async def _restore(self, hold: GroupHold) -> list[str]:
        """Restore now, bounded by the sysfs timeout (used to unwind a failed claim)."""
        return await self._drivers.restore(self._restore_entries(hold))

    def _start_restore(self, hold: GroupHold) -> list[str]:
        return self.restore_group(hold.group_id, self._restore_entries(hold))

    def restore_group(self, group_id: int, entries: list[JournalEntry]) -> list[str]:
        """Give a group's devices back in the background; claims of the group are
        answered ``busy`` (with what it waits for) until it is done. Also replays the
        journal of a previous run at start. Returns the BDFs being restored."""
        if not entries:
            return []
        task = self._drivers.restore_in_background(entries)
        self._restoring[group_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._restoring.get(group_id) is t:
                del self._restoring[group_id]

        task.add_done_callback(done)
        return [e.bdf for e in entries]

    # ------------------------------------------------------------------ revoke
    def active_leases(self, group_id: int) -> list[Lease]:
        hold = self._holds.get(group_id)
        if hold is None:
            return []
        return [le for le in hold.leases.values() if le.state is LeaseState.ACTIVE]


def _owner(hold: GroupHold | None) -> GroupOwner | None:
    """The group's holder as the plan sees it."""
    if hold is None:
        return None
    session = hold.session
    return GroupOwner(
        session.session_id,
        session.identity,
        lease_ids=tuple(hold.leases),
        is_revoked=any(le.state is not LeaseState.ACTIVE for le in hold.leases.values()),
        pinned=dict(hold.pinned),
        claims={
            # a delegated lease has no daemon IOAS: 0 is never a daemon IOAS id
            d.bdf: ExistingClaim(session.session_id, _ioas_id(le), le.backend)
            for le in hold.leases.values()
            for d in le.devices
        },
        delegated=frozenset(le.is_delegated for le in hold.leases.values()),
    )


def _ioas_id(lease: Lease) -> int:
    return 0 if lease.ioas is None else lease.ioas.ioas_id


def _reply(req: Claim, lease: Lease, *, new_iommufd: bool) -> ClaimReply | ClaimReplyV2:
    """The reply in the request's protocol version (v2's claim_reply carries ``mode``).
    Delegated: the new iommufd's fd comes first, then the devices'; devid unknown."""
    if lease.delegated is not None:
        first = int(new_iommufd)
        return ClaimReplyV2(
            id=req.id,
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            backend=str(lease.backend),
            ioas_id=None,
            mode=ClaimMode.DELEGATED,
            iommufd_id=lease.delegated.iommufd_id,
            iommufd_fd_index=0 if new_iommufd else None,
            devices=tuple(
                ClaimedDevice(bdf=ld.bdf, fd_index=first + i, devid=None)
                for i, ld in enumerate(lease.devices)
            ),
        )
    assert lease.ioas is not None
    devices = tuple(
        ClaimedDevice(bdf=ld.bdf, fd_index=i, devid=ld.devid) for i, ld in enumerate(lease.devices)
    )
    if isinstance(req, ClaimV2):
        return ClaimReplyV2(
            id=req.id,
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            backend=str(lease.backend),
            ioas_id=lease.ioas.ioas_id,
            mode=ClaimMode.BROKERED,
            iommufd_id=None,
            iommufd_fd_index=None,
            devices=devices,
        )
    return ClaimReply(
        id=req.id,
        fds=len(lease.devices),
        lease_id=lease.lease_id,
        group_id=lease.group_id,
        backend=str(lease.backend),
        ioas_id=lease.ioas.ioas_id,
        devices=devices,
    )


def close_request_fd(ld: LeasedDevice) -> None:
    """Stop watching the device's REQ eventfd (see Enforcer.watch_requests) and close it."""
    fd, ld.request_fd = ld.request_fd, None
    if fd is not None and not fd.closed:
        asyncio.get_running_loop().remove_reader(fd.fileno())
        fd.close()


async def _reset_quietly(ld: LeasedDevice) -> None:
    """VFIO_DEVICE_RESET when the device supports it; failures are logged, not raised."""
    try:
        info = await aio.call("VFIO_DEVICE_GET_INFO", ld.device.get_info)
        if info.can_reset:
            await aio.call("VFIO_DEVICE_RESET", ld.device.reset)
            log.info("device.reset", bdf=ld.bdf)
    except KernelError as exc:
        log.warning("device.reset_failed", bdf=ld.bdf, errno=exc.errno, op=exc.op)
