"""A revocation a hostile delegated client cannot undo, on the real kernel (lab guest).

tests/lab/hostile_holder.py runs as uid 1000 with no capabilities: it gets a delegated
claim of the 1:1 edu 0000:00:10.0 (protocol v2), binds the unbound cdev to the fresh
/dev/iommu itself, attaches, maps and pins a buffer of its own, and drives the edu
through its own device fd. Then ``revoke`` (an admin, over the socket):

- at once: the device is detached through the daemon's copy (the next DMA faults, a
  DMAR line in the kernel log) and the buffer unpinned (VmPin 0); the holder's
  RLIMIT_MEMLOCK is 0:0, so its re-attach (which the kernel allows: the file is still
  bound) finds an empty domain and its re-map is ENOMEM: DMA still does not land;
- meanwhile the daemon serves another client (v2 status shows the lease revoked and the
  holder's pinned bytes);
- after the grace period (4 s here) the holder is SIGKILLed through a pidfd, the device
  is reset and given back to its boot driver (none), and ``lease_enforced`` names the
  killed process; a brokered claim of the device then works.

Timings go to the output (``delegated.revoke_hostile`` line).
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vmm
from kmsg import Kmsg
from topology import EDU0

from iommud.client import Client
from iommud.protocol import messages as m
from iommud.protocol.limits import LATEST_VERSION
from iommud.protocol.v2 import LeaseEnforced, LeaseRevokedV2, StatusReplyV2
from tests.e2e.support import (
    BOOT_DRIVERS,
    Daemon,
    client_command,
    driver_of,
    drivers_now,
    wait_until,
)
from tests.lab.nested import DELEGATING, report
from tests.lab.nested import at as _at
from tests.labharness import running_daemon

pytestmark = pytest.mark.vm

HOSTILE = Path(__file__).resolve().parent / "hostile_holder.py"
GRACE_S = 4.0
CONFIG_GRACE = DELEGATING + f"\n[delegation]\ngrace_s = {GRACE_S}\n"


class HostileProc:
    """hostile_holder.py as uid 1000 (no capabilities; memlock raised by root first)."""

    def __init__(self, socket: str) -> None:
        argv, env = client_command()
        self.proc = subprocess.Popen(
            vmm.unprivileged([*argv, str(HOSTILE), socket, EDU0]),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10.0)
            assert self.proc.stderr is not None
            raise AssertionError(
                f"hostile exited {self.proc.returncode}: {self.proc.stderr.read()}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def do(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"do": what}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30.0)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon(lambda d: Daemon(d, CONFIG_GRACE), "iommud-rvk-") as d:
        yield d


def test_hostile_holder_is_blocked_at_once_and_killed_after_the_grace_period(
    daemon: Daemon, request: pytest.FixtureRequest
) -> None:
    request.node.daemon = daemon
    assert drivers_now() == BOOT_DRIVERS
    hostile = HostileProc(daemon.socket)
    try:
        info = hostile.read()
        pid = info["pid"]
        status = vmm.proc_status(pid)
        assert status["Uid"].split() == [str(vmm.VMM_UID)] * 4
        assert int(status["CapEff"], 16) == 0
        pinned = vmm.vm_pin_kib(pid)
        assert pinned >= 2048  # its own 2 MiB buffer, pinned by its own IOAS_MAP
        assert hostile.do("dma") == {"landed": True, "untouched": False}

        with Client(daemon.socket, "rvk-admin", version=LATEST_VERSION) as admin:
            admin.subscribe(
                [m.EventName.LEASE_REVOKED, m.EventName.LEASE_ENFORCED], [info["group_id"]]
            )
            with Kmsg() as kmsg:
                t0, sent = time.monotonic(), time.time()
                assert admin.revoke(info["group_id"], "hostile test") == (info["lease_id"],)
                revoke_reply_s = time.monotonic() - t0
                line = kmsg.expect_fault(
                    lambda: _assert_blocked(hostile.do("dma")),
                    lambda msg: "DMAR" in msg and "[00:10.0]" in msg,
                )
            fault_seen_s = time.monotonic() - t0
            assert "fault addr" in line
            unpinned = wait_until(lambda: vmm.vm_pin_kib(pid) == 0, 30.0, 0.02)
            assert unpinned is not None
            unpinned_s = time.monotonic() - t0
            assert _memlock(pid) == "0 0"

            # The hostile move: the file is still bound, so the kernel lets it attach
            # again; but the IOAS is empty and nothing can be pinned any more.
            tried = hostile.do("reattach")
            assert tried == {
                "attach": 0,
                "map": errno.ENOMEM,
                "fresh_alloc": 0,
                "fresh_attach": 0,
                "fresh_map": errno.ENOMEM,
            }, tried
            _assert_blocked(hostile.do("dma"))
            assert vmm.vm_pin_kib(pid) == 0

            # The daemon serves another client throughout (the grace period runs).
            with Client(daemon.socket, "rvk-other", version=LATEST_VERSION) as other:
                other.ping()
                st = other.status()
                assert isinstance(st, StatusReplyV2)
                (lease,) = st.leases
                assert (lease.state, lease.pinned_bytes, lease.pinned_pids) == (
                    "revoked",
                    0,
                    (pid,),
                )
                assert lease.enforce_at is not None

            assert hostile.proc.wait(GRACE_S + 60.0) == -signal.SIGKILL
            killed_s = time.monotonic() - t0
            assert killed_s >= GRACE_S
            back = wait_until(lambda: drivers_now() == BOOT_DRIVERS, 60.0, 0.02)
            assert back is not None, (drivers_now(), daemon.log_tail())
            back_s = time.monotonic() - t0

            revoked = admin.next_event(30.0)
            assert isinstance(revoked, LeaseRevokedV2)
            assert (revoked.lease_id, revoked.grace_s) == (info["lease_id"], GRACE_S)
            enforced = admin.next_event(30.0)
            assert isinstance(enforced, LeaseEnforced)
            assert [(h.pid, h.uid) for h in enforced.killed] == [(pid, vmm.VMM_UID)]
            assert enforced.outcome == "returned"

        # ...and the device is usable again (a brokered claim by root).
        with Client(daemon.socket, "rvk-after") as after:
            claimed = after.claim([EDU0])
            assert driver_of(EDU0) == "vfio-pci"
            after.release(claimed.lease_id)
        assert wait_until(lambda: drivers_now() == BOOT_DRIVERS, 60.0, 0.02) is not None

        # the revoke's (the give-back after the kill detaches and unmaps once more)
        detached = daemon.log_events("device.detached")[0]
        unmapped = daemon.log_events("iommufd.unmapped")[0]
        assert unmapped["bytes"] == pinned * 1024
        (killed_rec,) = daemon.log_events("enforce.killed")
        report(
            "delegated",
            "revoke_hostile",
            vm_pin_kib=pinned,
            grace_s=GRACE_S,
            revoke_reply_s=revoke_reply_s,
            revoke_to_detached_s=_at(detached) - sent,
            revoke_to_unmapped_s=_at(unmapped) - sent,
            revoke_to_fault_seen_s=fault_seen_s,
            revoke_to_vmpin0_s=unpinned_s,
            revoke_to_kill_s=_at(killed_rec) - sent,
            revoke_to_exit_seen_s=killed_s,
            revoke_to_driver_back_s=back_s,
        )
    finally:
        hostile.close()


def _assert_blocked(answer: dict[str, Any]) -> None:
    assert answer == {"landed": False, "untouched": True}, answer


def _memlock(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max locked memory"):
            return " ".join(line.split()[3:5])
    raise AssertionError("no memlock line")
