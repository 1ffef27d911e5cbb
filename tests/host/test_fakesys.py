"""The fake sysfs builder itself: links shaped like the kernel's, and its mutations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fakesys import FakeSys, large_host


def test_links_are_relative_and_resolve(lab: FakeSys) -> None:
    dev = lab.device_dir("0000:01:03.0")
    assert dev == lab.sys_root / "devices" / "pci0000:00" / "0000:00:11.0" / "0000:01:03.0"
    bus_link = lab.sys_root / "bus" / "pci" / "devices" / "0000:01:03.0"
    for link, target in [
        (bus_link, dev),
        (dev / "driver", lab.sys_root / "bus" / "pci" / "drivers" / "e1000"),
        (dev / "iommu_group", lab.sys_root / "kernel" / "iommu_groups" / "4"),
        (lab.sys_root / "kernel" / "iommu_groups" / "4" / "devices" / "0000:01:03.0", dev),
        (lab.sys_root / "bus" / "pci" / "drivers" / "e1000" / "0000:01:03.0", dev),
    ]:
        assert not os.readlink(link).startswith("/"), link
        assert link.resolve() == target.resolve()


def test_vfio_bind_and_unbind(lab: FakeSys) -> None:
    lab.bind("0000:00:10.0", "vfio-pci")
    assert (lab.device_dir("0000:00:10.0") / "vfio-dev" / "vfio0").is_dir()
    assert (lab.dev_root / "vfio" / "devices" / "vfio0").exists()
    assert (lab.dev_root / "vfio" / "3").exists()
    with pytest.raises(ValueError, match="already bound"):
        lab.bind("0000:00:10.0", "vfio-pci")
    lab.unbind("0000:00:10.0")
    assert not (lab.device_dir("0000:00:10.0") / "vfio-dev").exists()
    assert not (lab.dev_root / "vfio" / "devices" / "vfio0").exists()
    assert not (lab.sys_root / "bus" / "pci" / "drivers" / "vfio-pci" / "0000:00:10.0").exists()


def test_remove_device_order(lab: FakeSys) -> None:
    with pytest.raises(ValueError, match=r"before 0000:00:11\.0"):
        lab.remove_device("0000:00:11.0")
    for bdf in ("0000:01:01.0", "0000:01:02.0", "0000:01:03.0", "0000:00:11.0"):
        lab.remove_device(bdf)
    assert not (lab.sys_root / "kernel" / "iommu_groups" / "4").exists()
    assert not (lab.sys_root / "bus" / "pci" / "devices" / "0000:01:03.0").is_symlink()


def test_large_host_shape(fast_tmp: Path) -> None:
    fs = large_host(fast_tmp, 30, 7)
    groups = sorted(os.listdir(fs.sys_root / "kernel" / "iommu_groups"), key=int)
    assert groups == [str(g) for g in range(7)]
    assert len(os.listdir(fs.sys_root / "kernel" / "iommu_groups" / "0" / "devices")) == 5
    with pytest.raises(ValueError, match="n_devices >= n_groups"):
        large_host(fast_tmp / "x", 3, 5)
