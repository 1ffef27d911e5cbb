"""The launcher in this process on the fake VMM, against the real server on the fake kernel.

``LaunchedVm`` connects a v2 ``AsyncClient`` to a served broker (tests/serving.py: the lab
topology, uid 0 may delegate), runs ``Launcher.run`` as a task and keeps its records;
the VMM is tests/vmm/fake_vmm.py, whose JSON log (argv, inherited fds, QMP commands)
``fake_log`` reads. Test code only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from iommud.client import AsyncClient
from iommud.vmm.launcher import Launcher, VmOptions, prepare

FAKE_VMM = Path(__file__).resolve().parent / "fake_vmm.py"
GUARD = 60.0  # hang guard for a record to appear (a loaded host; never a timing bound)


def fake_argv(*extra: str) -> tuple[str, ...]:
    """The fake VMM's command line (as a user would write QEMU's)."""
    return (sys.executable, str(FAKE_VMM), "-machine", "q35", *extra)


def vfio(bdf: str, qdev_id: str | None = "dev0", bus: str = "rp0") -> list[str]:
    """``-device vfio-pci,...,fd={BDF}`` (without ``id=`` when ``qdev_id`` is None)."""
    ident = f",id={qdev_id}" if qdev_id else ""
    return ["-device", f"vfio-pci{ident},iommufd=i0,bus={bus},fd={{{bdf}}}"]


IOMMUFD_OBJECT = ("-object", "iommufd,id=i0,fd={iommufd}")


def fake_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def qmp_commands(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in fake_log(path) if "qmp" in r and (name is None or r["qmp"] == name)]


class LaunchedVm:
    """``Launcher.run`` as a task; ``records`` is what it reported, in order."""

    def __init__(self, socket: str, devices: tuple[str, ...], argv: tuple[str, ...], **kw: Any):
        self.socket = socket
        self.opts = VmOptions(devices=devices, argv=argv, **kw)
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client: AsyncClient | None = None
        self.task: asyncio.Task[int] | None = None

    def _report(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})
        self._changed.set()

    async def start(self) -> LaunchedVm:
        template, binary = prepare(self.opts)
        self.client = await AsyncClient.connect(self.socket, "vm-test", version=2)
        launcher = Launcher(self.client, template, binary, self.opts, self._report)
        self.task = asyncio.create_task(launcher.run(self.stop))
        self.task.add_done_callback(lambda _: self._changed.set())
        return self

    async def record(self, event: str, n: int = 1) -> dict[str, Any]:
        """The ``n``-th record named ``event`` (waits for it; fails if the run ends first)."""
        async with asyncio.timeout(GUARD):
            while True:
                found = [r for r in self.records if r["event"] == event]
                if len(found) >= n:
                    return found[n - 1]
                if self.task is not None and self.task.done():
                    raise AssertionError(f"no {event}: the launcher ended, {self.records}")
                self._changed.clear()
                await self._changed.wait()

    async def finish(self) -> int:
        """The launcher's exit status (after it ended by itself or was stopped)."""
        assert self.task is not None
        assert self.client is not None
        try:
            async with asyncio.timeout(GUARD):
                return await self.task
        finally:
            await self.client.aclose()

    async def terminate(self) -> int:
        """What SIGTERM to ``iommuctl vm`` does: set the stop future, wait for the end."""
        if not self.stop.done():
            self.stop.set_result(None)
        return await self.finish()

    async def aclose(self) -> None:
        """A test that failed midway still stops the VMM and closes the connection."""
        if self.task is not None and not self.task.done():
            with contextlib.suppress(Exception):
                await self.terminate()
        if self.task is not None and self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieved: a failed run is the test's to assert
        if self.client is not None:
            await self.client.aclose()


Launch = Callable[..., Awaitable[LaunchedVm]]
"""``await launch(socket, devices, argv, **VmOptions)``: a started ``LaunchedVm``."""


@asynccontextmanager
async def launcher_runs() -> AsyncIterator[Launch]:
    """Starts launchers; every one is stopped and closed on the way out."""
    runs: list[LaunchedVm] = []

    async def launch(
        socket: str, devices: tuple[str, ...], argv: tuple[str, ...], **kw: Any
    ) -> LaunchedVm:
        vm = LaunchedVm(socket, devices, argv, **kw)
        runs.append(vm)
        return await vm.start()

    try:
        yield launch
    finally:
        for vm in runs:
            await vm.aclose()
