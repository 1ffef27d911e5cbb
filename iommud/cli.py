"""``iommuctl``: the admin and scripting front end of iommud.

Subcommands: ``ls`` (devices and groups: viability, offenders, the path a claim would
take, owner), ``monitor`` (live event stream), ``status``, ``claim``/``release`` (for
scripts and tests; ``claim --hold`` keeps the lease until signalled, since a lease ends
with its connection), ``revoke`` (root only, enforced by the daemon), and ``vm`` /
``vm-attach``: run an unmodified VMM on delegated devices and hot-add more
(``iommud.vmm``; the help text below is its manual). Every command has ``--json``.

Exit codes: 0 success, 1 the daemon answered with an error (printed as
``iommuctl: <code>: <message>`` plus its details), 2 the daemon cannot be reached or
went away. The formatting functions are pure (models in, text out). This module talks to
the daemon only through :class:`iommud.client.aio.AsyncClient`: asyncio lets ``monitor``
and ``claim --hold`` wait for an event, a signal or the daemon going away at once,
without exceptions thrown out of signal handlers. It never touches sysfs or /dev.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Final, TextIO

from iommud import __version__
from iommud.client.aio import AsyncClient
from iommud.errors import IommudError, UnsupportedVersionError
from iommud.protocol import messages as m
from iommud.protocol.limits import LATEST_VERSION, PROTOCOL_VERSION
from iommud.protocol.v2 import LeaseEnforced, LeaseInfoV2, LeaseRevokedV2, StatusReplyV2
from iommud.transport import DEFAULT_SOCKET
from iommud.vmm import control
from iommud.vmm.launcher import EXIT_USAGE, Launcher, VmError, VmOptions, prepare
from iommud.vmm.template import TemplateError

CLIENT_NAME: Final = f"iommuctl/{__version__}"

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # the daemon refused (typed error reply)
EXIT_UNREACHABLE: Final = 2  # no daemon, or it went away


class UnreachableError(Exception):
    """The daemon is not running, refused the connection, or went away."""


# --------------------------------------------------------------------------- formatting


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A left-aligned text table; the last column is not padded (no trailing spaces)."""
    all_rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = []
    for r in all_rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _offenders(offenders: Iterable[m.Offender]) -> str:
    return ",".join(f"{o.bdf}={o.driver}" for o in offenders) or "-"


def _owner(owner: m.Owner | None) -> str:
    if owner is None:
        return "-"
    if owner.uid is None or owner.pid is None:
        return "held"  # by another uid: only root and that uid see who (PROTOCOL.md 9)
    return f"uid {owner.uid} pid {owner.pid}"


LS_HEADERS: Final = ("BDF", "ID", "DRIVER", "GROUP", "VIABLE", "OFFENDERS", "PATH", "OWNER")


def format_ls(devices: Sequence[m.DeviceEntry], groups: Sequence[m.GroupEntry]) -> str:
    """One row per device, grouped by IOMMU group; group columns on a group's first row.

    Devices outside any group come last (``-``: no IOMMU, not claimable). A bridge shows
    ``(bridge)`` after its driver: it never DMAs, so it never makes its group unviable.
    """
    by_group = {g.group_id: g for g in groups}
    devs = {d.bdf: d for d in devices}

    def sort_key(d: m.DeviceEntry) -> tuple[int, str]:
        return (d.group_id if d.group_id is not None else 1 << 32, d.bdf)

    rows: list[list[str]] = []
    seen: set[int] = set()
    for d in sorted(devs.values(), key=sort_key):
        driver = d.driver or "-"
        if d.is_bridge:
            driver += " (bridge)"
        row = [d.bdf, f"{d.vendor:04x}:{d.device:04x}", driver]
        g = by_group.get(d.group_id) if d.group_id is not None else None
        if d.group_id is None:
            row += ["-", "-", "-", "-", "-"]
        elif d.group_id in seen:
            row += ["", "", "", "", ""]
        elif g is None:
            row += [str(d.group_id), "?", "?", "?", "?"]
        else:
            seen.add(d.group_id)
            row += [
                str(g.group_id),
                "yes" if g.is_viable else "no",
                _offenders(g.offenders),
                g.path.value if g.path is not None else "-",
                _owner(g.owner),
            ]
        rows.append(row)
    # groups whose devices were not listed (raced with a hot unplug): still show them
    for g in sorted(groups, key=lambda g: g.group_id):
        if g.group_id not in seen and not any(b in devs for b in g.devices):
            rows.append(
                [
                    "-",
                    "-",
                    "-",
                    str(g.group_id),
                    "yes" if g.is_viable else "no",
                    _offenders(g.offenders),
                    g.path.value if g.path is not None else "-",
                    _owner(g.owner),
                ]
            )
    return table(LS_HEADERS, rows)


