"""QEMU 10 as an unprivileged VMM inside the lab guest (nested, TCG).

The pieces a lab test needs to run a real VMM the way a delegated client would:

- where lab/fetch-qemu unpacked QEMU 10 (``qemu_paths``), reachable by uid 1000;
- a minimal nested VM command line (``command_line``): q35, TCG, -nodefaults, no display,
  no disk, 64 MiB of RAM, paused (-S: the vCPU never runs, so it burns no host CPU; the
  devices are realized and guest RAM is mapped into the iommufd all the same), a QMP unix
  socket and pcie-root-ports, so that vfio-pci devices are hot-pluggable and can be
  unplugged (QEMU refuses to unplug from the root bus). ``run_firmware`` lets
  SeaBIOS number the root ports' buses, without which query-pci cannot list the devices
  behind them;
- ``Vmm``: runs it as uid 1000 with no capabilities (setpriv) and a raised RLIMIT_MEMLOCK
  (prlimit, applied while still root: an unprivileged process cannot raise its hard limit),
  passing the given fds by number;
- ``Qmp``: a small QMP client over the unix socket, including ``getfd`` with SCM_RIGHTS
  and ``xp``/``gpa2hva`` through human-monitor-command.

Lab code only: it must not be imported by the daemon. It runs inside the lab guest as
root (it mounts, and spawns QEMU as another uid); it opens no /dev/iommu or VFIO files
itself: the caller passes fds in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qmp_guest import QmpError

QEMU_VERSION = (10, 0, 2)  # lab/fetch-qemu's version
VMM_UID = 1000
VMM_GID = 1000
RAM_MIB = 64
# QEMU pins all guest RAM plus a little (VmPin 65792 kB for 64 MiB was seen): 4x is ample.
MEMLOCK_BYTES = 4 * RAM_MIB << 20
FIRMWARE_DIR = Path("/usr/share/seabios")  # the host's seabios: QEMU 10's data has no BIOS
ROOT_PORTS = ("rp0", "rp1")  # rp0 for a cold-plugged device, rp1 free for hotplug

_LAB = Path(__file__).resolve().parent
# The cache sits under root's home (mode 0700), which uid 1000 cannot traverse; in the
# guest a read-only bind mount at a public path makes it reachable (the mount is the
# guest's own and goes away with it). One per process.
_public_root: Path | None = None


@dataclass(frozen=True)
class QemuPaths:
    """An unpacked QEMU: the binary and the -L data dirs, in search order."""

    binary: Path
    data_dirs: tuple[Path, ...]


def _fetched_root() -> Path:
    """The dpkg -x root lab/fetch-qemu unpacked into (it is the source of the path)."""
    out = subprocess.run(
        [str(_LAB / "fetch-qemu"), "--path"], check=True, capture_output=True, text=True
    )
    binary = Path(out.stdout.strip().splitlines()[-1])
    return binary.parents[2]  # <root>/usr/bin/qemu-system-x86_64


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents))


def _public_mount(root: Path) -> Path:
    global _public_root  # one mount per guest process, made on first use
    if os.environ.get("IOMMUD_LAB_GUEST") != "1":
        raise PermissionError(f"{root} is not reachable by other users (and not in a guest)")
    if _public_root is None:
        target = Path(tempfile.mkdtemp(prefix="qemu10-"))
        target.chmod(0o755)
        subprocess.run(["mount", "--bind", "-o", "ro", str(root), str(target)], check=True)
        _public_root = target
    return _public_root


def qemu_paths(*, public: bool = True) -> QemuPaths:
    """QEMU 10's paths; with ``public``, at a path uid 1000 can reach (bind mount if needed)."""
    root = _fetched_root()
    binary = root / "usr/bin/qemu-system-x86_64"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing: run lab/fetch-qemu (lab/setup does)")
    if public and not _traversable_by_others(root):
        root = _public_mount(root)
        binary = root / "usr/bin/qemu-system-x86_64"
    return QemuPaths(binary=binary, data_dirs=(root / "usr/share/qemu", FIRMWARE_DIR))


def command_line(
    paths: QemuPaths,
    qmp_socket: Path,
    extra: Sequence[str] = (),
    *,
    ram_mib: int = RAM_MIB,
    root_ports: Sequence[str] = ROOT_PORTS,
) -> list[str]:
    """A minimal nested VM: no OS, paused, devices realized, QMP on ``qmp_socket``."""
    argv = [str(paths.binary)]
    for d in paths.data_dirs:
        argv += ["-L", str(d)]
    argv += [
        "-machine", "q35",
        # A small translation cache: the default (up to 1 GiB) is wasted on a paused vCPU.
        "-accel", "tcg,tb-size=16",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-m", f"{ram_mib}M",
        "-S",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]  # fmt: skip
    for chassis, port in enumerate(root_ports, start=1):
        argv += ["-device", f"pcie-root-port,id={port},chassis={chassis},bus=pcie.0"]
    return [*argv, *extra]


