"""Fixtures for the launcher's host tests: a served broker and the fake VMM's log."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from tests.serving import served_broker
from tests.vmm.support import Launch, launcher_runs


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for sockets (sun_path holds 108 bytes)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="iommud-vm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctl(sockdir: str) -> str:
    """Where a test's launcher puts its control socket (--control)."""
    return os.path.join(sockdir, "ctl")


@pytest.fixture
async def served(tmp_path: Path, sockdir: str) -> AsyncIterator[tuple[str, Broker]]:
    """(socket, broker) on the lab topology; no fd of this process leaks past it."""
    async with served_broker(tmp_path, sockdir, sysfs_timeout=1.0) as pair:
        yield pair


@pytest.fixture
def vmm_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the fake VMM writes its argv, inherited fds and QMP commands."""
    path = tmp_path / "fake-vmm.jsonl"
    monkeypatch.setenv("FAKE_VMM_LOG", str(path))
    for name in ("FAKE_VMM_EXIT", "FAKE_VMM_UNPLUG", "FAKE_VMM_TERM", "FAKE_VMM_DEVICE_ADD"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
async def launch(served: tuple[str, Broker]) -> AsyncIterator[Launch]:
    """``await launch(socket, devices, argv, **options)``: launchers stopped at teardown
    (before the served daemon stops)."""
    async with launcher_runs() as start:
        yield start
