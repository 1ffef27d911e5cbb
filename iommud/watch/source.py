"""PCI uevents from the kernel, as typed items on the asyncio loop.

- ``translate_uevent``: a pure function from a uevent's property dict (ACTION, DEVPATH,
  SUBSYSTEM, DRIVER, PCI_SLOT_NAME, SEQNUM) to a frozen ``HostEvent`` or ``None``.
- ``UdevSource``: a pyudev netlink monitor whose fd is registered with the running loop
  (``loop.add_reader``; no polling thread, no pyudev observer thread). It yields
  ``HostEvent`` items and ``Resync`` items whenever a view of the host may have drifted
  from sysfs: at startup (unless the consumer reads the host itself right after opening
  the source, as the daemon does), after ENOBUFS (the kernel dropped uevents because our
  socket buffer was full), after a seqnum gap on the kernel source, or when the consumer
  fell behind.

This module reads no sysfs, keeps no view of the host and decides nothing: it only says
what the kernel announced. No pyudev exception escapes it: every pyudev/OSError failure
becomes a ``Resync`` item, or a ``KernelError`` when the monitor cannot be opened at all.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from iommud.errors import KernelError
from iommud.pci import BDF_RE

log = structlog.get_logger(__name__)

SourceKind = Literal["udev", "kernel"]


# udevd asks for a 128 MiB buffer on its own kernel socket (systemd src/udev/udevd.c);
# a big buffer makes ENOBUFS rare, and the resync makes it harmless when it happens.
_RCVBUF_BYTES = 128 * 1024 * 1024
# Events drained per readiness callback, so a uevent storm cannot starve the loop.
_DRAIN_BATCH = 256
# After this many consecutive receive failures the source gives up (no busy loop).
_MAX_CONSECUTIVE_ERRORS = 16


class HostAction(enum.StrEnum):
    """The PCI uevent actions iommud acts on (bind/unbind exist since Linux 4.14)."""

    ADD = "add"
    REMOVE = "remove"
    CHANGE = "change"
    BIND = "bind"
    UNBIND = "unbind"
    # Not a PCI action: the device's VFIO cdev (class "vfio-dev", /dev/vfio/devices/vfioN)
    # was removed. vfio-pci's remove (an unbind or a hot-unplug) does that FIRST
    # (drivers/vfio/vfio_main.c vfio_unregister_group_dev -> vfio_device_del), then
    # waits for every open file of the device. For a delegated device it is the
    # daemon's only news: the REQ irq the kernel rings then is the VMM's own.
    CDEV_REMOVE = "cdev_remove"


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
    that do not name a valid PCI address. A ``vfio-dev`` remove (DEVPATH
    ``.../0000:00:10.0/vfio-dev/vfio0``) is ``CDEV_REMOVE`` of its PCI parent. Pure: no I/O.
    """
    if props.get("SUBSYSTEM") == "vfio-dev":
        return _cdev_event(props)
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


def _cdev_event(props: Mapping[str, str]) -> HostEvent | None:
    if props.get("ACTION") != "remove":
        return None
    parts = props.get("DEVPATH", "").rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != "vfio-dev":
        return None
    bdf = parts[-3].lower()
    if not BDF_RE.match(bdf):
        return None
    return HostEvent(action=HostAction.CDEV_REMOVE, bdf=bdf, seqnum=parse_seqnum(props))


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

    On the udev source the kernel-side BPF filter keeps all but PCI and vfio-dev (VFIO
    cdev) events out of our buffer; on the kernel source we take every uevent so the
    seqnum check works.
    """
    import pyudev

    try:
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source=kind)
        if kind == "udev":
            monitor.filter_by("pci")
            monitor.filter_by("vfio-dev")
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

    The first item is ``Resync("startup")`` unless ``start(resync=False)``. Items are
    buffered from ``start`` on, while nobody iterates, up to ``max_pending``; beyond that
    the buffer is replaced by a single ``Resync("backlog")`` (a rescan subsumes anything
    we dropped). A ``Resync`` also discards the events queued before it, for the same
    reason.
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

    async def start(self, *, resync: bool = True) -> None:
        """Open the monitor (``KernelError`` if it cannot be) and start buffering.

        ``resync``: begin with ``Resync("startup")``, since what happened before now is
        unknown. False when the consumer reads the whole host itself after this call
        (the daemon's start-up read, iommud.watch.watcher ``HostFollower``): that read
        is the resync, and every uevent from now on is buffered here.
        """
        if self._monitor is None:
            self._monitor = open_monitor(self.kind)
        self._loop = asyncio.get_running_loop()
        self._fd = self._monitor.fileno()
        if resync:
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

    def next_nowait(self) -> SourceItem | None:
        """The next buffered item, or None when none is buffered now (no waiting).

        Raises the ``SourceFailedError`` once the buffer is empty if the monitor failed.
        """
        if self._pending:
            return self._pending.popleft()
        if self._failure is not None:
            raise self._failure
        return None

    @property
    def pending(self) -> int:
        """How many items are buffered now."""
        return len(self._pending)

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
