"""The iommud demo, run as root inside the lab guest (./demo boots the guest and runs it).

    python lab/demo.py [--config examples/demo.toml] [--uid 1000]

As root it starts the real daemon (``python -m iommud``) with the demo config, then runs
its own client half (``--client SOCKET``) as an unprivileged user. The client connects,
shows it cannot open /dev/iommu itself, creates an IOAS, claims the edu device
0000:00:10.0 (the daemon binds it to vfio-pci, attaches it and passes the device fd),
maps a sealed memfd through the daemon, runs a DMA round trip through the passed device
fd (lab/edu.py), unmaps, shows that the same DMA is then blocked, and releases. Each step
is one JSON line; the root half prints them as a readable summary, adds the DMAR fault
line from the kernel log, stops the daemon and checks the device's driver is restored.
Exit status 0 only if every step passed.

Lab code: never imported by the daemon; it must run in a throw-away guest, not on a host.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import mmap
import os
import signal
import site
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from topology import EDU0

LAB = Path(__file__).resolve().parent
REPO = LAB.parent
DEVICE = EDU0  # alone in its group: the iommufd path
IOVA = 0x100000
SIZE = 1 << 20
CHUNK = 2048  # edu: at most 2048 bytes per transfer (QEMU 7.2 off-by-one)

# --------------------------------------------------------------------------- client half


class Steps:
    """Runs named steps and reports each as one JSON line on stdout."""

    def __init__(self) -> None:
        self.failed = False

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            yield info
        except Exception as exc:
            self.failed = True
            self.emit(name, False, time.perf_counter() - t0, {"error": f"{exc!r}", **info})
            raise
        ok = bool(info.pop("ok", True))
        self.failed |= not ok
        self.emit(name, ok, time.perf_counter() - t0, info)

    @staticmethod
    def emit(name: str, ok: bool, seconds: float, info: dict[str, Any]) -> None:
        line = {"step": name, "ok": ok, "seconds": seconds, **info}
        print(json.dumps(line), flush=True)


def client_main(socket_path: str) -> int:
    """The unprivileged half: every step of the demo, as one VMM would do it."""
    from edu import Edu

    from iommud.client import Client
    from iommud.client.calls import MapSpec

    s = Steps()
    try:
        with s.step("connect") as i:
            client = Client(socket_path, "iommud-demo/1")
            i.update(
                uid=os.getuid(),
                server=client.hello.server,
                capabilities=list(client.hello.capabilities),
            )
        with s.step(f"no /dev/iommu for uid {os.getuid()}") as i:
            try:
                os.close(os.open("/dev/iommu", os.O_RDWR))
                i.update(ok=False, detail="opened /dev/iommu: this user is privileged")
            except PermissionError as exc:
                i.update(detail=f"open(/dev/iommu) -> {errno.errorcode.get(exc.errno or 0)}")
        with s.step("ioas_create") as i:
            ioas = client.ioas_create()
            i.update(ioas_id=ioas)
        with s.step(f"claim {DEVICE}") as i:
            claim = client.claim([DEVICE], ioas_id=ioas)
            (dev,) = claim.devices
            i.update(
                lease_id=claim.lease_id,
                ioas_id=claim.ioas_id,
                backend=str(claim.backend),
                group_id=claim.group_id,
                devid=dev.devid,
                ok=claim.ioas_id == ioas,
            )
        with s.step("sealed memfd, 1 MiB") as i:
            fd = os.memfd_create("iommud-demo", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mem = mmap.mmap(fd, SIZE)
        with s.step("ioas_map through the daemon") as i:
            (mapped,) = client.ioas_map(ioas, [MapSpec(fd, 0, SIZE, IOVA)])
            i.update(iova=mapped.iova, length=mapped.length, ok=mapped.iova == IOVA)
        with s.step("DMA round trip (RAM -> edu -> RAM)") as i:
            edu = Edu(dev.fd.fileno())
            edu.enable_bus_master()
            pattern = os.urandom(CHUNK)
            mem[0:CHUNK] = pattern
            mem[0x1000 : 0x1000 + CHUNK] = bytes(CHUNK)
            edu.dma_from_ram(IOVA, CHUNK)
            edu.dma_to_ram(IOVA + 0x1000, CHUNK)
            landed = mem[0x1000 : 0x1000 + CHUNK]
            same = sum(a == b for a, b in zip(landed, pattern, strict=True))
            i.update(bytes=CHUNK, landed=same, exact=landed == pattern, ok=landed == pattern)
        with s.step("ioas_unmap") as i:
            i.update(unmapped=client.ioas_unmap(ioas, IOVA, SIZE))
        with s.step("DMA after unmap is blocked") as i:
            mem[0x2000 : 0x2000 + CHUNK] = bytes(CHUNK)
            edu.dma_to_ram(IOVA + 0x2000, CHUNK)
            untouched = mem[0x2000 : 0x2000 + CHUNK] == bytes(CHUNK)
            i.update(fault_addr=IOVA + 0x2000, untouched=untouched, ok=untouched)
        with s.step("release") as i:
            dev.fd.close()  # a VMM closes its device fd before giving the device back
            client.release(claim.lease_id)
            client.ioas_destroy(ioas)
            mem.close()
            os.close(fd)
            client.close()
    except Exception:  # already reported by the failing step
        return 1
    return 1 if s.failed else 0


# --------------------------------------------------------------------------- root half


def unprivileged_python() -> tuple[list[str], dict[str, str]]:
    """argv prefix and env to run this interpreter's code as another user.

    The venv's interpreter may live under a root-only directory (/root/.pyenv); the
    system Python of the same minor version can run the venv's packages instead.
    """
    env = dict(os.environ, HOME="/")
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        return [sys.executable], env
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(LAB), *site.getsitepackages()])
    return [str(system), "-s"], env


def driver_of(bdf: str) -> str | None:
    try:  # no check-then-read: the daemon may be rebinding right now
        return os.path.basename(os.readlink(Path("/sys/bus/pci/devices") / bdf / "driver"))
    except FileNotFoundError:
        return None


def kmsg_lines(fd: int) -> list[str]:
    out: list[str] = []
    while True:
        try:
            record = os.read(fd, 8192).decode(errors="replace")
        except BlockingIOError:
            return out
        except BrokenPipeError:
            continue
        out.append(record.split(";", 1)[-1].strip())


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def say(mark: str, text: str) -> None:
    print(f"  {mark} {text}", flush=True)


def describe(step: dict[str, Any]) -> str:
    keys = [k for k in step if k not in ("step", "ok", "seconds")]
    extra = ", ".join(
        f"{k}={step[k]:#x}" if k in ("iova", "fault_addr") else f"{k}={step[k]}" for k in keys
    )
    return f"{step['step']:<38} {step['seconds'] * 1e3:8.1f} ms  {extra}"


def root_main(config: Path, uid: int) -> int:
    import tomllib

    if os.geteuid() != 0:
        print("demo: run me as root inside the lab guest (./demo does that)", file=sys.stderr)
        return 2
    conf = tomllib.loads(config.read_text())
    sock = Path(conf["daemon"]["socket"])
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.parent.chmod(0o755)  # the unprivileged client must reach the socket
    log_path = sock.parent / "iommud.log"
    ok = True
    print(f"iommud demo: root starts the daemon, uid {uid} does the rest\n", flush=True)

    kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.lseek(kmsg, 0, os.SEEK_END)
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "iommud", "--config", str(config), "--socket-mode", "0666"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started = wait_for(lambda: sock.exists() or daemon.poll() is not None, 30.0)
    up = started and daemon.poll() is None
    took = (time.perf_counter() - t0) * 1e3
    say("✓" if up else "✗", f"{f'daemon up (pid {daemon.pid})':<38} {took:8.1f} ms  socket={sock}")
    steps: list[dict[str, Any]] = []
    if up:
        argv, env = unprivileged_python()
        client = subprocess.Popen(
            [*argv, str(Path(__file__).resolve()), "--client", str(sock)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            user=uid,
            group=uid,
            extra_groups=[],
            cwd="/",
        )
        assert client.stdout is not None
        for line in client.stdout:
            try:
                step = json.loads(line)
            except ValueError:
                print(f"    {line.rstrip()}")
                continue
            steps.append(step)
            ok &= bool(step["ok"])
            say("✓" if step["ok"] else "✗", describe(step))
            if not step["ok"] and "error" in step:
                say(" ", f"  error: {step['error']}")
        client.wait()
        assert client.stderr is not None
        err = client.stderr.read()
        if client.returncode != 0:
            ok = False
            say("✗", f"client exited with status {client.returncode}")
            if err.strip():
                print(err, flush=True)

    # The kernel's word on the blocked DMA: a DMAR fault for the device at that IOVA.
    blocked = next((s for s in steps if s["step"] == "DMA after unmap is blocked"), None)
    fault: str | None = None
    if blocked is not None:
        addr = f"fault addr {blocked['fault_addr']:#x}"
        seen: list[str] = []

        def has_fault() -> bool:
            seen.extend(kmsg_lines(kmsg))
            return any("DMAR" in m and addr in m for m in seen)

        if wait_for(has_fault, 5.0):
            fault = next(m for m in seen if "DMAR" in m and addr in m)
        ok &= fault is not None
        say(
            "✓" if fault else "✗",
            f"{'DMAR fault in the kernel log':<38} {'':>11}  {fault or 'none seen'}",
        )
    os.close(kmsg)

    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20.0)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    stopped = daemon.returncode == 0
    ok &= stopped
    say("✓" if stopped else "✗", f"daemon stopped on SIGTERM (exit {daemon.returncode})")
    restored = driver_of(DEVICE) is None
    ok &= restored
    say(
        "✓" if restored else "✗",
        f"{DEVICE} driver after release: {driver_of(DEVICE) or 'none (as at boot)'}",
    )

    claim = next((s for s in steps if s["step"].startswith("claim")), {})
    rt = next((s for s in steps if s["step"].startswith("DMA round trip")), {})
    print(
        f"\nsummary: lease {claim.get('lease_id', '-')} on IOMMU group "
        f"{claim.get('group_id', '-')} "
        f"({claim.get('backend', '-')}), IOAS {claim.get('ioas_id', '-')}; DMA moved "
        f"{rt.get('landed', 0)}/{rt.get('bytes', CHUNK)} bytes byte-exact into uid {uid}'s memfd; "
        f"after unmap: {'blocked' if fault else 'NOT shown blocked'}"
    )
    if not ok:
        print(f"\ndaemon log ({log_path}), last lines:")
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
    print(f"demo: {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="lab/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "demo.toml")
    parser.add_argument("--uid", type=int, default=1000, help="the unprivileged client's uid")
    parser.add_argument("--client", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        if os.geteuid() == 0:
            print("demo: the client half must not run as root", file=sys.stderr)
            return 2
        return client_main(args.client)
    return root_main(args.config.resolve(), args.uid)


if __name__ == "__main__":
    sys.exit(main())
