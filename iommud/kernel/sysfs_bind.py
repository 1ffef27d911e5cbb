"""PCI driver binding through sysfs (driver_override, unbind, drivers_probe, bind).

Implements iommud.kernel.interface.DriverBinder under a ``sys_root`` passed in (the
real /sys, or a fake tree in tests). Every string that ends up in a sysfs path or is
written into a sysfs file is validated first: a BDF must be a full lowercase
``dddd:bb:dd.f`` and a driver name a plain identifier, so nothing odd (slashes,
"..", newlines, a second BDF) can reach the kernel. Files are opened O_WRONLY without
O_CREAT (a missing attribute is an error, never a new file), with O_NOFOLLOW, and with
O_TRUNC like a shell redirection (sysfs ignores it; a fake tree then holds exactly
the last value written).

sysfs semantics relied on (Documentation/ABI/testing/sysfs-bus-pci):
- writing a driver name to driver_override restricts matching to that driver;
  writing an empty line ("\\n") clears it;
- writing the BDF to drivers/NAME/unbind detaches it (blocks while a vfio-pci
  device is still held open: callers run this off the event loop);
- writing the BDF to bus/pci/drivers_probe re-runs driver matching.

No policy here: which driver is acceptable is the caller's business. Must not be
called on the event loop (writes may block).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from iommud.errors import KernelError
from iommud.kernel.libc import map_oserror
from iommud.pci import BDF_RE

_DRIVER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")


def check_bdf(op: str, bdf: str) -> str:
    """Return ``bdf`` if it is a canonical PCI address, else raise KernelError(EINVAL)."""
    if not isinstance(bdf, str) or BDF_RE.fullmatch(bdf) is None:
        raise KernelError(op, errno.EINVAL, f"{op}: invalid PCI address {bdf!r}", value=repr(bdf))
    return bdf


def check_driver(op: str, driver: str) -> str:
    """Return ``driver`` if it is a plain driver name, else raise KernelError(EINVAL)."""
    if not isinstance(driver, str) or _DRIVER_RE.fullmatch(driver) is None:
        raise KernelError(
            op, errno.EINVAL, f"{op}: invalid driver name {driver!r}", value=repr(driver)
        )
    return driver


class SysfsBinder:
    """DriverBinder over ``<sys_root>/bus/pci``."""

    def __init__(self, sys_root: str | os.PathLike[str]) -> None:
        self._pci = Path(sys_root) / "bus" / "pci"

    def set_driver_override(self, bdf: str, driver: str | None) -> None:
        """Write ``driver`` to driver_override; ``None`` clears it (writes "\\n")."""
        check_bdf("driver_override", bdf)
        value = "\n" if driver is None else check_driver("driver_override", driver) + "\n"
        self._write("driver_override", self._pci / "devices" / bdf / "driver_override", value)

    def unbind(self, bdf: str) -> None:
        """Unbind from the current driver; a no-op when the device is driver-less."""
        check_bdf("unbind", bdf)
        driver = self.current_driver(bdf)
        if driver is None:
            return
        self._write("unbind", self._pci / "drivers" / driver / "unbind", bdf)

    def drivers_probe(self, bdf: str) -> None:
        check_bdf("drivers_probe", bdf)
        self._write("drivers_probe", self._pci / "drivers_probe", bdf)

    def bind(self, driver: str, bdf: str) -> None:
        check_bdf("bind", bdf)
        check_driver("bind", driver)
        self._write("bind", self._pci / "drivers" / driver / "bind", bdf)

    def current_driver(self, bdf: str) -> str | None:
        """The name of the bound driver (the ``driver`` link's target), or None."""
        check_bdf("current_driver", bdf)
        link = self._pci / "devices" / bdf / "driver"
        with map_oserror("current_driver", path=str(link)):
            try:
                target = os.readlink(link)
            except FileNotFoundError:
                if not (self._pci / "devices" / bdf).exists():
                    raise KernelError("current_driver", errno.ENODEV, path=str(link)) from None
                return None
        # A name we would refuse to write is one we refuse to report.
        return check_driver("current_driver", os.path.basename(target))

    @staticmethod
    def _write(op: str, path: Path, value: str) -> None:
        data = value.encode("ascii")
        with map_oserror(op, path=str(path)):
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
        if written != len(data):
            raise KernelError(op, errno.EIO, f"{op}: short write to {path}", path=str(path))


def bound_devices(driver_dir: str | os.PathLike[str]) -> frozenset[str]:
    """The BDFs bound to a driver: the device links in ``bus/pci/drivers/NAME``.

    One readdir of a small kernfs directory (microseconds). A driver that is gone (or a
    directory that cannot be read) has none.
    """
    try:
        names = os.listdir(driver_dir)
    except OSError:
        return frozenset()
    return frozenset(n for n in names if BDF_RE.fullmatch(n) is not None)