def format_timestamp(ts: float) -> str:
    """``2026-11-24T21:50:01.123`` in local time (what an admin's clock shows)."""
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="milliseconds")


def _group(gid: int | None) -> str:
    return f"group {gid if gid is not None else '-'}"


def describe_event(ev: m.Event) -> str:
    """The part after the timestamp and event name, e.g. ``0000:01:03.0 e1000 group 7``."""
    match ev:
        case m.DriverBound():
            return f"{ev.bdf} {ev.driver} {_group(ev.group_id)}"
        case m.DriverUnbound():
            return f"{ev.bdf} {ev.driver or '-'} {_group(ev.group_id)}"
        case m.DeviceAdded() | m.DeviceRemoved():
            return f"{ev.bdf} {_group(ev.group_id)}"
        case m.ViabilityChanged():
            if ev.is_viable:
                return f"{_group(ev.group_id)} viable"
            return f"{_group(ev.group_id)} not viable: {_offenders(ev.offenders)}"
        case LeaseRevokedV2(grace_s=float() as grace):
            return f"lease {ev.lease_id} {_group(ev.group_id)}: {ev.reason} (grace {grace:g} s)"
        case m.LeaseRevoked():
            return f"lease {ev.lease_id} {_group(ev.group_id)}: {ev.reason}"
        case LeaseEnforced():
            killed = ",".join(f"{h.pid}({h.comm})" for h in ev.killed) or "none"
            return f"lease {ev.lease_id} {_group(ev.group_id)}: {ev.outcome} killed {killed}"
        case m.BindRefused():
            return f"{ev.bdf} {ev.driver} {_group(ev.group_id)}: {ev.reason}"
    return ""  # pragma: no cover - every EventName has a case above


def format_event(ev: m.Event) -> str:
    """``2026-11-24T21:50:01.123 driver_bound 0000:01:03.0 e1000 group 7``."""
    return f"{format_timestamp(ev.ts)} {ev.event.value} {describe_event(ev)}".rstrip()


def _pinned(lease: LeaseInfoV2) -> str:
    if lease.pinned_bytes is None:
        return "-"
    pids = ",".join(map(str, lease.pinned_pids)) or "none"
    return f"{lease.pinned_bytes // 1024} KiB by {pids}"


def format_status(st: m.StatusReply | StatusReplyV2) -> str:
    lines = [
        f"daemon        iommud {st.version}",
        f"event source  {st.event_source or 'none'}",
        f"clients       {st.clients}",
        f"uptime        {st.uptime_s:.1f} s",
        f"leases        {len(st.leases)}",
    ]
    headers: tuple[str, ...] = ("LEASE", "GROUP", "UID", "PID", "BACKEND", "IOAS", "DEVICES")
    rows = []
    for lease in sorted(st.leases, key=lambda x: x.lease_id):
        row = [
            str(lease.lease_id),
            str(lease.group_id),
            str(lease.uid),
            str(lease.pid),
            lease.backend.value,
            str(lease.ioas_id),
            ",".join(lease.devices),
        ]
        if isinstance(lease, LeaseInfoV2):
            row += [lease.mode.value, lease.state.value, _pinned(lease)]
        rows.append(row)
    if isinstance(st, StatusReplyV2):
        headers += ("MODE", "STATE", "PINNED (VmPin)")
        lines.append(f"restores      {len(st.restores)}")
    if rows:
        lines += ["", table(headers, rows)]
    if isinstance(st, StatusReplyV2) and st.restores:
        restoring = [[r.bdf, r.waiting_for] for r in st.restores]
        lines += ["", table(("RESTORING", "WAITING FOR"), restoring)]
    return "\n".join(lines)


