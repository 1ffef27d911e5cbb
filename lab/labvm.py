"""Boot the lab guest (a Linux with a virtual Intel IOMMU under QEMU/TCG) and run one command.

The guest is booted with virtme-ng (`vng`): the host's root filesystem is the guest's root
(read-only, with throw-away overlays on /etc, /tmp, /var ...), so the repo and its
virtualenv run inside unchanged, at the same path and cwd, as root. Each run gets a fresh
host temp dir that the guest mounts read-write at the same path (9p): results go there,
and the QMP agent (`qmp_agent`) serves the guest's monitor requests through it.

The guest command's stderr is folded into its stdout inside the guest, and the guest script
prints explicit start and exit-status marker lines, which this module parses: vng's own
exit code is only a fallback. QEMU's own complaints (hardware error, abort) come on vng's
stderr together with the guest console; they are kept and surfaced, never swallowed.

This module does not build the kernel (lab/build-kernel does) and does not know pytest
(pytest_labvm does). It must not touch anything on the host outside its temp dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import topology
from qmp_agent import QmpAgent

LAB_DIR = Path(__file__).resolve().parent
REPO_ROOT = LAB_DIR.parent

START_MARKER = "IOMMUD-LAB-START"
EXIT_MARKER = "IOMMUD-LAB-EXIT="

#: Environment variables the runner sets inside the guest.
ENV_GUEST = "IOMMUD_LAB_GUEST"  # "1" inside the guest
ENV_DIR = "IOMMUD_LAB_DIR"  # the per-run read-write dir shared with the host
ENV_QMP_DIR = "IOMMUD_LAB_QMP_DIR"  # where qmp_guest drops its requests

DEFAULT_TIMEOUT = 600.0
#: How often the runner looks at a run's progress (stall watchdog, ``execute``).
PROGRESS_POLL = 2.0

# The guest's devices come from topology.QEMU_OPTIONS (lab/topology.py).

# vng mounts the host root over 9p without caching: every stat and read is a round trip
# through emulated virtio. The root is read-only and a guest lives for one run, so a loose
# cache is safe and halves the guest's pytest time (27 s -> 12 s measured). vng appends
# our --append after its own rootflags=, and the kernel keeps the last one. The shared
# read-write dir is a separate 9p mount and stays uncached (the QMP files need that).
ROOTFLAGS = "rootflags=version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose"

# Under TCG on a busy host the kernel's IO-APIC timer check can miss its window and panic
# ("timer doesn't work through Interrupt-remapped IO-APIC", seen 1 boot in ~10 here);
# the check is meaningless for an emulated timer (arch/x86/kernel/apic/io_apic.c).
NO_TIMER_CHECK = "no_timer_check"

# With --systemd, vng runs the command from serial-getty@ttyS0: it writes a drop-in for
# serial-getty@.service (agetty replaced by its own init) into a fresh dir under
# $HOME/.cache/virtme-ng/guest/ and points the guest's SYSTEMD_UNIT_PATH at it. The
# guest's root is this host's, and a host with /.dockerenv makes the guest's systemd
# believe it runs in a Docker container (src/basic/virt.c, detect_container_files): then
# systemd-getty-generator starts console-getty.service instead, the command never runs
# (a login prompt appears, seen), and the kernel command line is ignored (systemd reads
# PID 1's argv in a container), so no systemd.wants=/mask= can fix it. The runner gives
# vng a HOME of its own and a QEMU of its own: a wrapper (``LabRun.write_qemu_wrapper``)
# that copies vng's drop-in for console-getty.service and then execs QEMU. vng writes
# the drop-in before it starts QEMU (virtme/commands/run.py), so the copy is there before
# the guest exists: no race with the guest's systemd reading its units.
VNG_HOME = "vng-home"
_GETTY_DROP_IN = Path("serial-getty@.service.d") / "virtme-ng.conf"
_CONSOLE_DROP_IN = Path("console-getty.service.d") / "virtme-ng.conf"
QEMU_WRAPPER = "qemu-systemd"


_KERNEL_PANIC = re.compile(r"^.*(?:Kernel panic - .*|BUG: .*|Oops: .*)$", re.MULTILINE)
_QEMU_PROBLEM = re.compile(
    r"^(qemu-system-\w+: .*|.*hardware error.*|.*Aborted.*|.*core dumped.*)$", re.MULTILINE
)


class LabUnavailableError(Exception):
    """The lab cannot run on this machine (no QEMU, no vng, kernel image not built)."""


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What one guest boot produced."""

    #: The guest command's exit status from the marker line; None if it never finished.
    status: int | None
    #: The guest command's stdout+stderr, marker lines removed.
    output: str
    #: vng's stderr: the guest console (kernel log) and QEMU's own messages.
    console: str
    #: vng's exit code (-N for a signal); informative only.
    vng_returncode: int | None
    timed_out: bool
    #: Seconds from start to the guest script starting (None if it never did), and in total.
    boot_seconds: float | None
    total_seconds: float
    #: The vng argv that ran (`vng --dry-run` shows the QEMU command line it composes).
    argv: tuple[str, ...]
    #: Consoles of earlier boots that died before the command started (retried).
    failed_boots: tuple[str, ...] = ()
    #: Set when the stall watchdog stopped the run (``timed_out`` is then True too): the
    #: seconds it had gone without progress.
    stalled_seconds: float | None = None

    @property
    def qemu_problems(self) -> list[str]:
        """QEMU's own error lines (hardware error, abort, qemu-system-x86_64: ...)."""
        return _QEMU_PROBLEM.findall(self.console)

    @property
    def kernel_problems(self) -> list[str]:
        """The guest kernel's panic / BUG / Oops lines from the console."""
        return _KERNEL_PANIC.findall(self.console)

    @property
    def ok(self) -> bool:
        return self.status == 0

    def describe_failure(self, console_lines: int = 60) -> str:
        """A human explanation for a run that did not finish with status 0."""
        if self.stalled_seconds is not None:
            head = (
                f"lab guest stopped: no progress for {self.stalled_seconds:.0f}s "
                f"(after {self.total_seconds:.0f}s in all)"
            )
        elif self.timed_out:
            head = f"lab guest timed out after {self.total_seconds:.0f}s"
        elif self.status is None:
            head = (
                "lab guest died before the command finished "
                f"(vng exit code {self.vng_returncode}; no exit-status marker)"
            )
        else:
            head = f"guest command exited with status {self.status}"
        parts = [head]
        problems = self.qemu_problems
        if problems:
            parts.append("QEMU said:\n  " + "\n  ".join(problems))
        panics = self.kernel_problems
        if panics:
            parts.append("guest kernel said:\n  " + "\n  ".join(panics))
        if self.status is None or self.timed_out:
            tail = "\n".join(self.console.splitlines()[-console_lines:])
            parts.append(f"last {console_lines} console lines:\n{tail}")
            parts.append(f"guest output:\n{self.output[-4000:]}")
        return "\n".join(parts)


