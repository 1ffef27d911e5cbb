"""Start-up reads the host once and loses no uevent (host test, no VM).

``iommud.app.serve`` with the real Broker on the fake kernel and the lab tree
(tests/fakesys.lab_topology), the daemon's watcher (``HostFollower``) fed by a fake
netlink monitor, and the broker's full-tree reader (iommud.broker.hostview's
``read_snapshot``) wrapped: every call counted, and the first one held, before or after
it read the tree, until the test lets it return. So a host change and its uevent land
while the one start-up read runs, with no sleeps: the read either misses the change or
already shows it, and either way the daemon must be right when it reports READY.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import pytest
from topology import BRIDGE_FREE_SLOT, EDU0, NIC

from iommud.app import DaemonBroker, serve
from iommud.broker import Broker
from iommud.client import AsyncClient
from iommud.config import Config, DaemonConfig
from iommud.errors import KernelError
from iommud.fds import FdSet
from iommud.host.snapshot import HostSnapshot, read_snapshot
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.sdnotify import Notifier
from iommud.watch import HostFollower, UdevSource
from tests.fakekernel import FakeKernel
from tests.fakesys import CLASS_ETHERNET, E1000, FakeSys, lab_topology
from tests.serving import FdSnapshot, Logs
from tests.udev.fakemonitor import FakeMonitor, uevent

NIC_GROUP, EDU0_GROUP = 4, 3  # tests/fakesys.lab_topology's numbers


class Reads:
    """``read_snapshot``, counted; its first call held ``hold`` reading the tree (or not
    at all) until ``release`` is set, having set ``held``."""

    def __init__(self, hold: Literal["before", "after"] | None = None) -> None:
        self.hold = hold
        self.count = 0
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, sys_root: Path, dev_root: Path) -> HostSnapshot:
        self.count += 1
        first = self.count == 1
        if first and self.hold == "before":
            self._wait()
        snap = read_snapshot(sys_root, dev_root)
        if first and self.hold == "after":
            self._wait()
        return snap

    def _wait(self) -> None:
        self.held.set()
        if not self.release.wait(60):  # a hang guard for a broken test, not a bound
            raise TimeoutError("the test never released the start-up read")


class ReadyProbe(Notifier):
    """No systemd; at READY=1 it calls ``look`` and keeps what it returned in ``seen``:
    the daemon's state at the moment it declares itself ready."""

    def __init__(self) -> None:
        super().__init__({})
        self.look: Callable[[], object] = lambda: None
        self.seen: list[object] = []

    def notify(self, *states: str) -> bool:
        if "READY=1" in states:
            self.seen.append(self.look())
        return super().notify(*states)


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="iommud-s")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Daemon:
    """serve() as a task, with the test's handles on its broker, monitor and reads."""

    fs: FakeSys
    monitor: FakeMonitor
    reads: Reads
    path: str
    task: asyncio.Task[int]
    brokers: list[Broker]
    ready: ReadyProbe

    @property
    def broker(self) -> Broker:
        (broker,) = self.brokers
        return broker

    async def client(self) -> AsyncClient:
        """A client once the daemon serves (the socket accepts before that)."""
        async with asyncio.timeout(30):
            while True:
                try:
                    return await AsyncClient.connect(self.path, "startup-test")
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.02)

    async def stop(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on the loop
        assert await asyncio.wait_for(self.task, 30) == 0


class Starter(Protocol):
    def __call__(self, reads: Reads, source: Callable[[], UdevSource] | None = None) -> Daemon: ...


@pytest.fixture
async def start(
    tmp_path: Path, sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Starter]:
    """Starts serve() with given reads (once per test); stops it, checks no fd leaked."""
    fds = FdSnapshot.take()
    fs = lab_topology(tmp_path / "host")
    mon = FakeMonitor()
    started: list[Daemon] = []

    def starter(reads: Reads, source: Callable[[], UdevSource] | None = None) -> Daemon:
        monkeypatch.setattr("iommud.broker.hostview.read_snapshot", reads)
        brokers: list[Broker] = []
        config = Config(
            daemon=DaemonConfig(
                sys_root=fs.sys_root, dev_root=fs.dev_root, state_dir=tmp_path / "state"
            )
        )

        def factory(config: Config) -> Broker:
            brokers.append(Broker(config, FakeKernel(fs)))
            return brokers[-1]

        def watch(broker: DaemonBroker, config: Config) -> HostFollower:
            src = source() if source else UdevSource("kernel", monitor=mon)
            return HostFollower(broker, source=src)

        path = os.path.join(sockdir, "s")
        ready = ReadyProbe()
        task = asyncio.create_task(
            serve(config, factory, socket_path=path, host_watch=watch, notifier=ready)
        )
        started.append(Daemon(fs, mon, reads, path, task, brokers, ready))
        return started[-1]

    try:
        yield starter
    finally:
        for d in started:
            d.reads.release.set()
            if not d.task.done():
                d.task.cancel()
                await asyncio.gather(d.task, return_exceptions=True)
        mon.close()
    fds.assert_unchanged()


def dump(event: m.Event) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude={"ts", "seq", "op", "fds"})


