"""PCI uevents from the kernel, turned into host events on the asyncio loop.

Three layers, thinnest possible each:

- ``translate_uevent``: a pure function from a uevent's property dict (ACTION, DEVPATH,
  SUBSYSTEM, DRIVER, PCI_SLOT_NAME, SEQNUM) to a frozen ``HostEvent`` or ``None``.
- ``UdevSource``: a pyudev netlink monitor whose fd is registered with the running loop
  (``loop.add_reader``; no polling thread, no pyudev observer thread). It yields
  ``HostEvent`` items and ``Resync`` items whenever the view may have drifted from sysfs:
  at startup, after ENOBUFS (the kernel dropped uevents because our socket buffer was
  full), after a seqnum gap on the kernel source, or when the consumer fell behind.
- ``HostWatcher``: consumes those items, keeps a ``HostSnapshot`` in step by re-reading
  only the affected IOMMU group (``group_of`` + ``read_group``), and hands each
  ``HostChange`` to a sink; ``broker_sink``/``watch_host`` wire it to the broker
  (publish driver_bound/.../viability_changed, then ``Broker.on_host_change``).

This module must not decide anything about viability or ownership, must not write to
sysfs, and must not let a pyudev exception escape: every pyudev/OSError failure becomes a
``Resync`` item, or a ``KernelError`` when the monitor cannot be opened at all.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import structlog

from iommud.errors import IommudError, KernelError, NotFoundError
from iommud.host.snapshot import (
    DEFAULT_DEV_ROOT,
    DEFAULT_SYS_ROOT,
    HostSnapshot,
    PciDevice,
    group_of,
    read_group,
    read_snapshot,
)
from iommud.host.viability import Viability, group_viability
from iommud.kernel import aio
from iommud.pci import BDF_RE
from iommud.protocol.messages import Event, EventName

log = structlog.get_logger(__name__)

SourceKind = Literal["udev", "kernel"]


# udevd asks for a 128 MiB buffer on its own kernel socket (systemd src/udev/udevd.c);
# a big buffer makes ENOBUFS rare, and the resync makes it harmless when it happens.
_RCVBUF_BYTES = 128 * 1024 * 1024
# Events drained per readiness callback, so a uevent storm cannot starve the loop.
_DRAIN_BATCH = 256
# After this many consecutive receive failures the source gives up (no busy loop).
_MAX_CONSECUTIVE_ERRORS = 16
# Devices remembered between vanishing from sysfs and their remove uevent.
_VANISHED_MAX = 4096


class HostAction(enum.StrEnum):
    """The PCI uevent actions iommud acts on (bind/unbind exist since Linux 4.14)."""

    ADD = "add"
    REMOVE = "remove"
    CHANGE = "change"
    BIND = "bind"
    UNBIND = "unbind"


@dataclass(frozen=True, slots=True)
class HostEvent:
    """One PCI device uevent. ``driver`` is what the kernel reported (absent on unbind:
    the kernel sends KOBJ_UNBIND after clearing dev->driver, drivers/base/dd.c)."""

    action: HostAction
    bdf: str
    driver: str | None = None
    seqnum: int | None = None


@dataclass(frozen=True, slots=True)
class Resync:
    """The view may have drifted from sysfs: the consumer must rescan everything."""

    reason: str


SourceItem = HostEvent | Resync


def translate_uevent(props: Mapping[str, str]) -> HostEvent | None:
    """A PCI uevent's properties -> ``HostEvent``; ``None`` for anything we ignore.

    Ignored: other subsystems, other actions (move, online, offline), and properties
    that do not name a valid PCI address. Pure: no I/O.
    """
    if props.get("SUBSYSTEM") != "pci":
        return None
    try:
        action = HostAction(props.get("ACTION", ""))
    except ValueError:
        return None
    bdf = props.get("PCI_SLOT_NAME") or os.path.basename(props.get("DEVPATH", "").rstrip("/"))
    bdf = bdf.lower()
    if not BDF_RE.match(bdf):
        return None
    driver = props.get("DRIVER") or None
    return HostEvent(action=action, bdf=bdf, driver=driver, seqnum=parse_seqnum(props))


def parse_seqnum(props: Mapping[str, str]) -> int | None:
    raw = props.get("SEQNUM")
    if raw is None or not raw.isdigit():
        return None
    return int(raw)


class SeqnumTracker:
    """Detects lost uevents from the kernel's global uevent sequence number.

    The kernel numbers every uevent of every subsystem (lib/kobject_uevent.c,
    uevent_seqnum), so a gap is only meaningful when we see *all* uevents in kernel
    order: the raw kernel source with no subsystem filter. udevd forwards events after
    processing them, in parallel for unrelated devices, so on the udev source gaps and
    reordering are normal and ``strict`` is off (ENOBUFS still triggers a resync).
    """

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.last: int | None = None

    def reset(self) -> None:
        self.last = None

    def observe(self, seqnum: int | None) -> str | None:
        """Record one event's seqnum; return a resync reason when in doubt."""
        if not self.strict:
            return None
        if seqnum is None:
            self.last = None
            return "seqnum_missing"
        last, self.last = self.last, seqnum
        if last is None or seqnum == last + 1:
            return None
        return "seqnum_gap" if seqnum > last else "seqnum_reorder"


