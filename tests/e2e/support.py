"""Helpers for the end-to-end tests: the real daemon as a subprocess, puppet clients.

Guest topology (lab/topology.py)::

    0000:00:10.0  edu            alone in its IOMMU group (iommufd path)
    0000:00:11.0  pci-bridge  -+ one IOMMU group (legacy path)
    0000:01:01.0  edu          |
    0000:01:02.0  edu          |
    0000:01:03.0  e1000       -+ bound to e1000: the daemon may rebind it (config)

``Daemon`` starts ``python -m iommud`` as root with a config written to a temp dir
(socket, state_dir, an access rule for uid 1000 on the edu devices with a small quota,
[manage] rebind for the edus and the e1000) and captures its JSON log. ``ClientProc``
runs tests/e2e/client_script.py as an unprivileged user, driven one JSON line at a
time. Test code only; runs inside the lab guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import site
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from topology import EDU0, EDU1, EDU2, NIC

from iommud.client import Client

HERE = Path(__file__).resolve().parent
CLIENT_SCRIPT = HERE / "client_script.py"
REPO = HERE.parent.parent
PCI = Path("/sys/bus/pci/devices")

#: What a pidfd looks like in /proc/PID/fd; the daemon holds one per client session.
PIDFD = "anon_inode:[pidfd]"
USER = 1000  # allowed by the config
STRANGER = 1001  # in no rule
QUOTA_BYTES = 4 << 20

#: Drivers as the lab guest boots them; every test must leave them so.
BOOT_DRIVERS = {EDU0: None, EDU1: None, EDU2: None, NIC: "e1000"}

CONFIG = """\
[daemon]
socket = "{dir}/iommud.sock"
state_dir = "{dir}/state"

[manage]
rebind = ["{edu0}", "{edu1}", "{edu2}", "{nic}"]

[[access]]
uid = {user}
devices = ["1234:11e8"]   # QEMU's edu
quota = "e2e"

[quotas.e2e]
pinned_bytes = {quota}
max_ioas = 4
max_mappings = 16
"""


def driver_of(bdf: str) -> str | None:
    """The device's driver now, or None (no check-then-read: the daemon may be rebinding)."""
    try:
        return os.path.basename(os.readlink(PCI / bdf / "driver"))
    except FileNotFoundError:
        return None


