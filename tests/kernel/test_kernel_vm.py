"""The kernel layer against the real kernel: runs inside the lab guest (marker `vm`).

Guest topology (lab/topology.py): 0000:00:10.0 edu alone in its group; behind the bridge
0000:00:11.0 one group with edus 0000:01:01.0 and 0000:01:02.0 and an e1000 at
0000:01:03.0 (bound to e1000). Each test binds what it needs to vfio-pci with the
real SysfsBinder and the ``drivers`` fixture restores every driver afterwards.

The errno values asserted here were observed on the lab's Linux 6.12 guest; the
DMA checks use QEMU's edu device (lab/edu.py), so a passing round trip means bytes
really crossed the virtual IOMMU.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from edu import Edu, EduError
from kmsg import Kmsg
from topology import BRIDGE, EDU0, EDU1, EDU2, NIC

from iommud.errors import KernelError
from iommud.kernel import uapi
from iommud.kernel.interface import GroupStatus, IovaRange, MapFlag
from iommud.kernel.linux import LinuxIommuFd, LinuxKernel
from tests.kernel.contract import (
    DriverState,
    SealedMemfd,
    drivers_restored,
    expect,
    fd_count,
)

pytestmark = pytest.mark.vm


MiB = 1 << 20
IOVA = 0x100000
RW = MapFlag.READABLE | MapFlag.WRITEABLE
PCI = Path("/sys/bus/pci/devices")


_fd_count = fd_count


def _group_of(bdf: str) -> int:
    return int(os.path.basename(os.readlink(PCI / bdf / "iommu_group")))


def _expect(op: str, err: int, call: Callable[[], object]) -> KernelError:
    """Run ``call`` and require KernelError(op, err) exactly."""
    exc = expect(err, call)
    assert exc.op == op
    return exc


@pytest.fixture
def kernel() -> LinuxKernel:
    return LinuxKernel("/dev", "/sys")


@pytest.fixture
def drivers(kernel: LinuxKernel) -> Iterator[DriverState]:
    with drivers_restored(kernel.binder, Path("/sys")) as state:
        yield state


def _round_trip(edu: Edu, mm: mmap.mmap, src_iova: int, base_iova: int) -> float:
    """RAM -> device -> RAM through the IOMMU; returns the seconds it took."""
    pattern = os.urandom(2048)
    src, dst = src_iova - base_iova, src_iova - base_iova + 0x1000
    mm[src : src + 2048] = pattern
    mm[dst : dst + 2048] = bytes(2048)
    t0 = time.perf_counter()
    edu.dma_from_ram(src_iova, 2048)
    edu.dma_to_ram(src_iova + 0x1000, 2048)
    elapsed = time.perf_counter() - t0
    assert mm[dst : dst + 2048] == pattern
    return elapsed


# --------------------------------------------------------------------------- iommufd


def test_iommufd_dma_round_trip_then_unmap_blocks_dma(
    kernel: LinuxKernel, drivers: DriverState
) -> None:
    """edu 00:10.0 via cdev + iommufd: bytes cross the IOMMU both ways; after
    IOMMU_IOAS_UNMAP the device write does not land and the kernel logs a DMAR fault."""
    cdev = drivers.to_vfio(EDU0)
    before = _fd_count()
    with ExitStack() as stack:
        ifd = stack.enter_context(kernel.open_iommufd())
        dev = stack.enter_context(kernel.open_cdev(cdev))
        assert dev.name == cdev
        devid = dev.bind_iommufd(ifd)
        ioas = ifd.ioas_alloc()
        dev.attach_ioas(ioas)
        buf = stack.enter_context(SealedMemfd(MiB))
        t0 = time.perf_counter()
        assert ifd.ioas_map(ioas, buf.address, MiB, IOVA, RW) == IOVA
        map_seconds = time.perf_counter() - t0

        info = dev.get_info()
        assert info.flags & uapi.VFIO_DEVICE_FLAGS_PCI
        assert info.num_regions == 9  # BAR0-5, ROM, config, VGA
        assert ifd.get_hw_info(devid).data_type == uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD

        edu = Edu(dev.fileno())
        edu.enable_bus_master()
        assert edu.is_alive()
        rt_seconds = _round_trip(edu, buf.mm, IOVA, IOVA)
        print(
            f"ioas_map 1 MiB: {map_seconds * 1e3:.2f} ms; DMA round trip (2x2 KiB): "
            f"{rt_seconds * 1e3:.1f} ms"
        )

        assert ifd.ioas_unmap(ioas, IOVA, MiB) == MiB

        def blocked_write() -> None:
            edu.dma_to_ram(IOVA + 0x2000, 2048)
            assert buf.mm[0x2000:0x2800] == bytes(2048)

        with Kmsg() as kmsg:
            line = kmsg.expect_fault(blocked_write, lambda m: "DMAR" in m and "[00:10.0]" in m)
        assert "DMA Write" in line
        assert f"fault addr {IOVA + 0x2000:#x}" in line

        dev.detach_ioas()
        ifd.destroy(ioas)
    assert _fd_count() == before


def test_a_dup_of_the_device_fd_drives_the_device(
    kernel: LinuxKernel, drivers: DriverState
) -> None:
    """dup_fd() (what the broker hands to a client) works for regions and DMA."""
    cdev = drivers.to_vfio(EDU0)
    before = _fd_count()
    with ExitStack() as stack:
        ifd = stack.enter_context(kernel.open_iommufd())
        dev = stack.enter_context(kernel.open_cdev(cdev))
        dev.bind_iommufd(ifd)
        ioas = ifd.ioas_alloc()
        dev.attach_ioas(ioas)
        buf = stack.enter_context(SealedMemfd(MiB))
        iova = ifd.ioas_map(ioas, buf.address, MiB, None, RW)  # the kernel picks the IOVA
        assert iova % 4096 == 0
        if iova + MiB > 1 << 28:  # beyond edu's reach: place it ourselves
            ifd.ioas_unmap(ioas, iova, MiB)
            iova = ifd.ioas_map(ioas, buf.address, MiB, 0x400000, RW)
        fd = dev.dup_fd()
        stack.callback(os.close, fd)
        dev.close()  # only the dup is left
        edu = Edu(fd)
        edu.enable_bus_master()
        _round_trip(edu, buf.mm, iova, iova)
        # Requests that would abort QEMU 7.2 or be masked to 28 bits never reach the device.
        bad_requests: list[Callable[[], None]] = [
            lambda: edu.dma_to_ram(iova, 4096),
            lambda: edu.dma_to_ram(iova, 0),
            lambda: edu.dma_from_ram((1 << 28) - 1024, 2048),
            lambda: edu.dma_to_ram(iova, 2048, device_offset=3000),
        ]
        for bad in bad_requests:
            with pytest.raises(EduError):
                bad()
        assert edu.read64(0x90) == 2048  # the count register still holds the last transfer
        assert ifd.ioas_unmap_all(ioas) == MiB
    assert _fd_count() == before


def test_iommufd_refusals_and_their_errnos(kernel: LinuxKernel, drivers: DriverState) -> None:
    """The kernel refuses bad requests with these exact errnos (Linux 6.12)."""
    cdev = drivers.to_vfio(EDU0)
    before = _fd_count()
    with ExitStack() as stack:
        ifd = stack.enter_context(kernel.open_iommufd())
        dev = stack.enter_context(kernel.open_cdev(cdev))
        buf = stack.enter_context(SealedMemfd(MiB))

        # Before VFIO_DEVICE_BIND_IOMMUFD a cdev refuses everything else.
        _expect("VFIO_DEVICE_GET_REGION_INFO", errno.EINVAL, lambda: dev.get_region_info(0))
        _expect("VFIO_DEVICE_ATTACH_IOMMUFD_PT", errno.EINVAL, lambda: dev.attach_ioas(1))
        # Binding to something that is not an iommufd, or to a closed wrapper.
        not_iommufd = LinuxIommuFd(os.dup(buf.fd))
        stack.callback(not_iommufd.close)
        _expect("VFIO_DEVICE_BIND_IOMMUFD", errno.EBADFD, lambda: dev.bind_iommufd(not_iommufd))
        closed = kernel.open_iommufd()
        closed.close()
        _expect("fileno", errno.EBADF, lambda: dev.bind_iommufd(closed))

        devid = dev.bind_iommufd(ifd)
        _expect("VFIO_DEVICE_BIND_IOMMUFD", errno.EINVAL, lambda: dev.bind_iommufd(ifd))
        other = stack.enter_context(kernel.open_iommufd())
        _expect("VFIO_DEVICE_BIND_IOMMUFD", errno.EINVAL, lambda: dev.bind_iommufd(other))
        _expect("VFIO_DEVICE_ATTACH_IOMMUFD_PT", errno.ENOENT, lambda: dev.attach_ioas(999))
        _expect("VFIO_DEVICE_ATTACH_IOMMUFD_PT", errno.EINVAL, lambda: dev.attach_ioas(devid))
        # edu has no FLR or PM reset: VFIO_DEVICE_FLAGS_RESET is clear and reset fails.
        assert not dev.get_info().can_reset
        _expect("VFIO_DEVICE_RESET", errno.EINVAL, dev.reset)

        ioas = ifd.ioas_alloc()
        dev.attach_ioas(ioas)
        _expect("IOMMU_DESTROY", errno.ENOENT, lambda: ifd.destroy(999))
        _expect("IOMMU_DESTROY", errno.EBUSY, lambda: ifd.destroy(ioas))  # attached
        _expect("IOMMU_DESTROY", errno.EBUSY, lambda: ifd.destroy(devid))  # bound device
        _expect("IOMMU_IOAS_IOVA_RANGES", errno.ENOENT, lambda: ifd.ioas_iova_ranges(999))
        # RLIMIT_MODE can only change while the iommufd holds no objects.
        _expect("IOMMU_OPTION", errno.EBUSY, lambda: ifd.option_rlimit_mode(True))

        va = buf.address
        assert ifd.ioas_map(ioas, va, MiB, IOVA, RW) == IOVA
        _expect("IOMMU_IOAS_MAP", errno.EEXIST, lambda: ifd.ioas_map(ioas, va, MiB, IOVA, RW))
        _expect(
            "IOMMU_IOAS_MAP", errno.EEXIST, lambda: ifd.ioas_map(ioas, va, MiB, IOVA + MiB // 2, RW)
        )
        unmapped = 0x4000000
        for label, call in {
            "unaligned length": lambda: ifd.ioas_map(ioas, va, 100, unmapped, RW),
            "unaligned iova": lambda: ifd.ioas_map(ioas, va, 4096, unmapped + 0x100, RW),
            "unaligned va": lambda: ifd.ioas_map(ioas, va + 1, 4096, unmapped, RW),
            "zero length": lambda: ifd.ioas_map(ioas, va, 0, unmapped, RW),
            "no access flags": lambda: ifd.ioas_map(ioas, va, 4096, unmapped, MapFlag(0)),
            "MSI window": lambda: ifd.ioas_map(ioas, va, 4096, 0xFEE00000, RW),
        }.items():
            err = _expect("IOMMU_IOAS_MAP", errno.EINVAL, call)
            assert err.details["errno"] == errno.EINVAL, label
        _expect("IOMMU_IOAS_MAP", errno.EFAULT, lambda: ifd.ioas_map(ioas, 0x1000, 4096, None, RW))
        _expect("IOMMU_IOAS_MAP", errno.ENOENT, lambda: ifd.ioas_map(999, va, 4096, None, RW))
        # Unmap must cover whole mappings; a hole is ENOENT.
        _expect("IOMMU_IOAS_UNMAP", errno.ENOENT, lambda: ifd.ioas_unmap(ioas, IOVA, 4096))
        _expect("IOMMU_IOAS_UNMAP", errno.ENOENT, lambda: ifd.ioas_unmap(ioas, unmapped, 4096))

        # IOAS_COPY shares the pinned pages into another IOAS; unmap-all counts both.
        ioas2 = ifd.ioas_alloc()
        ifd.ioas_copy(ioas2, 0x800000, ioas, IOVA, MiB, RW)
        assert ifd.ioas_unmap_all(ioas2) == MiB
        ifd.destroy(ioas2)
        assert ifd.ioas_unmap_all(ioas) == MiB
        assert ifd.ioas_unmap_all(ioas) == 0
        dev.detach_ioas()
        dev.detach_ioas()  # detaching twice is not an error on 6.12
        ifd.destroy(ioas)
    assert _fd_count() == before


def test_rlimit_mode_on_a_fresh_iommufd(kernel: LinuxKernel) -> None:
    with kernel.open_iommufd() as ifd:
        assert ifd.option_rlimit_mode() is False
        assert ifd.option_rlimit_mode(True) is True
        assert ifd.option_rlimit_mode() is True
        assert ifd.option_rlimit_mode(False) is False


def test_map_file_probe_is_false_on_6_12(kernel: LinuxKernel) -> None:
    """IOMMU_IOAS_MAP_FILE arrived in 6.13; the lab guest runs 6.12."""
    assert os.uname().release.startswith("6.12")
    with kernel.open_iommufd() as ifd, SealedMemfd(MiB) as buf:
        ioas = ifd.ioas_alloc()
        assert ifd.has_map_file() is False
        _expect(
            "IOMMU_IOAS_MAP_FILE",
            errno.ENOTTY,
            lambda: ifd.ioas_map_file(ioas, buf.fd, 0, MiB, None, RW),
        )


def test_iova_ranges_and_allow_iovas(kernel: LinuxKernel, drivers: DriverState) -> None:
    """An empty IOAS allows everything; attaching the VT-d device narrows it to its 39-bit
    aperture minus the interrupt window 0xfee00000-0xfeefffff, with 4 KiB alignment."""
    cdev = drivers.to_vfio(EDU0)
    with kernel.open_iommufd() as ifd, kernel.open_cdev(cdev) as dev, SealedMemfd(MiB) as buf:
        dev.bind_iommufd(ifd)
        ioas = ifd.ioas_alloc()
        assert ifd.ioas_iova_ranges(ioas) == ([IovaRange(0, uapi.U64_MAX)], 1)
        dev.attach_ioas(ioas)
        ranges, alignment = ifd.ioas_iova_ranges(ioas)
        assert alignment == 4096
        assert ranges == [IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, (1 << 39) - 1)]
        # Allowed IOVAs steer the kernel's own IOVA choice (fixed maps are not limited)...
        window = IovaRange(0x2000000, 0x2FFFFFF)
        ifd.ioas_allow_iovas(ioas, [window])
        iova = ifd.ioas_map(ioas, buf.address, MiB, None, RW)
        assert window.start <= iova
        assert iova + MiB - 1 <= window.last
        # ...and cannot include IOVAs the attached device already excludes.
        _expect(
            "IOMMU_IOAS_ALLOW_IOVAS",
            errno.EADDRINUSE,
            lambda: ifd.ioas_allow_iovas(ioas, [IovaRange(0, 0xFFFFFFFF)]),
        )
        ifd.ioas_unmap_all(ioas)
        dev.detach_ioas()


# --------------------------------------------------------------------------- legacy


def test_multi_device_group_members() -> None:
    group = _group_of(EDU1)
    members = set(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices"))
    assert members == {BRIDGE, EDU1, EDU2, NIC}
    assert _group_of(EDU0) != group


def test_group_with_e1000_bound_is_not_viable(kernel: LinuxKernel, drivers: DriverState) -> None:
    """e1000 is not DMA-safe: the group is not viable and the kernel refuses ownership
    through the legacy container and through the iommufd cdev (both EPERM); while the
    group node is open the cdev is refused for that reason first (EBUSY)."""
    assert kernel.binder.current_driver(NIC) == "e1000"
    cdev = drivers.to_vfio(EDU1)
    before = _fd_count()
    with kernel.open_group(_group_of(EDU1)) as g, kernel.open_container() as c:
        assert g.get_status() == GroupStatus(is_viable=False, is_container_set=False)
        _expect("VFIO_GROUP_SET_CONTAINER", errno.EPERM, lambda: g.set_container(c))
        _expect("VFIO_GROUP_GET_DEVICE_FD", errno.EINVAL, lambda: g.get_device(EDU1))
        _expect("VFIO_SET_IOMMU", errno.EINVAL, c.set_iommu_type1v2)  # no group in it
        with kernel.open_iommufd() as ifd, kernel.open_cdev(cdev) as dev:
            _expect("VFIO_DEVICE_BIND_IOMMUFD", errno.EBUSY, lambda: dev.bind_iommufd(ifd))
    with kernel.open_iommufd() as ifd, kernel.open_cdev(cdev) as dev:
        _expect("VFIO_DEVICE_BIND_IOMMUFD", errno.EPERM, lambda: dev.bind_iommufd(ifd))
    assert _fd_count() == before


def test_legacy_container_dma_round_trip(kernel: LinuxKernel, drivers: DriverState) -> None:
    """Group of 01:01.0 made viable by unbinding e1000 (driver-less is fine): container,
    TYPE1v2, MAP_DMA, a DMA round trip through 01:01.0; e1000 cannot bind while owned."""
    drivers.unbind(NIC)
    drivers.to_vfio(EDU1)
    before = _fd_count()
    with ExitStack() as stack:
        g = stack.enter_context(kernel.open_group(_group_of(EDU1)))
        c = stack.enter_context(kernel.open_container())
        assert g.get_status() == GroupStatus(is_viable=True, is_container_set=False)
        assert c.get_api_version() == uapi.VFIO_API_VERSION
        assert c.check_extension(uapi.VFIO_TYPE1v2_IOMMU)
        assert c.check_extension(uapi.VFIO_UNMAP_ALL)
        g.set_container(c)
        assert g.get_status() == GroupStatus(is_viable=True, is_container_set=True)
        _expect("VFIO_GROUP_SET_CONTAINER", errno.EINVAL, lambda: g.set_container(c))
        c.set_iommu_type1v2()

        # While userspace owns the group, a DMA-unsafe driver cannot probe (drivers_probe
        # reports EINVAL for the refused probe) and the NIC stays driver-less.
        _expect("drivers_probe", errno.EINVAL, lambda: kernel.binder.drivers_probe(NIC))
        assert kernel.binder.current_driver(NIC) is None

        buf = stack.enter_context(SealedMemfd(MiB))
        c.map_dma(buf.address, IOVA, MiB, read=True, write=True)
        _expect(
            "VFIO_IOMMU_MAP_DMA",
            errno.EEXIST,
            lambda: c.map_dma(buf.address, IOVA, MiB, read=True, write=True),
        )
        _expect(
            "VFIO_IOMMU_MAP_DMA",
            errno.EINVAL,
            lambda: c.map_dma(buf.address, 0x4000000, 100, read=True, write=True),
        )
        _expect("VFIO_GROUP_GET_DEVICE_FD", errno.ENODEV, lambda: g.get_device(NIC))
        _expect("VFIO_GROUP_GET_DEVICE_FD", errno.ENODEV, lambda: g.get_device("0000:01:03.1"))

        with g.get_device(EDU1) as dev:
            assert dev.name == EDU1
            assert dev.get_info().flags & uapi.VFIO_DEVICE_FLAGS_PCI
            edu = Edu(dev.fileno())
            edu.enable_bus_master()
            assert edu.is_alive()
            _round_trip(edu, buf.mm, IOVA, IOVA)
        assert c.unmap_dma(IOVA, MiB) == MiB
        c.map_dma(buf.address, IOVA, MiB, read=True, write=False)
        assert c.unmap_all() == MiB
        assert c.unmap_all() == 0
        g.unset_container()
        assert g.get_status() == GroupStatus(is_viable=True, is_container_set=False)
        _expect("VFIO_GROUP_UNSET_CONTAINER", errno.EINVAL, g.unset_container)
    assert _fd_count() == before
