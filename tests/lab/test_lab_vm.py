"""Smoke tests of the lab guest itself: the IOMMU, the fixed topology and the QMP channel.

Marked vm: on the host the lab plugin runs them inside one guest boot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qmp_guest import GuestQmp, QmpError
from topology import (
    BRIDGE,
    BRIDGE_BUS,
    BRIDGE_FREE_SLOT,
    BRIDGE_GROUP,
    EDU0,
    EDU1,
    EDU2,
    EDU_ID,
    HOTEDU,
    NIC,
    QEMU_IDS,
)

pytestmark = pytest.mark.vm

SYS_PCI = Path("/sys/bus/pci/devices")


def group_members(bdf: str) -> set[str]:
    group = (SYS_PCI / bdf / "iommu_group").resolve()
    return set(os.listdir(group / "devices"))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_guest_has_iommufd() -> None:
    assert os.environ.get("IOMMUD_LAB_GUEST") == "1"
    assert Path("/sys/kernel/iommu_groups").is_dir()
    assert Path("/dev/iommu").is_char_device()
    assert len(os.listdir("/sys/kernel/iommu_groups")) >= 10


def test_root_complex_edu_is_alone_in_its_group() -> None:
    assert (SYS_PCI / EDU0 / "vendor").read_text().strip() == "0x1234" == hex(EDU_ID[0])
    assert (SYS_PCI / EDU0 / "device").read_text().strip() == "0x11e8" == hex(EDU_ID[1])
    assert group_members(EDU0) == {EDU0}


def test_bridge_group_has_bridge_two_edus_and_e1000() -> None:
    assert group_members(EDU2) == BRIDGE_GROUP
    driver = (SYS_PCI / NIC / "driver").resolve().name
    assert driver == "e1000"
    for bdf in (BRIDGE, EDU1, EDU2):
        assert not (SYS_PCI / bdf / "driver").exists(), bdf


def test_hot_unpluggable_edu_is_behind_the_root_port(lab_qmp: GuestQmp) -> None:
    """hotedu (02:00.0, own group) exists at boot; QEMU's view agrees via query-pci."""
    assert group_members(HOTEDU) == {HOTEDU}
    buses = lab_qmp("query-pci")
    ids = {dev.get("qdev_id") for bus in buses for dev in _walk(bus["devices"])}
    assert {"edu0", "edu1", "edu2", "nic0", "hotedu", "rp1", "br1"} == set(QEMU_IDS.values())
    assert set(QEMU_IDS.values()) <= ids


def _walk(devices: list[dict[str, object]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for dev in devices:
        out.append(dev)
        bridge = dev.get("pci_bridge")
        if isinstance(bridge, dict):  # QMP PciBridgeInfo: {"bus": ..., "devices": [...]}
            out.extend(_walk(bridge.get("devices", [])))
    return out


def test_qmp_hot_add_into_bridge_then_unplug(lab_qmp: GuestQmp) -> None:
    """device_add of an edu at br1 slot 4 joins the bridge group; device_del removes it."""
    new = BRIDGE_FREE_SLOT
    assert new == "0000:01:04.0"
    assert not (SYS_PCI / new).exists()
    assert lab_qmp("device_add", driver="edu", bus=BRIDGE_BUS, addr="0x4", id="labsmoke") == {}
    try:
        assert wait_for((SYS_PCI / new).exists), "hot-added edu never showed up in sysfs"
        assert group_members(new) == {*BRIDGE_GROUP, new}
    finally:
        lab_qmp("device_del", id="labsmoke")
        event = lab_qmp.wait_event("DEVICE_DELETED", device="labsmoke", timeout=30)
    assert event["data"]["path"] == "/machine/peripheral/labsmoke"
    assert wait_for(lambda: not (SYS_PCI / new).exists())
    assert group_members(EDU1) == BRIDGE_GROUP


def test_qmp_error_is_raised_with_qemu_class(lab_qmp: GuestQmp) -> None:
    with pytest.raises(QmpError) as err:
        lab_qmp("device_del", id="no-such-device")
    assert err.value.error_class == "DeviceNotFound"
    assert err.value.desc == "Device 'no-such-device' not found"
