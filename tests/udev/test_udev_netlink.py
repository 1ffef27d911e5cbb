"""Smoke test on the real kernel netlink socket (no fakes): UdevSource(kernel) on the loop.

Needs permission to open a NETLINK_KOBJECT_UEVENT socket and to write a synthetic
``change`` uevent to sysfs (root); skips with the reason otherwise. The synthetic uevents
(``change UUID``, Documentation/ABI/testing/sysfs-uevent) touch nothing: no driver
reacts to them, and udevd, if any, only re-applies its rules.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from iommud.errors import KernelError
from iommud.watch import HostAction, HostEvent, Resync, SourceItem, UdevSource, open_monitor

NULL_UEVENT = Path("/sys/devices/virtual/mem/null/uevent")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def synth_change(path: Path) -> str:
    token = str(uuid.uuid4())
    try:
        path.write_text(f"change {token}")
    except OSError as exc:
        pytest.skip(f"cannot write a synthetic uevent to {path}: {exc}")
    return token


def first_pci_device() -> str:
    pci = Path("/sys/bus/pci/devices")
    names = sorted(os.listdir(pci)) if pci.is_dir() else []
    if not names:
        pytest.skip("no PCI devices on this machine")
    return names[0]


@pytest.fixture
def kernel_monitor_works() -> None:
    """Skip unless a raw monitor opens here and kernel uevents reach this netns."""
    try:
        mon = open_monitor("kernel")
    except KernelError as exc:
        pytest.skip(f"cannot open a kernel uevent monitor: {exc.message}")
    token = synth_change(NULL_UEVENT)
    for _ in range(50):
        dev = mon.poll(timeout=0.1)
        if dev is not None and dev.properties.get("SYNTH_UUID") == token:
            return
    pytest.skip("kernel uevents do not reach this network namespace")


@pytest.mark.usefixtures("kernel_monitor_works")
async def test_real_kernel_source_sees_a_pci_change() -> None:
    """A synthetic change on a real PCI device arrives translated; the socket is closed after."""
    bdf = first_pci_device()
    before = fd_count()
    got: list[SourceItem] = []
    async with UdevSource("kernel") as src:
        assert src.kind == "kernel"
        assert fd_count() == before + 1
        assert await anext(src) == Resync("startup")
        synth_change(NULL_UEVENT)  # a non-PCI uevent: read (seqnum), not translated
        synth_change(Path("/sys/bus/pci/devices") / bdf / "uevent")
        async with asyncio.timeout(5):
            while True:
                item = await anext(src)
                got.append(item)
                if isinstance(item, HostEvent) and item.bdf == bdf:
                    break
        assert src.received >= 2
    assert fd_count() == before
    ev = got[-1]
    assert isinstance(ev, HostEvent)
    assert ev.action is HostAction.CHANGE
    assert ev.seqnum is not None
    # other uevents on a live host may interleave, but never a non-PCI HostEvent
    assert all(isinstance(i, Resync) or i.bdf.count(":") == 2 for i in got)