def pick_source(run_dir: Path = Path("/run")) -> SourceKind:
    """``udev`` when a udevd runs (its control socket exists), else the raw kernel one."""
    return "udev" if (run_dir / "udev" / "control").exists() else "kernel"


class MonitorLike(Protocol):
    """The part of ``pyudev.Monitor`` we use (tests substitute a fake)."""

    def fileno(self) -> int: ...

    def start(self) -> None: ...

    def poll(self, timeout: float | None = None) -> Any: ...


def open_monitor(kind: SourceKind) -> MonitorLike:
    """A started, non-blocking pyudev netlink monitor for ``kind``.

    On the udev source the kernel-side BPF filter keeps non-PCI events out of our
    buffer; on the kernel source we take every uevent so the seqnum check works.
    """
    import pyudev

    try:
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source=kind)
        if kind == "udev":
            monitor.filter_by("pci")
        try:
            monitor.set_receive_buffer_size(_RCVBUF_BYTES)
        except OSError as exc:  # EPERM without CAP_NET_ADMIN: keep the default size
            log.info("udev.rcvbuf_default", errno=exc.errno)
        monitor.start()
    except OSError as exc:
        raise KernelError.from_oserror("udev_monitor_open", exc, source=kind) from exc
    except Exception as exc:  # pyudev raises ValueError/ImportError-ish things too
        raise KernelError("udev_monitor_open", errno.EIO, str(exc), source=kind) from exc
    return monitor  # type: ignore[no-any-return]


class SourceFailedError(KernelError):
    """The monitor kept failing; the daemon should restart the source or exit."""


