"""A fake of the kernel layer's Protocols (iommud/kernel/interface.py), for host tests ONLY.

It behaves like Linux 6.12 where the broker's correctness depends on it:

- iommufd: ENOENT for an unknown IOAS, EINVAL for a zero or misaligned length/IOVA or an
  IOVA outside the allowed ranges, EEXIST for an overlapping fixed IOVA, EBUSY when
  destroying an IOAS with attached devices, unmap never splits an area (ENOENT, measured) and
  answers ENOENT when nothing was mapped (drivers/iommu/iommufd/io_pagetable.c);
- VFIO: a group that is not viable refuses a container and a cdev bind with EPERM (both
  measured on 6.12 in the lab, tests/kernel/test_kernel_vm.py), SET_IOMMU needs a group,
  GET_DEVICE_FD needs a container with an IOMMU and a device bound to vfio-pci, a cdev
  bind fails with EBUSY while another owner holds the group (drivers/iommu/iommu.c,
  iommu_device_claim_dma_owner);
- sysfs: the binder edits a real directory tree (the one tests/fakesys.py builds and
  iommud.host.snapshot reads), unbinding vfio-pci BLOCKS while any fd of the device is
  still open anywhere in the process (as vfio_unregister_group_dev waits), and an
  ordinary driver cannot probe a device of a user-owned group (EBUSY).

Every kernel object is backed by a real fd (a memfd), so /proc/self/fd counting in tests
is real, and handing a dup to a "client" keeps the object alive the way the kernel does.
Every call is appended to ``FakeKernel.calls`` so tests can assert ordering, and
``FakeKernel.fail_next(op, errno)`` injects one failure.

It must not be imported by the daemon: the daemon only knows iommud.kernel.interface.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iommud.errors import KernelError
from iommud.kernel.interface import (
    DeviceInfo,
    GroupStatus,
    IovaRange,
    MapFlag,
    Processes,
    RegionInfo,
)
from iommud.kernel.libc import map_oserror
from iommud.kernel.procs import ProcessTable
from tests.fakesys import FakeSys

PAGE = 4096
U64_MAX = 2**64 - 1
# Drivers that set driver_managed_dma (see shared/kernel-uapi.md).
DMA_SAFE = frozenset({"vfio-pci", "pci-stub", "pcieport"})
# An Intel VT-d like IOVA space: 48 bits with the MSI window reserved.
DEFAULT_IOVA_RANGES = (IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, 2**48 - 1))
ALL_IOVAS = (IovaRange(0, U64_MAX),)

Inode = tuple[int, int]


def _any_open(objects: Iterable[_FdBacked], but: Inode | None = None) -> bool:
    """Whether any of ``objects`` still has an fd open anywhere in this process (its
    own or a dup), as the kernel keeps a file alive until its last fd is closed."""
    live = _open_inodes() - {but}
    return any(o.inode in live for o in objects)


def _open_copies(inode: Inode) -> int:
    """How many fds of this process refer to the file ``inode`` right now."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        count += (st.st_dev, st.st_ino) == inode
    return count


def _open_inodes() -> set[Inode]:
    """(st_dev, st_ino) of every fd open in this process right now."""
    out: set[Inode] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


class _FdBacked:
    """A kernel object owning one real fd (a memfd standing in for the kernel file)."""

    kind = "fd"

    def __init__(self, kernel: FakeKernel, label: str) -> None:
        self._kernel = kernel
        self._label = label
        self._fd: int | None = os.memfd_create(f"fake-{self.kind}-{label}", os.MFD_CLOEXEC)
        st = os.fstat(self._fd)
        self.inode: Inode = (st.st_dev, st.st_ino)

    def fileno(self) -> int:
        if self._fd is None:
            raise KernelError(f"{self.kind}.fileno", errno.EBADF)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._kernel.record("close", self.kind, self._label)
            self._on_close()
            os.close(fd)

    def _on_close(self) -> None:
        pass

    def _check(self, op: str) -> None:
        self._kernel.maybe_fail(op)
        if self._fd is None:
            raise KernelError(op, errno.EBADF)


_ACCESS = int(MapFlag.READABLE | MapFlag.WRITEABLE)


@dataclass
class Area:
    """One IOVA area of an IOAS or a container: what it maps, for the fake's DMA."""

    iova: int
    length: int
    flags: MapFlag
    user_va: int | None = None  # ioas_map / map_dma: an address in this process
    file_fd: int | None = None  # ioas_map_file: the kernel's reference to the file (a dup)
    file_start: int = 0

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


