"""Prove systemd/iommud.{socket,service} under a real systemd, inside the lab guest.

    python lab/systemd_check.py                 as root, in a guest booted with systemd
                                                (labvm.run_command(..., systemd=True))
    python lab/systemd_check.py --client SOCK   the uid-1000 half (started by the root half)

The root half makes the read-only 9p root usable for a service (tmpfs overlays on /etc and
/var, a tmpfs /tmp), installs the shipped units unchanged in /run/systemd/system with one
drop-in (``lab.conf``: ExecStart runs the repo's code with the system Python, a short
WatchdogSec), creates the group with ``systemd-sysusers`` and the shipped sysusers conf,
writes /etc/iommud/iommud.toml (uid 1000 may claim the edu devices) and starts only
iommud.socket. Then, as uid 1000 in group iommud, the client half connects (that must
socket-activate the service), claims edu 0000:00:10.0 (iommufd), maps a sealed memfd, does
a DMA round trip through the passed device fd (lab/edu.py), unmaps, releases, and does the
same through the legacy container path on the hot-pluggable edu 0000:02:00.0. Between and
after, the root half records what systemd and the kernel say about the service: its
state, the status text, watchdog pings, /proc/<MainPID>/status (capabilities,
NoNewPrivs, seccomp), what the service's mount namespace allows (nsenter), what its
device cgroup allows (a helper process joins the service's cgroup), and finally that
``systemctl stop`` ends it cleanly with the drivers restored.

Everything goes into one JSON object, written to RESULT_FILE in the shared dir
($IOMMUD_LAB_DIR) and announced by a line starting with RESULT_MARKER; the host test
(tests/systemd/test_units_lab.py) asserts on it. This script decides nothing about pass
or fail, except for refusing to run outside a throw-away systemd guest. Lab code: never
imported by the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import grp
import json
import mmap
import os
import shutil
import site
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from topology import EDU0, HOTEDU

LAB = Path(__file__).resolve().parent
REPO = LAB.parent
UNITS = REPO / "systemd"
RUN_UNITS = Path("/run/systemd/system")
SOCKET = "/run/iommud/iommud.sock"
CONFIG = Path("/etc/iommud/iommud.toml")
RESULT_MARKER = "IOMMUD-SYSTEMD-RESULT "  # then the path of the JSON file
RESULT_FILE = "systemd-check.json"  # in $IOMMUD_LAB_DIR, the dir shared with the host

# EDU0 is alone in its group: the iommufd path. HOTEDU is alone in its group too: it is
# claimed through the legacy container.
USER = 1000
IOVA = 0x100000
SIZE = 1 << 20
CHUNK = 2048  # edu: at most 2048 bytes per transfer (QEMU 7.2 off-by-one)
#: The lab's watchdog: short enough that a daemon that stopped pinging would be killed
#: and restarted (NRestarts > 0) while this script runs; the shipped unit says 30 s.
LAB_WATCHDOG_SEC = 4

SHOW_SERVICE = (
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "NRestarts",
    "StatusText",
    "ExecMainStatus",
    "ExecMainCode",
    "WatchdogUSec",
    "WatchdogTimestampMonotonic",
    "InactiveExitTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
    "ControlGroup",
    "NotifyAccess",
    "Type",
)

CONFIG_TEXT = f"""\
# Written by lab/systemd_check.py in a throw-away guest.
[manage]
rebind = ["{EDU0}", "{HOTEDU}"]

[[access]]
uid = {USER}
devices = ["1234:11e8"]   # QEMU's edu
quota = "lab"

