"""Read-only answers: list_devices, list_groups and status.

Builds the wire replies from the host view, the owned groups and the sessions. Changes
no state but the view's snapshot (a listing re-reads the host so it never starts from a
stale tree); never touches the kernel layer. Lists come in pages that fit in one
datagram (``iommud.broker.paging``): devices sorted by bdf, groups by id.

A page costs O(page), not O(list): the sorted keys are computed once per snapshot (a
walk of N pages reuses page 0's reading) and an entry (a group's viability included) is
built only when ``fill_page`` measures it (``_Lazy``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, overload

from iommud import __version__
from iommud.broker.paging import fill_page
from iommud.broker.state import BrokerState, Lease
from iommud.host.snapshot import HostSnapshot
from iommud.host.viability import group_viability, whole_group_path
from iommud.policy import Identity, may_see_holder
from iommud.protocol import messages as m

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

    def status(
        self, rid: int, viewer: Identity, *, event_source: str | None, uptime_s: float
    ) -> m.StatusReply:
        """``leases`` lists only those ``viewer`` may see (its uid's; uid 0: all)."""
        return m.StatusReply(
            id=rid,
            version=__version__,
            event_source=event_source,
            clients=len(self._sessions),
            leases=tuple(lease_info(le) for le in self.visible_leases(viewer)),
            uptime_s=max(0.0, uptime_s),
        )


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
