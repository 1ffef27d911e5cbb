"""The first delegated claim end to end: the real daemon, a uid-1000 launcher, QEMU 10.

In the lab guest: the daemon runs as root (config: uid 1000 may claim the edu devices
with ``delegate = true``). tests/lab/delegated_vmm.py runs as uid 1000 with no
capabilities (memlock raised for QEMU beforehand), claims the 1:1 edu 0000:00:10.0 in
delegated mode over the socket (protocol v2) and starts QEMU 10 as its child with the
fresh /dev/iommu fd and the unbound cdev fd it received. QEMU binds, maps and pins its
guest RAM itself; an edu DMA driven by the test (through a copy of QEMU's own device fd,
pidfd_getfd) lands in QEMU's guest RAM. Then ``release``: the daemon detaches through its
copy and unmaps every IOAS of the iommufd, so the next DMA faults (DMAR) and QEMU's VmPin
drops to 0 while QEMU runs on unaware; QEMU still holds the device, so the release is
refused (``revoked``, waiting for the holders to exit: the daemon keeps its copies and
would kill QEMU after the grace period, 60 s here). Once QEMU is gone (the launcher
quits it and ends its session) the device goes back to its boot driver (none). Timings
go to the output (``delegated.*`` lines). The hostile variant (killed after the grace
period) is tests/lab/test_delegated_revoke_vm.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vmm
from kmsg import Kmsg
from qmp_guest import QmpError
from topology import EDU0

from tests.e2e.support import (
    BOOT_DRIVERS,
    Daemon,
    client_command,
    driver_of,
    drivers_now,
    wait_until,
)
from tests.lab.nested import (
    DELEGATING,
    EDU_DEVICE,
    EDU_VENDOR,
    GPA_BLOCKED,
    GPA_DST,
    GPA_SRC,
    LENGTH,
    RAM_KIB,
    alive,
    at,
    enable_device,
    fd_of,
    report,
)
from tests.labharness import running_daemon

pytestmark = pytest.mark.vm

LAUNCHER = Path(__file__).resolve().parent / "delegated_vmm.py"


class Launcher:
    """delegated_vmm.py as uid 1000 (no capabilities, memlock raised by root first)."""

    def __init__(self, socket: str) -> None:
        paths = vmm.qemu_paths()  # bind-mounted where uid 1000 can reach it
        argv, env = client_command()
        self.proc = subprocess.Popen(
            vmm.unprivileged(
                [*argv, str(LAUNCHER), socket, EDU0, str(paths.binary)]
                + [str(d) for d in paths.data_dirs]
            ),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        self.qmp: vmm.Qmp | None = None
        self.qemu_pid = 0

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10.0)
            assert self.proc.stderr is not None
            raise AssertionError(
                f"launcher exited {self.proc.returncode}: {self.proc.stderr.read()}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def connect_qmp(self, path: str, timeout: float = 120.0) -> vmm.Qmp:
        deadline = time.monotonic() + timeout
        while self.qmp is None:
            try:
                self.qmp = vmm.Qmp(Path(path), timeout=max(1.0, deadline - time.monotonic()))
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or not alive(self.qemu_pid):
                    raise
                time.sleep(0.05)
        return self.qmp

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(OSError, QmpError):
                self.qmp.execute("quit")
            self.qmp.close()
        if self.qemu_pid and alive(self.qemu_pid):
            os.kill(self.qemu_pid, 9)
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(30.0)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # The test holds a copy of QEMU's device fd after the refused release: far from the
    # grace period's end, or the daemon would kill this very process with QEMU.
    config = DELEGATING + "\n[delegation]\ngrace_s = 60.0\n"
    with running_daemon(lambda d: Daemon(d, config), "iommud-dlg-") as d:
        yield d


def test_uid1000_qemu_gets_the_edu_from_the_daemon_and_loses_it_on_release(
    daemon: Daemon, request: pytest.FixtureRequest
) -> None:
    """Delegated claim -> QEMU realizes the edu, pins its RAM, DMA lands; release ->
    DMA faults, VmPin 0, and once QEMU is gone the edu is back on its boot driver."""
    request.node.daemon = daemon
    assert drivers_now() == BOOT_DRIVERS
    launcher = Launcher(daemon.socket)
    dup = -1
    try:
        info = launcher.read()
        claimed = time.monotonic()
        claim = info["claim"]
        assert (claim["mode"], claim["ioas_id"], claim["fds"]) == ("delegated", None, 2)
        assert claim["devices"] == [{"bdf": EDU0, "fd_index": 1, "devid": None}]
        launcher.qemu_pid = info["qemu_pid"]
        status = vmm.proc_status(launcher.qemu_pid)
        assert status["Uid"].split() == [str(vmm.VMM_UID)] * 4
        assert int(status["CapEff"], 16) == 0
        assert driver_of(EDU0) == "vfio-pci"

        qmp = launcher.connect_qmp(info["qmp"])
        assert qmp.is_realized("dev0")
        realized_s = time.monotonic() - claimed
        pinned = vmm.vm_pin_kib(launcher.qemu_pid)
        assert pinned >= RAM_KIB  # QEMU's own pins, per-process accounted
        vmm.run_firmware(qmp, ["dev0"])
        (dev,) = (d for d in qmp.pci_devices() if d["qdev_id"] == "dev0")
        assert (dev["id"]["vendor"], dev["id"]["device"]) == (EDU_VENDOR, EDU_DEVICE)

        dup = fd_of(launcher.qemu_pid, info["device_fd"])
        edu = enable_device(dup)
        pattern = os.urandom(LENGTH)
        vmm.write_process_memory(launcher.qemu_pid, qmp.gpa2hva(GPA_SRC), pattern)
        edu.dma_from_ram(GPA_SRC, LENGTH)
        edu.dma_to_ram(GPA_DST, LENGTH)
        assert qmp.xp(GPA_DST, LENGTH) == pattern

        with Kmsg() as kmsg:
            t0, sent = time.monotonic(), time.time()
            launcher.send("release")
            answer = launcher.read()
            release_s = time.monotonic() - t0
            refused = answer["reply"]
            assert (refused["op"], refused["code"]) == ("error", "revoked"), answer
            assert refused["details"]["waiting_for"] == "holders_exit"
            assert launcher.qemu_pid in {h["pid"] for h in refused["details"]["holders"]}
            line = kmsg.expect_fault(
                lambda: edu.dma_to_ram(GPA_BLOCKED, LENGTH),
                lambda m: "DMAR" in m and "[00:10.0]" in m,
            )
        blocked_s = time.monotonic() - t0
        assert f"fault addr {GPA_BLOCKED:#x}" in line
        assert qmp.xp(GPA_BLOCKED, LENGTH) == bytes(LENGTH)
        assert wait_until(lambda: vmm.vm_pin_kib(launcher.qemu_pid) == 0, 30.0, 0.05) is not None
        unpinned = time.monotonic() - t0  # an upper bound: VmPin was read after the fault
        assert qmp("query-status")["status"] == "paused"  # QEMU runs on, unaware
        (unmapped,) = daemon.log_events("iommufd.unmapped")
        assert unmapped["bytes"] == pinned * 1024
        (detached,) = daemon.log_events("device.detached")

        os.close(dup)
        dup = -1
        launcher.close()
        back = wait_until(lambda: drivers_now() == BOOT_DRIVERS, 60.0, 0.05)
        assert back is not None, (drivers_now(), daemon.log_tail())
        assert wait_until(lambda: not daemon.status()["leases"], 10.0, 0.05) is not None
        report(
            "delegated",
            "edu0",
            claim_s=info["claim_s"],
            claim_to_realized_s=realized_s,
            vm_pin_kib=pinned,
            release_reply_s=release_s,
            release_to_blocked_s=blocked_s,
            release_to_unpinned_s=unpinned,
            release_to_detached_s=at(detached) - sent,
            release_to_unmapped_s=at(unmapped) - sent,
            qemu_exit_to_driver_back_s=back,
        )
    finally:
        if dup >= 0:
            os.close(dup)
        launcher.close()
