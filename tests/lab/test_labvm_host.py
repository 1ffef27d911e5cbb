"""The lab runner (labvm) on the host, driven through a fake vng (see conftest.py)."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import labvm
import pytest
import topology

from tests.fakesys import lab_topology


def calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_status_output_env_and_cwd(fake_vng: Path, tmp_path: Path) -> None:
    """stderr is folded into stdout, markers are stripped, cwd and the guest env are set."""
    result = labvm.run_command(
        ["sh", "-c", 'echo out; echo err >&2; pwd; echo "g=$IOMMUD_LAB_GUEST"; exit 3'],
        cwd=tmp_path,
        timeout=30,
    )
    assert result.status == 3
    assert result.output == f"out\nerr\n{tmp_path}\ng=1\n"
    assert result.vng_returncode == 3
    assert not result.timed_out
    assert result.boot_seconds is not None
    assert result.console == "fake console: Linux version 6.12 booting\n"
    assert result.qemu_problems == []
    assert not result.ok


def test_vng_argv_has_topology_qmp_and_shared_dir(fake_vng: Path, tmp_path: Path) -> None:
    result = labvm.run_command(["true"], cwd=tmp_path, timeout=30)
    assert result.status == 0
    assert result.ok
    (call,) = calls(fake_vng)
    argv = call["argv"]
    assert isinstance(argv, list)
    for flag in ("--disable-kvm", "--disable-microvm", "--force-9p", "--verbose"):
        assert flag in argv
    rwdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--rwdir="))
    qemu_opts = next(a.split("=", 1)[1] for a in argv if a.startswith("--qemu-opts="))
    assert f"-qmp unix:{rwdir}/qmp.sock,server=on,wait=off" in qemu_opts
    assert "-device intel-iommu,intremap=on,id=iommu0" in qemu_opts
    assert "-device edu,bus=rp1,id=hotedu" in qemu_opts
    assert f"--cwd={tmp_path}" in argv
    assert not Path(rwdir).exists()  # the per-run dir is removed afterwards


def test_exit_marker_wins_over_vng_exit_code(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vng's own exit code is not trusted: the guest's exit-status marker line is."""
    monkeypatch.setenv("FAKE_VNG", "rc-lies")
    result = labvm.run_command(["sh", "-c", "exit 5"], timeout=30)
    assert (result.vng_returncode, result.status) == (0, 5)


