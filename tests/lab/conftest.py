"""Fixtures for testing the lab runner on the host without QEMU: a fake `vng`.

The fake vng takes the same argv as the real one, prints a pretend console on stderr and
runs the --exec script on the host with sh, so the runner's script, markers, env, cwd,
timeouts and the pytest plugin's report pipeline all run for real. $FAKE_VNG picks a
behaviour: "run" (default), "rc-lies" (runs the script, then exits 0 whatever happened),
"crash" (QEMU dies with a hardware error mid-command), "hang" (never finishes),
"panic" (the kernel panics while booting), "panic-once" (only on the first boot),
"chatty" (runs the script while the console prints a kernel line every 0.1 s).
Each call writes its argv (JSON) and pid to $FAKE_VNG_LOG if set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import labvm
import pytest
import pytest_labvm

FAKE_VNG = """\
import json, os, subprocess, sys, threading, time
args = sys.argv[1:]
log = os.environ.get("FAKE_VNG_LOG")
if log:
    with open(log, "a") as f:
        f.write(json.dumps({"argv": args, "pid": os.getpid()}) + "\\n")
script = next(a.split("=", 1)[1] for a in args if a.startswith("--exec="))
mode = os.environ.get("FAKE_VNG", "run")
print("fake console: Linux version 6.12 booting", file=sys.stderr, flush=True)
if mode == "hang":
    time.sleep(600)
calls = len(open(log).read().splitlines()) if log else 1
if mode == "panic" or (mode == "panic-once" and calls == 1):
    print("Kernel panic - not syncing: timer doesn't work through Interrupt-remapped IO-APIC",
          file=sys.stderr, flush=True)
    sys.exit(255)
if mode == "crash":
    print("IOMMUD-LAB-START", flush=True)
    print("partial output", flush=True)
    print("qemu-system-x86_64: hardware error: EDU: DMA range 0x40000-0x40fff out of bounds",
          file=sys.stderr, flush=True)
    sys.exit(134)
if mode == "chatty":
    def chatter():
        while True:
            print("fake console: [ 12.3] random: crng tick", file=sys.stderr, flush=True)
            time.sleep(0.1)
    threading.Thread(target=chatter, daemon=True).start()
rc = subprocess.call(["sh", script])
sys.exit(0 if mode == "rc-lies" else rc)
"""


@pytest.fixture
def fake_vng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point labvm at a fake vng and a dummy kernel; return the fake's argv/pid log path."""
    vng = tmp_path / "vng"
    vng.write_text(f"#!{sys.executable}\n{FAKE_VNG}")
    vng.chmod(0o755)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not a kernel")
    log = tmp_path / "vng-calls.jsonl"
    monkeypatch.setattr(labvm, "find_vng", lambda: vng)
    monkeypatch.setattr(labvm, "find_qemu", lambda: Path("/bin/true"))
    monkeypatch.setenv("IOMMUD_LAB_KERNEL", str(kernel))
    monkeypatch.setenv("FAKE_VNG_LOG", str(log))
    monkeypatch.delenv("FAKE_VNG", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("IOMMUD_REQUIRE_LAB", raising=False)
    # The batch's bounds come from the option defaults: a developer's (or CI's) own
    # settings must not leak into the pytester sessions that test them.
    for var in (pytest_labvm.ENV_STALL, pytest_labvm.ENV_TIMEOUT, "PYTEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    return log
