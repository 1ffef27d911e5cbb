"""Reading fake sysfs trees into snapshots: fields, errors, races, one-group refresh."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from iommud.errors import NotFoundError, SnapshotError
from iommud.host import snapshot as snapshot_mod
from iommud.host.snapshot import (
    HostSnapshot,
    IommuGroup,
    OtherMember,
    PciDevice,
    group_of,
    read_device,
    read_group,
    read_snapshot,
)
from iommud.protocol.errors import ErrorCode
from tests.fakesys import FakeSys, lab_topology, large_host, real_server


def fresh(fs: FakeSys) -> HostSnapshot:
    return read_snapshot(fs.sys_root, fs.dev_root)


def test_lab_groups(lab_snap: HostSnapshot) -> None:
    assert dict(lab_snap.groups) == {
        0: IommuGroup(0, ("0000:00:00.0",), "DMA"),
        3: IommuGroup(3, ("0000:00:10.0",), "DMA"),
        4: IommuGroup(4, ("0000:00:11.0", "0000:01:01.0", "0000:01:02.0", "0000:01:03.0"), "DMA"),
        5: IommuGroup(5, ("0000:00:1f.0", "0000:00:1f.2"), "DMA"),
        6: IommuGroup(6, ("0000:00:01.0",), "DMA"),
    }
    assert lab_snap.has_iommufd is True
    assert lab_snap.has_legacy_container is True


def test_lab_devices(lab_snap: HostSnapshot) -> None:
    assert len(lab_snap.devices) == 9
    assert lab_snap.devices["0000:00:10.0"] == PciDevice(
        "0000:00:10.0", 0x1234, 0x11E8, 0x00FF00, None, None, 3, None
    )
    assert lab_snap.devices["0000:01:03.0"] == PciDevice(
        "0000:01:03.0", 0x8086, 0x100E, 0x020000, "e1000", None, 4, None
    )
    bridge = lab_snap.devices["0000:00:11.0"]
    assert bridge.is_bridge
    assert not lab_snap.devices["0000:01:01.0"].is_bridge
    assert lab_snap.devices["0000:01:01.0"].vendor_device == "1234:11e8"


def test_dev_root_flags(fast_tmp: Path) -> None:
    fs = lab_topology(fast_tmp, iommufd=False, legacy=False)
    s = fresh(fs)
    assert (s.has_iommufd, s.has_legacy_container) == (False, False)
    fs.enable_legacy_container()
    s = fresh(fs)
    assert (s.has_iommufd, s.has_legacy_container) == (False, True)


def test_vfio_bound_device_has_cdev_and_override(lab: FakeSys) -> None:
    lab.set_driver_override("0000:00:10.0", "vfio-pci")
    lab.bind("0000:00:10.0", "vfio-pci")
    dev = read_device(lab.sys_root, "0000:00:10.0")
    assert (dev.driver, dev.driver_override, dev.vfio_cdev, dev.group_id) == (
        "vfio-pci",
        "vfio-pci",
        "vfio0",
        3,
    )
    lab.unbind("0000:00:10.0")
    lab.set_driver_override("0000:00:10.0", None)
    dev = read_device(lab.sys_root, "0000:00:10.0")
    assert (dev.driver, dev.driver_override, dev.vfio_cdev) == (None, None, None)


def test_device_without_group(lab: FakeSys) -> None:
    """Devices outside any IOMMU group are listed with group_id None."""
    lab.add_device("0000:00:12.0", 0x1234, 0x11E8, 0x00FF00)
    s = fresh(lab)
    assert s.devices["0000:00:12.0"].group_id is None
    assert group_of(lab.sys_root, "0000:00:12.0") is None
    assert group_of(lab.sys_root, "0000:01:02.0") == 4


def test_real_server_shape(fast_tmp: Path) -> None:
    s = fresh(real_server(fast_tmp))
    assert len(s.devices) == 14
    assert s.groups[6].devices == ("0000:04:00.0", "0000:04:00.1")
    assert [s.devices[f"0000:04:00.{f}"].group_id for f in (2, 3, 4)] == [7, 8, 9]
    assert s.devices["0000:04:00.4"].driver == "mlx5_vfio_pci"
    assert s.devices["0000:03:00.0"].is_bridge
    assert s.devices["0000:03:00.0"].driver == "pcieport"
    assert s.groups[11].devices == ("0000:05:00.0", "0000:05:00.1")


def test_non_pci_group_member(lab: FakeSys) -> None:
    lab.add_other_member(3, "ACPI0007:00", driver="processor")
    s = fresh(lab)
    assert s.groups[3].other_members == (OtherMember("ACPI0007:00", "processor"),)
    assert s.groups[3].devices == ("0000:00:10.0",)


def test_empty_tree(fast_tmp: Path) -> None:
    """A host without IOMMU groups or PCI (a container) is an empty snapshot."""
    s = read_snapshot(fast_tmp / "sys", fast_tmp / "dev")
    assert (len(s.devices), len(s.groups), s.has_iommufd) == (0, 0, False)


# ----------------------------------------------------------------- errors


def _details(exc: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    return dict(exc.value.details)


def test_garbled_vendor_names_path(lab: FakeSys) -> None:
    lab.device_dir("0000:01:02.0").joinpath("vendor").write_text("banana\n")
    path = lab.sys_root / "bus" / "pci" / "devices" / "0000:01:02.0" / "vendor"
    with pytest.raises(SnapshotError) as exc:
        fresh(lab)
    assert exc.value.code is ErrorCode.KERNEL_ERROR
    assert _details(exc) == {"path": str(path), "problem": "not a hex number", "value": "banana"}


def test_class_too_wide(lab: FakeSys) -> None:
    path = lab.sys_root / "bus" / "pci" / "devices" / "0000:00:10.0" / "class"
    path.write_text("0x1000000\n")
    with pytest.raises(SnapshotError) as exc:
        read_device(lab.sys_root, "0000:00:10.0")
    assert _details(exc) == {
        "path": str(path),
        "problem": "wider than 24 bits",
        "value": "0x1000000",
    }


def test_missing_attribute_names_path(lab: FakeSys) -> None:
    path = lab.sys_root / "bus" / "pci" / "devices" / "0000:00:10.0" / "driver_override"
    path.unlink()
    with pytest.raises(SnapshotError) as exc:
        fresh(lab)
    assert _details(exc) == {"path": str(path), "problem": "missing"}


def test_driver_not_a_link(lab: FakeSys) -> None:
    path = lab.sys_root / "bus" / "pci" / "devices" / "0000:00:10.0" / "driver"
    path.write_text("e1000\n")
    with pytest.raises(SnapshotError) as exc:
        read_device(lab.sys_root, "0000:00:10.0")
    assert _details(exc) == {"path": str(path), "problem": "not a symlink"}


def test_odd_group_name(lab: FakeSys) -> None:
    path = lab.sys_root / "kernel" / "iommu_groups" / "weird"
    path.mkdir()
    with pytest.raises(SnapshotError) as exc:
        fresh(lab)
    assert _details(exc) == {"path": str(path), "problem": "not a group number"}


def test_group_without_devices_dir(lab: FakeSys) -> None:
    path = lab.sys_root / "kernel" / "iommu_groups" / "9"
    path.mkdir()
    with pytest.raises(SnapshotError) as exc:
        fresh(lab)
    assert _details(exc) == {"path": str(path / "devices"), "problem": "missing"}


def test_group_type_file_optional(lab: FakeSys) -> None:
    """Kernels before 5.11 have no iommu_groups/N/type: read as None, not an error."""
    (lab.sys_root / "kernel" / "iommu_groups" / "3" / "type").unlink()
    assert fresh(lab).groups[3].type is None


def test_read_device_not_found(lab: FakeSys) -> None:
    with pytest.raises(NotFoundError) as exc:
        read_device(lab.sys_root, "0000:09:00.0")
    assert exc.value.code is ErrorCode.NOT_FOUND
    assert _details(exc) == {"bdf": "0000:09:00.0"}
    with pytest.raises(NotFoundError):
        read_device(lab.sys_root, "../../etc")


def test_device_vanished_mid_read_is_skipped(lab: FakeSys) -> None:
    """Hot unplug race: links listed but the device directory already gone -> skipped."""
    shutil.rmtree(lab.device_dir("0000:01:02.0"))  # links to it now dangle
    s = fresh(lab)
    assert "0000:01:02.0" not in s.devices
    assert s.groups[4].devices == ("0000:00:11.0", "0000:01:01.0", "0000:01:03.0")
    with pytest.raises(NotFoundError):
        read_device(lab.sys_root, "0000:01:02.0")
    _, devices = read_group(lab.sys_root, 4)
    assert sorted(devices) == ["0000:00:11.0", "0000:01:01.0", "0000:01:03.0"]


def test_device_vanishing_between_files(lab: FakeSys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory disappears after the first attribute was read: skipped, no error."""
    victim = lab.device_dir("0000:01:01.0")
    real_read = snapshot_mod._read_bytes

    def racing_read(path: str) -> bytes:
        if os.path.realpath(path) == str(victim / "device"):
            shutil.rmtree(victim)
        return real_read(path)

    monkeypatch.setattr(snapshot_mod, "_read_bytes", racing_read)
    s = fresh(lab)
    assert "0000:01:01.0" not in s.devices
    assert "0000:01:02.0" in s.devices


