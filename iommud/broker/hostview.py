"""The one owner of the host snapshot: the broker decides on it, events are told from it.

Holds the frozen HostSnapshot the broker decides on and replaces it as groups are
re-read: a claim's group, a uevent's group (``apply``), everything for a listing or a
resync (``read_all``, ``rescan``). Group viability is judged here by one function given
the configured DMA-safe drivers (``viability``), for decisions and events alike.

Subscribers are told what changed since they were last told, not since the last read:
a listing or a claim may re-read a group before its uevent is handled, and the event
must still say what happened. So besides the snapshot the view keeps ``_announced``, the
host as the last host change reported it (a structure-sharing copy, never used for a
decision), and reports each change against it: the group before and after, the device
events (``HostEvent``; on unbind ``driver`` is filled in from that view, since the
kernel's uevent no longer carries it) and the viability before and after.

Also remembers every driver each device was seen bound to, so a refused bind can be
attributed (inotify names the driver's bind file, not the device written to it).

Reads sysfs only through iommud.host.snapshot; never writes sysfs and decides nothing
about ownership (iommud.broker.enforcement does).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

import structlog

from iommud.config import Config
from iommud.errors import BadRequestError, InvalidStateError, IommudError, NotFoundError
from iommud.host.snapshot import (
    HostSnapshot,
    IommuGroup,
    PciDevice,
    group_of,
    read_group,
    read_snapshot,
)
from iommud.host.viability import Viability, group_viability
from iommud.kernel import aio
from iommud.watch.source import HostAction, HostEvent

log = structlog.get_logger(__name__)

# Devices remembered between vanishing from sysfs and their remove uevent.
_VANISHED_MAX: Final = 4096

_EMPTY: Final = HostSnapshot({}, {}, has_iommufd=False, has_legacy_container=False)

_Group = tuple[IommuGroup, dict[str, PciDevice]]  # what read_group returns


@dataclass(frozen=True, slots=True)
class HostChange:
    """What one uevent (or one rescan) did to one IOMMU group, as the view reports it.

    ``events`` say what happened, in order. ``before`` and ``after`` are the group's
    viability as last reported and now (None where the group did not exist), both
    judged with the configured DMA-safe drivers. ``resync`` is the rescan reason when
    the change came from a rescan.
    """

    group_id: int
    events: tuple[HostEvent, ...]
    before: Viability | None
    after: Viability | None
    resync: str | None = None

    @property
    def is_viability_changed(self) -> bool:
        """The group exists and its viability or its offenders differ from before."""
        a, b = self.before, self.after
        return b is not None and (
            a is None or (a.is_viable, a.offenders) != (b.is_viable, b.offenders)
        )


class HostView:
    """The current snapshot, what subscribers were last told, and seen drivers."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._snapshot: HostSnapshot | None = None
        self._announced = _EMPTY
        self.seen_drivers: dict[str, set[str]] = {}
        self.is_stale = True  # no full read yet, or the last one failed
        self.events_handled = 0
        self.rescans = 0
        # Devices seen vanishing before their remove uevent arrived: bdf -> group id.
        self._vanished: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._reading: asyncio.Future[HostSnapshot] | None = None  # the shared read_all

    @property
    def snapshot(self) -> HostSnapshot:
        if self._snapshot is None:
            raise InvalidStateError("the broker has not started")
        return self._snapshot

    def viability(self, snapshot: HostSnapshot, group_id: int) -> Viability | None:
        """The group's viability under the configured DMA-safe drivers (None: no group)."""
        if group_id not in snapshot.groups:
            return None
        return group_viability(snapshot, group_id, self._config.dma_safe_drivers)

    def _note(self, devices: Iterable[PciDevice]) -> None:
        for dev in devices:
            if dev.driver is not None:
                self.seen_drivers.setdefault(dev.bdf, set()).add(dev.driver)

    def _set_group(self, group_id: int, found: _Group | None) -> None:
        """Replace one group (None: it is gone) in the snapshot the broker decides on."""
        if found is None:
            self._snapshot = self.snapshot.without_group(group_id)
        else:
            self._snapshot = self.snapshot.with_group(*found)
            self._note(found[1].values())

    # ------------------------------------------------------------------ reads
    async def read_all(self) -> HostSnapshot:
        """Read the whole host (listings); changes are reported by the next uevent.

        One read at a time, shared: callers that arrive while a read runs get its
        result, so N listings cost one read, not N queued on the work pool. A caller
        that is cancelled (its peer left) stops waiting; the read goes on for the rest.
        """
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read_all())
            self._reading.add_done_callback(self._read_done)
        return await asyncio.shield(self._reading)

    async def _read_all(self) -> HostSnapshot:
        d = self._config.daemon
        self._snapshot = await aio.call("read_snapshot", read_snapshot, d.sys_root, d.dev_root)
        return self._snapshot

    def _read_done(self, task: asyncio.Future[HostSnapshot]) -> None:
        self._reading = None
        if task.cancelled():
            return
        if task.exception() is not None:
            log.info("host.read_failed", error=str(task.exception()))  # callers got it too
        else:
            log.info("host.read_all", devices=len(task.result().devices))

    async def start(self) -> HostSnapshot:
        """The start-up read: the view subscribers start from, too.

        The daemon's only full read at start-up: its uevent monitor opened before it
        (iommud.watch.watcher ``HostFollower``), so what this read misses arrives as
        uevents, applied (``apply``) before the daemon reports READY."""
        snap = await self.read_all()
        self._announced = snap
        self.is_stale = False
        self._note(snap.devices.values())
        return snap

    async def refresh_groups(self, bdfs: list[str]) -> tuple[HostSnapshot, int]:
        """Re-read the one group these devices are in (BadRequest if they span groups)."""
        root = self._config.daemon.sys_root

        def work() -> tuple[int, IommuGroup, dict[str, PciDevice]]:
            groups = {b: group_of(root, b) for b in bdfs}
            ids = set(groups.values())
            if None in ids:
                orphans = [b for b, g in groups.items() if g is None]
                raise BadRequestError(
                    f"not in any IOMMU group: {', '.join(orphans)}", devices=orphans
                )
            if len(ids) > 1:
                raise BadRequestError(
                    "one claim covers one IOMMU group; these devices span several",
                    groups={b: g for b, g in groups.items()},
                )
            (group_id,) = ids
            assert group_id is not None
            group, devs = read_group(root, group_id)
            return group_id, group, devs

        group_id, group, devs = await aio.call("read_group", work)
        self._set_group(group_id, (group, devs))
        return self.snapshot, group_id

    async def refresh_group(self, group_id: int, snapshot: HostSnapshot | None = None) -> None:
        """Take a fresh view of one group: from ``snapshot`` (a view that already holds
        it as just re-read; the view's own, after ``apply``, costs nothing) or, without
        one, by reading it here."""
        if snapshot is self._snapshot:
            return
        if snapshot is not None:
            if group_id in snapshot.groups:
                devs = {d.bdf: d for d in snapshot.group_devices(group_id)}
                self._set_group(group_id, (snapshot.groups[group_id], devs))
            else:
                self._set_group(group_id, None)
            return
        try:
            found = await aio.call("read_group", read_group, self._config.daemon.sys_root, group_id)
        except NotFoundError:
            self._set_group(group_id, None)
        else:
            self._set_group(group_id, found)

    # ------------------------------------------------------------------ host changes
    async def rescan(self, reason: str) -> list[HostChange]:
        """Re-read the whole host (in a worker thread); report every group that differs
        from what was last reported, with synthesized events, so subscribers hear the
        same story whether or not uevents were lost."""
        d = self._config.daemon
        try:
            new = await aio.call("read_snapshot", read_snapshot, d.sys_root, d.dev_root)
        except IommudError as exc:
            # Keep the old view but remember it is stale: the next event rescans again.
            self.is_stale = True
            log.exception("host.rescan_failed", reason=reason, code=exc.code, **exc.details)
            return []
        self.is_stale = False
        self._vanished.clear()  # the diff below reports every removal
        old, self._announced = self._announced, new
        self._snapshot = new
        self._note(new.devices.values())
        self.rescans += 1
        changes: list[HostChange] = []
        for group_id in sorted(old.groups.keys() | new.groups.keys()):
            before, after = _members(old, group_id), _members(new, group_id)
            if before == after and old.groups.get(group_id) == new.groups.get(group_id):
                continue
            changes.append(
                HostChange(
                    group_id,
                    diff_events(before, after),
                    self.viability(old, group_id),
                    self.viability(new, group_id),
                    resync=reason,
                )
            )
        log.info(
            "host.rescanned", reason=reason, devices=len(new.devices), groups_changed=len(changes)
        )
        return changes

    async def apply(self, event: HostEvent) -> list[HostChange]:
        """Re-read the group(s) one uevent touches and report each.

        Per event it reads one device link (``group_of``) and one group (``read_group``):
        the cost does not depend on the number of devices on the host. A device or group
        that cannot be read falls back to a full ``rescan``.
        """
        self.events_handled += 1
        if self.is_stale:
            return await self.rescan("stale")
        sys_root = self._config.daemon.sys_root
        told = self._announced
        prev = told.devices.get(event.bdf)
        old_gid = prev.group_id if prev is not None else None
        new_gid: int | None = None
        if event.action is HostAction.REMOVE:
            if prev is None:  # it vanished while we handled an earlier event
                old_gid = self._vanished.pop(event.bdf, None)
        else:
            try:
                new_gid = group_of(sys_root, event.bdf)
            except NotFoundError:
                # Gone already (the kernel sends unbind, then removes the directory,
                # then sends remove): remember its group for the remove uevent.
                if old_gid is not None:
                    self._remember_vanished(event.bdf, old_gid)
            except IommudError as exc:
                log.warning("host.event_unreadable", bdf=event.bdf, code=exc.code, **exc.details)
                return await self.rescan("unreadable_device")
        gids = [g for g in dict.fromkeys((old_gid, new_gid)) if g is not None]
        if not gids:
            log.debug("host.event_no_group", action=event.action, bdf=event.bdf)
            return []
        if event.action is HostAction.UNBIND and event.driver is None and prev is not None:
            event = replace(event, driver=prev.driver)
        changes: list[HostChange] = []
        for group_id in gids:
            try:
                found: _Group | None = read_group(sys_root, group_id)
            except NotFoundError:
                found = None
            except (IommudError, ValueError) as exc:
                log.warning("host.group_unreadable", group_id=group_id, error=repr(exc))
                return [*changes, *await self.rescan("unreadable_group")]
            self._set_group(group_id, found)
            before = self._announced
            self._announced = (
                before.without_group(group_id) if found is None else before.with_group(*found)
            )
            changes.append(
                HostChange(
                    group_id,
                    (event,),
                    self.viability(before, group_id),
                    self.viability(self._announced, group_id),
                )
            )
        return changes

    def _remember_vanished(self, bdf: str, group_id: int) -> None:
        self._vanished[bdf] = group_id
        self._vanished.move_to_end(bdf)
        while len(self._vanished) > _VANISHED_MAX:
            self._vanished.popitem(last=False)


