"""See attempts to bind a driver to a device of an owned IOMMU group: inotify on sysfs.

While a group is owned its devices have driver_override pinned to vfio-pci, so the
kernel refuses a write of their address to ``drivers/NAME/bind`` (ENODEV, from
driver_match_device in drivers/base/bus.c bind_store) and a DMA-unsafe probe of a
user-owned group (EBUSY/EINVAL, drivers/base/dd.c really_probe). A refused bind sends
no uevent. The VFS still reports the attempt: closing a file opened for writing raises
fsnotify's close-write event whatever the writes returned (fs/file_table.c __fput ->
fsnotify_close), while modify is raised only by a write that succeeded
(fs/read_write.c vfs_write -> fsnotify_modify). Measured in the lab on 6.12 (sysfs is
kernfs): a refused write to ``drivers/e1000/bind`` gives IN_CLOSE_WRITE alone, an
accepted one IN_MODIFY then IN_CLOSE_WRITE, about 10 ms after the write under TCG.
But an open with O_TRUNC, as a shell's ``echo BDF > bind`` does, raises IN_MODIFY too,
before any write (fs/namei.c handle_truncate -> fs/attr.c notify_change ->
fsnotify_change; kernfs ignores the size and succeeds), so IN_MODIFY alone cannot tell
a refused ``echo`` from an accepted bind. For a driver's ``bind`` file the guard asks the
kernel's result instead: a bind that was accepted has bound a device to the driver
before the write returned (bind_store probes synchronously), so the device links in
``drivers/NAME`` grew since the guard last looked; if they did not, the bind was
refused, whatever IN_MODIFY said.

``BindGuard`` owns one inotify fd (iommud.kernel.inotify) registered with the
running loop (``loop.add_reader``; no thread). ``guard(bdfs)`` sets the devices to
watch: their ``driver_override`` files, and while any device is guarded every
``bus/pci/drivers/*/bind`` of a driver outside the DMA-safe list plus
``bus/pci/drivers_probe``. Each close-write becomes a ``SysfsWrite`` for the callback.
inotify does not say what was written, so the write names the file, not the target.

This module decides nothing and writes nothing to sysfs: the broker re-checks its
owned groups and reports. It makes no system call itself (iommud.kernel.inotify and
iommud.kernel.sysfs_bind's ``bound_devices``, a readdir, do).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from iommud.errors import KernelError
from iommud.kernel.inotify import (
    IN_CLOSE_WRITE,
    IN_IGNORED,
    IN_MODIFY,
    IN_Q_OVERFLOW,
    Inotify,
    parse_events,
)
from iommud.kernel.sysfs_bind import bound_devices

log = structlog.get_logger(__name__)


class WriteKind(enum.StrEnum):
    BIND = "bind"  # bus/pci/drivers/<driver>/bind
    DRIVERS_PROBE = "drivers_probe"  # bus/pci/drivers_probe
    DRIVER_OVERRIDE = "driver_override"  # bus/pci/devices/<bdf>/driver_override


@dataclass(frozen=True, slots=True)
class SysfsWrite:
    """A watched sysfs file was closed after being opened for writing.

    ``name`` is the driver (BIND) or the device (DRIVER_OVERRIDE); ``accepted`` is
    whether a write to it succeeded before the close: for BIND, whether the driver
    now drives a device it did not drive at the last look; otherwise IN_MODIFY seen. A
    refused bind is ``accepted=False``, also when the open truncated (O_TRUNC).
    """

    kind: WriteKind
    name: str | None
    path: str
    accepted: bool


@dataclass(frozen=True, slots=True)
class _Target:
    kind: WriteKind
    name: str | None
    path: str


class BindGuard:
    """inotify watches on the sysfs files that can bind a driver; see the module doc."""

    def __init__(
        self,
        sys_root: Path,
        on_write: Callable[[SysfsWrite], None],
        *,
        dma_safe: Iterable[str] = (),
    ) -> None:
        self._pci = Path(sys_root) / "bus" / "pci"
        self._on_write = on_write
        self._safe = frozenset(dma_safe)
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_wd: dict[int, _Target] = {}
        self._by_path: dict[str, int] = {}
        self._modified: set[int] = set()
        self._bound: dict[int, frozenset[str]] = {}  # BIND wd -> devices on the driver
        self.devices: frozenset[str] = frozenset()
        self.seen = 0  # close-write events reported

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the inotify fd and register it with the running loop."""
        self._inotify = Inotify()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._inotify.fileno(), self._on_readable)

    def close(self) -> None:
        ino, self._inotify = self._inotify, None
        if ino is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(ino.fileno())
        ino.close()
        self._by_wd.clear()
        self._by_path.clear()
        self._modified.clear()
        self._bound.clear()
        self.devices = frozenset()

    @property
    def watches(self) -> dict[str, str]:
        """path -> kind of every live watch (for tests and status)."""
        return {t.path: str(t.kind) for t in self._by_wd.values()}

    # ------------------------------------------------------------------ watches
    def guard(self, bdfs: Iterable[str]) -> None:
        """Watch exactly these devices (and, if any, the bind files of every driver)."""
        ino = self._inotify
        if ino is None:
            return
        self.devices = frozenset(bdfs)
        wanted: dict[str, _Target] = {}
        for bdf in self.devices:
            path = str(self._pci / "devices" / bdf / "driver_override")
            wanted[path] = _Target(WriteKind.DRIVER_OVERRIDE, bdf, path)
        if self.devices:
            probe = str(self._pci / "drivers_probe")
            wanted[probe] = _Target(WriteKind.DRIVERS_PROBE, None, probe)
            try:
                drivers = os.listdir(self._pci / "drivers")
            except OSError as exc:
                log.warning("guard.drivers_unreadable", errno=exc.errno)
                drivers = []
            for drv in drivers:
                if drv in self._safe:
                    continue
                path = str(self._pci / "drivers" / drv / "bind")
                wanted[path] = _Target(WriteKind.BIND, drv, path)
        for path in [p for p in self._by_path if p not in wanted]:
            wd = self._by_path.pop(path)
            self._by_wd.pop(wd, None)
            self._modified.discard(wd)
            self._bound.pop(wd, None)
            try:
                ino.rm_watch(wd)
            except KernelError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: the kernel dropped it already
                    raise
        for path, target in wanted.items():
            if path in self._by_path:
                continue
            try:
                wd = ino.add_watch(path, IN_MODIFY | IN_CLOSE_WRITE)
            except KernelError as exc:
                # A device or driver that vanished meanwhile: nothing left to guard there.
                log.warning("guard.watch_failed", path=path, errno=exc.errno)
                continue
            self._by_wd[wd] = target
            self._by_path[path] = wd
            if target.kind is WriteKind.BIND:
                self._bound[wd] = bound_devices(os.path.dirname(path))
        log.debug("guard.watching", devices=len(self.devices), watches=len(self._by_wd))

    # ------------------------------------------------------------------ events
    def _on_readable(self) -> None:
        if self._inotify is None:
            return
        try:
            data = self._inotify.read()
        except KernelError as exc:
            log.exception("guard.read_failed", errno=exc.errno)
            return
        for ev in self.parse(data):
            self._on_write(ev)

    def parse(self, data: bytes) -> list[SysfsWrite]:
        """Turn raw inotify records into writes (MODIFY is folded into the close)."""
        out: list[SysfsWrite] = []
        for wd, mask in ((ev.wd, ev.mask) for ev in parse_events(data)):
            if mask & IN_Q_OVERFLOW:
                # Lost events: say "something was written" so the owner re-checks.
                log.warning("guard.queue_overflow")
                out.append(SysfsWrite(WriteKind.DRIVERS_PROBE, None, "", accepted=False))
                continue
            target = self._by_wd.get(wd)
            if target is None:
                continue
            if mask & IN_IGNORED:  # the file went away (device removed, driver unloaded)
                self._by_wd.pop(wd, None)
                self._by_path.pop(target.path, None)
                self._modified.discard(wd)
                self._bound.pop(wd, None)
                continue
            if mask & IN_MODIFY:
                self._modified.add(wd)
            if mask & IN_CLOSE_WRITE:
                accepted = wd in self._modified
                self._modified.discard(wd)
                if target.kind is WriteKind.BIND:
                    # IN_MODIFY may be the open's O_TRUNC: ask the driver what it drives.
                    # (The set is as of the last write to this file: a device unbound
                    # since through another file and bound again by this write would
                    # read as refused. Rare, and only a bind_refused too many.)
                    before = self._bound.get(wd, frozenset())
                    now = bound_devices(os.path.dirname(target.path))
                    self._bound[wd] = now
                    accepted = accepted and bool(now - before)
                self.seen += 1
                out.append(SysfsWrite(target.kind, target.name, target.path, accepted))
        return out


__all__ = ["IN_CLOSE_WRITE", "IN_IGNORED", "IN_MODIFY", "BindGuard", "SysfsWrite", "WriteKind"]
