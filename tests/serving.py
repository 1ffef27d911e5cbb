"""Host-test helpers shared across suites: fd counting and a served broker.

``open_fds`` counts this process's open fds (tests compare it before and after a
scenario to prove nothing leaked). ``served_broker`` runs a started Broker on the fake
kernel and the lab-shaped fake sysfs behind the REAL server on a real AF_UNIX socket, and
after shutdown asserts the fd count is back where it was. Test code only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from iommud.broker import Broker
from iommud.server import Server, ServerInfo
from iommud.server.listen import bind_listener
from tests.broker.conftest import make_config
from tests.fakekernel import FakeKernel
from tests.fakesys import lab_topology


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@asynccontextmanager
async def served_broker(
    tmp_path: Path, sockdir: str, *, sysfs_timeout: float = 10.0
) -> AsyncIterator[tuple[str, Broker]]:
    """(socket path, broker): the lab topology served by the real server."""
    before = open_fds()
    fs = lab_topology(tmp_path / "host")
    broker = Broker(
        make_config(tmp_path, fs),
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
    assert open_fds() == before
