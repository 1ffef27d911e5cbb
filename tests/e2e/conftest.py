"""Fixtures for the end-to-end tests (inside the lab guest; see support.py).

``daemon`` (one per module) is the real iommud as root; a failing test gets the tail of
its log in the report. ``steady`` (autouse) checks after every test that the daemon is
back where it started: same open fds, no leases, the guest's boot drivers. ``spawn``
starts unprivileged clients and ends them after the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    BOOT_DRIVERS,
    USER,
    ClientProc,
    Daemon,
    Kmsg,
    Timings,
    drivers_now,
    wait_until,
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    if os.geteuid() != 0:
        pytest.skip("the e2e tests run as root inside the lab guest")
    # Short path (sun_path is 108 bytes) and searchable by uid 1000 for the socket.
    workdir = Path(tempfile.mkdtemp(prefix="iommud-e2e-", dir="/tmp"))
    workdir.chmod(0o755)
    d = Daemon(workdir)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def steady(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves the daemon with its fds, no leases and the boot drivers."""
    assert drivers_now() == BOOT_DRIVERS, "a previous test left drivers changed"
    before = daemon.settled_fds()
    request.node.daemon = daemon
    yield
    # Teardown of a disconnected client is asynchronous: give it a few seconds. Status
    # requests open connections themselves, so the fd count is awaited separately.
    wait_until(lambda: not daemon.status()["leases"] and drivers_now() == BOOT_DRIVERS, 10.0, 0.05)
    wait_until(lambda: daemon.fds() == before, 5.0)
    assert daemon.proc.poll() is None, "the daemon died"
    assert daemon.status()["leases"] == []
    assert drivers_now() == BOOT_DRIVERS
    assert daemon.settled_fds() == before


@pytest.fixture
def spawn(daemon: Daemon) -> Iterator[Callable[..., ClientProc]]:
    clients: list[ClientProc] = []

    def make(uid: int = USER, gid: int | None = None) -> ClientProc:
        c = ClientProc(daemon.socket, uid, gid)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def kmsg() -> Iterator[Kmsg]:
    k = Kmsg()
    yield k
    k.close()


@pytest.fixture
def timing(capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> Timings:
    return Timings(capsys, request.node.name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing e2e test carries the daemon's log tail in its report."""
    report = yield
    d = getattr(item, "daemon", None)
    if report.failed and isinstance(d, Daemon):
        report.sections.append(("iommud log (tail)", d.log_tail()))
    return report
