"""The host view the uevent tests drive: a standalone ``HostView`` over a fake tree.

``view_of`` builds the broker's one owner of the host snapshot without a broker;
``wire`` turns its ``HostChange`` reports into the events subscribers get (built by the
event hub, the one place events are made), minus the stamps (``ts``, ``seq``, ``op``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from iommud.broker.events import EventHub
from iommud.broker.hostview import HostChange, HostView
from iommud.config import Config, DaemonConfig, DriversConfig
from tests.fakesys import FakeSys


def view_of(fs: FakeSys, *, dma_safe_add: tuple[str, ...] = ()) -> HostView:
    return HostView(
        Config(
            daemon=DaemonConfig(sys_root=fs.sys_root, dev_root=fs.dev_root),
            drivers=DriversConfig(dma_safe_add=dma_safe_add),
        )
    )


def wire(changes: Iterable[HostChange]) -> list[dict[str, Any]]:
    hub = EventHub(wall_clock=lambda: 0.0)
    return [
        e.model_dump(mode="json", exclude={"ts", "seq", "op", "fds"})
        for c in changes
        for e in hub.host_events(c)
    ]
