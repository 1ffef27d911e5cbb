"""The kernel layer: the only code that touches the OS for the daemon.

- ``iommud.kernel.interface``: what the broker needs of the kernel, as Protocols
  (``Kernel``, ``IommuFd``, ``VfioDevice``, ``VfioGroup``, ``VfioContainer``,
  ``DriverBinder``) and plain records; ``tests/fakekernel.py`` is the other side, held to
  the real one by the kernel contract suite (tests/kernel/contract.py).
- ``iommud.kernel.linux`` (``LinuxKernel``) and ``sysfs_bind``: ctypes ioctls on
  /dev/iommu and /dev/vfio/*, sysfs driver writes; ``uapi``: the structs and ioctl
  numbers of include/uapi/linux/iommufd.h and vfio.h (6.12).
- ``memory`` (memfd inspection, the daemon's mmap of client memory), ``eventfd``,
  ``inotify``, ``libc`` (libc loaded once; ``map_oserror``: every OSError becomes a
  ``KernelError`` with the operation's name).
- ``aio``: the one place that decides whether a call leaves the event loop.

This package holds no policy and no state beyond the fds it wraps. Importing it loads
only the interface: the real layer and the worker pools load when their modules are
imported (the client library and the lab's helpers import ``uapi`` alone).
"""

from iommud.kernel.interface import (
    DeviceInfo,
    DriverBinder,
    GroupStatus,
    IommuFd,
    IovaRange,
    Kernel,
    MapFlag,
    RegionInfo,
    VfioContainer,
    VfioDevice,
    VfioGroup,
)

__all__ = [
    "DeviceInfo",
    "DriverBinder",
    "GroupStatus",
    "IommuFd",
    "IovaRange",
    "Kernel",
    "MapFlag",
    "RegionInfo",
    "VfioContainer",
    "VfioDevice",
    "VfioGroup",
]
