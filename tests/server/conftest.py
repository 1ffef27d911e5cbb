"""Fixtures for server tests: the real server on a real socket with the stand-in broker.

The server runs in-process on an AF_UNIX SOCK_SEQPACKET socket in a short temp dir
(sun_path is limited to 108 bytes); the stand-in broker is in support.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from iommud.server import Server, ServerInfo
from iommud.server.listen import bind_listener
from tests.server.support import Running, StandInBroker
from tests.serving import FdSnapshot


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="iommud-t")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def running(sockdir: str) -> AsyncIterator[Running]:
    """The real server on a real socket; asserts after teardown that no fd leaked."""
    before = FdSnapshot.take()
    broker = StandInBroker()
    path = os.path.join(sockdir, "s")
    server = Server(
        broker,
        [bind_listener(path, mode=0o600)],
        info=ServerInfo(capabilities=("iommufd",)),
        grace=1.0,
    )
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready.set))
    await ready.wait()
    yield Running(server, broker, path, task)
    server.stop()
    await asyncio.wait_for(task, 5)
    assert all(s.closed for s in broker.sessions)
    before.assert_unchanged()
