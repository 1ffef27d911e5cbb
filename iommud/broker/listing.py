"""Read-only answers: list_devices, list_groups and status.

Builds the wire replies from the host view, the owned groups and the sessions. Changes
no state but the view's snapshot (a listing re-reads the host so it never starts from a
stale tree); never touches the kernel layer itself (v2's status reads the delegated VMMs'
pinned bytes through iommud.broker.delegation). Lists come in pages that fit in one
datagram (``iommud.broker.paging``): devices sorted by bdf, groups by id.

A page costs O(page), not O(list): the sorted keys are computed once per snapshot (a
walk of N pages reuses page 0's reading) and an entry (a group's viability included) is
built only when ``fill_page`` measures it (``_Lazy``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final, Generic, TypeVar, overload

from iommud import __version__
from iommud.broker import delegation
from iommud.broker.paging import fill_page
from iommud.broker.state import BrokerState, Lease
from iommud.host.snapshot import HostSnapshot
from iommud.host.viability import group_viability, whole_group_path
from iommud.policy import Identity, may_see_holder
from iommud.protocol import messages as m
from iommud.protocol.v2 import (
    ClaimMode,
    LeaseInfoV2,
    LeaseStatus,
    PendingRestore,
    StatusReplyV2,
    StatusV2,
)

PINNED_TTL: Final = 1.0
"""Seconds a v2 status reuses the last reading of the VMMs' pinned bytes."""

K = TypeVar("K")
E = TypeVar("E")


class _Lazy(Sequence[E], Generic[K, E]):
    """``make(keys[i])`` for index ``i``, built when asked for (paging.fill_page)."""

    def __init__(self, keys: Sequence[K], make: Callable[[K], E]) -> None:
        self._keys = keys
        self._make = make

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, i: int) -> E: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[E]: ...
    def __getitem__(self, i: int | slice) -> E | Sequence[E]:
        if isinstance(i, slice):
            return [self._make(k) for k in self._keys[i]]
        return self._make(self._keys[i])