[quotas.lab]
pinned_bytes = "8MiB"
max_ioas = 4
max_mappings = 16
"""


def drop_in(python: str, pythonpath: str) -> str:
    """The lab's only change to the shipped service: how to run the code, and a short watchdog.

    The venv's interpreter lives under /root (ProtectHome=yes hides it from the service,
    as it should), so the system Python of the same minor version runs the repo and the
    venv's site-packages instead (cp311 wheels work in any 3.11). The checkout may itself
    live under /tmp (CI clones wherever it likes), which PrivateTmp=yes hides: every
    PYTHONPATH entry is bound read-only into the service's namespace ("-": skip a missing
    one), which systemd mounts after the private /tmp.
    """
    binds = " ".join(f"-{p}" for p in pythonpath.split(os.pathsep) if p)
    return (
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={python} -s -m iommud --config {CONFIG}\n"
        f"Environment=PYTHONPATH={pythonpath} PYTHONDONTWRITEBYTECODE=1\n"
        f"BindReadOnlyPaths={binds}\n"
        f"WatchdogSec={LAB_WATCHDOG_SEC}s\n"
    )


# --------------------------------------------------------------------------- client half


def client_main(socket_path: str) -> int:
    """The unprivileged half: one JSON line per step on stdout; exit 1 if a step failed."""
    from edu import Edu

    from iommud.client import Client
    from iommud.client.calls import MapSpec

    failed = False

    @contextlib.contextmanager
    def step(name: str) -> Iterator[dict[str, Any]]:
        nonlocal failed
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            yield info
        except Exception as exc:
            failed = True
            info["error"] = repr(exc)
            print(json.dumps({"step": name, "ok": False, **info}), flush=True)
            raise
        info["seconds"] = time.perf_counter() - t0
        print(json.dumps({"step": name, "ok": True, **info}), flush=True)

    def round_trip(edu: Edu, mem: mmap.mmap, iova: int) -> dict[str, Any]:
        pattern = os.urandom(CHUNK)
        mem[0:CHUNK] = pattern
        mem[0x1000 : 0x1000 + CHUNK] = bytes(CHUNK)
        edu.dma_from_ram(iova, CHUNK)
        edu.dma_to_ram(iova + 0x1000, CHUNK)
        landed = mem[0x1000 : 0x1000 + CHUNK]
        return {"bytes": CHUNK, "exact": landed == pattern}

    def sealed_memfd(name: str) -> tuple[int, mmap.mmap]:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd, mmap.mmap(fd, SIZE)

    try:
        with step("connect") as i:
            client = Client(socket_path, "systemd-check/1", timeout=60.0)
            i.update(
                uid=os.getuid(),
                groups=sorted(os.getgroups()),
                capabilities=list(client.hello.capabilities),
            )
        with step("ping"):
            client.ping()
        with step("claim_iommufd") as i:
            ioas = client.ioas_create()
            claim = client.claim([EDU0], ioas_id=ioas)
            (dev,) = claim.devices
            i.update(backend=str(claim.backend), ioas_id=claim.ioas_id, requested_ioas=ioas)
            i["driver"] = _driver_of(EDU0)
        fd, mem = sealed_memfd("systemd-check")
        with step("map_iommufd") as i:
            (mapped,) = client.ioas_map(ioas, [MapSpec(fd, 0, SIZE, IOVA)])
            i.update(iova=mapped.iova, length=mapped.length)
        with step("dma_iommufd") as i:
            edu = Edu(dev.fd.fileno())
            edu.enable_bus_master()
            i.update(round_trip(edu, mem, IOVA))
        with step("unmap_iommufd") as i:
            i["unmapped"] = client.ioas_unmap(ioas, IOVA, SIZE)
        with step("release_iommufd") as i:
            dev.fd.close()
            client.release(claim.lease_id)
            client.ioas_destroy(ioas)
        with step("claim_legacy") as i:
            legacy = client.claim([HOTEDU], backend="legacy")
            (ldev,) = legacy.devices
            i.update(backend=str(legacy.backend), driver=_driver_of(HOTEDU))
        with step("map_legacy") as i:
            (lmapped,) = client.ioas_map(legacy.ioas_id, [MapSpec(fd, 0, SIZE, IOVA)])
            i.update(iova=lmapped.iova, length=lmapped.length)
        with step("dma_legacy") as i:
            ledu = Edu(ldev.fd.fileno())
            ledu.enable_bus_master()
            i.update(round_trip(ledu, mem, IOVA))
        with step("release_legacy") as i:
            client.ioas_unmap(legacy.ioas_id, IOVA, SIZE)
            ldev.fd.close()
            client.release(legacy.lease_id)
        mem.close()
        os.close(fd)
        client.close()
    except Exception:  # reported by the failing step
        return 1
    return 1 if failed else 0


def _driver_of(bdf: str) -> str | None:
    try:  # no check-then-read: the daemon may be rebinding right now
        return os.path.basename(os.readlink(Path("/sys/bus/pci/devices") / bdf / "driver"))
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- root half


# A hang guard for one command in the guest: `systemctl daemon-reload` took over 60 s in
# a guest starved by a loaded host (CI with two CPU burners beside it).
SH_TIMEOUT = 300.0


def sh(
    *argv: str, check: bool = False, timeout: float = SH_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def show(unit: str | None, props: tuple[str, ...]) -> dict[str, str]:
    argv = ["systemctl", "show", "-p", ",".join(props), *(["--", unit] if unit else [])]
    out = sh(*argv, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unprivileged_python() -> tuple[str, str]:
    """The system Python and a PYTHONPATH that runs the repo and the venv's packages."""
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    path = os.pathsep.join([str(REPO), str(LAB), *site.getsitepackages()])
    return (system if os.path.exists(system) else sys.executable), path


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def writable_root() -> dict[str, Any]:
    """tmpfs overlays on /etc and /var, a tmpfs /tmp: the root is read-only 9p here.

    /etc takes the group (sysusers) and the config, /var the StateDirectory=, and /tmp,
    /var/tmp the PrivateTmp= directories. Overlays keep the host's files visible below.
    """
    done: dict[str, Any] = {}
    base = Path("/run/iommud-lab")
    for top in ("etc", "var"):
        if os.access(f"/{top}", os.W_OK):  # virtme-ng-init's own overlay is there
            continue
        upper, work = base / top / "upper", base / top / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir=/{top},upperdir={upper},workdir={work}"
        done[top] = sh("mount", "-t", "overlay", "overlay", "-o", opts, f"/{top}").returncode
    # PrivateTmp= makes its directories under /tmp and /var/tmp: give them a tmpfs where
    # the root is read-only (a writable /tmp is the shared run dir's parent: leave it).
    for tmp in ("/tmp", "/var/tmp"):  # noqa: S108 - the guest's own, throw-away
        if not os.access(tmp, os.W_OK):
            done[tmp] = sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", tmp).returncode
    return done