def drivers_now() -> dict[str, str | None]:
    return {bdf: driver_of(bdf) for bdf in BOOT_DRIVERS}


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> float | None:
    """Poll ``pred``; the seconds it took to become true, or None on timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


STARTUP_GUARD = 240.0
"""Seconds a lab daemon may take to answer before the harness calls it dead."""


class Daemon:
    """The real iommud as a root subprocess, logging (JSON) into ``log_path``."""

    def __init__(self, workdir: Path, config: str = CONFIG, **fields: object) -> None:
        """``config`` is a template filled with the lab's BDFs, ``dir`` and ``fields``."""
        self.dir = workdir
        self.socket = str(workdir / "iommud.sock")
        self.config = workdir / "iommud.toml"
        self.log_path = workdir / "iommud.log"
        self.config.write_text(
            config.format(
                dir=workdir,
                edu0=EDU0,
                edu1=EDU1,
                edu2=EDU2,
                nic=NIC,
                user=USER,
                quota=QUOTA_BYTES,
                **fields,
            )
        )
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iommud", "--config", str(self.config), "--socket-mode", "0666"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # A hang guard, not a bound: under TCG on a loaded 2-core host the daemon's
        # start (Python imports in the emulated guest) was seen to take over 60 s.
        took = wait_until(self._answers, timeout=STARTUP_GUARD, step=0.05)
        if took is None:
            self.stop()
            raise AssertionError(f"the daemon did not come up:\n{self.log_tail()}")
        self.startup_seconds = took
        #: The daemon's open fds once it serves, before any scenario.
        self.baseline_fds = self.settled_fds()

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({self.proc.returncode}):\n{self.log_tail()}")
        try:
            with Client(self.socket, "e2e-root-probe", timeout=5.0) as c:
                c.ping()
        except OSError:
            return False
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> list[str]:
        """What the daemon's open fds point to (readlink of /proc/PID/fd/*)."""
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except FileNotFoundError:
                continue
        return sorted(out)

    def settled_fds(self, quiet: float = 0.2, timeout: float = 15.0) -> list[str]:
        """``fds()`` once no client session is left (each holds its peer's pidfd) and it
        stopped changing for ``quiet`` seconds: a client that just closed its connection
        is only noticed by the daemon a moment later (seconds, on a loaded machine: a
        start-up probe's session was once taken into the baseline)."""
        deadline = time.monotonic() + timeout
        last = self.fds()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.fds()
            if now == last and PIDFD not in now:
                return now
            last = now
        return last

    def maps(self) -> str:
        return Path(f"/proc/{self.pid}/maps").read_text()

    def status(self) -> dict[str, Any]:
        with Client(self.socket, "e2e-root", timeout=10.0) as c:
            return c.status().model_dump(mode="json")

    def log_tail(self, lines: int = 80) -> str:
        if not self._log.closed:  # stop() closes it: a failed start still shows its log
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The daemon's JSON log records with this event name."""
        self._log.flush()
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                records.append(record)
        return records

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def client_command() -> tuple[list[str], dict[str, str]]:
    """How to run Python as an unprivileged user: argv prefix and environment.

    The project's venv interpreter may live under a root-only directory (here
    /root/.pyenv, mode 0700), which uid 1000 cannot execute. The system Python of the
    same minor version can, with the venv's site-packages, the repo and lab/ on its path
    (compiled wheels are per minor version, so cp311 ones work in any 3.11).
    """
    env = dict(os.environ)
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        return [sys.executable], env
    paths = [str(REPO), str(REPO / "lab"), *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["HOME"] = "/"
    return [str(system), "-s"], env


class ClientProc:
    """client_script.py as ``uid``/``gid`` with no supplementary groups."""

    def __init__(
        self, socket: str, uid: int = USER, gid: int | None = None, script: Path = CLIENT_SCRIPT
    ) -> None:
        self.uid = uid
        argv, env = client_command()
        self.proc = subprocess.Popen(
            [*argv, str(script), socket],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            user=uid,
            group=uid if gid is None else gid,
            extra_groups=[],
            cwd="/",
        )
        hello = self._read()
        assert hello.get("ready"), hello
        self.pid: int = hello["pid"]
        assert self.pid == self.proc.pid

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5.0)
            assert self.proc.stderr is not None
            raise AssertionError(
                f"client (uid {self.uid}) exited {self.proc.returncode}:\n{self.proc.stderr.read()}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, cmd: str, **args: Any) -> None:
        """Send one command without waiting for its answer (read it with ``answer``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        return self._read()

    def do(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command; its answer (``ok`` False for a daemon error)."""
        self.send(cmd, **args)
        return self._read()

    def ok(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command that must succeed."""
        answer = self.do(cmd, **args)
        assert answer["ok"], f"{cmd} {args} -> {answer}"
        return answer

    def error(self, cmd: str, **args: Any) -> tuple[str, dict[str, Any]]:
        """Send one command that must fail; its (code, details)."""
        answer = self.do(cmd, **args)
        assert not answer["ok"], f"{cmd} {args} unexpectedly succeeded: {answer}"
        return answer["code"], answer["details"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError, ValueError):
                self.do("exit")
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Timings:
    """Numbers worth reporting: printed past pytest's capture into the guest output."""

    def __init__(self, capsys: pytest.CaptureFixture[str], test: str) -> None:
        self._capsys = capsys
        self._test = test

    def __call__(self, what: str, seconds: float) -> None:
        with self._capsys.disabled():
            print(f"\nE2E-TIMING {self._test} {what}: {seconds * 1e3:.1f} ms", flush=True)