def vfio_args(
    iommufd: int | str, device_fd: int | str, *, object_id: str = "i0", device_id: str = "dev0",
    bus: str = "rp0",
) -> list[str]:  # fmt: skip
    """-object iommufd + -device vfio-pci taking pre-opened fds (QEMU >= 9.0)."""
    return [
        "-object", f"iommufd,id={object_id},fd={iommufd}",
        "-device", f"vfio-pci,id={device_id},iommufd={object_id},fd={device_fd},bus={bus}",
    ]  # fmt: skip


def unprivileged(
    argv: Sequence[str],
    *,
    uid: int = VMM_UID,
    gid: int = VMM_GID,
    memlock: int | None = MEMLOCK_BYTES,
) -> list[str]:
    """``argv`` run as ``uid`` with no capabilities and RLIMIT_MEMLOCK raised to ``memlock``.

    prlimit runs first, as root (raising a hard limit needs CAP_SYS_RESOURCE); setpriv
    then drops every id, the supplementary groups and all capabilities (bounding and
    inheritable sets too, with no_new_privs) before exec: the VMM holds nothing root had
    but the inherited fds. ``memlock=None`` keeps the inherited limit.
    """
    limit = [] if memlock is None else ["prlimit", f"--memlock={memlock}:{memlock}", "--"]
    return [
        *limit,
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        *argv,
    ]  # fmt: skip


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of raw values."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def vm_pin_kib(pid: int) -> int:
    """VmPin of ``pid`` in KiB: pages pinned by IOMMU_IOAS_MAP (iommufd/pages.c)."""
    return int(proc_status(pid)["VmPin"].split()[0])


def write_process_memory(pid: int, address: int, data: bytes) -> None:
    """Write ``data`` at ``address`` of another process (root: ptrace access mode)."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        if mem.write(data) != len(data):
            raise OSError(f"short write to /proc/{pid}/mem at {address:#x}")


# --------------------------------------------------------------------------- QMP


_XP_LINE = re.compile(r"^[0-9a-f]+:((?:\s+0x[0-9a-f]{2})+)\s*$")
_GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-f]+) \(([^)]*)\) is (0x[0-9a-f]+)")


class Qmp:
    """A QMP client over a unix socket: one command at a time, events kept in order."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
            self.greeting: dict[str, Any] = self._read()
            self._check_greeting()
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _check_greeting(self) -> None:
        if "QMP" not in self.greeting:
            raise QmpError("greeting", {"class": "Protocol", "desc": str(self.greeting)})

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"QMP socket {self.path} closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def __call__(self, command: str, /, **arguments: Any) -> Any:
        """``qmp("device_del", id="dev0")``: execute with keyword arguments."""
        return self.execute(command, arguments)

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fds: Iterable[int] = ()
    ) -> Any:
        """Run ``command``; ``fds`` ride along as SCM_RIGHTS (for ``getfd``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        fd_list = list(fds)
        if fd_list:
            socket.send_fds(self.sock, [data], fd_list)
        else:
            self.sock.sendall(data)
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise QmpError(command, msg["error"])
            elif "return" in msg:
                return msg["return"]

    def wait_event(self, name: str, *, timeout: float = 30.0, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``data`` (kept or still to come)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                got = event.get("data", {})
                if event["event"] == name and all(got.get(k) == v for k, v in data.items()):
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no QMP event {name} {data} within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                self.events.append(self._read())
            except TimeoutError:
                raise TimeoutError(f"no QMP event {name} {data} within {timeout}s") from None
            finally:
                self.sock.settimeout(self.timeout)

    def hmp(self, command_line: str) -> str:
        """A human monitor command (xp, gpa2hva, info ...); its text output."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def xp(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``gpa`` (HMP ``xp /Nxb``)."""
        out = bytearray()
        for line in self.hmp(f"xp /{length}xb {gpa:#x}").splitlines():
            m = _XP_LINE.match(line.strip())
            if m is None:
                raise QmpError("xp", {"class": "Parse", "desc": line})
            out += bytes(int(b, 16) for b in m.group(1).split())
        if len(out) != length:
            raise QmpError("xp", {"class": "Parse", "desc": f"{len(out)} of {length} bytes"})
        return bytes(out)

    def gpa2hva(self, gpa: int) -> int:
        """The host (here: lab guest) virtual address of guest-physical ``gpa`` in QEMU."""
        text = self.hmp(f"gpa2hva {gpa:#x}")
        m = _GPA2HVA.search(text)
        if m is None:
            raise QmpError("gpa2hva", {"class": "Parse", "desc": text})
        return int(m.group(3), 16)

    def pci_devices(self) -> list[dict[str, Any]]:
        """Every device of query-pci, bridges' secondary buses included."""
        found: list[dict[str, Any]] = []

        def walk(devices: list[dict[str, Any]]) -> None:
            for dev in devices:
                found.append(dev)
                walk(dev.get("pci_bridge", {}).get("devices", []))

        for bus in self.execute("query-pci"):
            walk(bus["devices"])
        return found

    def is_realized(self, qdev_id: str) -> bool:
        """qom-get of the device's ``realized`` property (needs no firmware, unlike query-pci)."""
        path = f"/machine/peripheral/{qdev_id}"
        return bool(self.execute("qom-get", {"path": path, "property": "realized"}))

    def unnumbered_bridges(self) -> list[str]:
        """Bridges (root ports) whose secondary bus has no number yet.

        query-pci walks buses by number (hw/pci/pci-hmp-cmds.c, qmp_query_pci_bus): until
        firmware numbers a root port's secondary bus, the devices behind it are not listed.
        """
        unnumbered = []
        for dev in self.pci_devices():
            if "pci_bridge" in dev:
                bus = dev["pci_bridge"]["bus"]
                # SeaBIOS sets a bridge's numbers in steps: a subordinate below the
                # secondary is a bridge it has not finished.
                if bus["secondary"] == 0 or bus["subordinate"] < bus["secondary"]:
                    unnumbered.append(str(dev["qdev_id"]))
        return unnumbered

    def close(self) -> None:
        self.sock.close()


