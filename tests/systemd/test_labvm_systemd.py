"""labvm's opt-in systemd boot on the host, without QEMU: argv, env, the getty drop-in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import labvm
import pytest

VNG_DROP_IN = """[Service]
StandardInput=tty
StandardOutput=tty
TTYPath=/dev/%I
TTYReset=yes
Environment=virtme_console=ttyS0
ExecStart=
ExecStart=/venv/virtme/guest/bin/virtme-ng-init"""


def _run(tmp_path: Path, *, systemd: bool) -> labvm.LabRun:
    return labvm.LabRun(
        workdir=tmp_path, kernel=tmp_path / "bzImage", cwd=tmp_path, systemd=systemd
    )


def test_default_boot_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labvm, "find_vng", lambda: Path("/venv/bin/vng"))
    monkeypatch.setenv("HOME", "/root")
    run = _run(tmp_path, systemd=False)
    assert "--systemd" not in run.vng_argv(exec_script=None)
    assert run.vng_env()["HOME"] == "/root"


def test_systemd_boot_adds_the_flag_and_a_home_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(labvm, "find_vng", lambda: Path("/venv/bin/vng"))
    run = _run(tmp_path, systemd=True)
    argv = run.vng_argv(exec_script=tmp_path / "guest.sh")
    assert argv.count("--systemd") == 1
    assert argv[-1] == f"--exec={tmp_path / 'guest.sh'}"
    assert run.vng_env()["HOME"] == str(tmp_path / labvm.VNG_HOME)


def test_qemu_wrapper_mirrors_the_getty_drop_in_before_qemu_runs(tmp_path: Path) -> None:
    """vng wrote its serial-getty drop-in before starting QEMU: the wrapper vng runs as
    QEMU copies it for console-getty on ttyS0 and only then execs QEMU (no race)."""
    run = _run(tmp_path, systemd=True)
    guest = tmp_path / labvm.VNG_HOME / ".cache" / "virtme-ng" / "guest" / "run-abc"
    src = guest / "serial-getty@.service.d" / "virtme-ng.conf"
    src.parent.mkdir(parents=True)
    src.write_text(VNG_DROP_IN)
    qemu = tmp_path / "qemu"
    dst = guest / "console-getty.service.d" / "virtme-ng.conf"
    # The fake QEMU proves the copy was complete when it started.
    qemu.write_text(f'#!/bin/sh\ncat "{dst}" >"{tmp_path}/seen"\necho "$@"\n')
    qemu.chmod(0o755)
    wrapper = run.write_qemu_wrapper(str(qemu))
    assert f"--qemu={wrapper}" in run.vng_argv(exec_script=None)
    out = subprocess.run([wrapper, "-m", "2G"], capture_output=True, text=True, check=True)
    assert out.stdout == "-m 2G\n"
    mirrored = VNG_DROP_IN.replace("TTYPath=/dev/%I", "TTYPath=/dev/ttyS0")
    assert dst.read_text() == mirrored
    assert (tmp_path / "seen").read_text() == mirrored
    # Probes (qemu --version) before vng wrote anything, and later runs, are harmless.
    subprocess.run([wrapper, "--version"], capture_output=True, check=True)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["virtme-ng.conf"]
