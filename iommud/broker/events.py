"""Event fan-out: the one place wire events are built, and one bounded queue per session.

``EventHub`` builds every event the daemon sends as a typed protocol message (``seq``,
``ts`` stamped here): the host's (``host_events``: driver_bound, driver_unbound,
device_added, device_removed, viability_changed from a ``HostChange``) and the broker's
(``make``: lease_revoked, lease_enforced, bind_refused). ``publish`` queues an event
for every session; what a client receives is decided by its connection (iommud.protocol.connection
``ServerConnection``: the subscription is connection state), with one exception coded
once, here: ``lease_revoked`` for a session's own lease is queued marked ``for_holder``
and reaches it, subscribed or not.

A queue that is full drops its OLDEST event (a slow client loses history, never the
newest news), counts the loss and says so in the log (``events.dropped``, at the 1st,
2nd, 4th, 8th... drop of a session, so a stuck client cannot flood the log).

No I/O here: the server drains the queues; the broker publishes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from iommud.broker.hostview import HostChange
from iommud.pci import BDF_RE
from iommud.protocol import messages as m
from iommud.protocol.v2 import EVENT_TYPES_V2
from iommud.watch.source import HostAction

log = structlog.get_logger(__name__)

QUEUE_SIZE: Final = 256

_HOST_EVENT_NAMES: Final[Mapping[HostAction, m.EventName]] = {
    HostAction.BIND: m.EventName.DRIVER_BOUND,
    HostAction.UNBIND: m.EventName.DRIVER_UNBOUND,
    HostAction.ADD: m.EventName.DEVICE_ADDED,
    HostAction.REMOVE: m.EventName.DEVICE_REMOVED,
}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One queued event and whether it must pass the client's subscription.

    ``for_holder``: the event is the lease_revoked of a lease this session holds. It
    never goes on the wire; the connection lets such an event through any filter.
    """

    event: m.Event
    for_holder: bool = False


@dataclass(eq=False)
class EventSink:
    """One session's end: its queue and how many events it lost."""

    session_id: int = 0
    queue: asyncio.Queue[Delivery] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    def put(self, delivery: Delivery) -> None:
        while True:
            try:
                self.queue.put_nowait(delivery)
            except asyncio.QueueFull:
                self.queue.get_nowait()
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...
                    log.warning(
                        "events.dropped",
                        session=self.session_id,
                        dropped=self.dropped,
                        queue_size=self.queue.maxsize,
                    )
            else:
                return


class EventHub:
    """Builds events (``seq``, ``ts``) and queues them for every session."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._seq = itertools.count(1)
        self._wall_clock = wall_clock

    def make(self, name: m.EventName, **fields: Any) -> m.Event:
        """The event in its richest (v2) form; a v1 connection downgrades it
        (iommud.protocol.v2 ``downgrade_event``)."""
        return EVENT_TYPES_V2[name](ts=self._wall_clock(), seq=next(self._seq), **fields)

    def host_events(self, change: HostChange) -> list[m.Event]:
        """The protocol events one host change implies, in order.

        One per device event (nothing for change, nor for a bind whose driver is
        unknown) and a viability_changed when the group's viability or its offenders
        changed (none when the group vanished). Lease decisions (bind_refused,
        lease_revoked) are the broker's, not the host's.
        """
        group_id = change.group_id
        out: list[m.Event] = []
        for ev in change.events:
            name = _HOST_EVENT_NAMES.get(ev.action)
            if name is None or (ev.action is HostAction.BIND and ev.driver is None):
                continue
            if ev.action in (HostAction.BIND, HostAction.UNBIND):
                out.append(self.make(name, bdf=ev.bdf, group_id=group_id, driver=ev.driver))
            else:
                out.append(self.make(name, bdf=ev.bdf, group_id=group_id))
        after = change.after
        if change.is_viability_changed and after is not None:
            offenders = tuple(
                # non-PCI members (platform devices) cannot be named by a BDF on the wire
                m.Offender(bdf=o.bdf, driver=o.driver)
                for o in after.offenders
                if BDF_RE.match(o.bdf)
            )
            out.append(
                self.make(
                    m.EventName.VIABILITY_CHANGED,
                    group_id=group_id,
                    is_viable=after.is_viable,
                    offenders=offenders,
                )
            )
        return out

    def publish(
        self, event: m.Event, sinks: Iterable[EventSink], *, must_reach: EventSink | None = None
    ) -> int:
        """Queue ``event`` for every sink; ``must_reach`` (a lease holder's) gets it
        marked ``for_holder``. Returns the number of sinks."""
        n = 0
        for sink in sinks:
            sink.put(Delivery(event, for_holder=sink is must_reach))
            n += 1
        log.debug("event.published", name=str(event.event), seq=event.seq, receivers=n)
        return n