def drain(q: asyncio.Queue[Any]) -> list[dict[str, Any]]:
    out = []
    while not q.empty():
        out.append(dump(q.get_nowait().event))
    return out


def names(logs: Logs) -> list[str]:
    return [e["event"] for e in logs]


async def test_start_up_reads_the_host_once(start: Starter, logs: Logs) -> None:
    """One full read of sysfs from process start to serving; the watcher was open first,
    caught up before READY, and follows after it."""
    d = start(Reads())
    async with await d.client() as client:
        await client.subscribe([m.EventName.DRIVER_UNBOUND])
        # Through the watcher's one queue: once this reached the client, anything the
        # watcher had queued at start-up (a start-up resync, say) has run too.
        d.fs.unbind(NIC)
        d.monitor.feed(uevent("unbind", NIC, 7))
        async with asyncio.timeout(10):
            ev = await anext(client.events())
        assert isinstance(ev, m.DriverUnbound)
        assert (ev.bdf, ev.driver, ev.group_id) == (NIC, "e1000", NIC_GROUP)
        assert d.reads.count == 1
        assert (d.broker.view.rescans, d.broker.event_source) == (0, "kernel")
    await d.stop()
    order = names(logs)
    steps = ["udev.source_started", "host.read_all", "udev.caught_up", "daemon.ready"]
    assert [order.index(s) for s in steps] == sorted(order.index(s) for s in steps)
    assert "host.rescanned" not in order
    assert d.reads.count == 1


@dataclass(frozen=True)
class HostChangeCase:
    """A change to the lab tree, the uevents the kernel sends for it, and what a
    subscriber hears when the daemon learns of it from those uevents (``heard``), or
    when the start-up read already showed it (``heard_if_read``: the device events the
    uevents name, no viability change; none where the device is gone)."""

    change: Callable[[FakeSys], None]
    uevents: tuple[Mapping[str, str], ...]
    group_id: int
    is_viable: bool
    heard: tuple[Mapping[str, object], ...]
    heard_if_read: tuple[Mapping[str, object], ...]


NEW = BRIDGE_FREE_SLOT  # a hot-added e1000 behind the bridge joins the NIC's group


def _add(fs: FakeSys) -> None:
    fs.add_device(NEW, *E1000, CLASS_ETHERNET, parent="0000:00:11.0", group=NIC_GROUP)
    fs.bind(NEW, "e1000")


def _viability(gid: int, offenders: tuple[tuple[str, str], ...]) -> dict[str, object]:
    return {
        "event": "viability_changed",
        "group_id": gid,
        "is_viable": not offenders,
        "offenders": [{"bdf": b, "driver": drv} for b, drv in offenders],
    }


CASES = {
    "unbind": HostChangeCase(
        lambda fs: fs.unbind(NIC),
        (uevent("unbind", NIC, 11),),
        NIC_GROUP,
        True,
        (
            {"event": "driver_unbound", "bdf": NIC, "driver": "e1000", "group_id": NIC_GROUP},
            _viability(NIC_GROUP, ()),
        ),
        # the uevent has no DRIVER (the kernel cleared it) and the view never saw one
        ({"event": "driver_unbound", "bdf": NIC, "driver": None, "group_id": NIC_GROUP},),
    ),
    "bind": HostChangeCase(
        lambda fs: fs.bind(EDU0, "e1000"),
        (uevent("bind", EDU0, 11, "e1000"),),
        EDU0_GROUP,
        False,
        (
            {"event": "driver_bound", "bdf": EDU0, "driver": "e1000", "group_id": EDU0_GROUP},
            _viability(EDU0_GROUP, ((EDU0, "e1000"),)),
        ),
        ({"event": "driver_bound", "bdf": EDU0, "driver": "e1000", "group_id": EDU0_GROUP},),
    ),
    "add": HostChangeCase(
        _add,
        (uevent("add", NEW, 11), uevent("bind", NEW, 12, "e1000")),
        NIC_GROUP,
        False,
        (
            {"event": "device_added", "bdf": NEW, "group_id": NIC_GROUP},
            _viability(NIC_GROUP, ((NIC, "e1000"), (NEW, "e1000"))),
            {"event": "driver_bound", "bdf": NEW, "driver": "e1000", "group_id": NIC_GROUP},
        ),
        (
            {"event": "device_added", "bdf": NEW, "group_id": NIC_GROUP},
            {"event": "driver_bound", "bdf": NEW, "driver": "e1000", "group_id": NIC_GROUP},
        ),
    ),
    "remove": HostChangeCase(
        lambda fs: fs.remove_device(NIC),
        (uevent("unbind", NIC, 11), uevent("remove", NIC, 12)),
        NIC_GROUP,
        True,
        (
            {"event": "driver_unbound", "bdf": NIC, "driver": "e1000", "group_id": NIC_GROUP},
            _viability(NIC_GROUP, ()),
            {"event": "device_removed", "bdf": NIC, "group_id": NIC_GROUP},
        ),
        (),
    ),
}


