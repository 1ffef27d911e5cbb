"""One verdict on viability in the lab guest, with e1000 configured DMA-safe.

The daemon runs with ``[drivers] dma_safe_add = ["e1000"]``: the bridge group (00:11.0
bridge, 01:01.0 and 01:02.0 edu, 01:03.0 e1000 bound at boot) is viable with e1000
bound. Unbinding and rebinding the NIC through sysfs therefore changes nothing about
viability: ``iommuctl monitor --json`` must show the driver events and no
viability_changed for the group, and list_groups and ``iommuctl ls --json`` must both
say viable with no offenders before, between and after (the uevent watcher once judged
with the built-in list and announced e1000 as an offender here).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from topology import NIC

from iommud.client import Client
from tests.labharness import running_daemon
from tests.live.support import CONFIG, PCI, LiveDaemon, Monitor, group_of, sysfs_write

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("restored")]

DMA_SAFE_CONFIG = (
    CONFIG
    + """
[drivers]
dma_safe_add = ["e1000"]
"""
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[LiveDaemon]:
    """This module's daemon: the live config with e1000 counted as DMA-safe."""
    with running_daemon(lambda w: LiveDaemon(w, DMA_SAFE_CONFIG), "iommud-dmasafe-") as d:
        yield d


def _is(event: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev["event"] == event and all(ev.get(k) == v for k, v in fields.items())


def _listings(daemon: LiveDaemon, gid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The group as list_groups and as ``iommuctl ls --json`` show it."""
    with Client(daemon.socket, "dma-safe-test") as client:
        (listed,) = [g for g in client.list_groups() if g.group_id == gid]
    ls = daemon.iommuctl("ls", "--json")
    assert ls.returncode == 0, ls.stderr
    (shown,) = [g for g in json.loads(ls.stdout)["groups"] if g["group_id"] == gid]
    return listed.model_dump(mode="json"), shown


def _viable_everywhere(daemon: LiveDaemon, gid: int) -> None:
    listed, shown = _listings(daemon, gid)
    assert listed == shown
    assert (listed["is_viable"], listed["offenders"]) == (True, [])


def test_e1000_configured_dma_safe_agrees_in_events_and_listings(
    daemon: LiveDaemon, monitor: Monitor
) -> None:
    """Unbind, bind, unbind, bind e1000: driver events only; both listings say viable."""
    gid = group_of(NIC)
    _viable_everywhere(daemon, gid)
    mark = monitor.mark()
    unbind, bind = PCI / "drivers" / "e1000" / "unbind", PCI / "drivers" / "e1000" / "bind"
    assert sysfs_write(unbind, NIC) is None
    monitor.wait_for(_is("driver_unbound", bdf=NIC), mark)
    _viable_everywhere(daemon, gid)
    assert sysfs_write(bind, NIC) is None
    _, bound = monitor.wait_for(_is("driver_bound", bdf=NIC), mark)
    # A second unbind is the marker: the first bind's events were all sent before it.
    after = monitor.mark()
    assert sysfs_write(unbind, NIC) is None
    monitor.wait_for(_is("driver_unbound", bdf=NIC), after)
    assert sysfs_write(bind, NIC) is None
    monitor.wait_for(_is("driver_bound", bdf=NIC), after)
    assert bound["group_id"] == gid
    seen = monitor.events(mark)
    assert not [e for e in seen if _is("viability_changed", group_id=gid)(e)], seen
    _viable_everywhere(daemon, gid)
