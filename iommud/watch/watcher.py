"""The uevent side's glue: source items in, the host view's changes out to the broker.

``HostWatcher`` keeps nothing of its own: a ``HostEvent`` asks the host view's owner
(iommud.broker.hostview ``HostView.apply``) to re-read the group(s) it touches, a
``Resync`` asks it for a full re-read (``HostView.rescan``), and every ``HostChange`` the
owner reports goes to a sink. ``watch_host`` wires a ``UdevSource`` to the broker: its
sink publishes the change's events and lets the broker re-check the group's leases
(``Broker.on_host_change``).

Must not read sysfs, judge viability or build wire events itself (the host view and the
event hub do), and must not stop following the host because a sink failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from iommud.watch.source import HostEvent, Resync, SourceItem, UdevSource

if TYPE_CHECKING:  # the broker imports the source's types: no import cycle at run time
    from iommud.broker.hostview import HostChange

log = structlog.get_logger(__name__)

HostChangeSink = Callable[["HostChange"], Awaitable[None]]


class HostOwner(Protocol):
    """What the watcher needs of the snapshot's owner (``HostView``; structural)."""

    async def apply(self, event: HostEvent) -> list[HostChange]: ...

    async def rescan(self, reason: str) -> list[HostChange]: ...


class HostWatcher:
    """Feeds source items to the host view's owner and its changes to a sink."""

    def __init__(self, owner: HostOwner, sink: HostChangeSink) -> None:
        self._owner = owner
        self._sink = sink

    async def run(self, source: AsyncIterator[SourceItem]) -> None:
        """Consume ``source`` until it ends (or the task is cancelled)."""
        async for item in source:
            if isinstance(item, Resync):
                await self.rescan(item.reason)
            else:
                await self.handle(item)

    async def rescan(self, reason: str) -> None:
        """Ask the owner for a full re-read; report every group that changed."""
        for change in await self._owner.rescan(reason):
            await self._deliver(change)

    async def handle(self, event: HostEvent) -> None:
        """Ask the owner to refresh the group(s) ``event`` touches; report each."""
        for change in await self._owner.apply(event):
            await self._deliver(change)

    async def _deliver(self, change: HostChange) -> None:
        try:
            await self._sink(change)
        except Exception:
            # A broker bug must not stop the host view from following sysfs.
            log.exception("udev.sink_failed", group_id=change.group_id)


class BrokerHooks(Protocol):
    """What the glue needs of ``iommud.broker.Broker`` (structural, for tests)."""

    event_source: str | None

    @property
    def view(self) -> HostOwner: ...

    async def on_host_change(self, group_id: int, change: HostChange | None = None) -> None: ...


def broker_sink(broker: BrokerHooks) -> HostChangeSink:
    """Hand each change to the broker: it publishes the events, then re-checks leases."""

    async def sink(change: HostChange) -> None:
        await broker.on_host_change(change.group_id, change)

    return sink


async def watch_host(broker: BrokerHooks, *, source: UdevSource | None = None) -> None:
    """The daemon's host watcher task: run it in the daemon's TaskGroup, cancel to stop.

    Call after ``broker.start()``: the broker's view is the owner, so the startup
    rescan reports only what changed since its start-up read. Sets
    ``broker.event_source``.
    """
    src = source or UdevSource()
    broker.event_source = src.kind
    watcher = HostWatcher(broker.view, broker_sink(broker))
    async with src:
        await watcher.run(src)
