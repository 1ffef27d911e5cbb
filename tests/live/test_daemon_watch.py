"""The daemon process wiring of the host watcher (host test, no VM).

``iommud.app.serve`` with the real Broker on the fake kernel and the lab tree
(tests/fakesys.lab_topology), a real AF_UNIX socket, and the daemon's watcher
(``HostFollower``) fed by a fake netlink monitor: status names the event source, a
uevent reaches a subscribed client, SIGTERM cancels the watcher (its fd leaves the loop)
and no fd leaks. A watcher that crashes leaves the daemon serving with no event source.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from topology import NIC

from iommud.app import DaemonBroker, serve
from iommud.broker import Broker
from iommud.client import AsyncClient
from iommud.config import Config, DaemonConfig
from iommud.protocol import messages as m
from iommud.sdnotify import Notifier
from iommud.watch import HostFollower, UdevSource
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, lab_topology
from tests.serving import FdSnapshot, Logs, after_start, logged
from tests.udev.fakemonitor import FakeMonitor, uevent


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="iommud-w")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(tmp_path: Path, fs: FakeSys) -> Config:
    return Config(
        daemon=DaemonConfig(
            sys_root=fs.sys_root, dev_root=fs.dev_root, state_dir=tmp_path / "state"
        )
    )


async def _connect(path: str) -> AsyncClient:
    async with asyncio.timeout(10):
        while True:
            try:
                return await AsyncClient.connect(path, "watch-test")
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.02)


async def test_serve_runs_the_watcher_and_stops_it(
    tmp_path: Path, sockdir: str, logs: Logs
) -> None:
    fs = lab_topology(tmp_path / "host")
    mon = FakeMonitor()
    before = FdSnapshot.take()
    path = os.path.join(sockdir, "s")

    def watch(broker: DaemonBroker, config: Config) -> HostFollower:
        return HostFollower(broker, source=UdevSource("kernel", monitor=mon))

    def factory(config: Config) -> Broker:
        return Broker(config, FakeKernel(fs))

    task = asyncio.create_task(
        serve(
            _config(tmp_path, fs),
            factory,
            socket_path=path,
            host_watch=watch,
            notifier=Notifier({}),
        )
    )
    try:
        client = await _connect(path)
        async with client:
            assert (await client.status()).event_source == "kernel"
            await client.subscribe([m.EventName.DRIVER_UNBOUND])
            fs.unbind(NIC)
            mon.feed(uevent("unbind", NIC, 7))
            async with asyncio.timeout(5):
                ev = await anext(client.events())
            assert isinstance(ev, m.DriverUnbound)
            assert (ev.bdf, ev.driver, ev.group_id) == (NIC, "e1000", 4)
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on the loop
        assert await asyncio.wait_for(task, 10) == 0
        assert asyncio.get_running_loop().remove_reader(mon.r) is False  # watcher gone
        before.assert_unchanged()
        daemon_events = [e["event"] for e in logs if e["event"].startswith("daemon.")]
        assert daemon_events == ["daemon.ready", "daemon.stopping", "daemon.stopped"]
        assert logged(logs, "daemon.stopping", signal="SIGTERM")
    finally:
        if not task.done():
            task.cancel()
        mon.close()


async def test_a_crashing_watcher_leaves_the_daemon_serving(
    tmp_path: Path, sockdir: str, logs: Logs
) -> None:
    fs = lab_topology(tmp_path / "host")
    path = os.path.join(sockdir, "s")

    async def watch(broker: DaemonBroker, config: Config) -> None:
        broker.event_source = "kernel"
        raise RuntimeError("watcher bug")

    task = asyncio.create_task(
        serve(
            _config(tmp_path, fs),
            lambda c: Broker(c, FakeKernel(fs)),
            socket_path=path,
            host_watch=after_start(watch),
            notifier=Notifier({}),
        )
    )
    try:
        async with await _connect(path) as client:
            await asyncio.sleep(0.05)
            assert (await client.status()).event_source is None
            await client.ping()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 10) == 0
        (crash,) = logged(logs, "daemon.host_watch_crashed", log_level="error")
        assert crash["exc_info"] is True
    finally:
        if not task.done():
            task.cancel()
