"""Host checks of iommud.kernel.linux that need no IOMMU: fd ownership, input
validation and errno translation (an ioctl on a plain file is a real ENOTTY).

The real ioctls against a real IOMMU are exercised in test_kernel_vm.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iommud.errors import KernelError
from iommud.kernel.interface import MapFlag
from iommud.kernel.linux import (
    LinuxIommuFd,
    LinuxKernel,
    LinuxVfioContainer,
    LinuxVfioDevice,
    LinuxVfioGroup,
    get_region_info,
)
from iommud.protocol.errors import ErrorCode


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def plain_fd(tmp_path: Path) -> Iterator[int]:
    """An fd of a regular file: every VFIO/iommufd ioctl on it is ENOTTY."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    yield fd
    with contextlib.suppress(OSError):  # already closed by an owning wrapper
        os.close(fd)


def test_open_missing_nodes_is_enoent(tmp_path: Path) -> None:
    k = LinuxKernel(dev_root=tmp_path, sys_root=tmp_path)
    for op, call in [
        ("open_iommufd", k.open_iommufd),
        ("open_container", k.open_container),
        ("open_group", lambda: k.open_group(3)),
        ("open_cdev", lambda: k.open_cdev("vfio0")),
    ]:
        with pytest.raises(KernelError) as ei:
            call()
        assert (ei.value.op, ei.value.errno) == (op, errno.ENOENT)
        assert ei.value.code is ErrorCode.KERNEL_ERROR
        assert ei.value.details["errno_name"] == "ENOENT"


def test_open_uses_dev_root(tmp_path: Path) -> None:
    (tmp_path / "vfio" / "devices").mkdir(parents=True)
    for p in ("iommu", "vfio/vfio", "vfio/7", "vfio/devices/vfio2"):
        (tmp_path / p).touch()
    k = LinuxKernel(dev_root=tmp_path, sys_root=tmp_path)
    before = _fd_count()
    with (
        k.open_iommufd() as i,
        k.open_container() as c,
        k.open_group(7) as g,
        k.open_cdev("vfio2") as d,
    ):
        assert d.name == "vfio2"
        assert g.group_id == 7
        assert len({i.fileno(), c.fileno(), g.fileno(), d.fileno()}) == 4
        assert _fd_count() == before + 4
    assert _fd_count() == before


@pytest.mark.parametrize("name", ["", "vfio", "../iommu", "vfio0/..", "vfio0\n", "vfiox", 3])
def test_open_cdev_rejects_odd_names(tmp_path: Path, name: object) -> None:
    with pytest.raises(KernelError) as ei:
        LinuxKernel(tmp_path, tmp_path).open_cdev(name)  # type: ignore[arg-type]
    assert (ei.value.op, ei.value.errno) == ("open_cdev", errno.EINVAL)


@pytest.mark.parametrize("group", [-1, True, "3", 1.0])
def test_open_group_rejects_odd_ids(tmp_path: Path, group: object) -> None:
    with pytest.raises(KernelError) as ei:
        LinuxKernel(tmp_path, tmp_path).open_group(group)  # type: ignore[arg-type]
    assert (ei.value.op, ei.value.errno) == ("open_group", errno.EINVAL)


def test_close_is_idempotent_and_fileno_after_close_is_ebadf(plain_fd: int) -> None:
    obj = LinuxIommuFd(plain_fd)
    assert not obj.closed
    obj.close()
    obj.close()
    assert obj.closed
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(plain_fd)  # the wrapper really closed it
    with pytest.raises(KernelError) as ei:
        obj.fileno()
    assert (ei.value.op, ei.value.errno) == ("fileno", errno.EBADF)
    with pytest.raises(KernelError) as ei:
        obj.ioas_alloc()
    assert (ei.value.op, ei.value.errno) == ("fileno", errno.EBADF)