def test_qemu_crash_is_surfaced(fake_vng: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VNG", "crash")
    result = labvm.run_command(["true"], timeout=30)
    assert result.status is None
    assert result.vng_returncode == 134
    assert result.output == "partial output\n"
    assert result.qemu_problems == [
        "qemu-system-x86_64: hardware error: EDU: DMA range 0x40000-0x40fff out of bounds"
    ]
    text = result.describe_failure()
    assert text.startswith(
        "lab guest died before the command finished (vng exit code 134; no exit-status marker)"
    )
    assert "QEMU said:\n  qemu-system-x86_64: hardware error: EDU" in text
    assert "partial output" in text


def test_boot_panic_is_retried_once_then_surfaced(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that dies before the command starts is booted again, once."""
    monkeypatch.setenv("FAKE_VNG", "panic")
    result = labvm.run_command(["true"], timeout=30)
    assert len(calls(fake_vng)) == 2
    assert result.status is None
    assert len(result.failed_boots) == 1
    panic = "Kernel panic - not syncing: timer doesn't work through Interrupt-remapped IO-APIC"
    assert result.kernel_problems == [panic]
    assert f"guest kernel said:\n  {panic}" in result.describe_failure()


def test_one_boot_panic_then_success(fake_vng: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VNG", "panic-once")
    result = labvm.run_command(["sh", "-c", "echo ran"], timeout=30)
    assert (result.status, result.output) == (0, "ran\n")
    assert len(calls(fake_vng)) == 2
    assert "Kernel panic" in result.failed_boots[0]
    assert result.kernel_problems == []


def test_timeout_kills_the_guest(fake_vng: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VNG", "hang")
    started = time.monotonic()
    result = labvm.run_command(["true"], timeout=1.0)
    assert time.monotonic() - started < 10
    assert result.timed_out
    assert result.status is None
    assert result.describe_failure().startswith("lab guest timed out after 1s")
    (call,) = calls(fake_vng)
    pid = call["pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_stall_watchdog_stops_a_guest_that_stopped_making_progress(
    fake_vng: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No output for stall_timeout seconds stops the run long before its overall timeout;
    kernel console lines (a chatty guest) are not progress."""
    monkeypatch.setenv("FAKE_VNG", "chatty")
    started = time.monotonic()
    with labvm.prepared() as run:
        result = labvm.execute(
            run, ["sh", "-c", "echo started; exec sleep 600"], timeout=300, stall_timeout=1.5
        )
    assert time.monotonic() - started < 60
    assert result.timed_out
    assert result.status is None
    assert result.output == "started\n"
    assert "random: crng tick" in result.console
    assert result.stalled_seconds is not None
    assert result.stalled_seconds >= 1.5
    text = result.describe_failure()
    assert text.startswith("lab guest stopped: no progress for ")
    assert "started" in text
    (call,) = calls(fake_vng)
    pid = call["pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("via", ["output", "progress file"])
def test_a_slow_guest_that_keeps_progressing_is_not_stopped(fake_vng: Path, via: str) -> None:
    """A run far longer than the stall window finishes, as long as something moves: a line
    of output, or the progress file growing (the vm batch's per-test report)."""
    step = "echo tick" if via == "output" else 'echo tick >>"$IOMMUD_LAB_DIR/progress"'
    command = f"for i in $(seq 40); do {step}; sleep 0.1; done; echo done"
    with labvm.prepared() as run:
        result = labvm.execute(
            run,
            ["sh", "-c", command],
            timeout=300,
            stall_timeout=2.0,
            progress_file=run.workdir / "progress",
        )
    assert result.status == 0, result.describe_failure()
    assert not result.timed_out
    assert result.stalled_seconds is None
    assert result.total_seconds > 2.0  # it outlived the stall window
    assert result.output.endswith("done\n")


def test_missing_kernel_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IOMMUD_LAB_KERNEL", str(tmp_path / "nope"))
    with pytest.raises(labvm.LabUnavailableError) as err:
        labvm.find_kernel()
    assert str(err.value) == f"guest kernel not built ({tmp_path}/nope): run lab/build-kernel"


def test_topology_qemu_ids_match_the_named_devices() -> None:
    """Every QEMU device id in the options has a BDF in topology.QEMU_IDS, and back."""
    opts = topology.QEMU_OPTIONS
    ids = {
        part.removeprefix("id=")
        for flag, value in itertools.pairwise(opts)
        if flag == "-device"
        for part in value.split(",")
        if part.startswith("id=")
    }
    assert ids == {"iommu0", *topology.QEMU_IDS.values()}
    assert "edu,addr=0x10,id=edu0" in opts  # 00:10.0 on the root complex
    assert f"edu,bus={topology.BRIDGE_BUS},addr=0x1,id=edu1" in opts  # 01:01.0
    assert not topology.NEVER_TOUCH & {*topology.QEMU_IDS, topology.BRIDGE_FREE_SLOT}


def test_fake_lab_tree_has_the_lab_groups(tmp_path: Path) -> None:
    """tests/fakesys.lab_topology builds the lab's groups from the same BDFs."""
    fs = lab_topology(tmp_path)

    def members(bdf: str) -> set[str]:
        link = fs.sys_root / "bus" / "pci" / "devices" / bdf / "iommu_group"
        return set(os.listdir(link.resolve() / "devices"))

    assert members(topology.EDU0) == {topology.EDU0}
    assert members(topology.EDU1) == topology.BRIDGE_GROUP
    assert os.readlink(fs.sys_root / "bus/pci/devices" / topology.NIC / "driver").endswith("e1000")
