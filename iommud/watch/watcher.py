"""The uevent side's glue: source items in, the host view's changes out to the broker.

``HostWatcher`` keeps nothing of its own: a ``HostEvent`` asks the host view's owner
(iommud.broker.hostview ``HostView.apply``) to re-read the group(s) it touches, a
``Resync`` asks it for a full re-read (``HostView.rescan``), and every ``HostChange`` the
owner reports goes to a sink. ``HostFollower`` wires a ``UdevSource`` to the broker: its
sink publishes the change's events and lets the broker re-check the group's leases
(``Broker.on_host_change``).

Start-up reads the host once. The daemon (iommud.app ``serve``) opens the source BEFORE
the broker's start-up read (``HostFollower``, entered without the source's start-up
resync), so every uevent from then on is buffered on the loop, not lost; after the read,
``catch_up`` applies what was buffered (events during or after the read) before the
daemon reports READY, then ``run`` follows the host. A full re-read after start-up
happens only on a ``Resync`` (ENOBUFS, seqnum gap, backlog) or an unreadable group.

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
            await self._process(item)

    async def catch_up(self, source: UdevSource) -> int:
        """Handle what ``source`` holds now, without waiting for more; returns the count.

        Bounded by what is buffered when called (a Resync arriving meanwhile replaces
        the rest; what arrives later is ``run``'s), so a uevent storm cannot hold the
        caller, the daemon's start-up before READY, for ever.
        """
        done = 0
        for _ in range(source.pending):
            item = source.next_nowait()
            if item is None:
                break
            await self._process(item)
            done += 1
        return done

    async def _process(self, item: SourceItem) -> None:
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


class HostFollower:
    """The daemon's host watcher: a ``UdevSource`` opened before the broker reads the host.

    In start-up's order (iommud.app ``serve``):

    1. ``async with HostFollower(broker)``: opens the netlink monitor and sets
       ``broker.event_source``; from here on every uevent is buffered on the loop
       (``KernelError`` if the monitor cannot be opened: the daemon serves without live
       events). No start-up ``Resync``: the broker's read that follows is the one read.
    2. ``broker.start()``: the start-up read of the whole host.
    3. ``catch_up``: the uevents buffered during or after that read re-read the groups
       they touch, as any uevent does. The read may already reflect such an event: a
       re-read is idempotent and the view reports against what it last announced (the
       read), so that event changes no viability.
    4. ``run`` (a task of the daemon, cancelled to stop): follows the host.

    ``resync=True`` keeps the source's start-up ``Resync`` instead, for a broker that
    read the host before the source opened (``watch_host``): a second full read.
    """

    def __init__(
        self, broker: BrokerHooks, *, source: UdevSource | None = None, resync: bool = False
    ) -> None:
        self.source = source or UdevSource()
        self._broker = broker
        self._resync = resync
        self._watcher = HostWatcher(broker.view, broker_sink(broker))

    async def __aenter__(self) -> HostFollower:
        await self.source.start(resync=self._resync)
        self._broker.event_source = self.source.kind
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.source.aclose()

    async def catch_up(self) -> int:
        """Apply the uevents buffered since the source opened (see the class); the count."""
        done = await self._watcher.catch_up(self.source)
        log.info("udev.caught_up", source=self.source.kind, items=done)
        return done

    async def run(self) -> None:
        """Follow the host until cancelled (or the source fails: ``SourceFailedError``)."""
        await self._watcher.run(self.source)


async def watch_host(broker: BrokerHooks, *, source: UdevSource | None = None) -> None:
    """Follow the host for a broker that has already read it; cancel to stop.

    The source opens after that read, so its start-up resync reads the host a second
    time and reports what changed in between. The daemon does not use this: it opens
    a ``HostFollower`` before the broker's read. Sets ``broker.event_source``.
    """
    async with HostFollower(broker, source=source, resync=True) as follower:
        await follower.run()
