"""labvm's opt-in systemd boot on the host, without QEMU: argv, env, the getty drop-in."""

from __future__ import annotations

import threading
import time
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


def test_getty_drop_in_is_mirrored_onto_console_getty(tmp_path: Path) -> None:
    """vng's serial-getty drop-in, once complete, is copied for console-getty on ttyS0."""
    guest = tmp_path / ".cache" / "virtme-ng" / "guest" / "run-abc"
    stop = threading.Event()
    mirror = threading.Thread(target=labvm._mirror_getty_drop_in, args=(tmp_path, stop))
    mirror.start()
    try:
        src = guest / "serial-getty@.service.d" / "virtme-ng.conf"
        src.parent.mkdir(parents=True)
        src.write_text("[Service]\nStandardInput=tty\n")  # vng still writing: not copied
        time.sleep(0.2)
        dst = guest / "console-getty.service.d" / "virtme-ng.conf"
        assert not dst.exists()
        src.write_text(VNG_DROP_IN)
        deadline = time.monotonic() + 5
        while not dst.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        mirror.join(5)
    assert not mirror.is_alive()
    assert dst.read_text() == VNG_DROP_IN.replace("TTYPath=/dev/%I", "TTYPath=/dev/ttyS0")