def install_units() -> dict[str, Any]:
    RUN_UNITS.mkdir(parents=True, exist_ok=True)
    for name in ("iommud.socket", "iommud.service"):
        shutil.copy(UNITS / name, RUN_UNITS / name)
    python, pythonpath = unprivileged_python()
    conf_dir = RUN_UNITS / "iommud.service.d"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "lab.conf").write_text(drop_in(python, pythonpath))
    sysusers = sh("systemd-sysusers", str(UNITS / "iommud.sysusers.conf"))
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(CONFIG_TEXT)
    reload = sh("systemctl", "daemon-reload")
    verify = sh("systemd-analyze", "verify", "iommud.socket", "iommud.service")
    return {
        "sysusers_rc": sysusers.returncode,
        "sysusers_err": sysusers.stderr.strip(),
        "group_gid": grp.getgrnam("iommud").gr_gid,
        "daemon_reload_rc": reload.returncode,
        "verify_rc": verify.returncode,
        "verify_err": verify.stderr.strip(),
        "drop_in": (conf_dir / "lab.conf").read_text(),
    }


def connect_without_group() -> dict[str, Any]:
    """uid 1000 without group iommud: the socket (0660 root:iommud) must refuse it."""
    python, pythonpath = unprivileged_python()
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "try:\n"
        f"    s.connect({SOCKET!r})\n"
        "except OSError as e:\n"
        "    print(e.errno); sys.exit(0)\n"
        "print(0)\n"
    )
    proc = subprocess.run(
        [python, "-s", "-c", code],
        capture_output=True,
        text=True,
        user=USER,
        group=USER,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "HOME": "/"},
        cwd="/",
        check=False,
        timeout=60,
    )
    out = proc.stdout.strip()
    number = int(out) if out.isdigit() else -1
    return {"errno": errno.errorcode.get(number, str(number)), "stderr": proc.stderr[-2000:]}


