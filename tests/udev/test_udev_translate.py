"""translate_uevent, SeqnumTracker, pick_source and diff_events: pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from iommud.broker.hostview import diff_events
from iommud.host.snapshot import PciDevice
from iommud.watch import (
    HostAction,
    HostEvent,
    SeqnumTracker,
    pick_source,
    translate_uevent,
)

DEVPATH = "/devices/pci0000:00/0000:00:11.0/0000:01:03.0"


def props(**kw: str) -> dict[str, str]:
    base = {
        "ACTION": "bind",
        "DEVPATH": DEVPATH,
        "SUBSYSTEM": "pci",
        "DRIVER": "e1000",
        "PCI_SLOT_NAME": "0000:01:03.0",
        "SEQNUM": "4711",
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v != "<absent>"}


def test_bind_translates_with_driver_and_seqnum() -> None:
    assert translate_uevent(props()) == HostEvent(HostAction.BIND, "0000:01:03.0", "e1000", 4711)


@pytest.mark.parametrize("action", ["add", "remove", "change", "bind", "unbind"])
def test_every_pci_action_is_kept(action: str) -> None:
    ev = translate_uevent(props(ACTION=action, DRIVER="<absent>"))
    assert ev == HostEvent(HostAction(action), "0000:01:03.0", None, 4711)


@pytest.mark.parametrize("action", ["move", "online", "offline", "", "BIND"])
def test_other_actions_are_ignored(action: str) -> None:
    assert translate_uevent(props(ACTION=action)) is None


@pytest.mark.parametrize("subsystem", ["usb", "block", "", "<absent>"])
def test_other_subsystems_are_ignored(subsystem: str) -> None:
    assert translate_uevent(props(SUBSYSTEM=subsystem)) is None


def test_vfio_cdev_remove_is_a_cdev_remove_of_its_pci_parent() -> None:
    """vfio-pci's remove deletes /dev/vfio/devices/vfioN first (vfio_device_del): the
    daemon's news of a hot-unplug of a delegated device; add and others are ignored."""
    cdev = {
        "ACTION": "remove",
        "SUBSYSTEM": "vfio-dev",
        "DEVPATH": "/devices/pci0000:00/0000:00:10.0/vfio-dev/vfio0",
        "DEVNAME": "vfio/devices/vfio0",
        "SEQNUM": "812",
    }
    assert translate_uevent(cdev) == HostEvent(HostAction.CDEV_REMOVE, "0000:00:10.0", None, 812)
    assert translate_uevent({**cdev, "ACTION": "add"}) is None
    assert translate_uevent({**cdev, "DEVPATH": "/devices/virtual/vfio-dev/vfio0"}) is None
    assert translate_uevent({**cdev, "DEVPATH": "/devices/pci0000:00/vfio0"}) is None


def test_bdf_falls_back_to_devpath_and_is_lowercased() -> None:
    """Without PCI_SLOT_NAME (remove events may lack it) the DEVPATH basename is used."""
    ev = translate_uevent(
        props(PCI_SLOT_NAME="<absent>", DEVPATH="/devices/pci0000:00/0000:00:1F.2/")
    )
    assert ev is not None
    assert ev.bdf == "0000:00:1f.2"


@pytest.mark.parametrize("slot", ["0000:01:03", "pci0000:00", "0000:01:03.8", "x" * 12])
def test_garbled_address_is_ignored(slot: str) -> None:
    assert translate_uevent(props(PCI_SLOT_NAME=slot, DEVPATH="/devices/" + slot)) is None


@pytest.mark.parametrize(("raw", "expected"), [("<absent>", None), ("12a", None), ("", None)])
def test_bad_seqnum_is_none(raw: str, expected: int | None) -> None:
    ev = translate_uevent(props(SEQNUM=raw))
    assert ev is not None
    assert ev.seqnum is expected


def test_empty_driver_is_none() -> None:
    ev = translate_uevent(props(DRIVER=""))
    assert ev is not None
    assert ev.driver is None


def test_seqnum_tracker_strict() -> None:
    t = SeqnumTracker(strict=True)
    assert t.observe(10) is None  # first one: nothing to compare
    assert t.observe(11) is None
    assert t.observe(13) == "seqnum_gap"
    assert t.observe(14) is None
    assert t.observe(14) == "seqnum_reorder"
    assert t.observe(None) == "seqnum_missing"
    assert t.observe(99) is None  # after a doubt the tracker restarts
    t.reset()
    assert t.observe(5) is None


def test_seqnum_tracker_lenient_never_doubts() -> None:
    """On the udev source gaps and reordering are normal (filtered, parallel udevd)."""
    t = SeqnumTracker(strict=False)
    assert [t.observe(s) for s in (10, 15, 12, None)] == [None, None, None, None]


def test_pick_source(tmp_path: Path) -> None:
    assert pick_source(tmp_path) == "kernel"
    (tmp_path / "udev").mkdir()
    (tmp_path / "udev" / "control").touch()
    assert pick_source(tmp_path) == "udev"


def _dev(bdf: str, driver: str | None) -> PciDevice:
    return PciDevice(bdf, 0x8086, 0x100E, 0x020000, driver, None, 4)


def test_diff_events_covers_add_remove_rebind() -> None:
    before = [_dev("0000:01:01.0", None), _dev("0000:01:02.0", "e1000"), _dev("0000:01:03.0", "a")]
    after = [_dev("0000:01:01.0", None), _dev("0000:01:03.0", "b"), _dev("0000:01:04.0", "c")]
    A = HostAction
    assert diff_events(before, after) == (
        HostEvent(A.UNBIND, "0000:01:02.0", "e1000"),
        HostEvent(A.REMOVE, "0000:01:02.0"),
        HostEvent(A.UNBIND, "0000:01:03.0", "a"),
        HostEvent(A.BIND, "0000:01:03.0", "b"),
        HostEvent(A.ADD, "0000:01:04.0"),
        HostEvent(A.BIND, "0000:01:04.0", "c"),
    )
    assert diff_events(after, after) == ()
