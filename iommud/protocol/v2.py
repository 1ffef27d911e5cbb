"""Protocol version 2: v1 plus delegated claims (protocol/PROTOCOL.md, "Version 2").

A v2 connection (``hello.version == 2``) speaks every v1 message unchanged except
``claim`` and ``claim_reply``, which gain a ``mode``:

- ``ClaimV2``: ``mode`` ("brokered", the default, is v1's claim) and ``iommufd_id``
  (join a delegated iommufd this session already holds);
- ``ClaimReplyV2``: ``mode``, ``iommufd_id`` and ``iommufd_fd_index``. A delegated
  reply carries the fresh /dev/iommu fd (only when the claim created it) and one UNBOUND
  VFIO cdev fd per device; its ``ioas_id`` and every ``devid`` are null, because the
  VMM binds and allocates its own IOAS.

``Request`` and ``ServerMessage`` here are v1's unions with those two swapped in; the
codec picks the union by the connection's version, so a v1 connection refuses ``mode``
and ``iommufd_id`` exactly like any unknown key. Pure data, like ``messages``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import Field, Strict, model_validator

from iommud.protocol.events import AnyEvent
from iommud.protocol.fields import (
    U32,
    Backend,
    BackendKind,
    ClaimedDevice,
    ClaimMode,
    FdIndex,
    ReplyBase,
    RequestBase,
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
)

__all__ = [
    "REPLY_TYPES_V2",
    "REQUEST_TYPES_V2",
    "AnyServerMessage",
    "ClaimMode",
    "ClaimReplyV2",
    "ClaimV2",
    "ReplyV2",
    "RequestV2",
    "ServerMessageV2",
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

    @model_validator(mode="before")
    @classmethod
    def _default_fds(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "fds" in data:
            return data
        devices = data.get("devices")
        if not isinstance(devices, list | tuple) or not devices:
            return data
        return {**data, "fds": len(devices) + (data.get("iommufd_fd_index") is not None)}

    @model_validator(mode="after")
    def _consistent(self) -> ClaimReplyV2:
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


RequestV2 = Annotated[
    Hello
    | Ping
    | Status
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
    | StatusReply
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

ServerMessageV2 = Annotated[ReplyV2 | ErrorReply | AnyEvent, Field(discriminator="op")]
"""Everything a v2 server may send."""

AnyServerMessage = ServerMessage | ClaimReplyV2
"""What a server of either version may send (the static type of a decoded datagram)."""

REQUEST_TYPES_V2: Final[Mapping[str, type[RequestBase]]] = {
    cls.model_fields["op"].default: cls for cls in _members(RequestV2)
}
"""Request op -> v2 request class."""

REPLY_TYPES_V2: Final[Mapping[str, type[ReplyBase]]] = {
    cls.model_fields["op"].default.removesuffix("_reply"): cls for cls in _members(ReplyV2)
}
"""Request op -> the class of its successful v2 reply."""
