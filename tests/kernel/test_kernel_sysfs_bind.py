"""SysfsBinder against a fake sysfs tree (tests/fakesys.py lab_topology).

The fake kernel does not react to writes, so each test reads back exactly what the
binder wrote (the binder opens with O_TRUNC) and checks nothing else changed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import topology

from iommud.errors import KernelError
from iommud.kernel.sysfs_bind import SysfsBinder
from tests.fakesys import FakeSys, lab_topology

EDU = topology.EDU0
E1000 = topology.NIC


@pytest.fixture
def fake(tmp_path: Path) -> FakeSys:
    """The lab guest's tree (see lab_topology's docstring) with the write-only
    attributes (bind, unbind, drivers_probe) emptied so writes can be read back."""
    fs = lab_topology(tmp_path)
    pci = fs.sys_root / "bus" / "pci"
    for f in [pci / "drivers_probe", *pci.glob("drivers/*/bind"), *pci.glob("drivers/*/unbind")]:
        f.write_text("")
    return fs


@pytest.fixture
def binder(fake: FakeSys) -> SysfsBinder:
    return SysfsBinder(fake.sys_root)


def _tree(root: Path) -> dict[str, str]:
    """Every regular file's content and every symlink's target under root."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = p.read_text()
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_current_driver(binder: SysfsBinder) -> None:
    assert binder.current_driver(E1000) == "e1000"
    assert binder.current_driver(EDU) is None


def test_current_driver_of_a_missing_device_is_enodev(binder: SysfsBinder) -> None:
    with pytest.raises(KernelError) as ei:
        binder.current_driver("0000:00:1e.7")
    assert (ei.value.op, ei.value.errno) == ("current_driver", errno.ENODEV)


def test_set_and_clear_driver_override(binder: SysfsBinder, fake: FakeSys) -> None:
    override = fake.device_dir(EDU) / "driver_override"
    binder.set_driver_override(EDU, "vfio-pci")
    assert override.read_text() == "vfio-pci\n"
    binder.set_driver_override(EDU, None)
    assert override.read_text() == "\n"


def test_unbind_writes_the_bdf_to_the_current_drivers_unbind(
    binder: SysfsBinder, fake: FakeSys
) -> None:
    binder.unbind(E1000)
    assert (fake.driver_dir("e1000") / "unbind").read_text() == E1000


def test_unbind_of_a_driverless_device_writes_nothing(binder: SysfsBinder, fake: FakeSys) -> None:
    before = _tree(fake.root)
    binder.unbind(EDU)
    assert _tree(fake.root) == before


def test_drivers_probe_and_bind(binder: SysfsBinder, fake: FakeSys) -> None:
    binder.drivers_probe(EDU)
    assert (fake.sys_root / "bus" / "pci" / "drivers_probe").read_text() == EDU
    binder.bind("e1000", E1000)
    assert (fake.driver_dir("e1000") / "bind").read_text() == E1000


BAD_BDFS = [
    "",
    "00:10.0",  # no domain
    "0000:00:10.8",  # function > 7
    "0000:00:1G.0",
    "0000:00:1F.0",  # sysfs names are lowercase
    "0000:00:10.0\n",
    "0000:00:10.0\n0000:01:03.0",
    "../../../../etc",
    "0000:00:10.0/../0000:01:03.0",
    " 0000:00:10.0",
]
BAD_DRIVERS = ["", "vfio-pci\n", "../e1000", "a/b", ".hidden", "vfio pci", "x" * 65, "e1000;"]


@pytest.mark.parametrize("bdf", BAD_BDFS)
def test_invalid_bdfs_are_refused_before_touching_sysfs(
    binder: SysfsBinder, fake: FakeSys, bdf: str
) -> None:
    before = _tree(fake.root)
    calls: dict[str, Callable[[], object]] = {
        "driver_override": lambda: binder.set_driver_override(bdf, "vfio-pci"),
        "unbind": lambda: binder.unbind(bdf),
        "drivers_probe": lambda: binder.drivers_probe(bdf),
        "bind": lambda: binder.bind("e1000", bdf),
        "current_driver": lambda: binder.current_driver(bdf),
    }
    for op, call in calls.items():
        with pytest.raises(KernelError) as ei:
            call()
        assert (ei.value.op, ei.value.errno) == (op, errno.EINVAL)
        assert ei.value.details["value"] == repr(bdf)
    assert _tree(fake.root) == before


@pytest.mark.parametrize("driver", BAD_DRIVERS)
def test_invalid_driver_names_are_refused_before_touching_sysfs(
    binder: SysfsBinder, fake: FakeSys, driver: str
) -> None:
    before = _tree(fake.root)
    with pytest.raises(KernelError) as ei:
        binder.set_driver_override(EDU, driver)
    assert (ei.value.op, ei.value.errno) == ("driver_override", errno.EINVAL)
    with pytest.raises(KernelError) as ei:
        binder.bind(driver, EDU)
    assert (ei.value.op, ei.value.errno) == ("bind", errno.EINVAL)
    assert _tree(fake.root) == before


def test_bind_to_an_unknown_driver_creates_no_file(binder: SysfsBinder, fake: FakeSys) -> None:
    """Without O_CREAT a missing drivers/NAME/bind is ENOENT, never a new file."""
    with pytest.raises(KernelError) as ei:
        binder.bind("nosuchdriver", EDU)
    assert (ei.value.op, ei.value.errno) == ("bind", errno.ENOENT)
    assert ei.value.details["path"].endswith("drivers/nosuchdriver/bind")
    assert not (fake.sys_root / "bus" / "pci" / "drivers" / "nosuchdriver").exists()


def test_override_of_a_missing_device_is_enoent(binder: SysfsBinder, fake: FakeSys) -> None:
    with pytest.raises(KernelError) as ei:
        binder.set_driver_override("0000:00:1e.7", "vfio-pci")
    assert (ei.value.op, ei.value.errno) == ("driver_override", errno.ENOENT)
    assert not (fake.sys_root / "bus" / "pci" / "devices" / "0000:00:1e.7").exists()


def test_a_symlinked_attribute_is_not_followed(
    binder: SysfsBinder, fake: FakeSys, tmp_path: Path
) -> None:
    """O_NOFOLLOW: a planted link at drivers_probe cannot redirect the write."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    probe = fake.sys_root / "bus" / "pci" / "drivers_probe"
    probe.unlink()
    probe.symlink_to(victim)
    with pytest.raises(KernelError) as ei:
        binder.drivers_probe(EDU)
    assert (ei.value.op, ei.value.errno) == ("drivers_probe", errno.ELOOP)
    assert victim.read_text() == "untouched"


def test_no_fd_leaks_on_success_or_failure(binder: SysfsBinder) -> None:
    before = _fd_count()
    for _ in range(20):
        binder.set_driver_override(EDU, "vfio-pci")
        binder.drivers_probe(EDU)
        with pytest.raises(KernelError):
            binder.bind("nosuchdriver", EDU)
        with pytest.raises(KernelError):
            binder.set_driver_override("0000:00:1e.7", None)
    assert _fd_count() == before
