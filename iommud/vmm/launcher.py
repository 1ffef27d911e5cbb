"""``iommuctl vm``: run an unmodified VMM on delegated devices, and keep it honest.

What the launcher does, in order (``Launcher.run``):

1. The command line is checked first (``template.parse_template``) and the VMM binary
   looked up: bad input fails before anything is claimed.
2. Delegated claims over protocol v2: the ``--device``s are split by IOMMU group
   (``list_devices``), one claim per group; the first claim gets a fresh /dev/iommu,
   the others join it (``iommufd_id``), so the whole VM has one iommufd and one IOAS.
3. The VMM is spawned with exactly those fds (``pass_fds``; every other fd of ours is
   close-on-exec) plus, unless ``--no-qmp``, the listening socket of a private QMP monitor
   (``-chardev socket,fd=N,server=on`` + ``-mon``: the user's own ``-qmp`` stays theirs).
   The launcher is connected to it before QEMU starts and the socket's path is removed at
   once: no one else can reach that monitor. The launcher then closes its own copies of
   the fds (the daemon keeps its duplicates; the VMM has its own).
4. Supervision: the leases live as long as the VMM. The VMM's exit releases them and the
   launcher exits with the VMM's status (128+N for a signal). SIGTERM/SIGINT/SIGHUP to the
   launcher: SIGTERM to the VMM, SIGKILL after ``stop_timeout``, then release. The VMM gets
   PR_SET_PDEATHSIG=SIGKILL, so a launcher killed outright takes its VMM along (and the
   daemon sees the session end). The daemon going away: the leases are gone with it, so
   the VMM is stopped the same way and the launcher exits 2.
5. ``lease_revoked``: QMP ``device_del`` of every device of that lease, at once (before
   the daemon's grace period, ``grace_s`` when the daemon sends it, runs out); reported as
   ``vm.revoked`` with what QEMU answered. The launcher does NOT release the revoked lease
   until QEMU reports ``DEVICE_DELETED`` (QEMU then closed its cdev fd): releasing earlier
   would let the daemon close its duplicates while QEMU still holds the device. A
   ``DEVICE_DELETED`` for every device of a lease (revoked, or unplugged by the guest)
   releases it.
6. Hotplug (``--control PATH``, ``iommuctl vm-attach``; ``hotplug.Hotplug`` behind
   ``control.ControlServer``): claim (joining the VM's iommufd), QMP ``getfd`` of the
   iommufd and ``object-add`` only when the VM has none yet, ``getfd`` of each cdev and
   ``device_add vfio-pci``.

The VM's leases and iommufd are ``state.VmState``'s. It never needs root and never
touches /dev or sysfs: every fd comes from the daemon. Records (``vm.*``) go to the
caller's ``Report``; timings are measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from iommud.client.aio import AsyncClient
from iommud.protocol import messages as m
from iommud.vmm.control import ControlServer
from iommud.vmm.hotplug import Hotplug
from iommud.vmm.qmp import QmpClient, QmpClosedError, QmpError
from iommud.vmm.state import Report, VmDevice, VmLease, VmState
from iommud.vmm.template import IOMMUFD, Template, parse_template

QMP_CHARDEV: Final = "iommuctl-qmp"

EXIT_ERROR: Final = 1  # the daemon refused a claim
EXIT_UNREACHABLE: Final = 2  # the daemon went away
EXIT_USAGE: Final = 64  # bad command line (sysexits EX_USAGE)
EXIT_NOT_EXECUTABLE: Final = 126
EXIT_NOT_FOUND: Final = 127

_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


class VmError(Exception):
    """The launcher cannot go on; ``exit_code`` is what ``iommuctl vm`` exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class VmOptions:
    devices: tuple[str, ...]
    argv: tuple[str, ...]
    held: tuple[str, ...] = ()
    control: str | None = None
    qmp: bool = True
    stop_timeout: float = 10.0
    qmp_timeout: float = 300.0  # nested TCG under load took 19 s; a hang guard only


def prepare(opts: VmOptions) -> tuple[Template, str]:
    """Check everything that needs no daemon: (the template, the VMM binary's path)."""
    template = parse_template(opts.argv, opts.devices, opts.held)
    if opts.control is not None:
        if not opts.qmp:
            raise VmError("--control needs the launcher's QMP monitor (drop --no-qmp)")
        if os.path.lexists(opts.control):
            raise VmError(f"--control {opts.control} exists: remove it or pick another path")
    binary = shutil.which(opts.argv[0])
    if binary is None:
        if os.path.sep in opts.argv[0] and os.path.exists(opts.argv[0]):
            raise VmError(f"{opts.argv[0]}: not executable", EXIT_NOT_EXECUTABLE)
        raise VmError(f"{opts.argv[0]}: VMM not found", EXIT_NOT_FOUND)
    return template, binary


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: the child gets SIGKILL when the launcher dies (PR_SET_PDEATHSIG).

    The fork happens on the loop's (main) thread, which lives as long as the launcher;
    the parent check closes the window of a launcher that died before the prctl.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(EXIT_UNREACHABLE)

    return preexec