# ----------------------------------------------------------------- one-group refresh


def test_read_group_unknown(lab: FakeSys) -> None:
    with pytest.raises(NotFoundError) as exc:
        read_group(lab.sys_root, 42)
    assert _details(exc) == {"group_id": 42}


def test_with_group_after_unbind_matches_fresh_read(lab: FakeSys, lab_snap: HostSnapshot) -> None:
    lab.unbind("0000:01:03.0")
    group, devices = read_group(lab.sys_root, 4)
    updated = lab_snap.with_group(group, devices)
    assert updated == fresh(lab)
    assert updated.devices["0000:01:03.0"].driver is None
    assert lab_snap.devices["0000:01:03.0"].driver == "e1000"  # the old one is untouched


def test_with_group_drops_removed_devices(lab: FakeSys, lab_snap: HostSnapshot) -> None:
    lab.remove_device("0000:01:02.0")
    updated = lab_snap.with_group(*read_group(lab.sys_root, 4))
    assert "0000:01:02.0" not in updated.devices
    assert updated.groups[4].devices == ("0000:00:11.0", "0000:01:01.0", "0000:01:03.0")
    assert updated == fresh(lab)


def test_without_group(lab: FakeSys, lab_snap: HostSnapshot) -> None:
    lab.remove_device("0000:00:10.0")  # group 3 had only this device
    with pytest.raises(NotFoundError):
        read_group(lab.sys_root, 3)
    assert lab_snap.without_group(3) == fresh(lab)