class Listing:
    """The list/status handlers of Broker.handle."""

    def __init__(self, state: BrokerState) -> None:
        self._config = state.config
        self._view = state.view
        self._holds = state.holds
        self._sessions = state.sessions
        self._processes = state.kernel.processes
        self._restoring = state.drivers.pending  # bdf -> what its restore waits for
        # v2 status walks /proc for the VMMs' pinned bytes: at most one walk per
        # PINNED_TTL, shared by concurrent requests (a status loop cannot load the
        # work pool that pins run on).
        self._pinned: tuple[float, dict[int, delegation.Pinned]] | None = None
        self._pinned_lock = asyncio.Lock()
        # (snapshot, its bdfs sorted, its group ids sorted), for the snapshot last listed
        self._order: tuple[HostSnapshot, list[str], list[int]] | None = None

    def _sorted(self, snap: HostSnapshot) -> tuple[list[str], list[int]]:
        if self._order is None or self._order[0] is not snap:
            self._order = (snap, sorted(snap.devices), sorted(snap.groups))
        return self._order[1], self._order[2]

    async def _snapshot(self, offset: int) -> HostSnapshot:
        # The first page re-reads the host; later pages use that reading (as the host
        # watcher keeps it current), so a walk of N pages reads sysfs once, not N times
        # (3,000 devices: ~0.15 s per read).
        return await self._view.read_all() if offset == 0 else self._view.snapshot

    async def list_devices(self, request: m.ListDevices) -> m.ListDevicesReply:
        snap = await self._snapshot(request.offset)
        bdfs, _ = self._sorted(snap)

        def entry(bdf: str) -> m.DeviceEntry:
            d = snap.devices[bdf]
            return m.DeviceEntry(
                bdf=d.bdf,
                vendor=d.vendor,
                device=d.device,
                class_code=d.class_code,
                driver=d.driver,
                driver_override=d.driver_override,
                group_id=d.group_id,
                is_bridge=d.is_bridge,
                vfio_cdev=d.vfio_cdev,
            )

        return fill_page(
            _Lazy(bdfs, entry),
            request.offset,
            request.limit,
            lambda page, total, nxt: m.ListDevicesReply(
                id=request.id, total=total, next_offset=nxt, devices=page
            ),
        )

    async def list_groups(self, request: m.ListGroups, viewer: Identity) -> m.ListGroupsReply:
        snap = await self._snapshot(request.offset)
        _, group_ids = self._sorted(snap)
        safe = self._config.dma_safe_drivers

        def entry(group_id: int) -> m.GroupEntry:
            v = group_viability(snap, group_id, safe)
            hold = self._holds.get(group_id)
            path = hold.backend if hold else whole_group_path(snap, group_id, safe)
            return m.GroupEntry(
                group_id=group_id,
                devices=snap.groups[group_id].devices,
                is_viable=v.is_viable,
                offenders=tuple(
                    m.Offender(bdf=o.bdf, driver=o.driver)
                    for o in v.offenders
                    if o.bdf in snap.devices
                ),
                path=None if path is None else str(path),
                owner=None if hold is None else owner(hold.session.identity, viewer),
            )

        return fill_page(
            _Lazy(group_ids, entry),
            request.offset,
            request.limit,
            lambda page, total, nxt: m.ListGroupsReply(
                id=request.id, total=total, next_offset=nxt, groups=page
            ),
        )

    def visible_leases(self, viewer: Identity) -> list[Lease]:
        """The leases ``viewer`` may see (PROTOCOL.md section 9): its own uid's; uid 0 all."""
        return [
            le
            for s in self._sessions.values()
            if may_see_holder(viewer, s.identity)
            for le in s.leases.values()
        ]

    async def status(
        self,
        request: m.Status,
        viewer: Identity,
        *,
        event_source: str | None,
        uptime_s: float,
    ) -> m.StatusReply | StatusReplyV2:
        """v1's reply, byte for byte as before; v2's (``StatusV2``) adds per lease its
        mode, state, enforcement time and its VMM's pinned bytes. ``leases`` lists only
        those ``viewer`` may see (its uid's; uid 0: all)."""
        leases = self.visible_leases(viewer)
        if not isinstance(request, StatusV2):
            return m.StatusReply(
                id=request.id,
                version=__version__,
                event_source=event_source,
                clients=len(self._sessions),
                leases=tuple(lease_info(le) for le in leases),
                uptime_s=max(0.0, uptime_s),
            )
        pinned = await self._pinned_now()
        return StatusReplyV2(
            id=request.id,
            version=__version__,
            event_source=event_source,
            clients=len(self._sessions),
            leases=tuple(lease_info_v2(le, pinned) for le in leases),
            restores=tuple(
                PendingRestore(bdf=bdf, waiting_for=why)
                for bdf, why in sorted(self._restoring.items())
            ),
            uptime_s=max(0.0, uptime_s),
        )

    async def _pinned_now(self) -> dict[int, delegation.Pinned]:
        async with self._pinned_lock:
            now = time.monotonic()
            live = {id(d) for s in self._sessions.values() for d in s.delegated.values()}
            if (
                self._pinned is None
                or now - self._pinned[0] >= PINNED_TTL
                or not live <= self._pinned[1].keys()  # a new iommufd since
            ):
                found = await delegation.pinned_bytes(self._processes, self._sessions.values())
                self._pinned = (time.monotonic(), found)
            return self._pinned[1]


def owner(holder: Identity, viewer: Identity) -> m.Owner:
    """A group's ``owner`` as ``viewer`` may see it: held, and by whom only if allowed."""
    if may_see_holder(viewer, holder):
        return m.Owner(uid=holder.uid, pid=holder.pid)
    return m.Owner(uid=None, pid=None)


def lease_info(lease: Lease) -> m.LeaseInfo:
    ident = lease.session.identity
    return m.LeaseInfo(
        lease_id=lease.lease_id,
        group_id=lease.group_id,
        uid=ident.uid,
        pid=ident.pid,
        backend=str(lease.backend),
        devices=tuple(d.bdf for d in lease.devices),
        ioas_id=0 if lease.ioas is None else lease.ioas.ioas_id,  # 0: delegated, none
    )


def lease_info_v2(lease: Lease, pinned: dict[int, delegation.Pinned]) -> LeaseInfoV2:
    base = lease_info(lease)
    d = lease.delegated
    pins = None if d is None else pinned.get(id(d))
    return LeaseInfoV2(
        **base.model_dump(),
        mode=ClaimMode.BROKERED if d is None else ClaimMode.DELEGATED,
        state=LeaseStatus(lease.state.value),
        iommufd_id=None if d is None else d.iommufd_id,
        enforce_at=lease.enforce_at,
        pinned_bytes=None if pins is None else pins.bytes,
        pinned_pids=() if pins is None else pins.pids,
    )
