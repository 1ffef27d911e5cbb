"""The bind-guard audit: react to writes on the guarded sysfs bind files.

iommud.broker.guard.BindGuard watches (inotify close-write) the sysfs files through which a
driver could take a device of an owned group. On each write this re-checks every owned
group (the enforcement path) and, when a bind was refused, attributes it to the owned
device the driver is known to drive (seen by this process on it or on a device of the
same vendor:device) and publishes bind_refused. The re-check is the
enforcer's (iommud.broker.enforcement); the guard's watch list follows the owned groups
from iommud.broker.claim, where ownership changes.

Changes no ownership itself; never writes sysfs.
"""

from __future__ import annotations

import structlog

from iommud.broker.drivers import VFIO_PCI
from iommud.broker.enforcement import Enforcer
from iommud.broker.guard import BindGuard, SysfsWrite, WriteKind
from iommud.broker.state import BrokerState
from iommud.errors import IommudError, KernelError
from iommud.host.snapshot import HostSnapshot
from iommud.protocol import messages as m

log = structlog.get_logger(__name__)


class GuardAudit:
    """Owns the BindGuard (when inotify is available) and audits its reports."""

    def __init__(self, state: BrokerState, enforcer: Enforcer) -> None:
        self._state = state
        self._enforcer = enforcer
        self._view = state.view
        self._holds = state.holds

    def start(self) -> None:
        """Start the guard (``BrokerState.guard``); without inotify the broker runs unguarded."""
        config = self._state.config
        guard = BindGuard(
            config.daemon.sys_root, self._on_sysfs_write, dma_safe=config.dma_safe_drivers
        )
        try:
            guard.start()
        except KernelError as exc:
            log.warning("guard.unavailable", errno=exc.errno)
        else:
            self._state.guard = guard

    def close(self) -> None:
        guard, self._state.guard = self._state.guard, None
        if guard is not None:
            guard.close()

    def _on_sysfs_write(self, write: SysfsWrite) -> None:
        self._state.spawn(self._audit(write))

    def _drivers_by_model(self, snap: HostSnapshot) -> dict[tuple[int, int], set[str]]:
        """vendor:device -> every driver seen on a device of that model."""
        models: dict[tuple[int, int], set[str]] = {}
        for bdf, seen in self._view.seen_drivers.items():
            dev = snap.devices.get(bdf)
            if dev is not None:
                models.setdefault((dev.vendor, dev.device), set()).update(seen)
        return models

    def _drivers_of(
        self, bdf: str, snap: HostSnapshot, models: dict[tuple[int, int], set[str]]
    ) -> set[str]:
        """Every driver known to drive ``bdf``: seen on it, or on any device of the same
        vendor:device (a driver matches by id table, so it drives the model), while this
        daemon ran. The device's own history alone was not enough: one that was
        driver-less when the daemon started (left so by a crash, or by an admin) got
        no bind_refused for its own driver."""
        known = set(self._view.seen_drivers.get(bdf, ()))
        dev = snap.devices.get(bdf)
        if dev is not None:
            known |= models.get((dev.vendor, dev.device), set())
        return known

    async def _audit(self, write: SysfsWrite) -> None:
        """A guarded sysfs file was written: re-check the owned groups, report refusals."""
        try:
            for group_id in list(self._holds):
                await self._enforcer.on_host_change(group_id)
        except IommudError as exc:
            log.warning("guard.audit_failed", code=exc.code, **exc.details)
        if write.kind is not WriteKind.BIND or write.accepted or write.name is None:
            if not write.accepted:
                log.warning("guard.write_refused", kind=str(write.kind), path=write.path)
            return
        driver = write.name
        snap = self._view.snapshot
        models = self._drivers_by_model(snap)
        targets = [
            (group_id, bdf)
            for group_id, hold in self._holds.items()
            for bdf in hold.pinned
            if driver in self._drivers_of(bdf, snap, models)
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
            self._state.publish(
                m.EventName.BIND_REFUSED, bdf=bdf, driver=driver, group_id=group_id, reason=reason
            )
