"""The ``event`` messages of protocol v1 (protocol/PROTOCOL.md, section 6).

Server-initiated datagrams without an ``id``: one class per event name, and
``AnyEvent``, their union discriminated on ``event``. Pure data: no I/O, no imports
from the rest of the daemon; ``messages`` re-exports everything here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from iommud.protocol.fields import (
    U32,
    U64,
    Bdf,
    Bool,
    EventName,
    Message,
    Name,
    NoFds,
    Offender,
    Seconds,
    Text,
)


class Event(Message):
    """Base of every event: no ``id``; ``seq`` counts events daemon-wide, ``ts`` is unix time."""

    op: Literal["event"] = "event"
    fds: NoFds = 0
    event: EventName
    ts: Seconds
    seq: U64

    @property
    def event_group(self) -> int | None:
        """The group the event is about (for subscription filters), if any."""
        value = getattr(self, "group_id", None)
        return value if isinstance(value, int) else None


class DriverBound(Event):
    event: Literal[EventName.DRIVER_BOUND] = EventName.DRIVER_BOUND
    bdf: Bdf
    driver: Name
    group_id: U32 | None


class DriverUnbound(Event):
    event: Literal[EventName.DRIVER_UNBOUND] = EventName.DRIVER_UNBOUND
    bdf: Bdf
    driver: Name | None
    group_id: U32 | None


class DeviceAdded(Event):
    event: Literal[EventName.DEVICE_ADDED] = EventName.DEVICE_ADDED
    bdf: Bdf
    group_id: U32 | None


class DeviceRemoved(Event):
    event: Literal[EventName.DEVICE_REMOVED] = EventName.DEVICE_REMOVED
    bdf: Bdf
    group_id: U32 | None


class ViabilityChanged(Event):
    event: Literal[EventName.VIABILITY_CHANGED] = EventName.VIABILITY_CHANGED
    group_id: U32
    is_viable: Bool
    offenders: tuple[Offender, ...]


class LeaseRevoked(Event):
    event: Literal[EventName.LEASE_REVOKED] = EventName.LEASE_REVOKED
    lease_id: U32
    group_id: U32
    reason: Text


class BindRefused(Event):
    """An unsafe driver tried to bind to a device of an owned group."""

    event: Literal[EventName.BIND_REFUSED] = EventName.BIND_REFUSED
    bdf: Bdf
    driver: Name
    group_id: U32
    reason: Text


AnyEvent = Annotated[
    DriverBound
    | DriverUnbound
    | DeviceAdded
    | DeviceRemoved
    | ViabilityChanged
    | LeaseRevoked
    | BindRefused,
    Field(discriminator="event"),
]
