"""The broker's view of the host: the current snapshot, re-read piecewise.

Holds the frozen HostSnapshot the broker decides on and replaces it as groups are
re-read (a claim's group, a uevent's group, a full read for a listing). Also remembers
every driver each device was seen bound to, so a refused bind can be attributed
(inotify names the driver's bind file, not the device written to it).

Reads sysfs only through iommud.host.snapshot, in worker threads; never writes sysfs
and decides nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from iommud.config import Config
from iommud.errors import BadRequestError, InvalidStateError, NotFoundError
from iommud.host.snapshot import (
    HostSnapshot,
    IommuGroup,
    PciDevice,
    group_of,
    read_group,
    read_snapshot,
)
from iommud.kernel import aio


class HostView:
    """The current snapshot plus the drivers each device was seen with."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._snapshot: HostSnapshot | None = None
        self.seen_drivers: dict[str, set[str]] = {}

    @property
    def snapshot(self) -> HostSnapshot:
        if self._snapshot is None:
            raise InvalidStateError("the broker has not started")
        return self._snapshot

    def _note(self, devices: Iterable[PciDevice]) -> None:
        for dev in devices:
            if dev.driver is not None:
                self.seen_drivers.setdefault(dev.bdf, set()).add(dev.driver)

    async def read_all(self) -> HostSnapshot:
        """Read the whole host (start-up, listings)."""
        d = self._config.daemon
        self._snapshot = await aio.call("read_snapshot", read_snapshot, d.sys_root, d.dev_root)
        return self._snapshot

    async def start(self) -> HostSnapshot:
        snap = await self.read_all()
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
            (gid,) = ids
            assert gid is not None
            group, devs = read_group(root, gid)
            return gid, group, devs

        gid, group, devs = await aio.call("read_group", work)
        self._snapshot = self.snapshot.with_group(group, devs)
        return self._snapshot, gid

    async def refresh_group(self, group_id: int, snapshot: HostSnapshot | None = None) -> None:
        """Take a fresh view of one group: from ``snapshot`` (the udev watcher's, which
        already holds it as just re-read) or, without one, by reading it here."""
        if snapshot is not None:
            if group_id in snapshot.groups:
                group = snapshot.groups[group_id]
                devs = {d.bdf: d for d in snapshot.group_devices(group_id)}
                self._snapshot = self.snapshot.with_group(group, devs)
            else:
                self._snapshot = self.snapshot.without_group(group_id)
        else:
            try:
                group, devs = await aio.call(
                    "read_group", read_group, self._config.daemon.sys_root, group_id
                )
            except NotFoundError:
                self._snapshot = self.snapshot.without_group(group_id)
            else:
                self._snapshot = self.snapshot.with_group(group, devs)
        if group_id in self.snapshot.groups:
            self._note(self.snapshot.group_devices(group_id))