async def _during_the_read(d: Daemon, case: HostChangeCase) -> asyncio.Queue[Any]:
    """Wait until the start-up read is held; subscribe an in-process session (a client
    connected by then would be one); change the host and send the uevents; let go."""
    async with asyncio.timeout(30):
        await asyncio.to_thread(d.reads.held.wait)
    session = d.broker.open_session(Identity(uid=0, gid=0, pid=1))
    await d.broker.handle(session, m.Subscribe(id=1), FdSet())
    case.change(d.fs)
    d.monitor.feed(*case.uevents)
    d.reads.release.set()
    return d.broker.events(session)


@pytest.mark.parametrize("action", CASES)
async def test_a_change_the_start_up_read_missed_is_applied_before_ready(
    start: Starter, action: str
) -> None:
    """The read had passed the device when it changed: its uevents, buffered since the
    monitor opened, re-evaluate the group before READY and reach the subscriber."""
    case = CASES[action]
    d = start(Reads(hold="after"))

    def at_ready() -> tuple[object, ...]:
        broker = d.broker
        viability = broker.view.viability(broker.snapshot, case.group_id)
        assert viability is not None
        present = NIC in broker.snapshot.devices
        return viability.is_viable, present, drain(heard), d.reads.count

    d.ready.look = at_ready
    heard = await _during_the_read(d, case)
    async with await d.client():
        assert d.ready.seen == [(case.is_viable, action != "remove", list(case.heard), 1)]
    await d.stop()
    assert d.reads.count == 1


@pytest.mark.parametrize("action", CASES)
async def test_a_change_the_start_up_read_saw_is_harmless(start: Starter, action: str) -> None:
    """The read already shows the change: its buffered uevents re-read the group and
    report no viability change, with one read."""
    case = CASES[action]
    d = start(Reads(hold="before"))
    heard = await _during_the_read(d, case)
    async with await d.client():
        broker = d.broker
        viability = broker.view.viability(broker.snapshot, case.group_id)
        assert viability is not None
        assert viability.is_viable is case.is_viable
        assert (NIC in broker.snapshot.devices) is (action != "remove")
        assert drain(heard) == list(case.heard_if_read)
    await d.stop()
    assert d.reads.count == 1


async def test_enobufs_still_rereads_the_whole_host(start: Starter, logs: Logs) -> None:
    """Uevents the kernel dropped for us (ENOBUFS) cost a full re-read, during start-up
    (caught up before READY) as after it: the only second read there is."""
    d = start(Reads(hold="after"))
    d.ready.look = lambda: d.reads.count
    async with asyncio.timeout(30):
        await asyncio.to_thread(d.reads.held.wait)
    d.fs.unbind(NIC)  # whose uevent is lost
    d.monitor.feed(OSError(errno.ENOBUFS, "No buffer space available"))
    d.reads.release.set()
    async with await d.client() as client:
        assert d.ready.seen == [2]
        assert d.broker.snapshot.devices[NIC].driver is None
        await client.subscribe([m.EventName.DRIVER_BOUND])
        d.fs.bind(NIC, "e1000")  # whose uevent is lost too
        d.monitor.feed(OSError(errno.ENOBUFS, "No buffer space available"))
        async with asyncio.timeout(10):
            ev = await anext(client.events())  # the rescan's report of the bind
        assert isinstance(ev, m.DriverBound)
        assert (ev.bdf, ev.driver, ev.group_id) == (NIC, "e1000", NIC_GROUP)
    await d.stop()
    assert d.reads.count == 3
    rescans = [e["reason"] for e in logs if e["event"] == "host.rescanned"]
    assert rescans == ["enobufs", "enobufs"]


async def test_a_monitor_that_cannot_open_leaves_the_daemon_serving(
    start: Starter, logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No netlink permission: logged, no event source, still one read, still serving."""

    def refused(kind: str) -> NoReturn:
        raise KernelError("udev_monitor_open", errno.EPERM, source=kind)

    monkeypatch.setattr("iommud.watch.source.open_monitor", refused)
    d = start(Reads(), source=lambda: UdevSource("kernel"))
    async with await d.client() as client:
        assert (await client.status()).event_source is None
        await client.ping()
    await d.stop()
    (failed,) = [e for e in logs if e["event"] == "daemon.host_watch_failed"]
    assert (failed["op"], failed["errno"], failed["log_level"]) == (
        "udev_monitor_open",
        errno.EPERM,
        "error",
    )
    assert d.reads.count == 1
    assert "daemon.ready" in names(logs)
