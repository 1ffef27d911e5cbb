"""The bind-guard audit: react to writes on the guarded sysfs bind files.

iommud.guard.BindGuard watches (inotify close-write) the sysfs files through which a
driver could take a device of an owned group. On each write this re-checks every owned
group (the enforcement path) and, when a bind was refused, attributes it to the owned
device the driver had been seen on and publishes bind_refused. Keeps the guard's watch
list equal to the devices of the owned groups.

Changes no ownership itself; never writes sysfs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from iommud.broker.drivers import VFIO_PCI
from iommud.broker.hostview import HostView
from iommud.broker.sessions import Spawn
from iommud.broker.state import GroupHold
from iommud.errors import IommudError, KernelError
from iommud.guard import BindGuard, SysfsWrite, WriteKind
from iommud.protocol import messages as m

log = structlog.get_logger(__name__)


class GuardAudit:
    """Owns the BindGuard (when inotify is available) and audits its reports."""

    def __init__(
        self,
        view: HostView,
        holds: dict[int, GroupHold],
        *,
        spawn: Spawn,
        recheck: Callable[[int], Awaitable[None]],
        publish: Callable[..., object],
    ) -> None:
        self._view = view
        self._holds = holds
        self._spawn = spawn
        self._recheck = recheck
        self._publish = publish
        self.guard: BindGuard | None = None

    def start(self, sys_root: Path, dma_safe: frozenset[str]) -> None:
        guard = BindGuard(sys_root, self._on_sysfs_write, dma_safe=dma_safe)
        try:
            guard.start()
        except KernelError as exc:
            log.warning("guard.unavailable", errno=exc.errno)
        else:
            self.guard = guard

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    def sync(self) -> None:
        """Watch exactly the devices of the owned groups (see iommud.guard)."""
        if self.guard is not None:
            self.guard.guard(b for hold in self._holds.values() for b in hold.pinned)

    def _on_sysfs_write(self, write: SysfsWrite) -> None:
        self._spawn(self._audit(write))

    async def _audit(self, write: SysfsWrite) -> None:
        """A guarded sysfs file was written: re-check the owned groups, report refusals."""
        try:
            for group_id in list(self._holds):
                await self._recheck(group_id)
        except IommudError as exc:
            log.warning("guard.audit_failed", code=exc.code, **exc.details)
        if write.kind is not WriteKind.BIND or write.accepted or write.name is None:
            if not write.accepted:
                log.warning("guard.write_refused", kind=str(write.kind), path=write.path)
            return
        driver = write.name
        snap = self._view.snapshot
        targets = [
            (group_id, bdf)
            for group_id, hold in self._holds.items()
            for bdf in hold.pinned
            if driver in self._view.seen_drivers.get(bdf, ())
            and getattr(snap.devices.get(bdf), "driver", None) != driver
        ]
        if not targets:
            log.warning(
                "guard.bind_attempt_unattributed",
                driver=driver,
                path=write.path,
                owned_groups=sorted(self._holds),
            )
            return
        for group_id, bdf in targets:
            reason = (
                f"a write to {write.path} was refused: driver_override of {bdf} is pinned "
                f"to {VFIO_PCI} while IOMMU group {group_id} is owned"
            )
            log.warning(
                "guard.bind_refused", bdf=bdf, driver=driver, group_id=group_id, path=write.path
            )
            self._publish(
                m.EventName.BIND_REFUSED, bdf=bdf, driver=driver, group_id=group_id, reason=reason
            )
