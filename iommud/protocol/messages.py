"""Every message of protocol v1 as a frozen pydantic model (protocol/PROTOCOL.md).

One class per wire op: requests (client -> server), their ``<op>_reply`` replies and
``error`` are here; the ``event`` family (server -> client) is in ``events``, the field
types and nested objects they share in ``fields``. This module re-exports both, so
``iommud.protocol.messages`` names every message and type. Two discriminated unions on
``op`` tie them together: ``Request`` and ``ServerMessage``. Models validate what a
peer could get wrong (bdf syntax, integer bounds, fd indexes against ``fds``); the
broker decides everything that needs state (does the device exist, is the range
allowed).

Pure data: no I/O, no imports from the rest of the daemon. Encoding and decoding
(and the translation of pydantic errors into ProtocolError) live in ``codec``.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Union

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import Field, JsonValue, Strict, model_validator

from iommud.protocol.errors import ErrorCode
from iommud.protocol.events import (
    AnyEvent,
    BindRefused,
    DeviceAdded,
    DeviceRemoved,
    DriverBound,
    DriverUnbound,
    Event,
    LeaseRevoked,
    ViabilityChanged,
)
from iommud.protocol.fields import (
    BDF_PATTERN,
    U16,
    U24,
    U32,
    U64,
    Backend,
    BackendKind,
    Bdf,
    Bool,
    ClaimedDevice,
    DeviceEntry,
    EventName,
    FdCount,
    FdIndex,
    GroupEntry,
    IovaRange,
    LeaseInfo,
    Length,
    MappedRange,
    MapRange,
    Message,
    Name,
    NoFds,
    Offender,
    Owner,
    PageLimit,
    ReplyBase,
    RequestBase,
    Seconds,
    Struct,
    Text,
)
from iommud.protocol.limits import MAX_FDS, MAX_RANGES, Limits

__all__ = [
    "BDF_PATTERN",
    "EVENT_TYPES",
    "REPLY_TYPES",
    "REQUEST_TYPES",
    "U16",
    "U24",
    "U32",
    "U64",
    "AnyEvent",
    "Backend",
    "BackendKind",
    "Bdf",
    "BindRefused",
    "Bool",
    "Claim",
    "ClaimReply",
    "ClaimedDevice",
    "DeviceAdded",
    "DeviceEntry",
    "DeviceRemoved",
    "DeviceReset",
    "DeviceResetReply",
    "DriverBound",
    "DriverUnbound",
    "ErrorReply",
    "Event",
    "EventName",
    "FdCount",
    "FdIndex",
    "GroupEntry",
    "Hello",
    "HelloReply",
    "IoasCreate",
    "IoasCreateReply",
    "IoasDestroy",
    "IoasDestroyReply",
    "IoasMap",
    "IoasMapReply",
    "IoasUnmap",
    "IoasUnmapReply",
    "IovaRange",
    "IovaRanges",
    "IovaRangesReply",
    "LeaseInfo",
    "LeaseRevoked",
    "Length",
    "ListDevices",
    "ListDevicesReply",
    "ListGroups",
    "ListGroupsReply",
    "MapRange",
    "MappedRange",
    "Message",
    "Name",
    "NoFds",
    "Offender",
    "Owner",
    "PageLimit",
    "PageReply",
    "Ping",
    "PingReply",
    "Release",
    "ReleaseReply",
    "Reply",
    "ReplyBase",
    "Request",
    "RequestBase",
    "Revoke",
    "RevokeReply",
    "Seconds",
    "ServerMessage",
    "Status",
    "StatusReply",
    "Struct",
    "Subscribe",
    "SubscribeReply",
    "Text",
    "ViabilityChanged",
]


# --------------------------------------------------------------------------- requests


class Hello(RequestBase):
    op: Literal["hello"] = "hello"
    version: U32
    client: Name


class Ping(RequestBase):
    op: Literal["ping"] = "ping"


class Status(RequestBase):
    op: Literal["status"] = "status"


class ListDevices(RequestBase):
    """One page of the daemon's devices, sorted by bdf, from index ``offset``.

    ``limit`` caps the page; null lets the daemon fill the datagram. Without both
    fields this is the first page.
    """

    op: Literal["list_devices"] = "list_devices"
    offset: U32 = 0
    limit: PageLimit | None = None


class ListGroups(RequestBase):
    """One page of the daemon's IOMMU groups, sorted by ``group_id``; see ``ListDevices``."""

    op: Literal["list_groups"] = "list_groups"
    offset: U32 = 0
    limit: PageLimit | None = None


class Claim(RequestBase):
    """Claim devices (whole groups or part of one); the reply carries one fd per device."""

    op: Literal["claim"] = "claim"
    devices: Annotated[
        tuple[Bdf, ...],
        MinLen(1),
        MaxLen(MAX_FDS),
        Field(json_schema_extra={"uniqueItems": True}),  # _distinct checks it
    ]
    backend: Backend = Backend.AUTO
    ioas_id: U32 | None = None

    @model_validator(mode="after")
    def _distinct(self) -> Claim:
        if len(set(self.devices)) != len(self.devices):
            raise ValueError("devices must be distinct")
        return self