def format_error(exc: IommudError) -> str:
    """``iommuctl: <code>: <message>`` then one indented ``key: value`` line per detail."""
    lines = [f"iommuctl: {exc.code.value}: {exc.message}"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(exc.details.items())]
    return "\n".join(lines)


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# --------------------------------------------------------------------------- commands


class Output:
    """stdout/stderr with a flush per line (``monitor`` output is read live by pipes)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def warn(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


async def _connect(path: str, version: int = PROTOCOL_VERSION) -> AsyncClient:
    try:
        return await AsyncClient.connect(path, CLIENT_NAME, version=version)
    except FileNotFoundError:
        raise UnreachableError(f"daemon not running (no socket at {path})") from None
    except ConnectionRefusedError:
        raise UnreachableError(f"daemon not running (connection refused at {path})") from None
    except PermissionError:
        raise UnreachableError(f"permission denied connecting to {path}") from None
    except OSError as exc:
        raise UnreachableError(f"cannot connect to {path}: {exc.strerror or exc}") from None


async def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    async with await _connect(args.socket) as client:
        devices = await client.list_devices()
        groups = await client.list_groups()
    if args.json:
        out.print(
            to_json(
                {
                    "devices": [d.model_dump(mode="json") for d in devices],
                    "groups": [g.model_dump(mode="json") for g in groups],
                }
            )
        )
    else:
        out.print(format_ls(devices, groups))
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, out: Output) -> int:
    # v2: each lease also shows its mode, state and its VMM's pinned bytes
    try:
        client = await _connect(args.socket, LATEST_VERSION)
    except UnsupportedVersionError:
        client = await _connect(args.socket)
    async with client:
        st = await client.status()
    if args.json:
        out.print(to_json(st.model_dump(mode="json", exclude={"op", "id", "fds"})))
    else:
        out.print(format_status(st))
    return EXIT_OK


async def cmd_monitor(args: argparse.Namespace, out: Output) -> int:
    stop = _stop_on_signals()
    async with await _connect(args.socket) as client:
        await client.subscribe(args.events, args.groups)
        # on stderr even with --json: scripts may wait for it (the subscription is live)
        out.warn(f"iommuctl: monitoring {args.socket} (Ctrl-C to stop)")

        async def pump() -> None:
            async for ev in client.events():
                out.print(to_json(ev.model_dump(mode="json")) if args.json else format_event(ev))

        reason = await _first(pump(), stop)
    if reason == "signal":
        return EXIT_OK
    out.warn("iommuctl: the daemon closed the connection")
    return EXIT_UNREACHABLE


async def cmd_claim(args: argparse.Namespace, out: Output) -> int:
    stop = _stop_on_signals() if args.hold else None
    async with await _connect(args.socket) as client:
        result = await client.claim(args.devices, args.backend)
        with result:  # device fds: closed here, iommuctl has no use for them
            bdfs = [d.bdf for d in result.devices]
            info = {
                "lease_id": result.lease_id,
                "group_id": result.group_id,
                "backend": result.backend.value,
                "ioas_id": result.ioas_id,
                "devices": bdfs,
            }
        if args.json:
            out.print(to_json(info))
        else:
            out.print(
                f"lease {result.lease_id} group {result.group_id} backend "
                f"{result.backend.value} ioas {result.ioas_id} devices {','.join(bdfs)}"
            )
        if stop is None:
            return EXIT_OK
        await client.subscribe([m.EventName.LEASE_REVOKED], [result.group_id])
        revoked: list[m.LeaseRevoked] = []

        async def watch() -> None:
            async for ev in client.events():
                if isinstance(ev, m.LeaseRevoked) and ev.lease_id == result.lease_id:
                    revoked.append(ev)
                    return

        if await _first(watch(), stop) == "signal":
            await client.release(result.lease_id)
            return EXIT_OK
    if revoked:
        out.warn(f"iommuctl: lease {revoked[0].lease_id} revoked: {revoked[0].reason}")
        return EXIT_ERROR
    out.warn("iommuctl: the daemon closed the connection")
    return EXIT_UNREACHABLE


async def cmd_release(args: argparse.Namespace, out: Output) -> int:
    async with await _connect(args.socket) as client:
        await client.release(args.lease)
    if args.json:
        out.print(to_json({"released": args.lease}))
    return EXIT_OK


async def cmd_revoke(args: argparse.Namespace, out: Output) -> int:
    async with await _connect(args.socket) as client:
        revoked = await client.revoke(args.group, args.reason)
    if args.json:
        out.print(to_json({"group_id": args.group, "revoked_leases": list(revoked)}))
    elif revoked:
        out.print(f"group {args.group}: revoked lease(s) {', '.join(map(str, revoked))}")
    else:
        out.print(f"group {args.group}: no lease to revoke")
    return EXIT_OK


def _vm_record(out: Output, as_json: bool) -> Callable[..., None]:
    """The launcher's records: JSON lines on stdout, or ``iommuctl: vm.x k=v`` on stderr."""

    def report(event: str, **fields: Any) -> None:
        if as_json:
            out.print(to_json({"event": event, **fields}))
        else:
            text = " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items() if v is not None)
            out.warn(f"iommuctl: {event} {text}")

    return report