def run_client(gid: int) -> tuple[list[dict[str, Any]], int, str, float]:
    python, pythonpath = unprivileged_python()
    t0 = time.monotonic()
    proc = subprocess.run(
        [python, "-s", str(Path(__file__).resolve()), "--client", SOCKET],
        capture_output=True,
        text=True,
        user=USER,
        group=USER,
        extra_groups=[gid],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "HOME": "/"},
        cwd="/",
        check=False,
        timeout=300,
    )
    took = time.monotonic() - t0
    steps = []
    for line in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line))
    return steps, proc.returncode, proc.stderr[-4000:], took


def proc_status(pid: int) -> dict[str, str]:
    keys = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"}
    keys |= {"Seccomp_filters", "Uid", "Gid"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = value.strip()
    return out


def in_service_mounts(pid: int) -> dict[str, Any]:
    """What the service's mount namespace allows, seen through nsenter as full root."""

    def inside(script: str) -> dict[str, Any]:
        proc = sh("nsenter", "-t", str(pid), "-m", "--", "sh", "-c", script)
        return {"rc": proc.returncode, "err": proc.stderr.strip()[-300:], "out": proc.stdout}

    probe = "iommud-lab-probe"
    outside_etc = sh("sh", "-c", f"touch /etc/{probe} && rm /etc/{probe}").returncode
    result: dict[str, Any] = {
        "etc_outside_rc": outside_etc,
        "etc_inside": inside(f"touch /etc/{probe}"),
        "usr_inside": inside(f"touch /usr/{probe}"),
        "state_dir_inside": inside(f"touch /var/lib/iommud/{probe} && rm /var/lib/iommud/{probe}"),
        "runtime_dir_inside": inside(f"touch /run/iommud/{probe} && rm /run/iommud/{probe}"),
        "sysfs_probe_writable_inside": inside("test -w /sys/bus/pci/drivers_probe"),
        "root_home_entries_inside": inside("ls -A /root | wc -l"),
        "root_home_entries_outside": len(os.listdir("/root")),
        "tmp_inside": inside(f"touch /tmp/{probe}"),
        "tmp_probe_visible_outside": os.path.exists(f"/tmp/{probe}"),  # noqa: S108
    }
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] in ("/", "/etc", "/usr", "/var/lib/iommud", "/sys"):
            result.setdefault("mount_opts", {})[fields[4]] = fields[5]
    return result


DEVICE_PROBE = """
import json, os, sys
def try_open(path):
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as e:
        return e.errno
    return 0
paths = sys.argv[2:]
before = {p: try_open(p) for p in paths}
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
after = {p: try_open(p) for p in paths}
print(json.dumps({"before": before, "after": after, "cgroup": open("/proc/self/cgroup").read()}))
"""


