"""The kernel layer's interface: what the broker may ask of the kernel.

The broker talks to the kernel only through these protocols. The real
implementation (iommud.kernel.linux) opens /dev/iommu and /dev/vfio/*; tests fake
the kernel here and only here. Every method raises iommud.errors.KernelError
(errno + op name) on failure and nothing else. Objects own their fd: ``close()`` is
idempotent, and ``fileno()`` on a closed object raises KernelError(EBADF).

No policy lives here: no quotas, no viability, no decisions.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class MapFlag(enum.IntFlag):
    """IOMMU_IOAS_MAP_* (include/uapi/linux/iommufd.h)."""

    FIXED_IOVA = 1
    WRITEABLE = 2
    READABLE = 4


@dataclass(frozen=True, slots=True)
class IovaRange:
    start: int
    last: int  # inclusive, as the kernel reports it


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """VFIO_DEVICE_GET_INFO."""

    flags: int
    num_regions: int
    num_irqs: int

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & 1)  # VFIO_DEVICE_FLAGS_RESET


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """VFIO_DEVICE_GET_REGION_INFO: ``offset`` is where the region lives in the device fd."""

    index: int
    flags: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """VFIO_GROUP_GET_STATUS."""

    is_viable: bool
    is_container_set: bool


class FdObject(Protocol):
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...


class IommuFd(FdObject, Protocol):
    """An open /dev/iommu."""

    def ioas_alloc(self) -> int: ...
    def destroy(self, object_id: int) -> None: ...
    def ioas_map(
        self, ioas_id: int, user_va: int, length: int, iova: int | None, flags: MapFlag
    ) -> int:
        """Map [user_va, user_va+length) of this process; returns the IOVA used.

        ``iova=None`` lets the kernel choose; otherwise FIXED_IOVA is added.
        """
        ...

    def ioas_map_file(
        self, ioas_id: int, fd: int, start: int, length: int, iova: int | None, flags: MapFlag
    ) -> int:
        """IOMMU_IOAS_MAP_FILE (Linux >= 6.13). Raises KernelError(ENOTTY) where absent."""
        ...

    def has_map_file(self) -> bool:
        """Whether IOMMU_IOAS_MAP_FILE exists on this kernel (probed once, cached)."""
        ...

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """Returns the number of bytes unmapped. iova=0, length=2**64-1 unmaps all."""
        ...

    def ioas_unmap_all(self, ioas_id: int) -> int: ...
    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[IovaRange], int]:
        """(allowed ranges, required IOVA alignment)."""
        ...

    def ioas_allow_iovas(self, ioas_id: int, ranges: list[IovaRange]) -> None: ...
    def ioas_copy(
        self,
        dst_ioas_id: int,
        dst_iova: int,
        src_ioas_id: int,
        src_iova: int,
        length: int,
        flags: MapFlag,
    ) -> None: ...
    def option_rlimit_mode(self, per_process: bool | None = None) -> bool:
        """IOMMU_OPTION RLIMIT_MODE: set when ``per_process`` is given; returns the value."""
        ...

    def dup_fd(self) -> int:
        """A new fd (dup) of this very file for a client (delegated claims); the caller
        owns it."""
        ...

    def is_device_bound(self, dev_id: int) -> bool:
        """Whether the device ``dev_id`` (a bind's out_devid) is still bound here.

        A VFIO cdev stays bound to the iommufd until every fd of it is closed (its
        file's release unbinds it), so this answers "does anyone still hold a copy of
        that device fd". Linux: IOMMU_GET_HW_INFO on the id, ENOENT once unbound.
        """
        ...


class VfioDevice(FdObject, Protocol):
    """A VFIO device fd: a cdev (/dev/vfio/devices/vfioN) or from VFIO_GROUP_GET_DEVICE_FD."""

    @property
    def name(self) -> str:
        """The cdev name (vfioN) or the BDF for a legacy device fd."""
        ...

    def bind_iommufd(self, iommufd: IommuFd) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the kernel's device id (out_devid)."""
        ...

    def attach_ioas(self, pt_id: int) -> None: ...
    def detach_ioas(self) -> None: ...
    def get_info(self) -> DeviceInfo: ...
    def get_region_info(self, index: int) -> RegionInfo: ...
    def reset(self) -> None: ...
    def set_irq_eventfd(self, index: int, eventfd: int) -> None:
        """VFIO_DEVICE_SET_IRQS: signal ``eventfd`` when irq ``index`` fires; -1 removes
        the trigger. For vfio-pci, index VFIO_PCI_REQ_IRQ_INDEX is the kernel asking
        the user to release the device (it is being removed)."""
        ...

    def trigger_irq(self, index: int) -> None:
        """VFIO_DEVICE_SET_IRQS with DATA_NONE | ACTION_TRIGGER: signal irq ``index``'s
        current trigger, whoever registered it (vfio_pci_intrs.c
        vfio_pci_set_ctx_trigger_single, "loopback"). For the REQ index of a delegated
        device that is QEMU's own eventfd: it then unplugs the device as for a host
        removal (hw/vfio/pci.c vfio_req_notifier_handler). EINVAL when no trigger is set
        or the file was never bound."""
        ...

    def dup_fd(self) -> int:
        """A new fd (dup) for handing to a client; the caller owns it."""
        ...


class VfioContainer(FdObject, Protocol):
    """The legacy /dev/vfio/vfio container."""

    def get_api_version(self) -> int: ...
    def check_extension(self, extension: int) -> bool: ...
    def set_iommu_type1v2(self) -> None: ...
    def map_dma(self, vaddr: int, iova: int, size: int, *, read: bool, write: bool) -> None: ...
    def unmap_dma(self, iova: int, size: int) -> int: ...
    def unmap_all(self) -> int: ...


class VfioGroup(FdObject, Protocol):
    """A legacy /dev/vfio/N group."""

    @property
    def group_id(self) -> int: ...
    def get_status(self) -> GroupStatus: ...
    def set_container(self, container: VfioContainer) -> None: ...
    def unset_container(self) -> None: ...
    def get_device(self, bdf: str) -> VfioDevice: ...


class DriverBinder(Protocol):
    """sysfs driver binding for PCI devices. Writes can block (unbinding vfio-pci waits
    for holders to close the device): callers run these off the event loop."""

    def set_driver_override(self, bdf: str, driver: str | None) -> None: ...
    def unbind(self, bdf: str) -> None:
        """Unbind from the current driver; a no-op when driver-less."""
        ...

    def drivers_probe(self, bdf: str) -> None: ...
    def bind(self, driver: str, bdf: str) -> None: ...
    def current_driver(self, bdf: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class FileKey:
    """How /proc names one file (iommud.kernel.procs): fdinfo's ``mnt_id`` and
    ``ino``, and the ``dev`` /proc/P/maps prints for a mapping of it."""

    mnt_id: int
    dev: int
    ino: int


class ProcessHolder(Protocol):
    """A live process found holding some of the scanned files; owns a pidfd of it."""

    pid: int
    uid: int
    ppid: int
    comm: str
    keys: frozenset[FileKey]
    vm_pin: int | None  # bytes pinned (VmPin), when the scan was asked for it

    def pidfd(self) -> int:
        """The pidfd (readable once the process has exited: wait on it)."""
        ...

    def is_alive(self) -> bool: ...
    def kill(self) -> None:
        """SIGKILL through the pidfd; a process already gone is not an error."""
        ...

    def clamp_memlock(self) -> None:
        """RLIMIT_MEMLOCK 0:0 for the process (no new pins under per-process mode)."""
        ...

    def close(self) -> None: ...


@dataclass
class Scan:
    """One pass over the process table: holders (the caller closes each) and pids
    whose tables could not be read (no CAP_SYS_PTRACE)."""

    holders: list[ProcessHolder] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)

    def close(self) -> None:
        for h in self.holders:
            h.close()


class Processes(Protocol):
    """Finding and stopping the processes that hold files the daemon handed out."""

    def file_key(self, fd: int) -> FileKey:
        """The key of the daemon's own fd ``fd``."""
        ...

    def scan(
        self, wanted: frozenset[FileKey], *, exclude: Iterable[int] = (), vm_pin: bool = False
    ) -> Scan:
        """Every live process but the daemon and ``exclude`` holding any of ``wanted``."""
        ...

    def parents(self) -> dict[int, int]:
        """pid -> parent pid of every process."""
        ...


class Kernel(Protocol):
    """Factory for kernel objects; the broker holds exactly one."""

    @property
    def processes(self) -> Processes: ...

    def open_iommufd(self) -> IommuFd: ...
    def open_cdev(self, cdev_name: str) -> VfioDevice:
        """Open /dev/vfio/devices/<cdev_name> (e.g. "vfio0")."""
        ...

    def open_container(self) -> VfioContainer: ...
    def open_group(self, group_id: int) -> VfioGroup: ...
    @property
    def binder(self) -> DriverBinder: ...
