"""``iommuctl vm`` and ``vm-attach`` as commands: help, exit codes, refusals.

(The launcher itself is tested in tests/vmm/.)

Bad input is refused before the daemon is asked (so these run without one); a daemon
refusal (no delegate right, as uid 1000) is a typed error and exit 1; the VMM's own exit
status comes back through ``run``. The daemon is tests/cli/support.py's (a thread, fake
kernel, socket 0666); the VMM is tests/vmm/fake_vmm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from topology import EDU0

from iommud.cli import build_parser
from iommud.config import AccessRule
from tests.cli.support import Daemon, ctl, spawn
from tests.e2e.support import client_command
from tests.vmm import support as fake_vmm
from tests.vmm.support import IOMMUFD_OBJECT, fake_argv, vfio

VM = [*IOMMUFD_OBJECT, *vfio(EDU0)]


@pytest.fixture
def user_daemon(sockdir: Path) -> Iterator[Daemon]:
    """uid 1000 may claim the edus, brokered only (no ``delegate = true``)."""
    d = Daemon(sockdir, access=(AccessRule(uid=1000, devices=("1234:11e8",)),))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_help_documents_the_launcher_and_the_memlock_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["vm", "--help"])
    text = capsys.readouterr().out
    for needle in ("{iommufd}", "{BDF}", "--hold", "device_del", "vm-attach", "LimitMEMLOCK=",
                   "prlimit --memlock", "CAP_IPC_LOCK", "PR_SET_PDEATHSIG", "127"):  # fmt: skip
        assert needle in text, needle


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--device", EDU0, "--", *fake_argv("-device", "v,fd={nope}")], 64,
         "unknown placeholder {nope}"),
        (["--", *fake_argv(*VM)], 64,
         "placeholder {0000:00:10.0} names 0000:00:10.0, which is not claimed"),
        (["--device", EDU0, "--", "no-such-vmm-here", *VM], 127,
         "no-such-vmm-here: VMM not found"),
        (["--device", EDU0, "--", str(fake_vmm.FAKE_VMM), *VM], 126, "/"),
        (["--device", EDU0, "--no-qmp", "--control", "/tmp/x", "--", *fake_argv(*VM)], 64,
         "--control needs"),
        (["--device", EDU0], 64, "no VMM command"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_the_daemon_is_asked(
    tmp_path: Path, argv: list[str], code: int, message: str
) -> None:
    """No daemon at all: the refusal is the command line's, not 'unreachable'."""
    got = ctl("--socket", str(tmp_path / "none"), "vm", *argv)
    assert (got.code, got.out) == (code, "")
    assert got.err.startswith(f"iommuctl: vm: {message}"), got.err
    if code == 126:  # the fake VMM's script itself: a file without the x bit
        assert got.err.endswith("fake_vmm.py: not executable\n"), got.err


def test_no_daemon_is_exit_2(tmp_path: Path) -> None:
    got = ctl("--socket", str(tmp_path / "none"), "vm", "--device", EDU0, "--", *fake_argv(*VM))
    assert got.code == 2
    assert "daemon not running" in got.err
    got = ctl("vm-attach", "--control", str(tmp_path / "none"), "--device", EDU0)
    assert got.code == 2
    assert "no launcher at" in got.err


def test_the_vmm_exit_status_is_iommuctl_s(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMM exiting 5 at start: iommuctl vm exits 5, the lease is given back."""
    monkeypatch.setenv("FAKE_VMM_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("FAKE_VMM_EXIT", "5")
    got = ctl("--socket", daemon.socket, "vm", "--json", "--device", EDU0, "--", *fake_argv(*VM))
    assert got.code == 5, got.err
    assert '"event": "vm.failed"' in got.out
    assert '"event": "vm.released"' in got.out


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the launcher as uid 1000")
def test_a_user_without_the_delegate_right_is_refused(user_daemon: Daemon) -> None:
    """uid 1000 with a brokered-only rule: permission_denied, delegate_not_allowed, exit 1."""
    argv, env = client_command()
    # The VMM never starts (the claim is refused first); it must only be executable by
    # uid 1000, which the venv's interpreter under /root is not.
    cmd = [*argv, "-m", "iommud.cli", "--socket", user_daemon.socket, "vm",
           "--device", EDU0, "--", argv[0], *VM]  # fmt: skip
    env["FAKE_VMM_LOG"] = "/dev/null"
    out = subprocess.run(
        cmd, env=env, user=1000, group=1000, extra_groups=[], capture_output=True, text=True,
        timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("iommuctl: permission_denied: "), out.stderr
    assert '  reason: "delegate_not_allowed"' in out.stderr


def _started(proc: subprocess.Popen[str]) -> dict[str, object]:
    """Read ``iommuctl vm --json`` records until vm.started (a hang guard via the timeout)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        record = json.loads(line)
        if record["event"] == "vm.started":
            return dict(record)
    raise AssertionError(f"no vm.started: {proc.wait(30)}")


@pytest.mark.parametrize("ending", ["sigterm", "daemon_stops"])
def test_a_real_iommuctl_vm_process_ends_its_vmm(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """SIGTERM to iommuctl vm: the VMM gets SIGTERM (status 143 passed on). The daemon
    going away: the leases are gone, so the VMM is stopped and iommuctl exits 2."""
    monkeypatch.setenv("FAKE_VMM_LOG", str(tmp_path / "log"))
    proc = spawn("--socket", daemon.socket, "vm", "--json", "--device", EDU0, "--",
                 *fake_argv(*VM))  # fmt: skip
    try:
        pid = int(str(_started(proc)["pid"]))
        if ending == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 128 + signal.SIGTERM
        else:
            daemon.stop()
            assert proc.wait(60) == 2
        assert not os.path.exists(f"/proc/{pid}")  # reaped by the launcher
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.communicate()