class UdevSource:
    """Async iterator of ``SourceItem`` fed by a netlink monitor registered on the loop.

    The first item is always ``Resync("startup")``. Items are buffered up to
    ``max_pending``; beyond that the buffer is replaced by a single
    ``Resync("backlog")`` (a rescan subsumes anything we dropped). A ``Resync`` also
    discards the events queued before it, for the same reason.
    """

    def __init__(
        self,
        kind: SourceKind | None = None,
        *,
        monitor: MonitorLike | None = None,
        max_pending: int = 4096,
    ) -> None:
        self.kind: SourceKind = kind or pick_source()
        self._monitor = monitor
        self._max_pending = max_pending
        self._pending: collections.deque[SourceItem] = collections.deque()
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._closed = False
        self._failure: SourceFailedError | None = None
        self._errors = 0
        self.tracker = SeqnumTracker(strict=self.kind == "kernel")
        self.received = 0  # uevents read from the socket, any subsystem
        self.resyncs: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        if self._monitor is None:
            self._monitor = open_monitor(self.kind)
        self._loop = asyncio.get_running_loop()
        self._fd = self._monitor.fileno()
        self._push(Resync("startup"))
        self._loop.add_reader(self._fd, self._on_readable)
        log.info("udev.source_started", source=self.kind, seqnum_check=self.tracker.strict)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None
        # pyudev closes the socket in Monitor.__del__ (udev_monitor_unref); dropping the
        # last reference closes it now under CPython.
        self._monitor = None
        self._ready.set()
        log.info("udev.source_closed", source=self.kind)

    async def __aenter__(self) -> UdevSource:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> UdevSource:
        return self

    async def __anext__(self) -> SourceItem:
        while not self._pending:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()

    def _push(self, item: SourceItem) -> None:
        if isinstance(item, Resync):
            self.resyncs[item.reason] += 1
            self._pending.clear()
        elif len(self._pending) >= self._max_pending:
            log.warning("udev.backlog", pending=len(self._pending))
            self.resyncs["backlog"] += 1
            self._pending.clear()
            item = Resync("backlog")
        self._pending.append(item)
        self._ready.set()

    def _on_readable(self) -> None:
        """Drain what the socket holds now (bounded), translating as we go."""
        monitor = self._monitor
        if monitor is None:
            return
        for _ in range(_DRAIN_BATCH):
            try:
                device = monitor.poll(timeout=0)
                props = dict(device.properties) if device is not None else None
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped uevents for us; the socket stays usable.
                    log.warning("udev.enobufs", source=self.kind)
                    self.tracker.reset()
                    self._push(Resync("enobufs"))
                    continue
                self._receive_failed(exc)
                return
            except Exception as exc:  # pyudev's own errors never leave this module
                self._receive_failed(exc)
                return
            if props is None:
                return
            self._errors = 0
            self.received += 1
            reason = self.tracker.observe(parse_seqnum(props))
            if reason is not None:
                log.warning("udev.seqnum_doubt", reason=reason, seqnum=props.get("SEQNUM"))
                self._push(Resync(reason))
            event = translate_uevent(props)
            if event is not None:
                self._push(event)

    def _receive_failed(self, exc: BaseException) -> None:
        self._errors += 1
        log.warning("udev.receive_failed", error=repr(exc), consecutive=self._errors)
        self.tracker.reset()
        self._push(Resync("receive_error"))
        if self._errors >= _MAX_CONSECUTIVE_ERRORS and self._loop is not None:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            self._failure = SourceFailedError("udev_monitor_receive", err, source=self.kind)
            if self._fd is not None:
                self._loop.remove_reader(self._fd)
                self._fd = None
            log.error("udev.source_failed", source=self.kind, errno=err)


# --------------------------------------------------------------------------- watcher


@dataclass(frozen=True, slots=True)
class HostChange:
    """What one uevent (or one rescan) did to one IOMMU group.

    ``events`` say what happened, in order (on unbind ``driver`` is filled in from the
    previous snapshot, since the kernel's uevent no longer carries it). ``previous`` and
    ``snapshot`` are the views before and after (snapshots share structure, so keeping
    both is cheap); either lacks ``group_id`` when the group did not exist then.
    """

    group_id: int
    events: tuple[HostEvent, ...]
    previous: HostSnapshot
    snapshot: HostSnapshot
    resync: str | None = None  # the rescan reason, when this change came from a rescan

    def viability(self) -> tuple[Viability | None, Viability | None]:
        """The group's viability before and after (None where the group did not exist)."""
        return _viability(self.previous, self.group_id), _viability(self.snapshot, self.group_id)

    def wire_events(self) -> list[dict[str, Any]]:
        """The protocol events this change implies, as ``{"event": name, **fields}``.

        One per host event (driver_bound, driver_unbound, device_added,
        device_removed; nothing for change) and a viability_changed when the group's
        viability or its offenders changed (none when the group vanished). The broker
        stamps ``ts``/``seq`` and publishes them; it alone decides about leases
        (bind_refused, lease_revoked).
        """
        gid = self.group_id
        out: list[dict[str, Any]] = []
        for ev in self.events:
            name = _WIRE_NAMES.get(ev.action)
            if name is None or (ev.action is HostAction.BIND and ev.driver is None):
                continue
            fields: dict[str, Any] = {"event": name, "bdf": ev.bdf, "group_id": gid}
            if ev.action in (HostAction.BIND, HostAction.UNBIND):
                fields["driver"] = ev.driver
            out.append(fields)
        before, after = self.viability()
        if after is not None and (
            before is None
            or (before.is_viable, before.offenders) != (after.is_viable, after.offenders)
        ):
            out.append(
                {
                    "event": "viability_changed",
                    "group_id": gid,
                    "is_viable": after.is_viable,
                    # non-PCI members (platform devices) cannot be named by a BDF on the wire
                    "offenders": [o.as_dict() for o in after.offenders if BDF_RE.match(o.bdf)],
                }
            )
        return out