def _qmp_socket() -> tuple[socket.socket, socket.socket]:
    """(listening socket for the VMM, our connection to it); no path is left behind."""
    rundir = tempfile.mkdtemp(prefix="iommuctl-vm-")  # mode 0700
    path = os.path.join(rundir, "qmp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(1)
        conn.connect(path)  # queued until the VMM accepts: no race with its start
    except BaseException:
        listener.close()
        conn.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(rundir)
    return listener, conn


def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: 128+N for a signal."""
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    """One VM: its leases, its VMM process and its QMP monitor."""

    def __init__(
        self,
        client: AsyncClient,
        template: Template,
        binary: str,
        opts: VmOptions,
        report: Report,
    ) -> None:
        self.template = template
        self.binary = binary
        self.opts = opts
        self.report = report
        self.vm = VmState(client, report, iommufd_object=template.iommufd_object)
        self.proc: asyncio.subprocess.Process | None = None

    # ------------------------------------------------------------------ start
    async def run(self, stop: asyncio.Future[None]) -> int:
        """Claim, start, supervise; the exit status (see the module docstring)."""
        t0 = time.monotonic()
        claims = await self.vm.claim(self.template.devices + self.template.held)
        claim_s = time.monotonic() - t0
        qmp_conn: socket.socket | None = None
        try:
            fds: dict[str, int] = {}
            for claim in claims:
                if claim.iommufd is not None:
                    fds[IOMMUFD] = claim.iommufd.fileno()
                lease = VmLease(claim.lease_id, claim.group_id)
                for dev in claim.devices:
                    if dev.bdf in self.template.held:
                        lease.held.append(dev.bdf)
                        continue
                    fds[dev.bdf] = dev.fd.fileno()
                    lease.devices.append(VmDevice(dev.bdf, self.template.qdev_ids[dev.bdf]))
                self.vm.leases[lease.lease_id] = lease
            extra: list[str] = []
            passed = list(fds.values())
            listener: socket.socket | None = None
            if self.opts.qmp:
                listener, qmp_conn = _qmp_socket()
                passed.append(listener.fileno())
                extra = [
                    "-chardev",
                    f"socket,id={QMP_CHARDEV},fd={listener.fileno()},server=on,wait=off",
                    "-mon",
                    f"chardev={QMP_CHARDEV},mode=control",
                ]
            argv = self.template.render(fds, extra)
            try:
                spawned = time.monotonic()
                self.proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    *argv[1:],
                    pass_fds=passed,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            except FileNotFoundError:
                raise VmError(f"{self.binary}: VMM not found", EXIT_NOT_FOUND) from None
            except PermissionError:
                raise VmError(f"{self.binary}: not executable", EXIT_NOT_EXECUTABLE) from None
            finally:
                if listener is not None:
                    listener.close()
        except BaseException:
            if qmp_conn is not None:
                qmp_conn.close()
            await self.vm.release_all()
            raise
        finally:
            for claim in claims:
                claim.close()  # the VMM has its copies, the daemon its duplicates
        return await self._supervise(stop, qmp_conn, claim_s, spawned)

    async def _connect_qmp(
        self, conn: socket.socket, stop: asyncio.Future[None]
    ) -> QmpClient | None:
        """QMP once the VMM answers; None if the VMM exits (or a signal comes) first."""
        assert self.proc is not None
        greeting = asyncio.ensure_future(QmpClient.start(conn))
        exited = asyncio.ensure_future(self.proc.wait())
        waits: set[asyncio.Future[Any]] = {greeting, exited, stop}
        try:
            done, _ = await asyncio.wait(
                waits, timeout=self.opts.qmp_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise VmError(f"the VMM did not answer QMP within {self.opts.qmp_timeout} s", 1)
            if greeting in done and greeting.exception() is None:
                return greeting.result()
            return None  # it exited, closed the monitor (exiting), or a signal came
        finally:
            exited.cancel()
            if not greeting.done():
                greeting.cancel()
                with contextlib.suppress(asyncio.CancelledError, QmpClosedError, QmpError):
                    await greeting

    async def _realized(self) -> dict[str, bool]:
        qmp = self.vm.qmp
        assert qmp is not None
        out = {}
        for lease in self.vm.leases.values():
            for dev in lease.devices:
                path = f"/machine/peripheral/{dev.qdev_id}"
                try:
                    got = await qmp.execute("qom-get", {"path": path, "property": "realized"})
                except QmpError:
                    got = False
                out[dev.qdev_id] = bool(got)
        return out

    # ------------------------------------------------------------------ supervise
    async def _supervise(
        self,
        stop: asyncio.Future[None],
        qmp_conn: socket.socket | None,
        claim_s: float,
        spawned: float,
    ) -> int:
        assert self.proc is not None
        control: ControlServer | None = None
        tasks: list[asyncio.Task[Any]] = []
        rc: int | None = None
        try:
            if qmp_conn is not None:
                self.vm.qmp = await self._connect_qmp(qmp_conn, stop)
                if self.vm.qmp is None and not stop.done():
                    rc = exit_status(await self.proc.wait())
                    self.report(
                        "vm.failed",
                        pid=self.proc.pid,
                        exit_status=rc,
                        hint="the VMM exited before QMP answered; if it reported -12 "
                        "(ENOMEM) from a DMA map, raise RLIMIT_MEMLOCK (iommuctl vm --help)",
                    )
                    return rc
            self.report(
                "vm.started",
                pid=self.proc.pid,
                iommufd_id=self.vm.iommufd_id,
                iommufd_object=self.vm.iommufd_object,
                leases=[lease.describe() for lease in self.vm.leases.values()],
                realized=await self._realized() if self.vm.qmp is not None else None,
                claim_s=claim_s,
                spawn_to_qmp_s=time.monotonic() - spawned,
                rlimit_memlock=resource.getrlimit(resource.RLIMIT_MEMLOCK)[0],
                control=self.opts.control,
            )
            if self.opts.control is not None and self.vm.qmp is not None:
                control = ControlServer(self.opts.control, Hotplug(self.vm).attach)
            exited = asyncio.create_task(self.proc.wait())
            daemon = asyncio.create_task(self._daemon_events())
            tasks = [exited, daemon]
            if self.vm.qmp is not None:
                tasks.append(asyncio.create_task(self._qmp_events()))
            waits: list[asyncio.Future[Any]] = [exited, daemon, stop]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                why = "vmm_exited"
            elif stop.done():
                why = "signal"
            else:
                why = "daemon_lost"
            rc = exit_status(await self._stop_vmm())
            self.report("vm.exited", pid=self.proc.pid, exit_status=rc, why=why)
            return EXIT_UNREACHABLE if why == "daemon_lost" else rc
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if control is not None:
                await control.aclose()
            if self.vm.qmp is not None:
                await self.vm.qmp.aclose()
            elif qmp_conn is not None:
                qmp_conn.close()
            if self.proc.returncode is None:
                await asyncio.shield(self._stop_vmm())
            await asyncio.shield(self.vm.release_all())

    async def _stop_vmm(self) -> int:
        """SIGTERM, SIGKILL after ``stop_timeout``; the VMM's returncode."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.opts.stop_timeout):
                    return await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        return await self.proc.wait()

    # ------------------------------------------------------------------ events
    async def _daemon_events(self) -> None:
        """Until the daemon closes the connection: react to our leases' events."""
        async for ev in self.vm.client.events():
            # By name and field, not class: protocol v2 may give lease_revoked its own
            # model (grace_s) and adds lease_enforced; a launcher built before either works.
            fields = ev.model_dump(mode="json", exclude={"op"})
            if fields.get("lease_id") not in self.vm.leases:
                continue
            if ev.event is m.EventName.LEASE_REVOKED:
                await self._on_revoked(fields)
            elif ev.event.value == "lease_enforced":
                self.report("vm.enforced", **fields)

    async def _on_revoked(self, ev: dict[str, Any]) -> None:
        received = time.time()
        lease = self.vm.leases[ev["lease_id"]]
        lease.revoked = ev["reason"]
        results = []
        for dev in lease.devices:
            if dev.deleted:
                continue
            sent = time.time()
            results.append(
                {"bdf": dev.bdf, "id": dev.qdev_id, "sent_at": sent, **await self._unplug(dev)}
            )
        self.report(
            "vm.revoked",
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            reason=lease.revoked,
            grace_s=ev.get("grace_s"),
            received_at=received,
            device_del=results,
        )

    async def _unplug(self, dev: VmDevice) -> dict[str, str]:
        if self.vm.qmp is None:
            return {"result": "no QMP monitor (--no-qmp): the VMM was not asked"}
        try:
            await self.vm.qmp.execute("device_del", {"id": dev.qdev_id})
        except QmpError as exc:
            return {"result": "refused", "error": exc.desc}
        except QmpClosedError:
            return {"result": "refused", "error": "QMP connection closed"}
        return {"result": "accepted"}

    async def _qmp_events(self) -> None:
        """DEVICE_DELETED: a lease whose devices are all gone from the VM is released."""
        assert self.vm.qmp is not None
        while (event := await self.vm.qmp.next_event()) is not None:
            if event.get("event") != "DEVICE_DELETED":
                continue
            qdev_id = event.get("data", {}).get("device")
            for lease in list(self.vm.leases.values()):
                for dev in lease.devices:
                    if dev.qdev_id != qdev_id or dev.deleted:
                        continue
                    dev.deleted = True
                    self.report("vm.device_deleted", bdf=dev.bdf, id=dev.qdev_id)
                    if all(d.deleted for d in lease.devices):
                        await self.vm.release(lease.lease_id)


__all__ = [
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_USAGE",
    "Launcher",
    "VmError",
    "VmOptions",
    "exit_status",
    "prepare",
]
