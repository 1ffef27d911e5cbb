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

``BindGuard`` owns one inotify fd (``inotify_init1`` through ctypes) registered with the
running loop (``loop.add_reader``; no thread). ``guard(bdfs)`` sets the devices to
watch: their ``driver_override`` files, and while any device is guarded every
``bus/pci/drivers/*/bind`` of a driver outside the DMA-safe list plus
``bus/pci/drivers_probe``. Each close-write becomes a ``SysfsWrite`` for the callback.
inotify does not say what was written, so the write names the file, not the target.

This module decides nothing and writes nothing to sysfs: the broker re-checks its
owned groups and reports. OSError from inotify becomes KernelError.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import errno
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from iommud.errors import KernelError

log = structlog.get_logger(__name__)

# include/uapi/linux/inotify.h
IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_IGNORED: Final = 0x00008000
IN_Q_OVERFLOW: Final = 0x00004000
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = (ctypes.c_int,)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)


class WriteKind(enum.StrEnum):
    BIND = "bind"  # bus/pci/drivers/<driver>/bind
    DRIVERS_PROBE = "drivers_probe"  # bus/pci/drivers_probe
    DRIVER_OVERRIDE = "driver_override"  # bus/pci/devices/<bdf>/driver_override


@dataclass(frozen=True, slots=True)
class SysfsWrite:
    """A watched sysfs file was closed after being opened for writing.

    ``name`` is the driver (BIND) or the device (DRIVER_OVERRIDE); ``accepted`` is
    whether a write to it succeeded before the close (IN_MODIFY seen). A refused bind
    is ``accepted=False``.
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


def _oserror(op: str) -> KernelError:
    return KernelError(op, ctypes.get_errno() or errno.EIO)


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
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_wd: dict[int, _Target] = {}
        self._by_path: dict[str, int] = {}
        self._modified: set[int] = set()
        self.devices: frozenset[str] = frozenset()
        self.seen = 0  # close-write events reported

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the inotify fd and register it with the running loop."""
        fd = int(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            raise _oserror("inotify_init1")
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_readable)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._by_wd.clear()
        self._by_path.clear()
        self._modified.clear()
        self.devices = frozenset()

    @property
    def watches(self) -> dict[str, str]:
        """path -> kind of every live watch (for tests and status)."""
        return {t.path: str(t.kind) for t in self._by_wd.values()}

    # ------------------------------------------------------------------ watches
    def guard(self, bdfs: Iterable[str]) -> None:
        """Watch exactly these devices (and, if any, the bind files of every driver)."""
        if self._fd < 0:
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
            _libc.inotify_rm_watch(self._fd, wd)  # EINVAL if the kernel dropped it: fine
        for path, target in wanted.items():
            if path in self._by_path:
                continue
            wd = int(_libc.inotify_add_watch(self._fd, path.encode(), IN_MODIFY | IN_CLOSE_WRITE))
            if wd < 0:
                # A device or driver that vanished meanwhile: nothing left to guard there.
                log.warning("guard.watch_failed", path=path, errno=ctypes.get_errno())
                continue
            self._by_wd[wd] = target
            self._by_path[path] = wd
        log.debug("guard.watching", devices=len(self.devices), watches=len(self._by_wd))

    # ------------------------------------------------------------------ events
    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.exception("guard.read_failed", errno=exc.errno)
            return
        for ev in self.parse(data):
            self._on_write(ev)

    def parse(self, data: bytes) -> list[SysfsWrite]:
        """Turn raw inotify records into writes (MODIFY is folded into the close)."""
        out: list[SysfsWrite] = []
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + length
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
                continue
            if mask & IN_MODIFY:
                self._modified.add(wd)
            if mask & IN_CLOSE_WRITE:
                accepted = wd in self._modified
                self._modified.discard(wd)
                self.seen += 1
                out.append(SysfsWrite(target.kind, target.name, target.path, accepted))
        return out


__all__ = ["BindGuard", "SysfsWrite", "WriteKind"]
