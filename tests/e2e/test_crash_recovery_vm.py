"""A daemon SIGKILLed while a client holds a legacy group: e1000 comes back, no manual step.

The client (uid 1000) claims 01:01.0 of the bridge group, so the daemon moves e1000 off
the NIC; the daemon is SIGKILLed while the client keeps its device fd (the fd is the
client's: its DMA keeps working). The restarted daemon replays its journal: it keeps
every entry, refuses claims of the group with busy naming what it waits for, and once
the client closes its fd, e1000 is back on the NIC within ``BOUND`` seconds. Runs inside
the lab guest; this module starts and kills its own daemons (one work dir per test).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from topology import EDU0, EDU1, EDU2, NIC

from iommud.broker.journal import JOURNAL_NAME
from iommud.client import Client
from iommud.kernel.linux import LinuxKernel
from iommud.protocol.v2 import StatusReplyV2
from tests.e2e.support import (
    BOOT_DRIVERS,
    ClientProc,
    Daemon,
    Timings,
    driver_of,
    drivers_now,
    wait_until,
)

pytestmark = pytest.mark.vm

BOUND = 30.0
"""Seconds from the client's close to e1000 back on the NIC. The daemon retries the
refused probe at most every 2 s (drivers.BUSY_RETRY_MAX); the rest is room for TCG on a
loaded 2-core host. The measured time is printed (E2E-TIMING)."""


class Host:
    """The daemons started in one work dir (the journal lives there across restarts)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.daemon = Daemon(workdir)
        self.clients: list[ClientProc] = []
        self.restarts = 0

    def client(self) -> ClientProc:
        c = ClientProc(self.daemon.socket)
        self.clients.append(c)
        return c

    def crash_and_restart(self) -> Daemon:
        """SIGKILL the daemon (its log kept aside), start a new one on the same state."""
        self.daemon.proc.kill()
        self.daemon.proc.wait(60)
        self.daemon.stop()
        self.restarts += 1
        self.daemon.log_path.rename(self.dir / f"iommud.log.{self.restarts}")
        self.daemon = Daemon(self.dir)
        return self.daemon

    def journal(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads((self.dir / "state" / JOURNAL_NAME).read_text())
        except FileNotFoundError:
            return {}
        return {e["bdf"]: e for e in data["entries"]}


@pytest.fixture(autouse=True)
def steady() -> Iterator[None]:
    """Replaces the module-wide check (this module runs its own daemons): the guest's
    drivers are as booted before and after each test."""
    assert drivers_now() == BOOT_DRIVERS, "a previous test left drivers changed"
    yield
    assert drivers_now() == BOOT_DRIVERS


@pytest.fixture
def host() -> Iterator[Host]:
    workdir = Path(tempfile.mkdtemp(prefix="iommud-crash-", dir="/tmp"))
    workdir.chmod(0o755)  # uid 1000 reaches the socket
    h = Host(workdir)
    try:
        yield h
    finally:
        for c in h.clients:
            c.close()
        # A failed test must not leave the NIC driver-less for the modules after it.
        wait_until(lambda: drivers_now() == BOOT_DRIVERS, 10.0, 0.1)
        h.daemon.stop()
        if driver_of(NIC) != "e1000":
            binder = LinuxKernel("/dev", "/sys").binder
            binder.set_driver_override(NIC, None)
            if driver_of(NIC) is not None:
                binder.unbind(NIC)
            binder.bind("e1000", NIC)
        shutil.rmtree(workdir, ignore_errors=True)


def _held_across_a_crash(host: Host) -> ClientProc:
    holder = host.client()
    claim = holder.ok("claim", devices=[EDU1])
    assert claim["backend"] == "legacy"
    assert driver_of(NIC) == "vfio-pci"
    host.crash_and_restart()
    return holder


def _still_waiting(host: Host) -> None:
    """Nothing given back, nothing forgotten, and the daemon says what it waits for."""
    assert driver_of(NIC) != "e1000"
    journal = host.journal()
    assert journal[NIC]["original_driver"] == "e1000", journal
    assert EDU1 in journal
    pending = host.daemon.log_events("journal.replay_pending")
    assert pending, host.daemon.log_tail()
    assert NIC in pending[-1]["waiting_for"], pending[-1]
    # ... and says it to any client too: v2 status lists the pending restores.
    with Client(host.daemon.socket, "restores", version=2) as c:
        st = c.status()
    assert isinstance(st, StatusReplyV2)
    why = {r.bdf: r.waiting_for for r in st.restores}
    assert NIC in why, why
    assert "holds a device fd" in why[NIC], why


def _close_and_time(host: Host, holder: ClientProc, timing: Timings) -> None:
    holder.ok("close_device", bdf=EDU1)  # its connection died with the daemon; the fd did not
    t0 = time.monotonic()
    back = wait_until(lambda: driver_of(NIC) == "e1000", BOUND + 60.0, 0.05)
    timing("fd closed -> e1000 back", back if back is not None else -1.0)
    assert back is not None, host.daemon.log_tail()
    assert back < BOUND, back
    assert wait_until(lambda: host.journal() == {}, 20.0, 0.1) is not None, host.journal()
    assert wait_until(lambda: drivers_now() == BOOT_DRIVERS, 20.0, 0.1) is not None
    timing("fd closed -> every member back, journal empty", time.monotonic() - t0)


def test_restart_while_held_then_close_gives_e1000_back(host: Host, timing: Timings) -> None:
    """One restart; meanwhile the group is busy (restoring) for others while another
    group serves; after the close, a claim and release of the group ends on e1000."""
    holder = _held_across_a_crash(host)
    _still_waiting(host)
    other = host.client()
    code, details = other.error("claim", devices=[EDU2])
    assert code == "busy", details
    assert NIC in details["restoring"], details
    # The daemon serves other groups meanwhile (iommufd path, group of 00:10.0).
    lease = other.ok("claim", devices=[EDU0])
    other.ok("close_device", bdf=EDU0)
    other.ok("release", lease_id=lease["lease_id"])
    time.sleep(5.0)  # the old daemon gave up after five attempts by now
    _still_waiting(host)

    _close_and_time(host, holder, timing)

    # The claim that follows records e1000 as the original again, and gives it back.
    again = other.ok("claim", devices=[EDU1])
    assert (again["backend"], driver_of(NIC)) == ("legacy", "vfio-pci")
    other.ok("close_device", bdf=EDU1)
    other.ok("release", lease_id=again["lease_id"])
    assert wait_until(lambda: driver_of(NIC) == "e1000", BOUND, 0.05) is not None
    assert wait_until(lambda: host.journal() == {}, 20.0, 0.1) is not None


def test_two_restarts_while_held_then_close(host: Host, timing: Timings) -> None:
    """A daemon restarted while the restore waits can itself be killed and restarted
    (nothing of it is stuck in the kernel); the third one gives e1000 back."""
    holder = _held_across_a_crash(host)
    _still_waiting(host)
    host.crash_and_restart()
    _still_waiting(host)
    _close_and_time(host, holder, timing)
