"""Event fan-out: a daemon-wide sequence counter and one bounded queue per session.

A session receives every event by default (the server's connection state machine
applies the client's ``subscribe`` filter on the way out); ``Broker.handle(Subscribe)``
narrows it here too, for callers that drive the broker directly. ``lease_revoked`` for a
session's own lease always reaches it. A queue that is full drops its OLDEST event (a
slow client loses history, never the newest news) and counts the loss.

No I/O here: the server drains the queues; the broker publishes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from iommud.protocol.messages import EVENT_TYPES, Event, EventName

log = structlog.get_logger(__name__)

QUEUE_SIZE: Final = 256


@dataclass(frozen=True, slots=True)
class Subscription:
    """None means everything; an empty tuple means nothing."""

    events: frozenset[EventName] | None = None
    groups: frozenset[int] | None = None

    def matches(self, event: Event) -> bool:
        if self.events is not None and event.event not in self.events:
            return False
        if self.groups is None:
            return True
        group = event.event_group
        return group is not None and group in self.groups


@dataclass(eq=False)
class EventSink:
    """One session's end: its queue, its subscription and how many events it lost."""

    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    subscription: Subscription = field(default_factory=Subscription)
    dropped: int = 0

    def put(self, event: Event) -> None:
        while True:
            try:
                self.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.queue.get_nowait()
                self.dropped += 1
            else:
                return


class EventHub:
    """Builds events (``seq``, ``ts``) and delivers them to matching sinks."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._seq = itertools.count(1)
        self._wall_clock = wall_clock

    def make(self, name: EventName, **fields: Any) -> Event:
        return EVENT_TYPES[name](ts=self._wall_clock(), seq=next(self._seq), **fields)

    def publish(
        self, event: Event, sinks: Iterable[EventSink], *, must_reach: EventSink | None = None
    ) -> int:
        """Deliver to every sink whose subscription matches (and to ``must_reach``)."""
        n = 0
        for sink in sinks:
            if sink is must_reach or sink.subscription.matches(event):
                sink.put(event)
                n += 1
        log.debug("event.published", name=str(event.event), seq=event.seq, receivers=n)
        return n
