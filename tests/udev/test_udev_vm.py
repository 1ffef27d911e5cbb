"""The udev layer against the real kernel in the lab guest (marker ``vm``).

Guest topology (lab/topology.py): behind the bridge 0000:00:11.0 one IOMMU group with edus
0000:01:01.0, 0000:01:02.0 and the e1000 at 0000:01:03.0 (bound to e1000, so the group
starts not viable). Both sources are tried: the raw kernel one (our own latency) and,
when the guest runs systemd-udevd, the udev one (which adds udevd's rule processing).
Unbinding/rebinding e1000 through sysfs must reach the watcher as driver_unbound /
driver_bound with the group's viability flipping; the latency from the sysfs write to
the HostChange is measured and printed (p50/p99) into .lab/vm-batch.log, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from topology import NIC

from iommud.broker.hostview import HostChange, HostView
from iommud.config import Config
from iommud.watch import HostWatcher, SourceKind, UdevSource, pick_source
from tests.udev.views import wire

pytestmark = pytest.mark.vm

PCI = Path("/sys/bus/pci")
ROUNDS = 10


def _group_of(bdf: str) -> int:
    return int(os.path.basename(os.readlink(PCI / "devices" / bdf / "iommu_group")))


def _driver(bdf: str) -> str | None:
    try:  # no check-then-read: the driver may be changing right now
        return os.path.basename(os.readlink(PCI / "devices" / bdf / "driver"))
    except FileNotFoundError:
        return None


def _settle() -> None:
    """Let udevd finish earlier events (TCG makes it lag by seconds), so the udev
    source does not hand us a previous test's bind as this test's first event."""
    udevadm = shutil.which("udevadm")
    if udevadm is not None and pick_source() == "udev":
        subprocess.run([udevadm, "settle", "--timeout=30"], check=False)


@pytest.fixture
async def nic_restored() -> AsyncIterator[None]:
    assert _driver(NIC) == "e1000", "the lab guest boots with e1000 bound"
    yield
    if _driver(NIC) is None:
        (PCI / "drivers" / "e1000" / "bind").write_text(NIC)


async def _next_change(q: asyncio.Queue[tuple[float, HostChange]], gid: int) -> Any:
    async with asyncio.timeout(5):
        while True:
            t, change = await q.get()
            if change.group_id == gid and change.resync is None:
                return t, change


@pytest.mark.parametrize("kind", ["kernel", "udev"])
@pytest.mark.usefixtures("nic_restored")
async def test_real_unbind_bind_flip_viability_with_latency(
    kind: SourceKind, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each write must be seen (a lost or wrong event fails within 5 s); latency is printed."""
    if kind == "udev" and pick_source() != "udev":
        pytest.skip("no udevd runs in this guest")
    _settle()
    gid = _group_of(NIC)
    q: asyncio.Queue[tuple[float, HostChange]] = asyncio.Queue()

    async def sink(change: HostChange) -> None:
        q.put_nowait((time.perf_counter(), change))

    view = HostView(Config())  # the real /sys
    watcher = HostWatcher(view, sink)
    latencies: list[float] = []
    async with UdevSource(kind) as src:
        task = asyncio.create_task(watcher.run(src))
        try:
            async with asyncio.timeout(10):
                while view.rescans == 0:  # noqa: ASYNC110 - no event to wait on
                    await asyncio.sleep(0.01)
            while not q.empty():
                q.get_nowait()  # the startup rescan's report of every group
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                (PCI / "drivers" / "e1000" / "unbind").write_text(NIC)
                t1, unbound = await _next_change(q, gid)
                t2 = time.perf_counter()
                (PCI / "drivers" / "e1000" / "bind").write_text(NIC)
                t3, bound = await _next_change(q, gid)
                latencies += [t1 - t0, t3 - t2]
                assert wire([unbound]) == [
                    {"event": "driver_unbound", "bdf": NIC, "driver": "e1000", "group_id": gid},
                    {"event": "viability_changed", "group_id": gid, "is_viable": True,
                     "offenders": []},
                ]  # fmt: skip
                assert wire([bound]) == [
                    {"event": "driver_bound", "bdf": NIC, "driver": "e1000", "group_id": gid},
                    {"event": "viability_changed", "group_id": gid, "is_viable": False,
                     "offenders": [{"bdf": NIC, "driver": "e1000"}]},
                ]  # fmt: skip
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert src.resyncs["seqnum_gap"] == 0, dict(src.resyncs)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    with capsys.disabled():  # into the lab's batch log (.lab/vm-batch.log)
        print(
            f"\nudev latency ({kind} source) sysfs write -> HostChange, {len(latencies)} events: "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        )