_WIRE_NAMES: Final[Mapping[HostAction, str]] = {
    HostAction.BIND: "driver_bound",
    HostAction.UNBIND: "driver_unbound",
    HostAction.ADD: "device_added",
    HostAction.REMOVE: "device_removed",
}


def _viability(snapshot: HostSnapshot, group_id: int) -> Viability | None:
    return group_viability(snapshot, group_id) if group_id in snapshot.groups else None


HostChangeSink = Callable[[HostChange], Awaitable[None]]


class HostWatcher:
    """Keeps a ``HostSnapshot`` in step with sysfs and reports each group change.

    Per event it reads one device link (``group_of``) and one group (``read_group``):
    the cost does not depend on the number of devices on the host. A ``Resync`` re-reads
    everything off the loop and reports every group that differs, with synthesized
    events, so subscribers see the same story whether or not uevents were lost.
    """

    def __init__(
        self,
        sink: HostChangeSink,
        *,
        sys_root: Path = DEFAULT_SYS_ROOT,
        dev_root: Path = DEFAULT_DEV_ROOT,
        snapshot: HostSnapshot | None = None,
        source_kind: SourceKind | None = None,
    ) -> None:
        self._sink = sink
        self.sys_root = sys_root
        self.dev_root = dev_root
        self.snapshot = snapshot or HostSnapshot(
            {}, {}, has_iommufd=False, has_legacy_container=False
        )
        self.source_kind = source_kind
        self.events_handled = 0
        self.rescans = 0
        self.is_stale = snapshot is None
        # Devices seen vanishing before their remove uevent arrived: bdf -> group id.
        self._vanished: collections.OrderedDict[str, int] = collections.OrderedDict()

    async def run(self, source: AsyncIterator[SourceItem]) -> None:
        """Consume ``source`` until it ends (or the task is cancelled)."""
        async for item in source:
            if isinstance(item, Resync):
                await self.rescan(item.reason)
            else:
                await self.handle(item)

    async def rescan(self, reason: str) -> None:
        """Re-read the whole host (in a worker thread) and report what changed."""
        try:
            new = await aio.call("read_snapshot", read_snapshot, self.sys_root, self.dev_root)
        except IommudError as exc:
            # Keep the old view but remember it is stale: the next event rescans again.
            self.is_stale = True
            log.exception("udev.rescan_failed", reason=reason, code=exc.code, **exc.details)
            return
        self.is_stale = False
        self._vanished.clear()  # the diff below reports every removal
        old, self.snapshot = self.snapshot, new
        self.rescans += 1
        changed = 0
        for gid in sorted(old.groups.keys() | new.groups.keys()):
            before = _members(old, gid)
            after = _members(new, gid)
            if before == after and old.groups.get(gid) == new.groups.get(gid):
                continue
            changed += 1
            change = HostChange(gid, diff_events(before, after), old, new, resync=reason)
            await self._deliver(change)
        log.info("udev.rescanned", reason=reason, devices=len(new.devices), groups_changed=changed)

    async def handle(self, event: HostEvent) -> None:
        """Refresh the group(s) ``event`` touches and report each."""
        self.events_handled += 1
        if self.is_stale:
            await self.rescan("stale")
            return
        old = self.snapshot
        prev = old.devices.get(event.bdf)
        old_gid = prev.group_id if prev is not None else None
        new_gid: int | None = None
        if event.action is HostAction.REMOVE:
            if prev is None:  # it vanished while we handled an earlier event
                old_gid = self._vanished.pop(event.bdf, None)
        else:
            try:
                new_gid = group_of(self.sys_root, event.bdf)
            except NotFoundError:
                # Gone already (the kernel sends unbind, then removes the directory,
                # then sends remove): remember its group for the remove uevent.
                if old_gid is not None:
                    self._remember_vanished(event.bdf, old_gid)
            except IommudError as exc:
                log.warning("udev.event_unreadable", bdf=event.bdf, code=exc.code, **exc.details)
                await self.rescan("unreadable_device")
                return
        gids = [g for g in dict.fromkeys((old_gid, new_gid)) if g is not None]
        if not gids:
            log.debug("udev.event_no_group", action=event.action, bdf=event.bdf)
            return
        if event.action is HostAction.UNBIND and event.driver is None and prev is not None:
            event = replace(event, driver=prev.driver)
        for gid in gids:
            try:
                group, devices = read_group(self.sys_root, gid)
                self.snapshot = self.snapshot.with_group(group, devices)
            except NotFoundError:
                self.snapshot = self.snapshot.without_group(gid)
            except (IommudError, ValueError) as exc:
                log.warning("udev.group_unreadable", group_id=gid, error=repr(exc))
                await self.rescan("unreadable_group")
                return
            await self._deliver(HostChange(gid, (event,), old, self.snapshot))

    def _remember_vanished(self, bdf: str, group_id: int) -> None:
        self._vanished[bdf] = group_id
        self._vanished.move_to_end(bdf)
        while len(self._vanished) > _VANISHED_MAX:
            self._vanished.popitem(last=False)

    async def _deliver(self, change: HostChange) -> None:
        try:
            await self._sink(change)
        except Exception:
            # A broker bug must not stop the host view from following sysfs.
            log.exception("udev.sink_failed", group_id=change.group_id)


