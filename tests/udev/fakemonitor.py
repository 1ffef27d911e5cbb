"""A fake pyudev monitor for the udev tests: a real pipe fd, uevents queued in memory.

``FakeMonitor`` has the shape of ``pyudev.Monitor`` that ``iommud.watch`` uses: its fd is
readable while items are queued, ``poll(0)`` pops one (a property dict wrapped like a
pyudev Device, or an exception to raise, e.g. ``OSError(ENOBUFS)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class FakeDevice:
    properties: Mapping[str, str]


class FakeMonitor:
    """pyudev.Monitor's shape: a readable fd while items are queued, poll(0) pops one."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.items: list[Mapping[str, str] | BaseException] = []
        self.started = True

    def fileno(self) -> int:
        return self.r

    def start(self) -> None:
        self.started = True

    def poll(self, timeout: float | None = None) -> FakeDevice | None:
        assert timeout == 0
        if not self.items:
            return None
        os.read(self.r, 1)
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return FakeDevice(item)

    def feed(self, *items: Mapping[str, str] | BaseException) -> None:
        self.items.extend(items)
        os.write(self.w, b"x" * len(items))

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def uevent(
    action: str, bdf: str, seq: int, driver: str | None = None, subsystem: str = "pci"
) -> dict[str, str]:
    p = {
        "ACTION": action,
        "SUBSYSTEM": subsystem,
        "DEVPATH": f"/devices/x/{bdf}",
        "SEQNUM": str(seq),
    }
    if subsystem == "pci":
        p["PCI_SLOT_NAME"] = bdf
    if driver:
        p["DRIVER"] = driver
    return p
