"""Protocol version 2: v1 plus delegated claims (protocol/PROTOCOL.md, "Version 2").

A v2 connection (``hello.version == 2``) speaks every v1 message unchanged except:

- ``ClaimV2``: ``mode`` ("brokered", the default, is v1's claim) and ``iommufd_id``
  (join a delegated iommufd this session already holds);
- ``ClaimReplyV2``: ``mode``, ``iommufd_id`` and ``iommufd_fd_index``. A delegated
  reply carries the fresh /dev/iommu fd (only when the claim created it) and one UNBOUND
  VFIO cdev fd per device; its ``ioas_id`` and every ``devid`` are null, because the
  VMM binds and allocates its own IOAS;
- ``StatusV2`` / ``StatusReplyV2``: each lease (``LeaseInfoV2``) also says its
  ``mode``, ``state``, when it will be enforced and, for a delegated lease, the bytes
  pinned by the processes that hold its iommufd (VmPin) and their pids;
- events: ``lease_revoked`` (``LeaseRevokedV2``) gains ``mode`` and ``grace_s`` (the
  seconds the holder has to let go before the daemon kills whoever still holds a
  delegated device); the new ``lease_enforced`` (``LeaseEnforced``) says what the
  enforcement did. ``downgrade_event`` turns the daemon's events into what a v1
  connection may see (v1's ``lease_revoked``, nothing for ``lease_enforced``).

``Request`` and ``ServerMessage`` here are v1's unions with those swapped in; the codec
picks the union by the connection's version, so a v1 connection refuses ``mode`` and
``iommufd_id`` exactly like any unknown key. Pure data, like ``messages``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Final, Literal

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import Field, Strict, model_validator

from iommud.protocol.events import (
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
    U32,
    U64,
    Backend,
    BackendKind,
    Bdf,
    ClaimedDevice,
    ClaimMode,
    EventName,
    FdIndex,
    LeaseInfo,
    Name,
    ReplyBase,
    RequestBase,
    Seconds,
    Struct,
    Text,
)
from iommud.protocol.limits import MAX_FDS
from iommud.protocol.messages import (
    Claim,
    DeviceReset,
    DeviceResetReply,
    ErrorReply,
    Hello,
    HelloReply,
    IoasCreate,
    IoasCreateReply,
    IoasDestroy,
    IoasDestroyReply,
    IoasMap,
    IoasMapReply,
    IoasUnmap,
    IoasUnmapReply,
    IovaRanges,
    IovaRangesReply,
    ListDevices,
    ListDevicesReply,
    ListGroups,
    ListGroupsReply,
    Ping,
    PingReply,
    Release,
    ReleaseReply,
    Revoke,
    RevokeReply,
    ServerMessage,
    Status,
    StatusReply,
    Subscribe,
    SubscribeReply,
    _members,
    default_fds,
)

__all__ = [
    "EVENT_TYPES_V2",
    "REPLY_TYPES_V2",
    "REQUEST_TYPES_V2",
    "V2_ONLY_EVENTS",
    "AnyEventV2",
    "AnyServerMessage",
    "ClaimMode",
    "ClaimReplyV2",
    "ClaimV2",
    "EnforceOutcome",
    "Holder",
    "LeaseEnforced",
    "LeaseInfoV2",
    "LeaseRevokedV2",
    "LeaseStatus",
    "PendingRestore",
    "ReplyV2",
    "RequestV2",
    "ServerMessageV2",
    "StatusReplyV2",
    "StatusV2",
    "downgrade_event",
]


class ClaimV2(Claim):
    """v2 ``claim``: v1's fields plus ``mode`` and ``iommufd_id``.

    A delegated claim is iommufd only (``backend`` auto or iommufd) and names no daemon
    IOAS; ``iommufd_id`` null asks for a fresh /dev/iommu file, N joins the delegated
    iommufd N of this session. A brokered claim names no ``iommufd_id``.
    """

    mode: ClaimMode = ClaimMode.BROKERED
    iommufd_id: U32 | None = None

    @model_validator(mode="after")
    def _mode_fields(self) -> ClaimV2:
        if self.mode is ClaimMode.BROKERED:
            if self.iommufd_id is not None:
                raise ValueError("iommufd_id is only for mode 'delegated'")
            return self
        if self.backend is Backend.LEGACY:
            raise ValueError("a delegated claim is iommufd only (backend 'auto' or 'iommufd')")
        if self.ioas_id is not None:
            raise ValueError("a delegated claim names no ioas_id: the VMM makes its own IOAS")
        return self


class ClaimReplyV2(ReplyBase):
    """v2 ``claim_reply``. ``fds`` defaults to the devices plus the iommufd fd, if any.

    Brokered: v1's reply plus ``mode``, ``iommufd_id: null``, ``iommufd_fd_index: null``.
    Delegated: ``backend`` iommufd, ``ioas_id`` null, ``iommufd_id`` set, every ``devid``
    null (unbound cdevs); ``iommufd_fd_index`` is the fresh /dev/iommu fd's index, null
    when the claim joined an existing ``iommufd_id``.
    """

    op: Literal["claim_reply"] = "claim_reply"
    fds: Annotated[int, Strict(), Ge(1), Le(MAX_FDS)] = 0  # computed when omitted
    lease_id: U32
    group_id: U32
    backend: BackendKind
    ioas_id: U32 | None
    mode: ClaimMode
    iommufd_id: U32 | None
    iommufd_fd_index: FdIndex | None
    devices: Annotated[tuple[ClaimedDevice, ...], MinLen(1), MaxLen(MAX_FDS)]

    @model_validator(mode="after")
    def _consistent(self) -> ClaimReplyV2:
        default_fds(self, len(self.devices) + (self.iommufd_fd_index is not None))
        indexes = [d.fd_index for d in self.devices]
        if self.iommufd_fd_index is not None:
            indexes.append(self.iommufd_fd_index)
        if sorted(indexes) != list(range(self.fds)):
            raise ValueError("devices[].fd_index and iommufd_fd_index must be 0..fds-1, each once")
        if self.mode is ClaimMode.BROKERED:
            if self.ioas_id is None:
                raise ValueError("a brokered claim_reply names its ioas_id")
            if self.iommufd_id is not None or self.iommufd_fd_index is not None:
                raise ValueError("iommufd_id and iommufd_fd_index are null when brokered")
            return self
        if self.backend is not BackendKind.IOMMUFD:
            raise ValueError("a delegated claim_reply has backend 'iommufd'")
        if self.ioas_id is not None or any(d.devid is not None for d in self.devices):
            raise ValueError("a delegated claim_reply has null ioas_id and devid")
        if self.iommufd_id is None:
            raise ValueError("a delegated claim_reply names its iommufd_id")
        return self


class LeaseStatus(enum.StrEnum):
    """Where a lease is in its life (v2 ``status``)."""

    ACTIVE = "active"
    REVOKED = "revoked"  # DMA blocked, the holder was told; enforcement may follow
    ENFORCING = "enforcing"  # the grace period is over: holders are being killed


class EnforceOutcome(enum.StrEnum):
    """How an enforcement ended (``lease_enforced.outcome``)."""

    RETURNED = "returned"  # nobody holds the devices any more: reset, given back
    STUCK = "stuck"  # holders survived every pass: the group stays owned, on vfio-pci


class Holder(Struct):
    """A process that held a delegated device file when the daemon enforced."""

    pid: U32
    uid: U32
    comm: Name


class StatusV2(Status):
    """v2 ``status``: the same request; the reply is ``StatusReplyV2``."""


class LeaseInfoV2(LeaseInfo):
    """v1's lease fields plus its mode and state and, for a delegated lease, the
    memory its VMM pinned.

    ``enforce_at``: unix time at which the daemon kills whoever still holds the
    lease's devices (null: no enforcement pending). ``pinned_bytes``: the sum of VmPin
    of ``pinned_pids``, the processes holding the lease's iommufd (its VMM; not
    necessarily the daemon's peer); null for a brokered lease or when it could not be
    read. Leases sharing one iommufd report the same processes.
    """

    mode: ClaimMode
    state: LeaseStatus
    iommufd_id: U32 | None
    enforce_at: Seconds | None
    pinned_bytes: U64 | None
    pinned_pids: tuple[U32, ...]


class PendingRestore(Struct):
    """A device the daemon is still giving back to its driver (after a release, a
    revocation or, at start-up, a crashed run's journal) and what that waits for, e.g.
    a client that still holds a device fd of the group (PROTOCOL.md section 5, release)."""

    bdf: Bdf
    waiting_for: Text


class StatusReplyV2(StatusReply):
    """v2 ``status_reply``: v1's fields, each lease a ``LeaseInfoV2``, plus
    ``restores``: every device whose driver is not back yet, and why (sorted by BDF;
    shown to every peer: it names devices and reasons, never a holder)."""

    leases: tuple[LeaseInfoV2, ...]
    restores: tuple[PendingRestore, ...]


class LeaseRevokedV2(LeaseRevoked):
    """v2 ``lease_revoked``: v1's fields plus ``mode`` and ``grace_s``.

    ``grace_s``: seconds from this event until the daemon kills every process that
    still holds one of the lease's delegated device files (0: at once, e.g. the
    holder's session ended); null when nothing will be enforced (a brokered lease).
    """

    mode: ClaimMode
    grace_s: Seconds | None


class LeaseEnforced(Event):
    """v2 only: the grace period of a revoked delegated lease ran out (or its session
    ended) and the daemon enforced: it killed ``killed`` (who held a device file) and
    the devices were given back (``returned``) or are still held (``stuck``)."""

    event: Literal[EventName.LEASE_ENFORCED] = EventName.LEASE_ENFORCED
    lease_id: U32
    group_id: U32
    outcome: EnforceOutcome
    killed: tuple[Holder, ...]


AnyEventV2 = Annotated[
    DriverBound
    | DriverUnbound
    | DeviceAdded
    | DeviceRemoved
    | ViabilityChanged
    | LeaseRevokedV2
    | BindRefused
    | LeaseEnforced,
    Field(discriminator="event"),
]
"""Every event a v2 server may send."""

V2_ONLY_EVENTS: Final = frozenset({EventName.LEASE_ENFORCED})
"""Event names a v1 connection never sees (nor may subscribe to)."""


def downgrade_event(event: Event) -> Event | None:
    """What a v1 connection sees of ``event``: v1's ``lease_revoked``, no v2-only event."""
    if isinstance(event, LeaseRevokedV2):
        return LeaseRevoked(
            ts=event.ts,
            seq=event.seq,
            lease_id=event.lease_id,
            group_id=event.group_id,
            reason=event.reason,
        )
    if event.event in V2_ONLY_EVENTS:
        return None
    return event


RequestV2 = Annotated[
    Hello
    | Ping
    | StatusV2
    | ListDevices
    | ListGroups
    | ClaimV2
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
"""Everything a v2 client may send."""

ReplyV2 = (
    HelloReply
    | PingReply
    | StatusReplyV2
    | ListDevicesReply
    | ListGroupsReply
    | ClaimReplyV2
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
"""A successful v2 reply."""

ServerMessageV2 = Annotated[ReplyV2 | ErrorReply | AnyEventV2, Field(discriminator="op")]
"""Everything a v2 server may send."""

AnyServerMessage = ServerMessage | ClaimReplyV2 | StatusReplyV2 | LeaseEnforced
"""What a server of either version may send (the static type of a decoded datagram)."""

REQUEST_TYPES_V2: Final[Mapping[str, type[RequestBase]]] = {
    cls.model_fields["op"].default: cls for cls in _members(RequestV2)
}
"""Request op -> v2 request class."""

REPLY_TYPES_V2: Final[Mapping[str, type[ReplyBase]]] = {
    cls.model_fields["op"].default.removesuffix("_reply"): cls for cls in _members(ReplyV2)
}
"""Request op -> the class of its successful v2 reply."""

EVENT_TYPES_V2: Final[Mapping[EventName, type[Event]]] = {
    cls.model_fields["event"].default: cls for cls in _members(AnyEventV2)
}
"""Event name -> the class a v2 server sends (what the daemon builds)."""