# --------------------------------------------------------------------------- discovery


def venv_bin() -> Path | None:
    """The project's virtualenv bin dir: this interpreter's if it runs in one, else .venv."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.executable).parent
    repo_venv = REPO_ROOT / ".venv" / "bin"
    return repo_venv if repo_venv.is_dir() else None


def find_vng() -> Path:
    """The vng executable: in the project's virtualenv, else on PATH."""
    bin_dir = venv_bin()
    if bin_dir is not None and (bin_dir / "vng").exists():
        return bin_dir / "vng"
    found = shutil.which("vng")
    if found is None:
        raise LabUnavailableError("vng (virtme-ng) not found: pip install -e '.[lab]'")
    return Path(found)


def find_qemu() -> Path:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise LabUnavailableError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    return Path(found)


def find_kernel() -> Path:
    """The cached guest kernel image ($IOMMUD_LAB_KERNEL, else `lab/build-kernel --path`)."""
    override = os.environ.get("IOMMUD_LAB_KERNEL")
    if override:
        path = Path(override)
    else:
        proc = subprocess.run(
            [str(LAB_DIR / "build-kernel"), "--path"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise LabUnavailableError(
                f"lab/build-kernel --path failed: {proc.stderr.strip() or proc.returncode}"
            )
        path = Path(proc.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise LabUnavailableError(f"guest kernel not built ({path}): run lab/build-kernel")
    return path


def check_available() -> Path:
    """Raise LabUnavailableError unless QEMU, vng and the kernel are present; return the kernel."""
    find_qemu()
    find_vng()
    return find_kernel()


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class LabRun:
    """One prepared guest boot: its shared dir, and the env and argv it will use."""

    workdir: Path
    kernel: Path
    cwd: Path
    memory: str = "2G"
    cpus: int = 2
    extra_qemu: tuple[str, ...] = ()
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)
    kernel_append: tuple[str, ...] = (ROOTFLAGS, NO_TIMER_CHECK)
    #: Boot with systemd as PID 1 (vng --systemd) instead of virtme-ng's own init. The
    #: command then runs from a getty unit (see VNG_HOME), where virtme-ng-init still puts
    #: the writable overlays on /etc, /var and /tmp. Booting takes 30-130 s, not 10.
    systemd: bool = False

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def qmp_dir(self) -> Path:
        return self.workdir / "qmp"

    def guest_env(self) -> dict[str, str]:
        env = {
            ENV_GUEST: "1",
            ENV_DIR: str(self.workdir),
            ENV_QMP_DIR: str(self.qmp_dir),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": os.pathsep.join([str(LAB_DIR), str(REPO_ROOT)]),
        }
        env.update(self.extra_env)
        return env

    def env_exports(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.guest_env().items()]
        bin_dir = venv_bin()
        if bin_dir is not None:
            lines.append(f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"')
        return "\n".join(lines)

    def write_exec_script(self, argv: Sequence[str]) -> Path:
        """The script the guest runs: markers, env, cwd, stderr folded into stdout."""
        script = self.workdir / "guest.sh"
        script.write_text(
            "#!/bin/sh\n"
            f"echo {START_MARKER}\n"
            f"{self.env_exports()}\n"
            f"cd {shlex.quote(str(self.cwd))} || exit 125\n"
            f"{shlex.join(argv)} 2>&1\n"
            "status=$?\n"
            f'echo "{EXIT_MARKER}$status"\n'
            'exit "$status"\n'
        )
        script.chmod(0o755)
        return script

    def write_qemu_wrapper(self, qemu: str | None = None) -> Path:
        """The QEMU that vng runs for a systemd boot: mirror the getty drop-in, exec QEMU.

        ``qemu`` defaults to the qemu-system-x86_64 on vng's PATH."""
        real = qemu or shutil.which("qemu-system-x86_64", path=self.vng_env()["PATH"])
        if real is None:
            raise LabUnavailableError("qemu-system-x86_64 is not installed")
        guests = shlex.quote(str(self.workdir / VNG_HOME / ".cache" / "virtme-ng" / "guest"))
        wrapper = self.workdir / QEMU_WRAPPER
        wrapper.write_text(
            "#!/bin/sh\n"
            "# lab/labvm.py: copy vng's serial-getty drop-in for console-getty (see VNG_HOME).\n"
            f"for src in {guests}/run-*/{_GETTY_DROP_IN}; do\n"
            '  [ -f "$src" ] || continue\n'
            f'  dst="${{src%/{_GETTY_DROP_IN}}}/{_CONSOLE_DROP_IN}"\n'
            '  [ -f "$dst" ] && continue\n'
            '  mkdir -p "${dst%/*}"\n'
            '  sed \'s|TTYPath=/dev/%I|TTYPath=/dev/ttyS0|\' "$src" >"$dst.tmp"\n'
            '  mv "$dst.tmp" "$dst"\n'
            "done\n"
            f'exec {shlex.quote(real)} "$@"\n'
        )
        wrapper.chmod(0o755)
        return wrapper

    def write_shell_script(self) -> Path:
        """A login shell for `lab/run --shell` with the same env as an exec run."""
        script = self.workdir / "shell.sh"
        script.write_text(
            "#!/bin/sh\n"
            f"{self.env_exports()}\n"
            f"cd {shlex.quote(str(self.cwd))}\n"
            'exec /bin/bash -i "$@"\n'
        )
        script.chmod(0o755)
        return script

    def vng_argv(self, *, exec_script: Path | None, shell: Path | None = None) -> list[str]:
        qemu_opts = (
            *topology.QEMU_OPTIONS,
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            *self.extra_qemu,
        )
        argv = [
            str(find_vng()),
            "--run",
            str(self.kernel),
            "--disable-kvm",
            "--disable-microvm",
            # 9p straight away: vng otherwise spends seconds failing to start virtiofsd.
            "--force-9p",
            "--memory",
            self.memory,
            "--cpus",
            str(self.cpus),
            "--verbose",
            f"--rwdir={self.workdir}",
            f"--cwd={self.cwd}",
            f"--qemu-opts={shlex.join(qemu_opts)}",
            *(f"--append={a}" for a in self.kernel_append),
        ]
        if os.geteuid() != 0:
            argv.append("--user=root")
        if self.systemd:
            argv += ["--systemd", f"--qemu={self.workdir / QEMU_WRAPPER}"]
        if exec_script is not None:
            argv.append(f"--exec={exec_script}")
        if shell is not None:
            argv.append(f"--shell={shell}")
        return argv

    def vng_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # vng calls virtme-run by name: the venv's bin must be on PATH.
        env["PATH"] = f"{find_vng().parent}{os.pathsep}{env.get('PATH', '')}"
        if self.systemd:
            env["HOME"] = str(self.workdir / VNG_HOME)  # see VNG_HOME
        return env


@contextmanager
def prepared(
    *,
    cwd: Path | None = None,
    kernel: Path | None = None,
    extra_qemu: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    keep: bool = False,
    systemd: bool = False,
) -> Iterator[LabRun]:
    """A LabRun with a fresh host temp dir (removed afterwards unless keep) and a QMP agent.

    ``systemd=True`` boots the guest with systemd as init (see ``LabRun.systemd``)."""
    kernel = kernel or check_available()
    workdir = Path(tempfile.mkdtemp(prefix="iommud-lab-"))
    run = LabRun(
        workdir=workdir,
        kernel=kernel,
        cwd=(cwd or Path.cwd()).resolve(),
        extra_qemu=tuple(extra_qemu),
        extra_env=dict(extra_env or {}),
        systemd=systemd,
    )
    run.qmp_dir.mkdir()
    agent = QmpAgent(run.qmp_socket, run.qmp_dir)
    agent.start()
    try:
        yield run
    finally:
        agent.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def execute(
    run: LabRun,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    stall_timeout: float | None = None,
    progress_file: Path | None = None,
    on_output: Callable[[str], None] | None = None,
    on_console: Callable[[str], None] | None = None,
    boot_retries: int = 1,
) -> GuestResult:
    """Boot the guest, run argv in it, power it off; return what happened.

    ``timeout`` bounds the whole run. ``stall_timeout`` (if given) is the watchdog that
    copes with a loaded host: the run is stopped only when it has made no progress for
    that long, where progress is a line of the guest command's output or a change of
    ``progress_file``'s size (a file in the run's shared dir that the guest appends to).
    A slow guest that keeps making progress is never cut off by the watchdog; the console
    (kernel messages) does not count, so a hung command with a chatty kernel still stops.

    on_output / on_console get each line of the guest command's output / the console as
    it arrives (for live display); everything is also captured in the result. A guest that
    dies before the command starts (a boot failure: the command cannot have run) is booted
    again up to boot_retries times; the consoles of such boots are kept in failed_boots.
    """
    script = run.write_exec_script(argv)
    if run.systemd:
        run.write_qemu_wrapper()
    vng = run.vng_argv(exec_script=script)
    deadline = time.monotonic() + timeout
    failed: list[str] = []
    while True:
        left = max(deadline - time.monotonic(), 1.0)
        result = _boot_once(run, vng, left, stall_timeout, progress_file, on_output, on_console)
        if result.boot_seconds is not None or result.timed_out or len(failed) >= boot_retries:
            break
        failed.append(result.console)
        if on_console is not None:
            on_console("lab: the guest died before the command started; booting again\n")
    return dataclasses.replace(result, failed_boots=tuple(failed))


def _boot_once(
    run: LabRun,
    vng: list[str],
    timeout: float,
    stall_timeout: float | None,
    progress_file: Path | None,
    on_output: Callable[[str], None] | None,
    on_console: Callable[[str], None] | None,
) -> GuestResult:
    started = time.monotonic()
    boot_at: list[float] = []
    #: When the guest command last printed a line (written by pump_out, read by the watchdog).
    last_output = [started]
    out_lines: list[str] = []
    con_lines: list[str] = []

    proc = subprocess.Popen(
        vng,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=run.vng_env(),
        cwd=run.cwd,
        start_new_session=True,  # so a timeout can kill vng and QEMU together
    )
    assert proc.stdout is not None
    assert proc.stderr is not None

    def pump_out() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.rstrip("\r\n") == START_MARKER and not boot_at:
                boot_at.append(time.monotonic())
                continue
            out_lines.append(line)
            last_output[0] = time.monotonic()
            if on_output is not None and not line.startswith(EXIT_MARKER):
                on_output(line)

    def pump_err() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            con_lines.append(line)
            if on_console is not None:
                on_console(line)

    readers = [threading.Thread(target=f, daemon=True) for f in (pump_out, pump_err)]
    for t in readers:
        t.start()
    timed_out = False
    stalled: float | None = None
    try:
        stalled = _watch(proc, started + timeout, stall_timeout, progress_file, last_output)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)  # on a timeout, and a QEMU left behind by a dead vng
        proc.wait()
    timed_out = timed_out or stalled is not None
    for t in readers:
        t.join(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    total = time.monotonic() - started

    status: int | None = None
    kept: list[str] = []
    for line in out_lines:
        if line.startswith(EXIT_MARKER):
            try:
                status = int(line[len(EXIT_MARKER) :].strip())
            except ValueError:
                kept.append(line)
        else:
            kept.append(line)
    return GuestResult(
        status=None if timed_out else status,
        output="".join(kept),
        console="".join(con_lines),
        vng_returncode=proc.returncode,
        timed_out=timed_out,
        boot_seconds=(boot_at[0] - started) if boot_at else None,
        total_seconds=total,
        argv=tuple(vng),
        stalled_seconds=stalled,
    )


def _file_size(path: Path | None) -> int:
    if path is None:
        return -1
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _watch(
    proc: subprocess.Popen[bytes],
    deadline: float,
    stall_timeout: float | None,
    progress_file: Path | None,
    last_output: list[float],
) -> float | None:
    """Wait for proc to end. Raise TimeoutExpired at the deadline; return the seconds
    without progress if the stall watchdog fires first, None if proc ended by itself."""
    size = _file_size(progress_file)
    last_progress = time.monotonic()
    while True:
        now = time.monotonic()
        new_size = _file_size(progress_file)
        if new_size != size:
            size, last_progress = new_size, now
        last_progress = max(last_progress, last_output[0])
        if stall_timeout is not None and now - last_progress >= stall_timeout:
            return now - last_progress
        wait = deadline - now
        if wait <= 0:
            raise subprocess.TimeoutExpired(proc.args, deadline)
        if stall_timeout is not None:
            wait = min(wait, PROGRESS_POLL, last_progress + stall_timeout - now)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(wait, 0.01))
            return None


def run_command(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_output: Callable[[str], None] | None = None,
    on_console: Callable[[str], None] | None = None,
    systemd: bool = False,
) -> GuestResult:
    """Boot a fresh guest, run argv as root in cwd, and return the result (the simple API).

    ``systemd=True`` boots with systemd as PID 1 (vng --systemd); the default is
    virtme-ng's own init."""
    with prepared(cwd=cwd, systemd=systemd) as run:
        return execute(run, argv, timeout=timeout, on_output=on_output, on_console=on_console)
