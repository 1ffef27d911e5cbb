"""A real daemon in a background thread for iommuctl tests (fixtures: conftest.py).

The real Server on a real AF_UNIX socket (short temp dir), the real Broker over the fake
kernel (tests/fakekernel.py) on the lab tree (tests/fakesys.lab_topology), and the udev
glue (HostWatcher + broker_sink) that tests drive with synthetic uevents. It runs its
own event loop in a thread so iommuctl (which calls asyncio.run) can run in-process
from synchronous tests, or as a subprocess for the signal tests::

    group 3:  0000:00:10.0  edu (alone, driver-less: claimable, rebound to vfio-pci)
    group 4:  0000:00:11.0  pci-bridge, 0000:01:01.0 edu, 0000:01:02.0 edu,
              0000:01:03.0  e1000 (bound: the group is not viable)
    groups 0, 5, 6: host bridge, lpc_ich + ahci, virtio-pci
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from iommud.broker import Broker
from iommud.cli import Output, run
from iommud.config import AccessRule, Config, DaemonConfig, ManageConfig
from iommud.server import Server, ServerInfo
from iommud.server.listen import bind_listener
from iommud.watch import HostEvent, HostWatcher, broker_sink
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, lab_topology

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


class Daemon:
    """iommud in a thread: ``call`` runs a coroutine on its loop and waits for it."""

    def __init__(
        self,
        root: Path,
        access: tuple[AccessRule, ...] = (AccessRule(uid=0, devices=("1234:11e8",)),),
    ) -> None:
        self.root = root
        self.fs: FakeSys = lab_topology(root / "root")
        self.socket = str(root / "s")
        self.config = Config(
            daemon=DaemonConfig(
                sys_root=self.fs.sys_root, dev_root=self.fs.dev_root, state_dir=root / "state"
            ),
            manage=ManageConfig(rebind=("1234:11e8",)),
            access=access,
        )
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self.broker: Broker | None = None
        self.watcher: HostWatcher | None = None
        self._thread = threading.Thread(target=self._run, name="iommud-test", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("daemon did not start")
        if self._failed is not None:
            raise self._failed

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.broker = Broker(self.config, FakeKernel(self.fs))
        await self.broker.start()
        self.broker.event_source = "kernel"
        self.watcher = HostWatcher(self.broker.view, broker_sink(self.broker))
        self.server = Server(
            self.broker,
            [bind_listener(self.socket, mode=0o666)],
            info=ServerInfo(capabilities=("iommufd", "legacy")),
            grace=1.0,
        )
        try:
            await self.server.serve(self._ready.set)
        finally:
            await self.broker.aclose()

    def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        assert self.loop is not None

        async def wrapped() -> T:
            return await make()

        fut: Future[T] = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        return fut.result(10)

    def uevent(self, event: HostEvent) -> None:
        """Deliver one synthetic uevent to the daemon's watcher and wait for it."""
        assert self.watcher is not None
        watcher = self.watcher
        self.call(lambda: watcher.handle(event))

    def stop(self) -> None:
        if self.loop is not None and self.server is not None and self._thread.is_alive():
            broker, server = self.broker, self.server

            def stop() -> None:  # as the daemon's SIGTERM handler (iommud.app)
                if broker is not None:
                    broker.begin_stop()
                server.stop()

            self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)
        assert not self._thread.is_alive()


@dataclass
class Result:
    code: int
    out: str
    err: str


def ctl(*argv: str) -> Result:
    """Run iommuctl in-process, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), Output(out, err))
    return Result(code, out.getvalue(), err.getvalue())


def spawn(*argv: str, **kw: Any) -> subprocess.Popen[str]:
    """iommuctl as a real process (for signals and live streaming)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("IOMMUD_SOCKET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "iommud.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )
