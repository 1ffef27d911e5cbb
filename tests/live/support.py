"""Helpers for the live-viability lab tests: the daemon, iommuctl monitor, puppets.

Builds on tests/e2e/support.py (the real daemon as a root subprocess, uid-1000 puppet
clients, /dev/kmsg): ``LiveDaemon`` only changes the config so the daemon may also
rebind the hot-pluggable edu behind the root port (0000:02:00.0), ``LiveClient`` runs
tests/live/live_client.py, and ``Monitor`` runs ``iommuctl monitor --json`` against the
daemon and timestamps each line as it is read. Test code; runs inside the lab guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from topology import HOTEDU

from tests.e2e.support import (
    STARTUP_GUARD,
    USER,
    ClientProc,
    Daemon,
    wait_until,
)

HERE = Path(__file__).resolve().parent
LIVE_CLIENT = HERE / "live_client.py"
PCI = Path("/sys/bus/pci")

CONFIG = """\
[daemon]
socket = "{dir}/iommud.sock"
state_dir = "{dir}/state"

[manage]
rebind = ["{edu0}", "{edu1}", "{edu2}", "{nic}", "{hot}"]

[[access]]
uid = {user}
devices = ["1234:11e8"]   # QEMU's edu
quota = "live"

[quotas.live]
pinned_bytes = {quota}
max_ioas = 4
max_mappings = 16
"""


class LiveDaemon(Daemon):
    """tests.e2e.support.Daemon with the live config (hotedu may be rebound)."""

    def __init__(self, workdir: Path, config: str = CONFIG) -> None:
        """``config``: the live template (the default) or one that extends it."""
        super().__init__(workdir, config, hot=HOTEDU)
        # The watcher opened before the broker read the host and caught up on the
        # uevents of that read before READY: it must have logged so by now.
        if wait_until(lambda: bool(self.log_events("udev.caught_up")), STARTUP_GUARD, 0.05) is None:
            raise AssertionError(f"the host watcher did not start:\n{self.log_tail()}")
        self.baseline_fds = self.settled_fds()

    def iommuctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "iommud.cli", "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


class LiveClient(ClientProc):
    """tests/live/live_client.py as ``uid`` (the e2e puppet plus wait_event etc.)."""

    def __init__(self, socket: str, uid: int = USER) -> None:
        super().__init__(socket, uid, script=LIVE_CLIENT)


class Monitor:
    """``iommuctl monitor --json`` as a subprocess; lines kept with their arrival time."""

    def __init__(self, socket: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iommud.cli", "--socket", socket, "monitor", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # iommuctl says "monitoring" on stderr once the subscription is live.
        assert self.proc.stderr is not None
        banner = self.proc.stderr.readline()
        assert "monitoring" in banner, banner

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.perf_counter()
            with self._cond:
                self.lines.append((t, json.loads(line)))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], since: int = 0, timeout: float = 10.0
    ) -> tuple[float, dict[str, Any]]:
        """The first line from index ``since`` on matching ``pred`` (and its arrival time)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, ev in self.lines[since:]:
                    if pred(ev):
                        return t, ev
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [ev for _, ev in self.lines[since:]]
                    raise AssertionError(f"no matching monitor line within {timeout}s: {got}")
                self._cond.wait(left)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        with self._cond:
            return [ev for _, ev in self.lines[since:]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()


def override_of(bdf: str) -> str:
    return (PCI / "devices" / bdf / "driver_override").read_text().strip()


def group_of(bdf: str) -> int:
    return int(os.path.basename(os.readlink(PCI / "devices" / bdf / "iommu_group")))


def sysfs_write(path: Path | str, value: str) -> int | None:
    """Write like ``echo value > path``; the errno if the kernel refused, else None."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return None


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]
