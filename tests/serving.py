"""Host-test helpers shared across suites: the fd-leak check and a served broker.

``FdSnapshot`` records this process's open fds (/proc/self/fd, with what each points
at); ``assert_unchanged`` fails with the fds opened and closed since, by number and
target. The ``no_fd_leak`` fixture (this module is a pytest plugin, loaded from
tests/conftest.py) wraps a whole test in one snapshot. The ``logs`` fixture collects the
structlog events the test's in-process daemon code logs (structlog.testing.capture_logs),
for asserting on them as data; a daemon in a subprocess keeps its log file.
``served_broker`` runs a started Broker on the fake kernel and the lab-shaped fake sysfs
behind the REAL server on a real AF_UNIX socket, and after shutdown asserts no fd leaked.
``DaemonProcess`` runs the real daemon as a child process (tests/fake_daemon.py: the lab
tree, the fake kernel, everything else real) for attacks that must not hurt pytest
itself, and reads its VMAs, threads and exit. ``after_start`` makes a coroutine into an
iommud.app host watch that runs it as the daemon's watcher task, once the broker has
started. Test code only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from iommud.app import DaemonBroker, HostWatch, HostWatchFactory
from iommud.broker import Broker
from iommud.client import Client
from iommud.config import Config, DriversConfig
from iommud.server import Server, ServerInfo
from iommud.server.listen import bind_listener
from tests.broker.support import make_config
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, lab_topology


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # the fd of the listing itself, closed by now
        return "?"


@dataclass(frozen=True)
class FdSnapshot:
    """This process's open fds at one moment: fd number -> what it points at."""

    fds: dict[int, str]

    @classmethod
    def take(cls) -> FdSnapshot:
        names = os.listdir("/proc/self/fd")
        fds = {int(n): _target(n) for n in names}
        # listdir's own directory fd was open while it listed and is closed now.
        return cls({fd: t for fd, t in fds.items() if t != "?"})

    def __len__(self) -> int:
        return len(self.fds)

    def changes(self, now: FdSnapshot) -> str:
        """The fds opened and closed between this snapshot and ``now``, for a message."""
        opened = {fd: now.fds[fd] for fd in sorted(now.fds.keys() - self.fds.keys())}
        closed = {fd: self.fds[fd] for fd in sorted(self.fds.keys() - now.fds.keys())}
        return f"opened {opened}, closed {closed}"

    def assert_unchanged(self, *, opened: int = 0) -> None:
        """The same fd numbers are open now as then (plus ``opened`` new ones, if given)."""
        now = FdSnapshot.take()
        if opened:
            assert len(now) == len(self) + opened, f"fd count: {self.changes(now)}"
            assert self.fds.keys() <= now.fds.keys(), f"fd closed: {self.changes(now)}"
        else:
            assert now.fds.keys() == self.fds.keys(), f"fd leak: {self.changes(now)}"


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fails the test if it leaves other fds open than it started with."""
    before = FdSnapshot.take()
    yield
    before.assert_unchanged()


#: Captured structlog events: each the event dict (``event`` name, ``log_level``, fields).
Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def logs() -> Iterator[Logs]:
    """The structlog events logged in this process during the test, as dicts."""
    with structlog.testing.capture_logs() as captured:
        yield captured


def logged(logs: Logs, event: str, **fields: object) -> Logs:
    """The captured events named ``event`` whose fields include ``fields``."""
    return [e for e in logs if e["event"] == event and fields.items() <= e.items()]


@asynccontextmanager
async def served_broker(
    tmp_path: Path,
    sockdir: str,
    *,
    sysfs_timeout: float = 10.0,
    fs: FakeSys | None = None,
    drivers: DriversConfig | None = None,
) -> AsyncIterator[tuple[str, Broker]]:
    """(socket path, broker): the lab topology (or ``fs``) served by the real server;
    ``drivers`` replaces the configuration's DMA-safe driver settings."""
    before = FdSnapshot.take()
    if fs is None:
        fs = lab_topology(tmp_path / "host")
    config = make_config(tmp_path, fs)
    if drivers is not None:
        config = config.model_copy(update={"drivers": drivers})
    broker = Broker(
        config,
        FakeKernel(fs),
        sysfs_timeout=sysfs_timeout,
        restore_retry_delay=0.01,
    )
    await broker.start()
    path = os.path.join(sockdir, "s")
    server = Server(broker, [bind_listener(path)], info=ServerInfo(capabilities=("iommufd",)))
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready.set))
    await ready.wait()
    yield path, broker
    server.stop()
    await asyncio.wait_for(task, 5)
    await broker.aclose(grace=5.0)
    before.assert_unchanged()


REPO = Path(__file__).resolve().parents[1]


class DaemonProcess:
    """The real daemon in a child process over the fake kernel and the lab tree.

    ``config`` is the TOML text without ``[daemon]`` (added here: the tree, the state
    dir, the socket). The socket is 0666 so tests can connect as other uids; its
    directory must be reachable by them. ``stop()`` sends SIGTERM and returns the exit
    code (killing the child if it does not exit within ``timeout``).
    """

    def __init__(self, root: Path, socket_path: str, config: str) -> None:
        self.root = root
        self.socket = socket_path
        tree = root / "host"
        conf = root / "iommud.toml"
        conf.write_text(
            f'[daemon]\nsys_root = "{tree}/sys"\ndev_root = "{tree}/dev"\n'
            f'state_dir = "{root}/state"\n\n{config}'
        )
        self.log = (root / "daemon.log").open("w")
        args = [sys.executable, "-m", "tests.fake_daemon", str(tree), "--config", str(conf)]
        args += ["--socket", socket_path, "--socket-mode", "666"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "lab")))}
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=self.log)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60  # a hang guard on a loaded machine
        while True:
            try:
                with Client(socket_path, "probe", timeout=10) as c:
                    c.ping()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the daemon did not start: {self.output()}") from None
                time.sleep(0.05)

    def vmas(self) -> int:
        """The daemon's VMAs now (lines of /proc/PID/maps)."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(1 for _ in f)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def output(self) -> str:
        self.log.flush()
        return (self.root / "daemon.log").read_text()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM; the exit code, or None if it had to be killed after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.log.close()
        return code


#: A coroutine function run as the daemon's watcher task (what serve() took before the
#: watcher had to open ahead of the broker's start-up read).
AfterStartHook = Callable[[DaemonBroker, Config], Awaitable[None]]


def after_start(hook: AfterStartHook) -> HostWatchFactory:
    """A host watch factory for serve(): opens nothing, catches up on nothing, and its
    ``run`` (the daemon's watcher task, started once the broker has started) awaits
    ``hook(broker, config)``."""

    class AfterStart:
        def __init__(self, broker: DaemonBroker, config: Config) -> None:
            self.broker, self.config = broker, config

        async def __aenter__(self) -> HostWatch:
            return self

        async def __aexit__(self, *exc_info: object) -> None:
            pass

        async def catch_up(self) -> int:
            return 0

        async def run(self) -> None:
            await hook(self.broker, self.config)

    return AfterStart