def test_ioctl_errors_carry_the_kernel_op_name(plain_fd: int) -> None:
    with LinuxIommuFd(os.dup(plain_fd)) as i:
        cases: dict[str, Callable[[], object]] = {
            "IOMMU_IOAS_ALLOC": i.ioas_alloc,
            "IOMMU_IOAS_MAP": lambda: i.ioas_map(1, 0x1000, 4096, None, MapFlag.READABLE),
            "IOMMU_IOAS_UNMAP": lambda: i.ioas_unmap_all(1),
            "IOMMU_IOAS_IOVA_RANGES": lambda: i.ioas_iova_ranges(1),
            "IOMMU_OPTION": i.option_rlimit_mode,
            "IOMMU_DESTROY": lambda: i.destroy(1),
        }
        for op, call in cases.items():
            with pytest.raises(KernelError) as ei:
                call()
            assert (ei.value.op, ei.value.errno) == (op, errno.ENOTTY)
    with LinuxVfioDevice(os.dup(plain_fd), "vfio0") as d:
        with pytest.raises(KernelError) as ei:
            d.get_region_info(0)
        assert (ei.value.op, ei.value.errno) == ("VFIO_DEVICE_GET_REGION_INFO", errno.ENOTTY)
        with pytest.raises(KernelError) as ei:
            get_region_info(d.fileno(), 7)
        assert ei.value.errno == errno.ENOTTY
    with LinuxVfioContainer(os.dup(plain_fd)) as c:
        with pytest.raises(KernelError) as ei:
            c.map_dma(0x1000, 0, 4096, read=True, write=True)
        assert (ei.value.op, ei.value.errno) == ("VFIO_IOMMU_MAP_DMA", errno.ENOTTY)
    with LinuxVfioGroup(os.dup(plain_fd), 3) as g:
        with pytest.raises(KernelError) as ei:
            g.get_status()
        assert (ei.value.op, ei.value.errno) == ("VFIO_GROUP_GET_STATUS", errno.ENOTTY)


def test_group_get_device_validates_the_bdf_before_the_ioctl(plain_fd: int) -> None:
    with LinuxVfioGroup(os.dup(plain_fd), 3) as g:
        with pytest.raises(KernelError) as ei:
            g.get_device("0000:00:10.0 ")
        assert (ei.value.op, ei.value.errno) == ("VFIO_GROUP_GET_DEVICE_FD", errno.EINVAL)


def test_map_file_probe_treats_enotty_as_absent(
    plain_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe maps ENOTTY (what 6.12 answers) to False and caches it."""
    monkeypatch.setattr(LinuxIommuFd, "_map_file_probe", None)
    with LinuxIommuFd(os.dup(plain_fd)) as i:
        assert i.has_map_file() is False
    assert LinuxIommuFd._map_file_probe is False
    with LinuxIommuFd(os.dup(plain_fd)) as i:
        with pytest.raises(KernelError) as ei:
            i.ioas_map_file(1, plain_fd, 0, 4096, None, MapFlag.READABLE)
        assert (ei.value.op, ei.value.errno) == ("IOMMU_IOAS_MAP_FILE", errno.ENOTTY)


def test_dup_fd_is_a_new_cloexec_fd(plain_fd: int) -> None:
    with LinuxVfioDevice(os.dup(plain_fd), "vfio0") as d:
        new = d.dup_fd()
        try:
            assert new != d.fileno()
            assert os.path.samestat(os.fstat(new), os.fstat(d.fileno()))
            assert not os.get_inheritable(new)
        finally:
            os.close(new)


def test_no_fd_leaks_across_failures(tmp_path: Path, plain_fd: int) -> None:
    k = LinuxKernel(tmp_path, tmp_path)
    before = _fd_count()
    for _ in range(20):
        with pytest.raises(KernelError):
            k.open_iommufd()
        with LinuxIommuFd(os.dup(plain_fd)) as i, pytest.raises(KernelError):
            i.ioas_alloc()
    assert _fd_count() == before