def _members(snapshot: HostSnapshot, group_id: int) -> tuple[PciDevice, ...]:
    if group_id not in snapshot.groups:
        return ()
    return snapshot.group_devices(group_id)


def diff_events(before: Iterable[PciDevice], after: Iterable[PciDevice]) -> tuple[HostEvent, ...]:
    """The events that turn one group's device list into another (pure; for rescans)."""
    old = {d.bdf: d for d in before}
    new = {d.bdf: d for d in after}
    out: list[HostEvent] = []
    for bdf in sorted(old.keys() | new.keys()):
        a, b = old.get(bdf), new.get(bdf)
        if a is not None and b is None:
            if a.driver is not None:
                out.append(HostEvent(HostAction.UNBIND, bdf, a.driver))
            out.append(HostEvent(HostAction.REMOVE, bdf))
        elif a is None and b is not None:
            out.append(HostEvent(HostAction.ADD, bdf))
            if b.driver is not None:
                out.append(HostEvent(HostAction.BIND, bdf, b.driver))
        elif a is not None and b is not None and a.driver != b.driver:
            if a.driver is not None:
                out.append(HostEvent(HostAction.UNBIND, bdf, a.driver))
            if b.driver is not None:
                out.append(HostEvent(HostAction.BIND, bdf, b.driver))
    return tuple(out)
