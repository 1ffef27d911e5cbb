"""The real kernel layer: thin typed wrappers over iommufd and VFIO ioctls.

Implements the protocols of iommud.kernel.interface against Linux (6.12 and later).
This is the only code in the daemon that opens /dev/iommu and /dev/vfio/*; paths
come from a ``dev_root`` passed in. Each wrapper object owns exactly one fd:
``close()`` is idempotent, the objects are context managers, and ``fileno()`` on a
closed object raises KernelError(EBADF). Every OSError becomes
iommud.errors.KernelError(op, errno) with the kernel's ioctl name as ``op``.

Kernel references: include/uapi/linux/iommufd.h, include/uapi/linux/vfio.h,
Documentation/userspace-api/iommufd.rst, Documentation/driver-api/vfio.rst.

No policy: no quotas, no viability or ownership decisions, no logging of client
data. Calls may block (pinning memory, resets): iommud.kernel.aio decides which leave
the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from iommud.errors import KernelError
from iommud.kernel import uapi
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
from iommud.kernel.libc import check, libc, map_oserror
from iommud.kernel.procs import ProcessTable
from iommud.kernel.sysfs_bind import SysfsBinder, check_bdf

_CDEV_RE = re.compile(r"vfio[0-9]{1,9}")


def ioctl(
    fd: int,
    op: str,
    request: int,
    arg: ctypes.Structure | ctypes.Array[ctypes.c_char] | int | None = None,
) -> int:
    """ioctl(2) with ``arg`` passed by address (a ctypes object) or by value (an int).

    Returns the ioctl's non-negative result; raises KernelError(op, errno) on failure.
    The kernel writes output fields straight into the ctypes object, even when it also
    returns an error (IOMMU_IOAS_IOVA_RANGES relies on that for EMSGSIZE).
    """
    if arg is None:
        value: int | None = None
    elif isinstance(arg, int):
        value = arg
    else:
        value = ctypes.addressof(arg)
    return check(op, int(libc.ioctl(fd, request, value)))


def get_region_info(fd: int, index: int) -> RegionInfo:
    """VFIO_DEVICE_GET_REGION_INFO on a raw device fd (also used by lab/edu.py)."""
    info = uapi.vfio_region_info.new(index=index)
    ioctl(fd, "VFIO_DEVICE_GET_REGION_INFO", uapi.VFIO_DEVICE_GET_REGION_INFO, info)
    return RegionInfo(index=index, flags=info.flags, size=info.size, offset=info.offset)


def _open(path: Path, op: str) -> int:
    with map_oserror(op, path=str(path)):
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)


class _FdOwner:
    """Owns one fd. close() is idempotent and safe to race with itself."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def fileno(self) -> int:
        fd = self._fd
        if fd < 0:
            raise KernelError("fileno", errno.EBADF, f"{type(self).__name__} is closed")
        return fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort against leaks; owners are expected to close explicitly.
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _ioctl(
        self,
        op: str,
        request: int,
        arg: ctypes.Structure | ctypes.Array[ctypes.c_char] | int | None = None,
    ) -> int:
        return ioctl(self.fileno(), op, request, arg)

    def dup_fd(self) -> int:
        """A new fd of this very open file (a client's copy); the caller owns it."""
        with map_oserror("dup"):
            return os.dup(self.fileno())  # non-inheritable (O_CLOEXEC) by default


@dataclass(frozen=True, slots=True)
class HwInfo:
    """IOMMU_GET_HW_INFO: the IOMMU type behind a bound device and its raw data.

    For IOMMU_HW_INFO_TYPE_INTEL_VTD ``data`` is struct iommu_hw_info_vtd
    (flags u32, reserved u32, cap_reg u64, ecap_reg u64).
    """

    data_type: int
    capabilities: int
    max_pasid_log2: int
    data: bytes