async def cmd_vm(args: argparse.Namespace, out: Output) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    opts = VmOptions(
        devices=tuple(args.devices or ()),
        argv=tuple(command),
        held=tuple(args.held or ()),
        control=args.control,
        qmp=not args.no_qmp,
        stop_timeout=args.grace,
    )
    template, binary = prepare(opts)  # bad input fails before the daemon is asked
    stop = _stop_on_signals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    try:
        async with await _connect(args.socket, version=2) as client:
            hello = client.hello
            if hello is None or "delegate" not in hello.capabilities:
                raise VmError("the daemon does not delegate (it needs iommufd and protocol 2)", 1)
            launcher = Launcher(client, template, binary, opts, _vm_record(out, args.json))
            return await launcher.run(stop)
    finally:
        if not stop.done():
            stop.cancel()


async def cmd_vm_attach(args: argparse.Namespace, out: Output) -> int:
    n = len(args.devices)
    if len(args.buses or ()) > n or len(args.ids or ()) > n:
        raise VmError("more --bus or --id than --device")
    req = {
        "op": "attach",
        "devices": args.devices,
        "buses": args.buses,
        "ids": args.ids,
        "hold": args.held or [],
    }
    try:
        async with asyncio.timeout(args.timeout):
            answer = await control.request(args.control, req)
    except (OSError, TimeoutError) as exc:
        raise UnreachableError(f"no launcher at {args.control}: {exc}") from None
    if args.json:
        out.print(to_json(answer))
    elif answer.get("ok"):
        for lease in answer["leases"]:
            devs = ", ".join(f"{d['bdf']} as {d['id']}" for d in lease["devices"])
            out.print(f"lease {lease['lease_id']} group {lease['group_id']}: {devs}")
    if not answer.get("ok"):
        details = answer.get("details") or {}
        lines = [f"iommuctl: {answer.get('code')}: {answer.get('message')}"]
        lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(details.items())]
        out.warn("\n".join(lines))
        return EXIT_ERROR
    return EXIT_OK