class Release(RequestBase):
    op: Literal["release"] = "release"
    lease_id: U32


class IoasCreate(RequestBase):
    op: Literal["ioas_create"] = "ioas_create"


class IoasDestroy(RequestBase):
    op: Literal["ioas_destroy"] = "ioas_destroy"
    ioas_id: U32


class IoasMap(RequestBase):
    """Map ranges of the attached fds (memfds, files) into an IOAS.

    ``fds`` defaults to the number the ranges reference; every attached fd must be
    referenced by at least one range, and every ``fd_index`` must be below ``fds``.
    """

    op: Literal["ioas_map"] = "ioas_map"
    fds: Annotated[int, Strict(), Ge(1), Le(MAX_FDS)] = 0  # computed when omitted
    ioas_id: U32
    ranges: Annotated[tuple[MapRange, ...], MinLen(1), MaxLen(MAX_RANGES)]

    @model_validator(mode="after")
    def _fd_indexes(self) -> IoasMap:
        used = {r.fd_index for r in self.ranges}
        default_fds(self, max(used) + 1)
        if max(used) >= self.fds:
            raise ValueError("every ranges[].fd_index must be < fds")
        if len(used) != self.fds:
            raise ValueError("every attached fd must be referenced by a range")
        return self


class IoasUnmap(RequestBase):
    op: Literal["ioas_unmap"] = "ioas_unmap"
    ioas_id: U32
    iova: U64
    length: Length


class IovaRanges(RequestBase):
    op: Literal["iova_ranges"] = "iova_ranges"
    ioas_id: U32


class DeviceReset(RequestBase):
    op: Literal["device_reset"] = "device_reset"
    bdf: Bdf


class Subscribe(RequestBase):
    """Choose which events this connection receives; null means all. Replaces the last."""

    op: Literal["subscribe"] = "subscribe"
    events: tuple[EventName, ...] | None = None
    groups: tuple[U32, ...] | None = None


class Revoke(RequestBase):
    """Admin only: revoke every lease on a group."""

    op: Literal["revoke"] = "revoke"
    group_id: U32
    reason: Text


# --------------------------------------------------------------------------- replies


class HelloReply(ReplyBase):
    op: Literal["hello_reply"] = "hello_reply"
    version: U32
    server: Name
    capabilities: tuple[Name, ...]
    limits: Limits


class PingReply(ReplyBase):
    op: Literal["ping_reply"] = "ping_reply"


class StatusReply(ReplyBase):
    op: Literal["status_reply"] = "status_reply"
    version: Name
    event_source: Name | None
    clients: U32
    leases: tuple[LeaseInfo, ...]
    uptime_s: Seconds


class PageReply(ReplyBase):
    """Base of a list reply: one page of entries out of ``total``; ask again from
    ``next_offset`` (null: this page ends the list)."""

    total: U32
    next_offset: U32 | None

    def entries(self) -> tuple[Struct, ...]:
        raise NotImplementedError

    @model_validator(mode="after")
    def _page(self) -> PageReply:
        _check_page(len(self.entries()), self.total, self.next_offset)
        return self


class ListDevicesReply(PageReply):
    """A page of ``list_devices``: ``total`` devices in all; ask again from
    ``next_offset`` (null: this page ends the list)."""

    op: Literal["list_devices_reply"] = "list_devices_reply"
    devices: tuple[DeviceEntry, ...]

    def entries(self) -> tuple[DeviceEntry, ...]:
        return self.devices


class ListGroupsReply(PageReply):
    """A page of ``list_groups``; see ``ListDevicesReply``."""

    op: Literal["list_groups_reply"] = "list_groups_reply"
    groups: tuple[GroupEntry, ...]

    def entries(self) -> tuple[GroupEntry, ...]:
        return self.groups


class ClaimReply(ReplyBase):
    """Carries one fd per claimed device; ``fds`` defaults to ``len(devices)``."""

    op: Literal["claim_reply"] = "claim_reply"
    fds: Annotated[int, Strict(), Ge(1), Le(MAX_FDS)] = 0  # computed when omitted
    lease_id: U32
    group_id: U32
    backend: BackendKind
    ioas_id: U32
    devices: Annotated[tuple[ClaimedDevice, ...], MinLen(1), MaxLen(MAX_FDS)]

    @model_validator(mode="after")
    def _fd_indexes(self) -> ClaimReply:
        default_fds(self, len(self.devices))
        if self.fds != len(self.devices):
            raise ValueError("fds must equal the number of devices")
        if sorted(d.fd_index for d in self.devices) != list(range(self.fds)):
            raise ValueError("devices[].fd_index must be 0..fds-1, each once")
        return self


class ReleaseReply(ReplyBase):
    op: Literal["release_reply"] = "release_reply"