class LinuxIommuFd(_FdOwner):
    """An open /dev/iommu (iommud.kernel.interface.IommuFd)."""

    # IOMMU_IOAS_MAP_FILE presence is a property of the running kernel: probe once.
    _map_file_probe: bool | None = None
    _probe_lock = threading.Lock()

    def ioas_alloc(self) -> int:
        cmd = uapi.iommu_ioas_alloc.new()
        self._ioctl("IOMMU_IOAS_ALLOC", uapi.IOMMU_IOAS_ALLOC, cmd)
        return int(cmd.out_ioas_id)

    def destroy(self, object_id: int) -> None:
        cmd = uapi.iommu_destroy.new(id=object_id)
        self._ioctl("IOMMU_DESTROY", uapi.IOMMU_DESTROY, cmd)

    def ioas_map(
        self, ioas_id: int, user_va: int, length: int, iova: int | None, flags: MapFlag
    ) -> int:
        cmd = uapi.iommu_ioas_map.new(
            flags=_map_flags(flags, iova),
            ioas_id=ioas_id,
            user_va=user_va,
            length=length,
            iova=iova or 0,
        )
        self._ioctl("IOMMU_IOAS_MAP", uapi.IOMMU_IOAS_MAP, cmd)
        return int(cmd.iova)

    def ioas_map_file(
        self, ioas_id: int, fd: int, start: int, length: int, iova: int | None, flags: MapFlag
    ) -> int:
        cmd = uapi.iommu_ioas_map_file.new(
            flags=_map_flags(flags, iova),
            ioas_id=ioas_id,
            fd=fd,
            start=start,
            length=length,
            iova=iova or 0,
        )
        self._ioctl("IOMMU_IOAS_MAP_FILE", uapi.IOMMU_IOAS_MAP_FILE, cmd)
        return int(cmd.iova)

    def has_map_file(self) -> bool:
        """Probe IOMMU_IOAS_MAP_FILE with an invalid IOAS id: ENOTTY means absent (6.12);
        anything else (ENOENT for the bad id on 6.13+) means the kernel knows the ioctl."""
        cls = type(self)
        with cls._probe_lock:
            if cls._map_file_probe is None:
                cmd = uapi.iommu_ioas_map_file.new(ioas_id=0, fd=-1, length=4096)
                try:
                    self._ioctl("IOMMU_IOAS_MAP_FILE", uapi.IOMMU_IOAS_MAP_FILE, cmd)
                except KernelError as exc:
                    if exc.errno == errno.EBADF and self.closed:
                        raise
                    cls._map_file_probe = exc.errno != errno.ENOTTY
                else:  # cannot happen with ioas_id 0, but then it certainly exists
                    cls._map_file_probe = True
            return cls._map_file_probe

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        cmd = uapi.iommu_ioas_unmap.new(ioas_id=ioas_id, iova=iova, length=length)
        self._ioctl("IOMMU_IOAS_UNMAP", uapi.IOMMU_IOAS_UNMAP, cmd)
        return int(cmd.length)

    def ioas_unmap_all(self, ioas_id: int) -> int:
        # iommufd.h: "The values 0 to U64_MAX will unmap everything."
        return self.ioas_unmap(ioas_id, 0, uapi.U64_MAX)

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[IovaRange], int]:
        """Two calls: learn the count (EMSGSIZE), then fetch. Retries if it grew meanwhile."""
        count = 0
        for _ in range(8):
            array = (uapi.iommu_iova_range * max(count, 1))()
            cmd = uapi.iommu_ioas_iova_ranges.new(
                ioas_id=ioas_id,
                num_iovas=count,
                allowed_iovas=ctypes.addressof(array) if count else 0,
            )
            try:
                self._ioctl("IOMMU_IOAS_IOVA_RANGES", uapi.IOMMU_IOAS_IOVA_RANGES, cmd)
            except KernelError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                count = int(cmd.num_iovas)
                continue
            ranges = [IovaRange(int(r.start), int(r.last)) for r in array[: cmd.num_iovas]]
            return ranges, int(cmd.out_iova_alignment)
        raise KernelError("IOMMU_IOAS_IOVA_RANGES", errno.EAGAIN, "IOVA ranges kept changing")

    def ioas_allow_iovas(self, ioas_id: int, ranges: list[IovaRange]) -> None:
        array = (uapi.iommu_iova_range * max(len(ranges), 1))()
        for slot, r in zip(array, ranges, strict=False):
            slot.start, slot.last = r.start, r.last
        cmd = uapi.iommu_ioas_allow_iovas.new(
            ioas_id=ioas_id,
            num_iovas=len(ranges),
            allowed_iovas=ctypes.addressof(array) if ranges else 0,
        )
        self._ioctl("IOMMU_IOAS_ALLOW_IOVAS", uapi.IOMMU_IOAS_ALLOW_IOVAS, cmd)

    def ioas_copy(
        self,
        dst_ioas_id: int,
        dst_iova: int,
        src_ioas_id: int,
        src_iova: int,
        length: int,
        flags: MapFlag,
    ) -> None:
        cmd = uapi.iommu_ioas_copy.new(
            flags=int(flags | MapFlag.FIXED_IOVA),
            dst_ioas_id=dst_ioas_id,
            src_ioas_id=src_ioas_id,
            length=length,
            dst_iova=dst_iova,
            src_iova=src_iova,
        )
        self._ioctl("IOMMU_IOAS_COPY", uapi.IOMMU_IOAS_COPY, cmd)

    def option_rlimit_mode(self, per_process: bool | None = None) -> bool:
        if per_process is not None:
            cmd = uapi.iommu_option.new(
                option_id=uapi.IOMMU_OPTION_RLIMIT_MODE,
                op=uapi.IOMMU_OPTION_OP_SET,
                object_id=0,
                val64=int(per_process),
            )
            self._ioctl("IOMMU_OPTION", uapi.IOMMU_OPTION, cmd)
        cmd = uapi.iommu_option.new(
            option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=uapi.IOMMU_OPTION_OP_GET, object_id=0
        )
        self._ioctl("IOMMU_OPTION", uapi.IOMMU_OPTION, cmd)
        return bool(cmd.val64)

    def get_hw_info(self, dev_id: int) -> HwInfo:
        """IOMMU_GET_HW_INFO for a device bound to this iommufd (its out_devid)."""
        buf = (ctypes.c_char * 256)()
        cmd = uapi.iommu_hw_info.new(
            dev_id=dev_id, data_len=ctypes.sizeof(buf), data_uptr=ctypes.addressof(buf)
        )
        self._ioctl("IOMMU_GET_HW_INFO", uapi.IOMMU_GET_HW_INFO, cmd)
        return HwInfo(
            data_type=int(cmd.out_data_type),
            capabilities=int(cmd.out_capabilities),
            max_pasid_log2=int(cmd.out_max_pasid_log2),
            data=buf.raw[: min(int(cmd.data_len), ctypes.sizeof(buf))],
        )

    def is_device_bound(self, dev_id: int) -> bool:
        """IOMMU_GET_HW_INFO as a probe: ENOENT means ``dev_id`` names no device here.

        iommufd_get_hw_info (drivers/iommu/iommufd/device.c) looks the id up with
        iommufd_get_device -> iommufd_get_object (main.c), which answers ENOENT for an
        id with no object or an object of another type. The VFIO cdev's last fput
        (vfio_device_fops_release -> vfio_df_unbind_iommufd -> iommufd_device_unbind)
        destroys the device object, so ENOENT = no fd of the device is left. An id
        reused by a later IOAS or HWPT is still ENOENT (not a device); a later device
        bind could reuse it, which the broker prevents while it waits (see
        iommud.broker.freeze). Any other error is raised: callers fail closed.
        """
        try:
            self.get_hw_info(dev_id)
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True