@dataclass
class _Space:
    """An IOVA space (an IOAS or a type1 container) with kernel-like map/unmap rules."""

    allowed: tuple[IovaRange, ...]
    alignment: int
    areas: dict[int, Area] = field(default_factory=dict)  # change through add() / unmap()
    allow: tuple[IovaRange, ...] = ()  # IOMMU_IOAS_ALLOW_IOVAS: steers the kernel's choice
    # The areas' IOVAs, sorted: lookups bisect, like the kernel's interval tree
    # (io_pagetable.c iopt_area_iter), so a fake with thousands of areas stays fast.
    starts: list[int] = field(default_factory=list)

    def add(self, area: Area) -> None:
        self.areas[area.iova] = area
        bisect.insort(self.starts, area.iova)

    def meeting(self, iova: int, last: int) -> list[Area]:
        """The areas that meet [iova, last], by IOVA."""
        lo = bisect.bisect_left(self.starts, iova)
        hi = bisect.bisect_right(self.starts, last)
        hits = [self.areas[s] for s in self.starts[lo:hi]]
        if lo and self.areas[self.starts[lo - 1]].last >= iova:
            hits.insert(0, self.areas[self.starts[lo - 1]])
        return hits

    def check(self, op: str, iova: int, length: int, flags: MapFlag = MapFlag.READABLE) -> None:
        # io_pagetable.c: no READ/WRITE is EINVAL (conv_iommu_prot), like a bad length.
        no_access = not int(flags) & _ACCESS  # int: enum.Flag's & | cost microseconds
        if no_access or length == 0 or length % self.alignment or iova % self.alignment:
            raise KernelError(op, errno.EINVAL)
        last = iova + length - 1
        if last > U64_MAX:
            raise KernelError(op, errno.EOVERFLOW)
        if not any(r.start <= iova and last <= r.last for r in self.allowed):
            raise KernelError(op, errno.EINVAL)
        if self.meeting(iova, last):
            raise KernelError(op, errno.EEXIST)

    def pick_iova(self, op: str, length: int) -> int:
        for r in self.allow or self.allowed:
            cand = -(-r.start // self.alignment) * self.alignment
            for a in (self.areas[s] for s in self.starts):
                if a.last < cand:
                    continue
                if cand + length - 1 < a.iova:
                    break
                cand = -(-(a.last + 1) // self.alignment) * self.alignment
            if cand + length - 1 <= r.last:
                return cand
        raise KernelError(op, errno.ENOSPC)

    def unmap(self, op: str, iova: int, length: int) -> int:
        if iova == 0 and length == U64_MAX:
            victims = list(self.areas.values())
        else:
            if length == 0:
                raise KernelError(op, errno.EINVAL)
            last = iova + length - 1
            victims = self.meeting(iova, last)
            if any(a.iova < iova or a.last > last for a in victims):
                raise KernelError(op, errno.ENOENT)  # never split; 6.12: ENOENT
            if not victims:
                raise KernelError(op, errno.ENOENT)
        for a in victims:
            del self.areas[a.iova]
            del self.starts[bisect.bisect_left(self.starts, a.iova)]
            if a.file_fd is not None:
                os.close(a.file_fd)
        return sum(a.length for a in victims)

    def find(self, iova: int) -> Area:
        for a in self.meeting(iova, iova):
            return a
        raise KeyError(iova)


@dataclass
class _Ioas:
    """An IOAS. With no device attached it allows every IOVA with alignment 1; an
    attached device brings its IOMMU's aperture, reserved ranges and page size
    (drivers/iommu/iommufd/io_pagetable.c iopt_table_enforce_dev_resv_regions)."""

    space: _Space
    device_ranges: tuple[IovaRange, ...]
    attached: set[str] = field(default_factory=set)

    def attach(self, bdf: str) -> None:
        self.attached.add(bdf)
        self.space.allowed = self.device_ranges

    def detach(self, bdf: str) -> None:
        self.attached.discard(bdf)
        if not self.attached:
            self.space.allowed = ALL_IOVAS

    def ranges(self) -> tuple[list[IovaRange], int]:
        return list(self.space.allowed), self.space.alignment if self.attached else 1


class FakeIommuFd(_FdBacked):
    kind = "iommufd"

    def __init__(self, kernel: FakeKernel, label: str) -> None:
        super().__init__(kernel, label)
        self.ioas: dict[int, _Ioas] = {}
        self.devices: dict[int, FakeDevice] = {}  # devid -> device bound here
        self._next_id = 1
        self.rlimit_per_process = False

    def new_id(self) -> int:
        """IOAS and device ids share one id space per iommufd (main.c, ictx->objects)."""
        object_id, self._next_id = self._next_id, self._next_id + 1
        return object_id

    def _get(self, op: str, ioas_id: int) -> _Ioas:
        self._check(op)
        try:
            return self.ioas[ioas_id]
        except KeyError:
            raise KernelError(op, errno.ENOENT) from None

    def ioas_alloc(self) -> int:
        self._check("ioas_alloc")
        ioas_id = self.new_id()
        k = self._kernel
        self.ioas[ioas_id] = _Ioas(_Space(ALL_IOVAS, k.iova_alignment), k.iova_ranges)
        k.record("ioas_alloc", ioas_id)
        return ioas_id

    def destroy(self, object_id: int) -> None:
        if object_id in self.devices:
            raise KernelError("destroy", errno.EBUSY)  # a bound device is not destroyed
        ioas = self._get("destroy", object_id)
        if ioas.attached:
            raise KernelError("destroy", errno.EBUSY)
        ioas.space.unmap("destroy", 0, U64_MAX)
        del self.ioas[object_id]
        self._kernel.record("destroy", object_id)

    def _map(self, op: str, ioas_id: int, length: int, iova: int | None, area: Area) -> int:
        space = self._get(op, ioas_id).space
        if iova is None:
            iova = space.pick_iova(op, length)  # a bad length fails the check below
        space.check(op, iova, length, area.flags)
        area.iova, area.length = iova, length
        space.add(area)
        self._kernel.record(op, ioas_id, iova, length)
        return iova

    def ioas_map(
        self, ioas_id: int, user_va: int, length: int, iova: int | None, flags: MapFlag
    ) -> int:
        if user_va % PAGE:
            self._check("ioas_map")
            raise KernelError("ioas_map", errno.EINVAL)
        return self._map("ioas_map", ioas_id, length, iova, Area(0, 0, flags, user_va=user_va))

    def ioas_map_file(
        self, ioas_id: int, fd: int, start: int, length: int, iova: int | None, flags: MapFlag
    ) -> int:
        op = "ioas_map_file"
        if not self._kernel.map_file:
            self._check(op)
            raise KernelError(op, errno.ENOTTY)
        self._get(op, ioas_id)
        with map_oserror(op):
            size = os.fstat(fd).st_size
        if start % PAGE or start + length > size:
            raise KernelError(op, errno.EINVAL)
        dup = os.dup(fd)  # the kernel keeps a reference to the file while mapped
        try:
            return self._map(
                op, ioas_id, length, iova, Area(0, 0, flags, file_fd=dup, file_start=start)
            )
        except BaseException:
            os.close(dup)
            raise

    def has_map_file(self) -> bool:
        return self._kernel.map_file

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        n = self._get("ioas_unmap", ioas_id).space.unmap("ioas_unmap", iova, length)
        self._kernel.record("ioas_unmap", ioas_id, iova, length)
        return n

    def ioas_unmap_all(self, ioas_id: int) -> int:
        n = self._get("ioas_unmap", ioas_id).space.unmap("ioas_unmap", 0, U64_MAX)
        self._kernel.record("ioas_unmap_all", ioas_id)
        return n

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[IovaRange], int]:
        return self._get("ioas_iova_ranges", ioas_id).ranges()

    def ioas_allow_iovas(self, ioas_id: int, ranges: list[IovaRange]) -> None:
        self._get("ioas_allow_iovas", ioas_id).space.allow = tuple(ranges)

    def ioas_copy(
        self,
        dst_ioas_id: int,
        dst_iova: int,
        src_ioas_id: int,
        src_iova: int,
        length: int,
        flags: MapFlag,
    ) -> None:
        raise KernelError("ioas_copy", errno.EOPNOTSUPP)  # not used by the broker

    def option_rlimit_mode(self, per_process: bool | None = None) -> bool:
        self._check("option")
        if per_process is not None:
            if self.ioas or self.devices:
                raise KernelError("option", errno.EBUSY)  # only on an empty iommufd
            self.rlimit_per_process = per_process
        return self.rlimit_per_process

    def dup_fd(self) -> int:
        return os.dup(self.fileno())

    def is_device_bound(self, dev_id: int) -> bool:
        """Bound while any fd of the device (the daemon's or a client's dup) is open,
        as a VFIO cdev stays bound until its file is released."""
        self._check("is_device_bound")
        dev = self.devices.get(dev_id)
        if dev is None:
            return False
        if _any_open([dev]):
            return True
        self._unbind(dev)
        return False

    def _unbind(self, dev: FakeDevice) -> None:
        """The device's last fd is gone: it leaves its IOAS and this iommufd."""
        self.devices.pop(dev.devid or 0, None)
        dev.leave_ioas()

    def _on_close(self) -> None:
        # The file (and its objects) lives on while a client holds a dup (delegated
        # claims): only the last close destroys them (main.c iommufd_fops_release).
        if _open_copies(self.inode) > 1:
            return
        for ioas in self.ioas.values():
            ioas.space.unmap("close", 0, U64_MAX)
        self.ioas.clear()


class FakeDevice(_FdBacked):
    kind = "device"

    def __init__(self, kernel: FakeKernel, bdf: str, name: str, *, legacy: bool) -> None:
        super().__init__(kernel, bdf)
        self.bdf = bdf
        self._name = name
        self.legacy = legacy
        self.group_id = kernel.group_of(bdf)
        self.bound_to: FakeIommuFd | None = None
        self.attached_to: int | None = None
        self.devid: int | None = None
        kernel.devices.append(self)

    @property
    def name(self) -> str:
        return self._name

    def bind_iommufd(self, iommufd: Any) -> int:
        op = "bind_iommufd"
        super()._check(op)
        if self.legacy or self.bound_to is not None or not isinstance(iommufd, FakeIommuFd):
            raise KernelError(op, errno.EINVAL)
        k = self._kernel
        if k.group_is_open(self.group_id):
            raise KernelError(op, errno.EBUSY)  # group.c vfio_device_block_group
        if not k.is_viable(self.group_id):
            raise KernelError(op, errno.EPERM)  # measured on 6.12 (group node closed)
        k.claim_group(op, self.group_id, iommufd.inode, {self.inode})
        self.bound_to = iommufd
        self.devid = iommufd.new_id()
        iommufd.devices[self.devid] = self
        k.record(op, self.bdf, self.devid)
        return self.devid

    def _check(self, op: str) -> None:
        """A cdev answers nothing but the bind until it is bound (vfio_main.c
        vfio_device_fops_unl_ioctl: access_granted), whatever the ioctl."""
        super()._check(op)
        if not self.legacy and self.bound_to is None:
            raise KernelError(op, errno.EINVAL)

    def enter_ioas(self, pt_id: int) -> None:
        """Attach (or move) to ``pt_id`` of the iommufd this device is bound to."""
        assert self.bound_to is not None
        ioas = self.bound_to._get("attach_ioas", pt_id)
        self.leave_ioas()
        ioas.attach(self.bdf)
        self.attached_to = pt_id

    def leave_ioas(self) -> None:
        if self.bound_to is not None and self.attached_to in self.bound_to.ioas:
            self.bound_to.ioas[self.attached_to].detach(self.bdf)
        self.attached_to = None

    def attach_ioas(self, pt_id: int) -> None:
        self._check("attach_ioas")
        if pt_id in self._bound().devices:
            raise KernelError("attach_ioas", errno.EINVAL)  # an id, but not of an IOAS
        self.enter_ioas(pt_id)
        self._kernel.record("attach_ioas", self.bdf, pt_id)

    def detach_ioas(self) -> None:
        self._check("detach_ioas")
        self.leave_ioas()  # not attached: nothing to do, not an error (measured on 6.12)
        self._kernel.record("detach_ioas", self.bdf)

    def _bound(self) -> FakeIommuFd:
        if self.bound_to is None:
            raise KernelError("attach_ioas", errno.EINVAL)
        return self.bound_to

    def get_info(self) -> DeviceInfo:
        self._check("get_info")
        return DeviceInfo(flags=3 if self._kernel.can_reset else 2, num_regions=9, num_irqs=5)

    def get_region_info(self, index: int) -> RegionInfo:
        self._check("get_region_info")
        return RegionInfo(
            index=index, flags=7, size=0x100000 if index == 0 else 0, offset=index << 40
        )

    def reset(self) -> None:
        self._check("reset")
        if not self._kernel.can_reset:
            raise KernelError("reset", errno.EINVAL)  # vfio_pci_core.c: !reset_works
        self._kernel.record("reset", self.bdf)

    def set_irq_eventfd(self, index: int, eventfd: int) -> None:
        self._check("set_irq_eventfd")
        self._kernel.irq_eventfds[(self.bdf, index)] = os.dup(eventfd) if eventfd >= 0 else -1
        self._kernel.record("set_irq_eventfd", self.bdf, index)

    def trigger_irq(self, index: int) -> None:
        """Signal whatever eventfd is registered for ``index`` (EINVAL: none)."""
        self._check("trigger_irq")
        if not self._kernel.signal_irq(self.bdf, index):
            raise KernelError("trigger_irq", errno.EINVAL)
        self._kernel.record("trigger_irq", self.bdf, index)

    def dup_fd(self) -> int:
        return os.dup(self.fileno())

    def _on_close(self) -> None:
        # vfio_pci_core_close_device drops the REQ trigger (approximated at this close).
        for key in [k for k in self._kernel.irq_eventfds if k[0] == self.bdf]:
            fd = self._kernel.irq_eventfds.pop(key)
            if fd >= 0:
                os.close(fd)
        # Closing the daemon's fd; the kernel file lives on while a client holds a dup.
        if self.bound_to is not None and self.attached_to in self.bound_to.ioas:
            self.bound_to.ioas[self.attached_to].detach(self.bdf)


class FakeContainer(_FdBacked):
    kind = "container"

    def __init__(self, kernel: FakeKernel, label: str) -> None:
        super().__init__(kernel, label)
        self.groups: set[int] = set()
        self.space: _Space | None = None

    def get_api_version(self) -> int:
        self._check("get_api_version")
        return 0

    def check_extension(self, extension: int) -> bool:
        self._check("check_extension")
        return extension in (1, 3)  # VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU

    def set_iommu_type1v2(self) -> None:
        self._check("set_iommu")
        if not self.groups or self.space is not None:
            raise KernelError("set_iommu", errno.EINVAL)
        k = self._kernel
        self.space = _Space(k.iova_ranges, PAGE)
        k.record("set_iommu", self._label)

    def _iommu(self, op: str) -> _Space:
        """The type1 IOMMU's space; EINVAL before VFIO_SET_IOMMU."""
        self._check(op)
        if self.space is None:
            raise KernelError(op, errno.EINVAL)
        return self.space

    def map_dma(self, vaddr: int, iova: int, size: int, *, read: bool, write: bool) -> None:
        space = self._iommu("map_dma")
        flags = (MapFlag.READABLE if read else MapFlag(0)) | (
            MapFlag.WRITEABLE if write else MapFlag(0)
        )
        if vaddr % PAGE:
            raise KernelError("map_dma", errno.EINVAL)
        space.check("map_dma", iova, size, flags)
        space.add(Area(iova, size, flags, user_va=vaddr))
        self._kernel.record("map_dma", iova, size)

    def unmap_dma(self, iova: int, size: int) -> int:
        n = self._iommu("unmap_dma").unmap("unmap_dma", iova, size)
        self._kernel.record("unmap_dma", iova, size)
        return n

    def unmap_all(self) -> int:
        n = self._iommu("unmap_dma").unmap("unmap_dma", 0, U64_MAX)
        self._kernel.record("unmap_all", self._label)
        return n

    def _on_close(self) -> None:
        if self.space is not None:
            self.space.unmap("close", 0, U64_MAX)


class FakeGroup(_FdBacked):
    kind = "group"

    def __init__(self, kernel: FakeKernel, group_id: int) -> None:
        super().__init__(kernel, str(group_id))
        self._group_id = group_id
        self.container: FakeContainer | None = None
        self.devices: list[FakeDevice] = []

    @property
    def group_id(self) -> int:
        return self._group_id

    def get_status(self) -> GroupStatus:
        self._check("get_status")
        return GroupStatus(self._kernel.is_viable(self._group_id), self.container is not None)

    def set_container(self, container: Any) -> None:
        op = "set_container"
        self._check(op)
        k = self._kernel
        if self.container is not None or not isinstance(container, FakeContainer):
            raise KernelError(op, errno.EINVAL)
        if not k.is_viable(self._group_id):
            raise KernelError(op, errno.EPERM)  # measured on 6.12
        k.claim_group(op, self._group_id, self.inode, {self.inode})
        self.container = container
        container.groups.add(self._group_id)
        k.record(op, self._group_id)

    def unset_container(self) -> None:
        op = "unset_container"
        self._check(op)
        if self.container is None:
            raise KernelError(op, errno.EINVAL)
        if _any_open(self.devices):
            raise KernelError(op, errno.EBUSY)
        self._detach()
        self._kernel.record(op, self._group_id)

    def _detach(self) -> None:
        c, self.container = self.container, None
        if c is None:
            return
        c.groups.discard(self._group_id)
        if not c.groups and c.space is not None:
            # The last group leaving tears the type1 IOMMU down with its mappings.
            c.space.unmap("unset_container", 0, U64_MAX)
            c.space = None
        self._kernel.release_group(self._group_id, self.inode)

    def get_device(self, bdf: str) -> FakeDevice:
        op = "get_device_fd"
        self._check(op)
        k = self._kernel
        if self.container is None or self.container.space is None:
            raise KernelError(op, errno.EINVAL)
        if k.group_of(bdf) != self._group_id or k.binder.current_driver(bdf) != "vfio-pci":
            raise KernelError(op, errno.ENODEV)
        dev = FakeDevice(k, bdf, bdf, legacy=True)
        self.devices.append(dev)
        k.add_group_holder(self._group_id, dev.inode)
        k.record(op, bdf)
        return dev

    def _on_close(self) -> None:
        if self._kernel.open_groups.get(self._group_id) is self:
            del self._kernel.open_groups[self._group_id]
        if not _any_open(self.devices, but=self.inode):
            self._detach()


class FakeBinder:
    """sysfs driver binding on a directory tree laid out like /sys (see snapshot.py)."""

    def __init__(self, kernel: FakeKernel) -> None:
        self._k = kernel
        self._lock = threading.Lock()

    def _dev(self, bdf: str) -> Path:
        d = self._k.sys_root / "bus" / "pci" / "devices" / bdf
        if not d.exists():
            raise KernelError("sysfs", errno.ENODEV, bdf=bdf)
        return d

    def current_driver(self, bdf: str) -> str | None:
        link = self._dev(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def override(self, bdf: str) -> str | None:
        text = (self._dev(bdf) / "driver_override").read_text().strip()
        return None if text in ("", "(null)") else text

    def set_driver_override(self, bdf: str, driver: str | None) -> None:
        self._k.maybe_fail("set_driver_override")
        self._dev(bdf)
        self._k.fs.set_driver_override(bdf, driver)
        self._k.record("set_driver_override", bdf, driver)

    def unbind(self, bdf: str) -> None:
        self._k.maybe_fail("unbind")
        drv = self.current_driver(bdf)
        if drv is None:
            return
        if drv == "vfio-pci":
            self._wait_unheld(bdf)
        with self._lock:
            self._k.fs.unbind(bdf)
        self._k.record("unbind", bdf, drv)

    def _wait_unheld(self, bdf: str) -> None:
        # drivers/vfio/vfio_main.c vfio_unregister_group_dev waits for every user.
        deadline = time.monotonic() + self._k.unbind_block_limit
        while _any_open(d for d in self._k.devices if d.bdf == bdf):
            if time.monotonic() > deadline:
                raise KernelError("unbind", errno.EINTR, bdf=bdf)
            time.sleep(0.005)

    def drivers_probe(self, bdf: str) -> None:
        self._k.maybe_fail("drivers_probe")
        if self.current_driver(bdf) is not None:
            return
        drv = self.override(bdf) or self._k.native_driver.get(bdf)
        if drv is not None:
            self._attach(drv, bdf, "drivers_probe")
        self._k.record("drivers_probe", bdf, drv)

    def bind(self, driver: str, bdf: str) -> None:
        self._k.maybe_fail("bind")
        if self.current_driver(bdf) is not None:
            raise KernelError("bind", errno.EBUSY, bdf=bdf)
        ov = self.override(bdf)
        if ov is not None and ov != driver:
            raise KernelError("bind", errno.ENODEV, bdf=bdf)
        self._attach(driver, bdf, "bind")
        self._k.record("bind", driver, bdf)

    def _attach(self, driver: str, bdf: str, op: str) -> None:
        k = self._k
        gid = k.group_of(bdf)
        if driver not in DMA_SAFE and gid is not None and k.group_owner(gid) is not None:
            # really_probe refuses a DMA-unsafe driver on a user-owned group; a write to
            # drivers_probe then fails EINVAL and the device stays driver-less (measured
            # on 6.12 in the lab).
            raise KernelError(op, errno.EINVAL if op == "drivers_probe" else errno.EBUSY, bdf=bdf)
        with self._lock:
            k.fs.bind(bdf, driver)


@dataclass
class _Owner:
    token: Inode
    inodes: set[Inode]


class FakeKernel:
    """The fake ``Kernel``: a factory of fake objects over a fake sysfs tree."""

    def __init__(
        self,
        fs: FakeSys,
        *,
        map_file: bool = False,
        can_reset: bool = True,
        iova_ranges: tuple[IovaRange, ...] = DEFAULT_IOVA_RANGES,
        iova_alignment: int = PAGE,
        unbind_block_limit: float = 10.0,
    ) -> None:
        self.fs = fs
        self.sys_root = sys_root = fs.sys_root
        self.map_file = map_file
        self.can_reset = can_reset
        self.iova_ranges = iova_ranges
        self.iova_alignment = iova_alignment
        self.unbind_block_limit = unbind_block_limit
        self.calls: list[tuple[Any, ...]] = []
        self._fail: dict[str, list[tuple[int, int]]] = {}
        self._owners: dict[int, _Owner] = {}
        self.open_groups: dict[int, FakeGroup] = {}  # group.c: one open of /dev/vfio/N
        self._mutex = threading.Lock()
        self._binder = FakeBinder(self)
        self.devices: list[FakeDevice] = []  # every device object ever opened
        self.iommufds: list[FakeIommuFd] = []  # every /dev/iommu ever opened
        # (bdf, irq index) -> the kernel's reference to a registered eventfd (a dup).
        self.irq_eventfds: dict[tuple[str, int], int] = {}
        self.process_table: Processes = ProcessTable()
        # drivers_probe without an override binds the driver the device had at start.
        devs = sys_root / "bus" / "pci" / "devices"
        self.native_driver: dict[str, str] = {}
        for d in devs.iterdir() if devs.exists() else ():
            drv = self._binder.current_driver(d.name)
            if drv is not None and drv != "vfio-pci":
                self.native_driver[d.name] = drv

    # -- test helpers ------------------------------------------------------------
    def record(self, *call: Any) -> None:
        with self._mutex:
            self.calls.append(call)

    def ops(self, *names: str) -> list[tuple[Any, ...]]:
        """The recorded calls whose op is one of ``names`` (all calls if none given)."""
        return [c for c in self.calls if not names or c[0] in names]

    def index(self, *call: Any) -> int:
        """Position of the first recorded call starting with ``call`` (ValueError if none)."""
        for i, c in enumerate(self.calls):
            if c[: len(call)] == call:
                return i
        raise ValueError(f"{call!r} not called; calls: {self.calls!r}")

    def signal_irq(self, bdf: str, index: int) -> bool:
        """Fire an irq as the kernel would (vfio_pci_core_request for the REQ index)."""
        fd = self.irq_eventfds.get((bdf, index), -1)
        if fd < 0:
            return False
        os.eventfd_write(fd, 1)
        return True

    def device_of_fd(self, fd: int) -> FakeDevice:
        """The device a (client's) fd refers to: its open file, wherever it came from."""
        st = os.fstat(fd)
        for dev in self.devices:
            if dev.inode == (st.st_dev, st.st_ino):
                return dev
        raise KernelError("device_of_fd", errno.EBADF)

    def iommufd_of_fd(self, fd: int) -> FakeIommuFd:
        """The iommufd a (client's) fd refers to: its open file, wherever it came from."""
        st = os.fstat(fd)
        for ictx in self.iommufds:
            if ictx.inode == (st.st_dev, st.st_ino):
                return ictx
        raise KernelError("iommufd_of_fd", errno.EBADF)

    def client_bind(self, device_fd: int, iommufd_fd: int) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD issued by a client (a VMM given a delegated claim's
        fds) on its own copies; returns the devid."""
        dev = self.device_of_fd(device_fd)
        devid = dev.bind_iommufd(self.iommufd_of_fd(iommufd_fd))
        self.record("client_bind", dev.bdf, devid)
        return devid

    def client_attach(self, fd: int, pt_id: int) -> None:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT issued by a client on its own copy of a device
        fd: works while the device file is open (bound), whatever the daemon did."""
        dev = self.device_of_fd(fd)
        iommufd = dev.bound_to
        if iommufd is None or iommufd.devices.get(dev.devid or 0) is not dev:
            raise KernelError("attach_ioas", errno.EINVAL)
        dev.enter_ioas(pt_id)
        self.record("client_attach", dev.bdf, pt_id)

    def fail_next(self, op: str, err: int, *, after: int = 0) -> None:
        """Make the call to ``op`` after ``after`` successful ones fail with ``err`` (once)."""
        self._fail.setdefault(op, []).append((after, err))

    def maybe_fail(self, op: str) -> None:
        with self._mutex:
            pending = self._fail.get(op)
            err = None
            if pending:
                after, e = pending[0]
                if after == 0:
                    pending.pop(0)
                    err = e
                else:
                    pending[0] = (after - 1, e)
        if err is not None:
            raise KernelError(op, err)

    # -- host model --------------------------------------------------------------
    def group_of(self, bdf: str) -> int | None:
        link = self.sys_root / "bus" / "pci" / "devices" / bdf / "iommu_group"
        return int(os.path.basename(os.readlink(link))) if link.is_symlink() else None

    def group_members(self, group_id: int) -> list[str]:
        return sorted(
            os.listdir(self.sys_root / "kernel" / "iommu_groups" / str(group_id) / "devices")
        )

    def is_viable(self, group_id: int | None) -> bool:
        if group_id is None:
            return False
        drivers = (self._binder.current_driver(b) for b in self.group_members(group_id))
        return all(d is None or d in DMA_SAFE for d in drivers)

    def group_is_open(self, group_id: int | None) -> bool:
        group = self.open_groups.get(group_id) if group_id is not None else None
        return group is not None and not group.closed

    def group_owner(self, group_id: int) -> Inode | None:
        owner = self._owners.get(group_id)
        if owner is not None and not owner.inodes & _open_inodes():
            del self._owners[group_id]  # every file of the owner is gone: released
            owner = None
        return None if owner is None else owner.token

    def claim_group(self, op: str, group_id: int | None, token: Inode, inodes: set[Inode]) -> None:
        if group_id is None:
            raise KernelError(op, errno.ENODEV)
        current = self.group_owner(group_id)
        if current is not None and current != token:
            raise KernelError(op, errno.EBUSY)
        self._owners.setdefault(group_id, _Owner(token, set())).inodes |= inodes

    def add_group_holder(self, group_id: int, inode: Inode) -> None:
        if group_id in self._owners:
            self._owners[group_id].inodes.add(inode)

    def release_group(self, group_id: int, token: Inode) -> None:
        owner = self._owners.get(group_id)
        if owner is not None and owner.token == token:
            del self._owners[group_id]

    def dma_read(
        self, space_owner: FakeIommuFd | FakeContainer, ioas_id: int | None, iova: int, n: int
    ) -> bytes:
        """Read ``n`` bytes at ``iova`` as a device would (only inside one area)."""
        area, at = self._area(space_owner, ioas_id, iova)
        if area.file_fd is not None:
            return os.pread(area.file_fd, n, at)
        return ctypes.string_at(at, n)

    def dma_write(
        self, space_owner: FakeIommuFd | FakeContainer, ioas_id: int | None, iova: int, data: bytes
    ) -> None:
        area, at = self._area(space_owner, ioas_id, iova)
        if area.file_fd is not None:
            os.pwrite(area.file_fd, data, at)
        else:
            ctypes.memmove(at, data, len(data))

    @staticmethod
    def _area(
        owner: FakeIommuFd | FakeContainer, ioas_id: int | None, iova: int
    ) -> tuple[Area, int]:
        """The area holding ``iova`` and where that byte is (file offset or address)."""
        space = owner.ioas[ioas_id or 0].space if isinstance(owner, FakeIommuFd) else owner.space
        assert space is not None
        area = space.find(iova)
        base = area.file_start if area.file_fd is not None else area.user_va
        assert base is not None
        return area, base + iova - area.iova

    # -- the Kernel protocol -----------------------------------------------------
    def open_iommufd(self) -> FakeIommuFd:
        self.maybe_fail("open_iommufd")
        obj = FakeIommuFd(self, "iommu")
        self.iommufds.append(obj)
        self.record("open_iommufd")
        return obj

    def open_cdev(self, cdev_name: str) -> FakeDevice:
        self.maybe_fail("open_cdev")
        for bdf in self._bdfs():
            if (self.sys_root / "bus" / "pci" / "devices" / bdf / "vfio-dev" / cdev_name).exists():
                dev = FakeDevice(self, bdf, cdev_name, legacy=False)
                self.record("open_cdev", cdev_name, bdf)
                return dev
        raise KernelError("open_cdev", errno.ENOENT, cdev=cdev_name)

    def open_container(self) -> FakeContainer:
        self.maybe_fail("open_container")
        obj = FakeContainer(self, "container")
        self.record("open_container")
        return obj

    def open_group(self, group_id: int) -> FakeGroup:
        self.maybe_fail("open_group")
        members = (
            self.group_members(group_id)
            if (self.sys_root / "kernel" / "iommu_groups" / str(group_id)).exists()
            else []
        )
        if not any(self._binder.current_driver(b) == "vfio-pci" for b in members):
            raise KernelError("open_group", errno.ENOENT, group_id=group_id)  # no /dev/vfio/N
        # group.c vfio_group_fops_open: one opener at a time, none while a cdev is bound.
        cdev_bound = _any_open(
            d for d in self.devices if d.group_id == group_id and d.bound_to is not None
        )
        if self.group_is_open(group_id) or cdev_bound:
            raise KernelError("open_group", errno.EBUSY, group_id=group_id)
        obj = self.open_groups[group_id] = FakeGroup(self, group_id)
        self.record("open_group", group_id)
        return obj

    @property
    def binder(self) -> FakeBinder:
        return self._binder

    @property
    def processes(self) -> Processes:
        """The REAL process table (iommud.kernel.procs): fake kernel files are memfds,
        so a child process given a dup of one is found exactly as a VMM holding a cdev
        would be. Tests may swap in a wrapper (``kernel.process_table = ...``)."""
        return self.process_table

    def _bdfs(self) -> Iterator[str]:
        yield from sorted(os.listdir(self.sys_root / "bus" / "pci" / "devices"))