class IoasCreateReply(ReplyBase):
    op: Literal["ioas_create_reply"] = "ioas_create_reply"
    ioas_id: U32


class IoasDestroyReply(ReplyBase):
    op: Literal["ioas_destroy_reply"] = "ioas_destroy_reply"


class IoasMapReply(ReplyBase):
    """``mappings`` are in the order of the request's ``ranges``."""

    op: Literal["ioas_map_reply"] = "ioas_map_reply"
    mappings: Annotated[tuple[MappedRange, ...], MinLen(1), MaxLen(MAX_RANGES)]


class IoasUnmapReply(ReplyBase):
    op: Literal["ioas_unmap_reply"] = "ioas_unmap_reply"
    unmapped: U64


class IovaRangesReply(ReplyBase):
    op: Literal["iova_ranges_reply"] = "iova_ranges_reply"
    ranges: tuple[IovaRange, ...]
    alignment: U64


class DeviceResetReply(ReplyBase):
    op: Literal["device_reset_reply"] = "device_reset_reply"


class SubscribeReply(ReplyBase):
    op: Literal["subscribe_reply"] = "subscribe_reply"


class RevokeReply(ReplyBase):
    op: Literal["revoke_reply"] = "revoke_reply"
    revoked_leases: tuple[U32, ...]


class ErrorReply(Message):
    """A failed request. ``id`` is null when the request's id could not be read."""

    op: Literal["error"] = "error"
    fds: NoFds = 0
    id: U32 | None
    code: ErrorCode
    message: Text
    details: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _finite(self) -> ErrorReply:
        if not _is_finite_json(self.details):
            raise ValueError("details must not contain NaN or infinities")
        return self


# --------------------------------------------------------------------------- unions

Request = Annotated[
    Hello
    | Ping
    | Status
    | ListDevices
    | ListGroups
    | Claim
    | Release
    | IoasCreate
    | IoasDestroy
    | IoasMap
    | IoasUnmap
    | IovaRanges
    | DeviceReset
    | Subscribe
    | Revoke,
    Field(discriminator="op"),
]
"""Everything a client may send."""

Reply = (
    HelloReply
    | PingReply
    | StatusReply
    | ListDevicesReply
    | ListGroupsReply
    | ClaimReply
    | ReleaseReply
    | IoasCreateReply
    | IoasDestroyReply
    | IoasMapReply
    | IoasUnmapReply
    | IovaRangesReply
    | DeviceResetReply
    | SubscribeReply
    | RevokeReply
)
"""A successful reply (not a union the codec decodes on its own)."""

ServerMessage = Annotated[Reply | ErrorReply | AnyEvent, Field(discriminator="op")]
"""Everything a server may send: replies, errors and events."""


def _members(union: Any) -> list[Any]:
    """The classes of a (possibly Annotated, possibly nested) union, in order."""
    if typing.get_origin(union) is Annotated:
        return _members(typing.get_args(union)[0])
    if typing.get_origin(union) in (Union, types.UnionType):
        return [cls for arg in typing.get_args(union) for cls in _members(arg)]
    return [union]


REQUEST_TYPES: Final[Mapping[str, type[RequestBase]]] = {
    cls.model_fields["op"].default: cls for cls in _members(Request)
}
"""Request op -> request class."""

REPLY_TYPES: Final[Mapping[str, type[ReplyBase]]] = {
    cls.model_fields["op"].default.removesuffix("_reply"): cls for cls in _members(Reply)
}
"""Request op -> the class of its successful reply."""

EVENT_TYPES: Final[Mapping[EventName, type[Event]]] = {
    cls.model_fields["event"].default: cls for cls in _members(AnyEvent)
}
"""Event name -> event class."""


def default_fds(msg: Message, fds: int) -> None:
    """Set ``fds`` to what the message references when the caller left it out (Python
    callers only: the codec requires ``fds`` on the wire, so this never relaxes decoding).

    An "after" validator, not a "before" one: with one of those, pydantic-core turns
    every decoded JSON message into Python objects first (an ioas_map took 13.6 us to
    validate, 5.2 without).
    """
    if "fds" not in msg.model_fields_set:
        msg.__dict__["fds"] = fds  # the model is frozen; this is still its validation


def _check_page(count: int, total: int, next_offset: int | None) -> None:
    """A page holds at most ``total`` entries; a page that is not the last is not empty
    and points inside the list (``offset + count`` is its ``next_offset``, so it is at
    least ``count`` and below ``total``)."""
    if count > total:
        raise ValueError("a page cannot hold more than total entries")
    if next_offset is not None and not (1 <= count <= next_offset < total):
        raise ValueError("next_offset must be null, or >= the entries, >= 1 and < total")


def _is_finite_json(value: JsonValue) -> bool:
    """False if a NaN or an infinity hides anywhere in ``value`` (JSON has neither)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_is_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_finite_json(v) for v in value)
    return True