def _stop_on_signals(
    sigs: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> asyncio.Future[None]:
    """A future set by one of ``sigs`` (handlers removed again once it is done)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def fire() -> None:
        if not fut.done():
            fut.set_result(None)

    for sig in sigs:
        loop.add_signal_handler(sig, fire)

    def cleanup(_: object) -> None:
        for sig in sigs:
            loop.remove_signal_handler(sig)

    fut.add_done_callback(cleanup)
    return fut


async def _first(work: Coroutine[Any, Any, None], stop: asyncio.Future[None]) -> str:
    """Run ``work`` until it returns (``"done"``) or ``stop`` fires (``"signal"``)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not stop.done():
            stop.cancel()
    return "signal" if stop.done() and not stop.cancelled() else "done"


# --------------------------------------------------------------------------- entry

VM_HELP: Final = """\
Run a VMM as your own (unprivileged) user on devices iommud delegates to it.

  iommuctl vm --device 0000:00:10.0 -- qemu-system-x86_64 -machine q35 -m 1G ... \\
      -device pcie-root-port,id=rp0,chassis=1 \\
      -object iommufd,id=i0,fd={iommufd} \\
      -device vfio-pci,id=dev0,iommufd=i0,bus=rp0,fd={0000:00:10.0}

The devices are claimed in delegated mode (protocol 2; your [[access]] rule needs
delegate = true): one claim per IOMMU group, all on ONE iommufd. A group goes whole:
name its other DMA-capable devices with --hold (claimed, moved to vfio-pci, given to
no one; back to their drivers when the VM ends) or with --device. {iommufd} becomes the
/dev/iommu fd number and {BDF} the device's cdev fd number; the VMM inherits exactly
those fds and the launcher's QMP monitor socket, nothing else. Use ONE -object iommufd
for the whole VM (two objects pin guest RAM twice). The VMM binds the devices and pins
its guest RAM itself, against its own RLIMIT_MEMLOCK.

Supervision: the leases live as long as the VMM. When it exits they are released and
iommuctl exits with its status. SIGTERM, SIGINT or SIGHUP to iommuctl: SIGTERM to the
VMM, SIGKILL after --grace seconds, then release. If iommuctl is killed, the VMM gets
SIGKILL (PR_SET_PDEATHSIG). If the daemon goes away, the VMM is stopped (exit 2).

On lease_revoked (iommuctl revoke, a host unplug, a driver grabbing the group) the
launcher asks the VMM to let go at once: QMP device_del of every device of that lease
(its id= from the -device option; iommuctl adds id=iommuctl-<bdf> if there is none). A
lease is released when QEMU reports DEVICE_DELETED for all its devices. A guest OS must
answer the unplug; the daemon blocks DMA at once either way and enforces after its grace
period.

Hotplug: with --control PATH (a 0600 socket, up once the VMM answers QMP, only your uid
may use it), `iommuctl vm-attach --control PATH --device BDF --bus rp1` claims the device
(joining the VM's iommufd) and adds it over QMP (getfd, object-add if the VM has no
iommufd yet, device_add vfio-pci). Put hot-pluggable devices behind a pcie-root-port.
"""

VM_EPILOG: Final = """\
memory lock limit (for the admin):
  The VMM pins all guest RAM through the iommufd, charged to the VMM process's own
  RLIMIT_MEMLOCK (the daemon sets per-process accounting). The default (8 MiB) is far
  too small; an unprivileged user cannot raise the hard limit. Size it guest RAM plus
  about 1 MiB (ROMs), e.g. for a 1 GiB guest:
    systemd unit running iommuctl vm:  LimitMEMLOCK=1100M
    or as root, for a running shell:   prlimit --memlock=1153433600:1153433600 --pid PID
    or at login (pam_limits, KiB):     /etc/security/limits.d/vm.conf: USER - memlock 1126400
  iommuctl vm passes its limit on to the VMM (the vm.started record shows it).
  A VMM that fails with "vfio_container_dma_map(...) = -12" hit this limit. Never give a
  VMM CAP_IPC_LOCK (it would pin without any limit).

exit status:
  the VMM's (128+N if killed by signal N); 1 the daemon refused (error printed);
  2 the daemon is unreachable or went away; 64 bad command line (unknown placeholder,
  device not claimed, ...); 126 VMM not executable; 127 VMM not found.
"""


def _bdf(text: str) -> str:
    return text.strip().lower()


def _vm_devices(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--device`` and ``--hold`` (both repeatable) of ``vm`` and ``vm-attach``."""
    parser.add_argument(
        "--device",
        dest="devices",
        action="append",
        required=required,
        type=_bdf,
        metavar="BDF",
        help="claim this device and give it to the VM (its fd replaces {BDF})",
    )
    parser.add_argument(
        "--hold",
        dest="held",
        action="append",
        type=_bdf,
        metavar="BDF",
        help="claim this device with its group but give it to no one",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iommuctl", description="Inspect and drive iommud, the IOMMU/VFIO device broker."
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("IOMMUD_SOCKET", DEFAULT_SOCKET),
        help="daemon socket (default: $IOMMUD_SOCKET or %(default)s)",
    )
    p.add_argument("--version", action="version", version=f"iommuctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[..., Any], help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=fn)
        return sp

    add("ls", cmd_ls, "devices and IOMMU groups: viability, offenders, claim path, owner")
    mon = add("monitor", cmd_monitor, "live stream of host and lease events (Ctrl-C stops)")
    mon.add_argument(
        "--event",
        dest="events",
        action="append",
        choices=[e.value for e in m.EventName],
        help="only this event (repeatable; default all)",
    )
    mon.add_argument(
        "--group", dest="groups", action="append", type=int, help="only this group (repeatable)"
    )
    add("status", cmd_status, "daemon version, event source, clients and leases")
    cl = add("claim", cmd_claim, "claim devices (the lease ends when iommuctl exits)")
    cl.add_argument("devices", nargs="+", type=_bdf, metavar="BDF")
    cl.add_argument("--backend", choices=[b.value for b in m.Backend], default="auto")
    cl.add_argument(
        "--hold", action="store_true", help="keep the lease until SIGINT/SIGTERM, then release"
    )
    rel = add("release", cmd_release, "release a lease held by this connection")
    rel.add_argument("lease", type=int, metavar="LEASE")
    rev = add("revoke", cmd_revoke, "revoke every lease on a group (root only)")
    rev.add_argument("group", type=int, metavar="GROUP")
    rev.add_argument("--reason", default="revoked by an administrator")
    vm = sub.add_parser(
        "vm",
        help="run a VMM (QEMU >= 9.0) on delegated devices",
        description=VM_HELP,
        epilog=VM_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vm.add_argument("--json", action="store_true", help="records as JSON lines on stdout")
    vm.set_defaults(func=cmd_vm)
    _vm_devices(vm, required=False)
    vm.add_argument(
        "--control",
        metavar="PATH",
        help="listen here (0600) for vm-attach hotplug requests while the VMM runs",
    )
    vm.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT/SIGHUP: seconds between SIGTERM and SIGKILL to the VMM "
        "(default %(default)s)",
    )
    vm.add_argument(
        "--no-qmp",
        action="store_true",
        help="add no QMP monitor (then no device_del on revocation and no hotplug)",
    )
    vm.add_argument("command", nargs=argparse.REMAINDER, metavar="-- VMM [ARG...]")
    at = add(
        "vm-attach", cmd_vm_attach, "hot-add devices to a VM started with iommuctl vm --control"
    )
    at.add_argument("--control", required=True, metavar="PATH", help="the launcher's socket")
    _vm_devices(at, required=True)
    at.add_argument(
        "--bus", dest="buses", action="append", metavar="BUS", help="per --device, in order"
    )
    at.add_argument("--id", dest="ids", action="append", metavar="ID", help="QEMU id per --device")
    at.add_argument("--timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    return p


def run(argv: Sequence[str] | None = None, out: Output | None = None) -> int:
    """Parse ``argv``, run the command, map failures to exit codes (no tracebacks)."""
    args = build_parser().parse_args(argv)
    out = out or Output()
    command: Callable[[argparse.Namespace, Output], Coroutine[Any, Any, int]] = args.func
    try:
        return asyncio.run(command(args, out))
    except UnreachableError as exc:
        out.warn(f"iommuctl: {exc}")
        return EXIT_UNREACHABLE
    except TemplateError as exc:
        out.warn(f"iommuctl: vm: {exc}")
        return EXIT_USAGE
    except VmError as exc:
        out.warn(f"iommuctl: vm: {exc.message}")
        return exc.exit_code
    except IommudError as exc:
        out.warn(format_error(exc))
        return EXIT_ERROR
    except ConnectionError as exc:  # ClientClosedError: the daemon went away mid-request
        out.warn(f"iommuctl: {exc or 'the daemon closed the connection'}")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:  # Ctrl-C outside monitor/--hold (e.g. while connecting)
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
