"""One verdict on viability: with ``[drivers] dma_safe_add = ["e1000"]`` the live
viability_changed event, list_groups and ``iommuctl ls --json`` agree.

The real server on a real AF_UNIX socket, the real Broker over the fake kernel, and the
uevent glue (HostWatcher over the broker's host view) driven with synthetic uevents, on
the lab tree (tests/fakesys.lab_topology)::

    group 4:  0000:00:11.0  pci-bridge, 0000:01:01.0 edu, 0000:01:02.0 edu,
              0000:01:03.0  e1000 (bound; DMA-safe by configuration: the group is viable)

Unbinding and rebinding e1000 changes nothing about viability, so no viability_changed
may be sent; an unsafe driver on an edu makes the group unviable naming that edu alone.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommud.cli import Output, run
from iommud.client import AsyncClient
from iommud.config import DriversConfig
from iommud.protocol import messages as m
from iommud.watch import HostAction, HostEvent, HostWatcher, broker_sink
from tests.fakesys import FakeSys, lab_topology
from tests.serving import served_broker

NIC = "0000:01:03.0"
EDU1 = "0000:01:01.0"
BRIDGE_GROUP = 4
A = HostAction


@dataclass
class Served:
    fs: FakeSys
    socket: str
    watcher: HostWatcher


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for the socket (sun_path holds 108 bytes)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="iommud-dma-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(tmp_path: Path, sockdir: str) -> AsyncIterator[Served]:
    fs = lab_topology(tmp_path / "host")
    drivers = DriversConfig(dma_safe_add=("e1000",))
    async with served_broker(tmp_path, sockdir, fs=fs, drivers=drivers) as (path, broker):
        assert "e1000" in broker.state.config.dma_safe_drivers
        yield Served(fs, path, HostWatcher(broker.view, broker_sink(broker)))


def _dump(model: m.Event | m.GroupEntry) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude={"ts", "seq", "op", "fds"})


async def _listings(served: Served, client: AsyncClient) -> tuple[dict[str, Any], ...]:
    """The bridge group as list_groups and as ``iommuctl ls --json`` show it."""
    (listed,) = [g for g in await client.list_groups() if g.group_id == BRIDGE_GROUP]
    out, err = io.StringIO(), io.StringIO()
    # iommuctl runs its own event loop: give it a thread
    code = await asyncio.to_thread(
        run, ["--socket", served.socket, "ls", "--json"], Output(out, err)
    )
    assert code == 0, err.getvalue()
    (shown,) = [g for g in json.loads(out.getvalue())["groups"] if g["group_id"] == BRIDGE_GROUP]
    return _dump(listed), shown


async def _next(events: AsyncIterator[m.Event]) -> dict[str, Any]:
    async with asyncio.timeout(5):
        return _dump(await anext(events))


async def test_ls_list_groups_and_live_events_agree_with_dma_safe_add(served: Served) -> None:
    """e1000 configured DMA-safe: its bind is no offence in any of the three answers."""
    fs, w = served.fs, served.watcher
    async with await AsyncClient.connect(served.socket, "dma-safe-test") as client:
        await client.subscribe(groups=[BRIDGE_GROUP])
        events = client.events()
        listed, shown = await _listings(served, client)
        assert listed == shown
        assert (listed["is_viable"], listed["offenders"]) == (True, [])

        fs.unbind(NIC)
        await w.handle(HostEvent(A.UNBIND, NIC, None, 1))
        fs.bind(NIC, "e1000")
        await w.handle(HostEvent(A.BIND, NIC, "e1000", 2))
        fs.bind(EDU1, "edu_unsafe")
        await w.handle(HostEvent(A.BIND, EDU1, "edu_unsafe", 3))
        gid = BRIDGE_GROUP
        offenders = [{"bdf": EDU1, "driver": "edu_unsafe"}]
        assert [await _next(events) for _ in range(4)] == [
            {"event": "driver_unbound", "bdf": NIC, "driver": "e1000", "group_id": gid},
            {"event": "driver_bound", "bdf": NIC, "driver": "e1000", "group_id": gid},
            {"event": "driver_bound", "bdf": EDU1, "driver": "edu_unsafe", "group_id": gid},
            {"event": "viability_changed", "group_id": gid, "is_viable": False,
             "offenders": offenders},
        ]  # fmt: skip
        listed, shown = await _listings(served, client)
        assert listed == shown
        assert (listed["is_viable"], listed["offenders"]) == (False, offenders)

        fs.unbind(EDU1)
        await w.handle(HostEvent(A.UNBIND, EDU1, None, 4))
        assert [await _next(events) for _ in range(2)] == [
            {"event": "driver_unbound", "bdf": EDU1, "driver": "edu_unsafe", "group_id": gid},
            {"event": "viability_changed", "group_id": gid, "is_viable": True, "offenders": []},
        ]
        listed, shown = await _listings(served, client)
        assert listed == shown
        assert (listed["is_viable"], listed["offenders"]) == (True, [])