def test_with_group_device_moved_between_groups(lab: FakeSys, lab_snap: HostSnapshot) -> None:
    """A device re-read in a new group leaves its old group's member list."""
    lab.set_group("0000:01:01.0", 3)
    updated = lab_snap.with_group(*read_group(lab.sys_root, 3))
    assert updated.groups[3].devices == ("0000:00:10.0", "0000:01:01.0")
    assert updated.groups[4].devices == ("0000:00:11.0", "0000:01:02.0", "0000:01:03.0")
    assert updated == fresh(lab)


def test_with_group_rejects_foreign_device(lab_snap: HostSnapshot) -> None:
    dev = lab_snap.devices["0000:00:10.0"]
    with pytest.raises(ValueError, match="has group_id 3, not 4"):
        lab_snap.with_group(lab_snap.groups[4], {dev.bdf: dev})


def test_many_refreshes_stay_consistent(fast_tmp: Path) -> None:
    """Past the overlay compaction threshold, refreshed snapshots still equal fresh reads."""
    fs = large_host(fast_tmp, 140, 70)
    snap = fresh(fs)
    for i in range(70):  # 70 distinct groups: both maps pass the 64-entry overlay limit
        bdf = f"0000:01:{i >> 3:02x}.{i & 7}"
        fs.unbind(bdf)
        fs.bind(bdf, "vfio-pci" if i % 2 else "pci-stub")
        gid = snap.devices[bdf].group_id
        assert gid is not None
        snap = snap.with_group(*read_group(fs.sys_root, gid))
        if i in (10, 63, 64, 65, 69):
            assert snap == fresh(fs)
            assert len(snap.devices) == 140
            assert len(snap.groups) == 70
            assert sorted(snap.devices) == sorted(fresh(fs).devices)
    assert isinstance(snap.groups, snapshot_mod._OverlayMap)
    assert len(snap.groups._overlay) < 64  # it was folded into a new base at least once


def test_overlay_map_semantics() -> None:
    base = {i: str(i) for i in range(10)}
    m = snapshot_mod._OverlayMap(base)
    m2 = m.replace({3: "three", 11: "eleven"}, [4, 5])
    assert dict(m2) == {
        **{i: str(i) for i in range(10) if i not in (4, 5)},
        3: "three",
        11: "eleven",
    }
    assert (len(m2), 4 in m2, 11 in m2, m2.get(5)) == (9, False, True, None)
    m3 = m2.replace({4: "back"}, [11])
    assert (len(m3), m3[4], 11 in m3) == (9, "back", False)
    assert dict(m) == base  # the original is never changed
    with pytest.raises(KeyError):
        m2[4]


def test_read_group_cost_is_independent_of_host_size(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_group opens 4 attribute files per member plus the group type, whatever the host."""
    counts = []
    real_read = snapshot_mod._read_bytes
    for n in (40, 120):
        fs = large_host(fast_tmp / str(n), n, 20)  # group 0 has n/20 members
        opened: list[str] = []

        def counting_read(path: str, _log: list[str] = opened) -> bytes:
            _log.append(path)
            return real_read(path)

        monkeypatch.setattr(snapshot_mod, "_read_bytes", counting_read)
        group, _ = read_group(fs.sys_root, 0)
        monkeypatch.undo()
        assert len(opened) == 4 * len(group.devices) + 1
        members = {str(fs.sys_root / "bus" / "pci" / "devices" / b) for b in group.devices}
        type_file = str(fs.sys_root / "kernel" / "iommu_groups" / "0" / "type")
        assert all(os.path.dirname(p) in members or p == type_file for p in opened)
        counts.append(len(opened))
    assert counts == [4 * 2 + 1, 4 * 6 + 1]