def _members(snapshot: HostSnapshot, group_id: int) -> tuple[PciDevice, ...]:
    if group_id not in snapshot.groups:
        return ()
    return snapshot.group_devices(group_id)


def diff_events(before: Iterable[PciDevice], after: Iterable[PciDevice]) -> tuple[HostEvent, ...]:
    """The events that turn one group's device list into another (pure; for rescans)."""
    old = {d.bdf: d for d in before}
    new = {d.bdf: d for d in after}
    out: list[HostEvent] = []
    for bdf in sorted(old.keys() | new.keys()):
        a, b = old.get(bdf), new.get(bdf)
        if a is not None and b is None:
            if a.driver is not None:
                out.append(HostEvent(HostAction.UNBIND, bdf, a.driver))
            out.append(HostEvent(HostAction.REMOVE, bdf))
        elif a is None and b is not None:
            out.append(HostEvent(HostAction.ADD, bdf))
            if b.driver is not None:
                out.append(HostEvent(HostAction.BIND, bdf, b.driver))
        elif a is not None and b is not None and a.driver != b.driver:
            if a.driver is not None:
                out.append(HostEvent(HostAction.UNBIND, bdf, a.driver))
            if b.driver is not None:
                out.append(HostEvent(HostAction.BIND, bdf, b.driver))
    return tuple(out)


# --------------------------------------------------------------------------- broker glue


class BrokerHooks(Protocol):
    """What the glue needs of ``iommud.broker.Broker`` (structural, for tests)."""

    event_source: str | None

    @property
    def snapshot(self) -> HostSnapshot: ...

    def publish(self, name: EventName, **fields: Any) -> Event: ...

    async def on_host_change(self, group_id: int, snapshot: HostSnapshot | None = None) -> None: ...


def broker_sink(broker: BrokerHooks) -> HostChangeSink:
    """Publish a change's events, then let the broker re-check the group's leases.

    Events go first so subscribers read bind -> viability lost -> lease revoked in
    order; publishing does not await, so it does not delay the broker's enforcement.
    """

    async def sink(change: HostChange) -> None:
        for fields in change.wire_events():
            name = EventName(fields.pop("event"))
            broker.publish(name, **fields)
        # The watcher just read this group: hand its view over instead of a re-read.
        await broker.on_host_change(change.group_id, change.snapshot)

    return sink


async def watch_host(
    broker: BrokerHooks,
    *,
    sys_root: Path = DEFAULT_SYS_ROOT,
    dev_root: Path = DEFAULT_DEV_ROOT,
    source: UdevSource | None = None,
) -> None:
    """The daemon's host watcher task: run it in the daemon's TaskGroup, cancel to stop.

    Call after ``broker.start()``: the watcher starts from the broker's snapshot, so the
    startup rescan reports only what changed since. Sets ``broker.event_source``.
    """
    src = source or UdevSource()
    broker.event_source = src.kind
    watcher = HostWatcher(
        broker_sink(broker),
        sys_root=sys_root,
        dev_root=dev_root,
        snapshot=broker.snapshot,
        source_kind=src.kind,
    )
    async with src:
        await watcher.run(src)