def run_firmware(qmp: Qmp, devices: Iterable[str] = (), *, timeout: float = 120.0) -> float:
    """Let SeaBIOS run until it has numbered every root port's bus and query-pci lists
    ``devices`` (qdev ids), then pause again.

    Without it (-S) the devices behind root ports are realized but query-pci cannot list
    them. SeaBIOS finds no boot disk and idles; stopping keeps the vCPU off the host's
    CPUs all the same. Returns the seconds it took.
    """
    wanted = set(devices)
    t0 = time.monotonic()
    qmp("cont")
    try:
        while qmp.unnumbered_bridges() or not wanted <= {
            str(d["qdev_id"]) for d in qmp.pci_devices()
        }:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"firmware numbered no buses within {timeout}s")
            time.sleep(0.1)
    finally:
        qmp("stop")
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the VMM


@dataclass
class Timings:
    """Seconds from spawn (time.monotonic) to each milestone."""

    spawn: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic() - self.spawn
        return self.marks[name]


class Vmm:
    """QEMU 10 nested in the lab guest, run as uid 1000, with QMP on a private socket.

    ``extra`` is appended to the command line (vfio_args ...); ``pass_fds`` are inherited
    by QEMU under the same numbers. The caller keeps and closes its own copies.
    """

    def __init__(
        self,
        extra: Sequence[str] = (),
        *,
        pass_fds: Sequence[int] = (),
        ram_mib: int = RAM_MIB,
        uid: int = VMM_UID,
        gid: int = VMM_GID,
        memlock: int | None = MEMLOCK_BYTES,
        paths: QemuPaths | None = None,
    ) -> None:
        self.paths = paths or qemu_paths()
        self.rundir = Path(tempfile.mkdtemp(prefix="vmm-", dir="/tmp"))
        os.chown(self.rundir, uid, gid)
        self.qmp_socket = self.rundir / "qmp.sock"
        self.log = self.rundir / "qemu.log"
        self.argv = unprivileged(
            command_line(self.paths, self.qmp_socket, extra, ram_mib=ram_mib),
            uid=uid,
            gid=gid,
            memlock=memlock,
        )
        self.pass_fds = tuple(pass_fds)
        self.timings = Timings()
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None

    @property
    def pid(self) -> int:
        """QEMU's pid (prlimit and setpriv exec it in place)."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            raise RuntimeError("no QMP connection: call start()")
        return self._qmp

    def start(self, *, timeout: float = 120.0) -> Self:
        """Spawn QEMU and connect to QMP (its greeting comes once the machine is built).

        Generous ``timeout``: 19 s to the greeting was seen nested under a loaded host.
        """
        with open(self.log, "wb") as log:
            self.timings.spawn = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, pass_fds=self.pass_fds, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while self._qmp is None:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"QEMU exited with {self.proc.returncode}: {self.stderr_text().strip()}"
                )
            try:
                self._qmp = Qmp(self.qmp_socket, timeout=max(1.0, deadline - time.monotonic()))
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no QMP socket after {timeout}s") from None
                time.sleep(0.02)
        self.timings.mark("qmp_ready")
        return self

    def run_firmware(self, devices: Iterable[str] = (), *, timeout: float = 120.0) -> float:
        """``run_firmware`` on this VM's QMP."""
        return run_firmware(self.qmp, devices, timeout=timeout)

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self, *, timeout: float = 20.0) -> int:
        """quit over QMP, else SIGKILL; returns QEMU's exit status."""
        if self.proc is None:
            return 0
        if self._qmp is not None:
            with contextlib.suppress(OSError, QmpError):
                self._qmp.execute("quit")
            self._qmp.close()
            self._qmp = None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        with contextlib.suppress(OSError):
            for p in self.rundir.iterdir():
                p.unlink()
            self.rundir.rmdir()
        return rc

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