_FIXED_IOVA: Final = int(MapFlag.FIXED_IOVA)


def _map_flags(flags: MapFlag, iova: int | None) -> int:
    """The ioctl's flags word: FIXED_IOVA exactly when an IOVA is given (integer
    arithmetic: enum.Flag's cost 4 us a map on the host, far more under TCG)."""
    bits = int(flags) & ~_FIXED_IOVA
    return bits if iova is None else bits | _FIXED_IOVA


class LinuxVfioDevice(_FdOwner):
    """A VFIO device fd (iommud.kernel.interface.VfioDevice)."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__(fd)
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def bind_iommufd(self, iommufd: IommuFd) -> int:
        cmd = uapi.vfio_device_bind_iommufd.new(flags=0, iommufd=iommufd.fileno())
        self._ioctl("VFIO_DEVICE_BIND_IOMMUFD", uapi.VFIO_DEVICE_BIND_IOMMUFD, cmd)
        return int(cmd.out_devid)

    def attach_ioas(self, pt_id: int) -> None:
        cmd = uapi.vfio_device_attach_iommufd_pt.new(flags=0, pt_id=pt_id)
        self._ioctl("VFIO_DEVICE_ATTACH_IOMMUFD_PT", uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd)

    def detach_ioas(self) -> None:
        cmd = uapi.vfio_device_detach_iommufd_pt.new(flags=0)
        self._ioctl("VFIO_DEVICE_DETACH_IOMMUFD_PT", uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, cmd)

    def get_info(self) -> DeviceInfo:
        cmd = uapi.vfio_device_info.new()
        self._ioctl("VFIO_DEVICE_GET_INFO", uapi.VFIO_DEVICE_GET_INFO, cmd)
        return DeviceInfo(
            flags=int(cmd.flags), num_regions=int(cmd.num_regions), num_irqs=int(cmd.num_irqs)
        )

    def get_region_info(self, index: int) -> RegionInfo:
        return get_region_info(self.fileno(), index)

    def reset(self) -> None:
        self._ioctl("VFIO_DEVICE_RESET", uapi.VFIO_DEVICE_RESET)

    def set_irq_eventfd(self, index: int, eventfd: int) -> None:
        # vfio.h VFIO_DEVICE_SET_IRQS: ACTION_TRIGGER | DATA_EVENTFD, start 0, count 1.
        cmd = uapi.vfio_irq_set_eventfd.new(
            flags=uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
            index=index,
            start=0,
            count=1,
            eventfd=eventfd,
        )
        self._ioctl("VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, cmd)

    def trigger_irq(self, index: int) -> None:
        # vfio.h VFIO_DEVICE_SET_IRQS: ACTION_TRIGGER | DATA_NONE, start 0, count 1.
        cmd = uapi.vfio_irq_set.new(
            flags=uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
            index=index,
            start=0,
            count=1,
        )
        self._ioctl("VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, cmd)


class LinuxVfioContainer(_FdOwner):
    """The legacy /dev/vfio/vfio container (iommud.kernel.interface.VfioContainer)."""

    def get_api_version(self) -> int:
        return self._ioctl("VFIO_GET_API_VERSION", uapi.VFIO_GET_API_VERSION)

    def check_extension(self, extension: int) -> bool:
        return self._ioctl("VFIO_CHECK_EXTENSION", uapi.VFIO_CHECK_EXTENSION, extension) > 0

    def set_iommu_type1v2(self) -> None:
        self._ioctl("VFIO_SET_IOMMU", uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)

    def map_dma(self, vaddr: int, iova: int, size: int, *, read: bool, write: bool) -> None:
        flags = (uapi.VFIO_DMA_MAP_FLAG_READ if read else 0) | (
            uapi.VFIO_DMA_MAP_FLAG_WRITE if write else 0
        )
        cmd = uapi.vfio_iommu_type1_dma_map.new(flags=flags, vaddr=vaddr, iova=iova, size=size)
        self._ioctl("VFIO_IOMMU_MAP_DMA", uapi.VFIO_IOMMU_MAP_DMA, cmd)

    def unmap_dma(self, iova: int, size: int) -> int:
        cmd = uapi.vfio_iommu_type1_dma_unmap.new(flags=0, iova=iova, size=size)
        self._ioctl("VFIO_IOMMU_UNMAP_DMA", uapi.VFIO_IOMMU_UNMAP_DMA, cmd)
        return int(cmd.size)

    def unmap_all(self) -> int:
        # vfio.h: with VFIO_DMA_UNMAP_FLAG_ALL, iova and size must be 0.
        cmd = uapi.vfio_iommu_type1_dma_unmap.new(flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL)
        self._ioctl("VFIO_IOMMU_UNMAP_DMA", uapi.VFIO_IOMMU_UNMAP_DMA, cmd)
        return int(cmd.size)


class LinuxVfioGroup(_FdOwner):
    """A legacy /dev/vfio/N group (iommud.kernel.interface.VfioGroup)."""

    def __init__(self, fd: int, group_id: int) -> None:
        super().__init__(fd)
        self._group_id = group_id

    @property
    def group_id(self) -> int:
        return self._group_id

    def get_status(self) -> GroupStatus:
        cmd = uapi.vfio_group_status.new()
        self._ioctl("VFIO_GROUP_GET_STATUS", uapi.VFIO_GROUP_GET_STATUS, cmd)
        return GroupStatus(
            is_viable=bool(cmd.flags & uapi.VFIO_GROUP_FLAGS_VIABLE),
            is_container_set=bool(cmd.flags & uapi.VFIO_GROUP_FLAGS_CONTAINER_SET),
        )

    def set_container(self, container: VfioContainer) -> None:
        # vfio.h: the argument is a pointer to the container fd (__s32).
        fd = ctypes.c_int32(container.fileno())
        ioctl(
            self.fileno(),
            "VFIO_GROUP_SET_CONTAINER",
            uapi.VFIO_GROUP_SET_CONTAINER,
            ctypes.addressof(fd),
        )

    def unset_container(self) -> None:
        self._ioctl("VFIO_GROUP_UNSET_CONTAINER", uapi.VFIO_GROUP_UNSET_CONTAINER)

    def get_device(self, bdf: str) -> LinuxVfioDevice:
        check_bdf("VFIO_GROUP_GET_DEVICE_FD", bdf)
        name = ctypes.create_string_buffer(bdf.encode("ascii"))
        fd = self._ioctl("VFIO_GROUP_GET_DEVICE_FD", uapi.VFIO_GROUP_GET_DEVICE_FD, name)
        return LinuxVfioDevice(fd, bdf)


class LinuxKernel:
    """The real kernel (iommud.kernel.interface.Kernel) under ``dev_root``/``sys_root``."""

    def __init__(
        self, dev_root: str | os.PathLike[str] = "/dev", sys_root: str | os.PathLike[str] = "/sys"
    ) -> None:
        self._dev = Path(dev_root)
        self._binder = SysfsBinder(sys_root)
        self._processes = ProcessTable()

    def open_iommufd(self) -> LinuxIommuFd:
        return LinuxIommuFd(_open(self._dev / "iommu", "open_iommufd"))

    def open_cdev(self, cdev_name: str) -> LinuxVfioDevice:
        if not isinstance(cdev_name, str) or _CDEV_RE.fullmatch(cdev_name) is None:
            raise KernelError("open_cdev", errno.EINVAL, f"invalid VFIO cdev name {cdev_name!r}")
        fd = _open(self._dev / "vfio" / "devices" / cdev_name, "open_cdev")
        return LinuxVfioDevice(fd, cdev_name)

    def open_container(self) -> LinuxVfioContainer:
        return LinuxVfioContainer(_open(self._dev / "vfio" / "vfio", "open_container"))

    def open_group(self, group_id: int) -> LinuxVfioGroup:
        if isinstance(group_id, bool) or not isinstance(group_id, int) or group_id < 0:
            raise KernelError("open_group", errno.EINVAL, f"invalid group id {group_id!r}")
        fd = _open(self._dev / "vfio" / str(group_id), "open_group")
        return LinuxVfioGroup(fd, group_id)

    @property
    def binder(self) -> SysfsBinder:
        return self._binder

    @property
    def processes(self) -> ProcessTable:
        return self._processes


if TYPE_CHECKING:  # never runs: lets mypy prove these classes implement the interface

    def _conforms(
        k: LinuxKernel,
        i: LinuxIommuFd,
        d: LinuxVfioDevice,
        c: LinuxVfioContainer,
        g: LinuxVfioGroup,
        b: SysfsBinder,
    ) -> tuple[Kernel, IommuFd, VfioDevice, VfioContainer, VfioGroup, DriverBinder]:
        return k, i, d, c, g, b
