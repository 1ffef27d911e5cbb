"""The building blocks of protocol v1 messages (protocol/PROTOCOL.md, "Common field types").

Strict scalar types (``Bdf``, ``U32``, ``Name``...), the wire enums, the model bases
(``Struct``, ``Message``, ``RequestBase``, ``ReplyBase``) and the nested objects that
requests, replies and events share. The messages themselves are in ``messages`` and
``events``. Pure data: no I/O, no imports from the rest of the daemon.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

from annotated_types import Ge, Le, MaxLen
from pydantic import BaseModel, ConfigDict, Strict, StringConstraints, model_validator

from iommud.protocol.limits import MAX_FDS, MAX_NAME, MAX_TEXT, U32_MAX, U64_MAX

# --------------------------------------------------------------------------- types

BDF_PATTERN: Final = r"^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$"
"""PCI address "DDDD:BB:DD.F", lowercase hex, device 0..1f, function 0..7."""

# Scalars are strict: JSON "1" is not an int, 1.0 is not an int, 0 is not a bool.
# Containers and enums stay lax so Python callers may pass lists and plain strings.
Bdf = Annotated[str, Strict(), StringConstraints(pattern=BDF_PATTERN)]
U16 = Annotated[int, Strict(), Ge(0), Le(0xFFFF)]
U24 = Annotated[int, Strict(), Ge(0), Le(0xFFFFFF)]
U32 = Annotated[int, Strict(), Ge(0), Le(U32_MAX)]
U64 = Annotated[int, Strict(), Ge(0), Le(U64_MAX)]
Length = Annotated[int, Strict(), Ge(1), Le(U64_MAX)]
FdIndex = Annotated[int, Strict(), Ge(0), Le(MAX_FDS - 1)]
FdCount = Annotated[int, Strict(), Ge(0), Le(MAX_FDS)]
NoFds = Annotated[int, Strict(), Ge(0), Le(0)]
"""``fds`` of a message that never carries fds: always 0."""
Bool = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict(), Ge(0.0)]
Name = Annotated[str, Strict(), MaxLen(MAX_NAME)]
"""Short identifiers: driver names, client and server names, versions."""
Text = Annotated[str, Strict(), MaxLen(MAX_TEXT)]
"""Free text: reasons and error messages."""
PageLimit = Annotated[int, Strict(), Ge(1), Le(U32_MAX)]
"""Most entries a list reply may carry (``list_devices.limit``)."""


class Backend(enum.StrEnum):
    """What a ``claim`` asks for."""

    AUTO = "auto"
    IOMMUFD = "iommufd"
    LEGACY = "legacy"


class BackendKind(enum.StrEnum):
    """What a claim got, or what a whole-group claim would take."""

    IOMMUFD = "iommufd"
    LEGACY = "legacy"


class ClaimMode(enum.StrEnum):
    """How a v2 ``claim`` hands devices out (protocol v2 only)."""

    BROKERED = "brokered"  # the daemon binds, attaches and maps (v1's only mode)
    DELEGATED = "delegated"  # a fresh /dev/iommu fd and unbound cdev fds: the VMM does it all


class EventName(enum.StrEnum):
    """The ``event`` field of an ``event`` message."""

    DRIVER_BOUND = "driver_bound"
    DRIVER_UNBOUND = "driver_unbound"
    DEVICE_ADDED = "device_added"
    DEVICE_REMOVED = "device_removed"
    VIABILITY_CHANGED = "viability_changed"
    LEASE_REVOKED = "lease_revoked"
    BIND_REFUSED = "bind_refused"
    LEASE_ENFORCED = "lease_enforced"  # protocol v2 only (iommud.protocol.v2)


def _require_wire_fields(schema: dict[str, Any]) -> None:
    # op, fds (and an event's name) have Python defaults, but a datagram must carry them
    # (the codec checks it); say so in the JSON Schema too. A required field has no
    # default on the wire: drop the Python one (``fds`` 0 of ioas_map and claim_reply is
    # "count them", which contradicted their minimum of 1).
    required = schema.setdefault("required", [])
    for key in ("op", "fds", "event"):
        prop = schema.get("properties", {}).get(key)
        if prop is not None:
            prop.pop("default", None)
            if key not in required:
                required.append(key)


class Struct(BaseModel):
    """Base of nested wire objects: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Message(Struct):
    """Base of every datagram: carries ``op`` and ``fds`` (fds attached via SCM_RIGHTS)."""

    model_config = ConfigDict(json_schema_extra=_require_wire_fields)

    op: str
    fds: FdCount = 0


class RequestBase(Message):
    """A client request: ``id`` is chosen by the client and echoed in the reply."""

    id: U32
    fds: NoFds = 0


class ReplyBase(Message):
    """A successful reply: ``op`` is the request's op + ``_reply``, same ``id``."""

    id: U32
    fds: NoFds = 0


# --------------------------------------------------------------------------- nested


class DeviceEntry(Struct):
    bdf: Bdf
    vendor: U16
    device: U16
    class_code: U24
    driver: Name | None
    driver_override: Name | None
    group_id: U32 | None
    is_bridge: Bool
    vfio_cdev: Annotated[str, MaxLen(MAX_TEXT)] | None


class Offender(Struct):
    """A device whose driver makes its group unsafe for user DMA."""

    bdf: Bdf
    driver: Name


class Owner(Struct):
    """Who holds a group; ``uid`` and ``pid`` are null for a peer that may not see them
    (another uid's lease, seen by anyone but uid 0: PROTOCOL.md section 9)."""

    uid: U32 | None
    pid: U32 | None


class GroupEntry(Struct):
    group_id: U32
    devices: tuple[Bdf, ...]
    is_viable: Bool
    offenders: tuple[Offender, ...]
    path: BackendKind | None
    owner: Owner | None


class LeaseInfo(Struct):
    lease_id: U32
    group_id: U32
    uid: U32
    pid: U32
    backend: BackendKind
    devices: tuple[Bdf, ...]
    ioas_id: U32


class ClaimedDevice(Struct):
    """One device of a claim reply; its fd is at ``fd_index`` in the SCM_RIGHTS array."""

    bdf: Bdf
    fd_index: FdIndex
    devid: U32 | None


class MapRange(Struct):
    """One range of ``ioas_map``: ``length`` bytes at ``offset`` of fd ``fd_index``."""

    fd_index: FdIndex
    offset: U64
    length: Length
    iova: U64 | None = None
    read: Bool = True
    write: Bool = True


class MappedRange(Struct):
    """Where one ``ioas_map`` range landed."""

    iova: U64
    length: Length


class IovaRange(Struct):
    """An allowed IOVA range, inclusive at both ends (``last``), as the kernel reports."""

    start: U64
    last: U64

    @model_validator(mode="after")
    def _ordered(self) -> IovaRange:
        if self.start > self.last:
            raise ValueError("start must be <= last")
        return self