def in_service_devices(control_group: str) -> dict[str, Any]:
    """A root helper opens device nodes, joins the service's cgroup, opens them again.

    On cgroup v2 systemd enforces DevicePolicy=/DeviceAllow= with a BPF program attached
    to the service's cgroup: a process inside is refused (EPERM) what is not allowed,
    whatever its capabilities. /dev/kmsg is not on the list; /dev/iommu and /dev/vfio/vfio
    must be.
    """
    procs = f"/sys/fs/cgroup{control_group}/cgroup.procs"
    paths = ["/dev/kmsg", "/dev/iommu", "/dev/vfio/vfio", "/dev/null"]
    proc = sh(sys.executable, "-c", DEVICE_PROBE, procs, *paths)
    try:
        out: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return {"error": proc.stderr.strip()[-2000:], "rc": proc.returncode}
    for key in ("before", "after"):
        out[key] = {p: errno.errorcode.get(n, "OK") if n else "OK" for p, n in out[key].items()}
    return out


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def root_main(r: dict[str, Any]) -> None:
    """Fill ``r`` step by step (a failure leaves what was recorded so far)."""
    t: dict[str, float] = {}
    r["timings"] = t
    t["uptime_at_start"] = uptime()
    r["pid1"] = Path("/proc/1/comm").read_text().strip()
    if r["pid1"] != "systemd" or os.environ.get("IOMMUD_LAB_GUEST") != "1" or os.getuid() != 0:
        raise SystemExit("refusing: run as root in a lab guest booted with systemd as PID 1")
    t0 = time.monotonic()
    state = sh("systemctl", "is-system-running", "--wait")
    t["is_system_running_wait"] = time.monotonic() - t0
    r["system_state"] = state.stdout.strip()
    r["failed_units"] = sh("systemctl", "--failed", "--plain", "--no-legend").stdout.split("\n")
    r["manager"] = show(None, ("UserspaceTimestampMonotonic", "FinishTimestampMonotonic"))
    r["cgroup_fs"] = sh("stat", "-f", "-c", "%T", "/sys/fs/cgroup").stdout.strip()

    r["writable_root"] = writable_root()
    r["install"] = install_units()

    t0 = time.monotonic()
    r["socket_start_rc"] = sh("systemctl", "start", "iommud.socket").returncode
    t["socket_start"] = time.monotonic() - t0
    st = os.stat(SOCKET)
    r["socket_file"] = {
        "mode": oct(st.st_mode & 0o7777),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "dir_mode": oct(os.stat(os.path.dirname(SOCKET)).st_mode & 0o7777),
    }
    r["socket_unit"] = show("iommud.socket", ("ActiveState", "SubState"))
    r["service_before"] = show("iommud.service", ("ActiveState", "SubState"))
    r["no_group"] = connect_without_group()
    r["service_after_refused_connect"] = show("iommud.service", ("ActiveState",))

    steps, rc, err, took = run_client(r["install"]["group_gid"])
    r["client"] = {"steps": steps, "rc": rc, "stderr": err}
    t["client_total"] = took
    running = show("iommud.service", SHOW_SERVICE)
    r["service_running"] = running
    pid = int(running["MainPID"])
    if pid:
        r["proc_status"] = proc_status(pid)
        r["proc_cgroup"] = Path(f"/proc/{pid}/cgroup").read_text().strip()
        r["mounts"] = in_service_mounts(pid)
        r["devices"] = in_service_devices(running["ControlGroup"])
    # Two samples of the last WATCHDOG=1 a watchdog period apart: the pings keep coming.
    time.sleep(LAB_WATCHDOG_SEC + 0.5)
    later = show("iommud.service", SHOW_SERVICE)
    r["service_later"] = later
    r["drivers_before_stop"] = {EDU0: _driver_of(EDU0), HOTEDU: _driver_of(HOTEDU)}

    # The service first, while the socket still references it: a unit nothing references
    # is unloaded at once, and `systemctl show` would then print defaults, not its result.
    t0 = time.monotonic()
    r["stop_rc"] = sh("systemctl", "stop", "iommud.service").returncode
    t["stop"] = time.monotonic() - t0
    r["service_stopped"] = show("iommud.service", (*SHOW_SERVICE, "LoadState"))
    r["socket_stop_rc"] = sh("systemctl", "stop", "iommud.socket").returncode
    r["socket_removed"] = not os.path.exists(SOCKET)
    r["drivers_after_stop"] = {EDU0: _driver_of(EDU0), HOTEDU: _driver_of(HOTEDU)}
    journal = sh("journalctl", "-u", "iommud.service", "-o", "cat", "--no-pager").stdout
    events, problems = [], []
    for line in journal.splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(line)
            events.append(record["event"])
            if record.get("level") in ("warning", "error", "critical"):
                problems.append(record)
    r["journal_events"] = events
    r["journal_problems"] = problems
    r["journal_tail"] = journal.splitlines()[-40:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", metavar="SOCKET", help="run the unprivileged half")
    args = parser.parse_args()
    if args.client:
        return client_main(args.client)
    result: dict[str, Any] = {}
    try:
        root_main(result)
    except Exception:  # report what we have; the host test shows it
        result["error"] = traceback.format_exc()
    # Into the shared dir: one long line would be cut by the guest's console ports.
    out = Path(os.environ.get("IOMMUD_LAB_DIR", "/tmp")) / RESULT_FILE  # noqa: S108
    out.write_text(json.dumps(result, indent=1))
    print(f"{RESULT_MARKER}{out}", flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
