"""Enforcement: what the broker does when the host changes under an owned group.

A uevent (or a bind-guard audit) touching an owned group: pin driver_override on
devices that joined it (hot-add), re-pin overrides someone changed, forget devices that
left, and revoke the group's leases if it lost viability; a group that vanished ends its
leases. The kernel asking for a handed-out device back (vfio-pci's REQ irq, i.e. a
hot-unplug) revokes its lease and closes the daemon's fds of the device. ``iommuctl
revoke`` takes the same revoke path.

Revoke blocks DMA at once and tells the owner (lease_revoked); the lease stays (state
revoked, group still owned, overrides pinned) until the client releases it or
disconnects. On the iommufd path a revoke also freezes the session's iommufd (every
IOAS unmapped, maps refused) until the revoked devices are gone: see
iommud.broker.freeze for why and when it lifts. Everything here runs under the claim
lock and shielded from cancellation.
Never decides viability itself (iommud.host.viability does).
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from iommud.broker.claim import ClaimManager, close_request_fd
from iommud.broker.drivers import VFIO_PCI
from iommud.broker.freeze import freeze
from iommud.broker.journal import JournalEntry
from iommud.broker.revocation import Revoker
from iommud.broker.sessions import quietly
from iommud.broker.state import BrokerState, GroupHold, Lease, LeasedDevice, LeaseState
from iommud.errors import KernelError
from iommud.host.snapshot import HostSnapshot, PciDevice
from iommud.host.viability import ClaimPath, group_viability
from iommud.kernel import aio
from iommud.kernel.eventfd import drain_eventfd, open_eventfd
from iommud.kernel.uapi import VFIO_PCI_REQ_IRQ_INDEX
from iommud.protocol import messages as m
from iommud.protocol.v2 import ClaimMode
from iommud.watch.source import HostAction, HostEvent

log = structlog.get_logger(__name__)

DEVICE_REQUESTED: Final = "device removal requested by the kernel"


class Enforcer:
    """Host changes on owned groups, revoke, and the kernel's device requests."""

    def __init__(self, state: BrokerState, claims: ClaimManager, revoker: Revoker) -> None:
        self._state = state
        self._revoker = revoker
        self._config = state.config
        self._view = state.view
        self._claims = claims
        self._ioas = state.ioas
        self._drivers = state.drivers
        self._journal = state.journal
        self._holds = state.holds

    # ------------------------------------------------------------------ host changes
    async def on_host_change(
        self,
        group_id: int,
        snapshot: HostSnapshot | None = None,
        events: tuple[HostEvent, ...] = (),
    ) -> None:
        """A uevent touched one group: take its fresh view, enforce on owned groups.

        ``snapshot`` is the udev watcher's view, which already holds this group as just
        re-read (so the group is not read twice per event); without it the group is read
        here. ``events``: what happened; a VFIO cdev's removal (a hot-unplug or unbind
        of a device vfio-pci holds) revokes a delegated lease of that device.
        """
        await self._view.refresh_group(group_id, snapshot)
        if group_id in self._holds:
            unplugged = {e.bdf for e in events if e.action is HostAction.CDEV_REMOVE}
            await asyncio.shield(self._enforce(group_id, unplugged))

    async def _enforce(self, group_id: int, unplugged: frozenset[str] | set[str]) -> None:
        revoke: str | None = None
        gone = False
        async with self._claims.held():
            hold = self._holds.get(group_id)
            if hold is None:
                return
            snap = self._view.snapshot
            if group_id not in snap.groups:
                gone = True
                members: dict[str, PciDevice] = {}
            else:
                members = {d.bdf: d for d in snap.group_devices(group_id)}
            await self._track_members(hold, members)
            if gone:
                revoke = f"IOMMU group {group_id} disappeared"
            elif any(
                ld.bdf in unplugged
                for le in hold.leases.values()
                if le.is_delegated
                for ld in le.devices
            ):
                # The kernel is removing a device the VMM holds: vfio_unregister_group_dev
                # waits for every file of it, and QEMU's REQ eventfd replaced ours.
                revoke = DEVICE_REQUESTED
            else:
                v = group_viability(snap, group_id, self._config.dma_safe_drivers)
                if not v.is_viable:
                    names = ", ".join(f"{o.bdf} ({o.driver})" for o in v.offenders)
                    revoke = f"viability lost: {names}"
            if revoke is not None:
                await self.revoke_locked(group_id, revoke)
            if gone:
                # Nothing is left to give back: end the leases (the owner was told).
                for lease in list(hold.leases.values()):
                    await self._claims.release_lease(lease, why="group vanished")

    async def _track_members(self, hold: GroupHold, members: dict[str, PciDevice]) -> None:
        """Keep every device of an owned group pinned to vfio-pci (called with the lock)."""
        left = [b for b in hold.pinned if b not in members]
        if left:
            for b in left:
                hold.pinned.pop(b, None)
                hold.rebound.pop(b, None)
            await aio.call("journal_write", self._journal.drop, left)
            log.info("group.members_left", group_id=hold.group_id, devices=left)
        joined = [d for d in members.values() if d.bdf not in hold.pinned]
        if joined:
            await self._drivers.journal(
                [
                    JournalEntry(d.bdf, hold.group_id, d.driver, d.driver_override, rebound=False)
                    for d in joined
                ]
            )
        for d in joined:
            hold.pinned[d.bdf] = d.driver_override
            await quietly("driver.pin", self._drivers.pin(d.bdf))
            log.warning(
                "group.device_joined",
                group_id=hold.group_id,
                bdf=d.bdf,
                driver=d.driver,
                pinned=VFIO_PCI,
            )
        new = {d.bdf for d in joined}
        for d in members.values():
            if d.bdf not in new and d.driver_override != VFIO_PCI:
                log.warning(
                    "guard.override_repinned",
                    group_id=hold.group_id,
                    bdf=d.bdf,
                    found=d.driver_override,
                )
                await quietly("driver.pin", self._drivers.pin(d.bdf))

    # ------------------------------------------------------------------ revoke
    async def revoke_group(self, group_id: int, reason: str) -> list[int]:
        """Block DMA for every active lease on the group at once and tell the owner.

        iommufd: detach the devices, freeze the session's iommufd and unmap EVERY IOAS
        in it (the client holds the device fd and could re-attach it to any of them;
        see iommud.broker.freeze); legacy: unmap the container. The leases stay (state
        revoked, group still owned, overrides still pinned) until the client releases
        them or disconnects; maps are refused meanwhile.
        """

        async def work() -> list[int]:
            async with self._claims.held():
                return await self.revoke_locked(group_id, reason)

        return await asyncio.shield(work())

    async def revoke_locked(self, group_id: int, reason: str) -> list[int]:
        """:meth:`revoke_group` for a caller already holding the claim lock."""
        revoked: list[int] = []
        for lease in self._claims.active_leases(group_id):
            session = lease.session
            if lease.is_delegated:
                # detach, clamp, unmap, lease_revoked with grace_s, then enforcement
                await self._revoker.revoke_locked(lease, reason)
                revoked.append(lease.lease_id)
                continue
            await self._claims.block_dma(lease, drop_shared_container=False)
            if lease.backend is ClaimPath.IOMMUFD:
                # The client's copy of the device fd stays bound to the session's
                # iommufd and can be re-attached to any IOAS there: empty them all
                # and keep them empty until the device is gone (iommud.broker.freeze).
                freeze(session, lease, reason)
                targets = [i for i in session.ioases.values() if i.backend is ClaimPath.IOMMUFD]
            else:
                assert lease.ioas is not None
                targets = [lease.ioas]
            for ioas in targets:
                try:
                    await self._ioas.unmap_all(session, ioas)
                except KernelError as exc:
                    log.exception(
                        "group.revoke_unmap_failed",
                        group_id=group_id,
                        ioas_id=ioas.ioas_id,
                        errno=exc.errno,
                    )
            lease.state = LeaseState.REVOKED
            lease.revoke_reason = reason
            revoked.append(lease.lease_id)
            self._state.publish(
                m.EventName.LEASE_REVOKED,
                holder=lease.session,
                lease_id=lease.lease_id,
                group_id=group_id,
                reason=reason,
                mode=ClaimMode.BROKERED,
                grace_s=None,
            )
            log.warning(
                "group.revoked",
                group_id=group_id,
                lease_id=lease.lease_id,
                session=lease.session.session_id,
                uid=lease.session.identity.uid,
                reason=reason,
            )
        return revoked

    # ------------------------------------------------------------------ device requests
    def watch_requests(self, lease: Lease) -> None:
        """Register an eventfd on each leased device's REQ irq and watch it on the loop.

        vfio-pci's remove path (drivers/vfio/vfio_main.c vfio_unregister_group_dev)
        waits until every fd of the device is closed and meanwhile signals this irq
        (vfio_pci_core_request); the remove uevent only comes after, so this is the
        daemon's only timely news of a hot-unplug of a device it handed out.
        """
        loop = asyncio.get_running_loop()
        for ld in lease.devices:
            efd = open_eventfd()
            try:
                ld.device.set_irq_eventfd(VFIO_PCI_REQ_IRQ_INDEX, efd.fileno())
            except KernelError as exc:
                efd.close()
                log.warning("device.request_irq_unavailable", bdf=ld.bdf, errno=exc.errno)
                continue
            ld.request_fd = efd
            loop.add_reader(efd.fileno(), self._device_requested, lease, ld)

    def _device_requested(self, lease: Lease, ld: LeasedDevice) -> None:
        fd = ld.request_fd
        if fd is None or fd.closed:
            return
        if not drain_eventfd(fd.fileno()):
            return
        log.warning(
            "device.removal_requested",
            bdf=ld.bdf,
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            session=lease.session.session_id,
        )
        self._state.spawn(self._give_back(lease, ld))

    async def _give_back(self, lease: Lease, ld: LeasedDevice) -> None:
        """The kernel wants the device back: revoke the lease, close our fds of it."""

        async def work() -> None:
            async with self._claims.held():
                if lease.state is LeaseState.ACTIVE:
                    await self.revoke_locked(lease.group_id, DEVICE_REQUESTED)
                for dev in lease.devices:
                    if dev.bdf == ld.bdf:
                        close_request_fd(dev)
                        dev.device.close()

        await asyncio.shield(work())
