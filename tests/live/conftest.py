"""Fixtures for the live-viability lab tests (inside the lab guest; see support.py).

``daemon`` (one per module) is the real iommud as root with its host watcher;
``monitor`` runs ``iommuctl monitor --json`` for one test; ``spawn`` starts uid-1000
puppets. ``restored`` (used by every vm test here) puts the guest back as it booted after every test
(e1000 on the NIC, hotedu present and driver-less, nothing pinned) because every vm
test of the run shares this one guest, and checks the daemon holds no lease and runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from topology import HOTEDU, NIC

from tests.e2e.support import BOOT_DRIVERS, USER, drivers_now, wait_until
from tests.labharness import running_daemon
from tests.live.support import PCI, LiveClient, LiveDaemon, Monitor, sysfs_write


@pytest.fixture(scope="module")
def daemon() -> Iterator[LiveDaemon]:
    with running_daemon(LiveDaemon, "iommud-live-") as d:
        yield d


def _put_back() -> None:
    for bdf in (*BOOT_DRIVERS, HOTEDU):
        if (PCI / "devices" / bdf).exists():
            sysfs_write(PCI / "devices" / bdf / "driver_override", "\n")
    link = PCI / "devices" / NIC / "driver"
    if link.is_symlink() and os.path.basename(os.readlink(link)) != "e1000":
        sysfs_write(PCI / "devices" / NIC / "driver" / "unbind", NIC)
    if not link.is_symlink():
        sysfs_write(PCI / "drivers" / "e1000" / "bind", NIC)


@pytest.fixture
def restored(daemon: LiveDaemon, request: pytest.FixtureRequest) -> Iterator[None]:
    request.node.daemon = daemon
    yield
    ok = wait_until(lambda: not daemon.status()["leases"], 10.0, 0.05)
    if drivers_now() != BOOT_DRIVERS:
        _put_back()
    if not (PCI / "devices" / HOTEDU).exists():
        from qmp_guest import qmp

        qmp("device_add", driver="edu", bus="rp1", id="hotedu")
        wait_until(lambda: (PCI / "devices" / HOTEDU).exists(), 10.0, 0.05)
    assert daemon.proc.poll() is None, f"the daemon died:\n{daemon.log_tail()}"
    assert ok is not None, daemon.status()
    assert drivers_now() == BOOT_DRIVERS


@pytest.fixture
def monitor(daemon: LiveDaemon) -> Iterator[Monitor]:
    mon = Monitor(daemon.socket)
    yield mon
    mon.close()


@pytest.fixture
def spawn(daemon: LiveDaemon) -> Iterator[Callable[..., LiveClient]]:
    clients: list[LiveClient] = []

    def make(uid: int = USER) -> LiveClient:
        c = LiveClient(daemon.socket, uid)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
