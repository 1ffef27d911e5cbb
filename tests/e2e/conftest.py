"""Fixtures for the end-to-end tests (inside the lab guest; see support.py).

``daemon`` (one per module) is the real iommud as root; a failing test gets the tail of
its log in the report. ``steady`` (autouse) checks after every test that the daemon is
back where it started: same open fds, no leases, the guest's boot drivers. ``spawn``
starts unprivileged clients and ends them after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.e2e.support import (
    BOOT_DRIVERS,
    USER,
    ClientProc,
    Daemon,
    Timings,
    drivers_now,
    wait_until,
)
from tests.labharness import running_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon(Daemon, "iommud-e2e-") as d:
        yield d


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
    wait_until(lambda: daemon.fds() == before, 15.0)
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
def timing(capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> Timings:
    return Timings(capsys, request.node.name)
