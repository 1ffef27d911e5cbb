"""Group viability and claim path selection: pure functions over a HostSnapshot.

Viability follows the kernel's rule: a group may be handed to userspace only while every
member is driver-less or bound to a driver that manages its own DMA
(``driver_managed_dma``; the list ships as data in ``dma_safe_drivers.toml``).

Path selection decides whether a claim goes through iommufd (the device cdev bound to
the daemon's /dev/iommu) or the legacy VFIO group/container API:

- a 1:1 group takes iommufd when the host has /dev/iommu, else legacy;
- a multi-device group takes legacy, unless every DMA-capable member (bridges and
  pcieport-bound ports excluded) ends up claimed by the same client into the same IOAS
  by this request plus the existing claims, in which case iommufd can hold the whole
  group in one IOAS;
- devices of one group never land in different IOASes or with different clients
  (GroupSplitError), and once a group has claims their backend is fixed.

No I/O, no clocks, no globals beyond the immutable default driver set loaded at import.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final

from iommud.errors import (
    BadRequestError,
    BusyError,
    GroupSplitError,
    NotFoundError,
    NotViableError,
)
from iommud.host.snapshot import HostSnapshot, IommuGroup, PciDevice

__all__ = [
    "DEFAULT_DMA_SAFE_DRIVERS",
    "BackendRequest",
    "ClaimIntent",
    "ClaimPath",
    "ExistingClaim",
    "Offender",
    "PathDecision",
    "Viability",
    "dma_capable",
    "group_viability",
    "load_dma_safe_driver_table",
    "select_path",
    "whole_group_path",
]


def load_dma_safe_driver_table() -> dict[str, str]:
    """driver name -> the kernel file that sets its driver_managed_dma (from the data file)."""
    text = resources.files("iommud.host").joinpath("dma_safe_drivers.toml").read_text("utf-8")
    table = tomllib.loads(text)["drivers"]
    return {str(k): str(v) for k, v in table.items()}


DEFAULT_DMA_SAFE_DRIVERS: Final[frozenset[str]] = frozenset(load_dma_safe_driver_table())

# drivers/pci/pcie/portdrv.c: port services never DMA (commit c7d469849747).
_PORT_DRIVER: Final = "pcieport"


@dataclass(frozen=True, slots=True)
class Offender:
    """A group member bound to a driver that is not DMA-safe."""

    bdf: str  # a PCI BDF, or the sysfs name of a non-PCI member
    driver: str

    def as_dict(self) -> dict[str, str]:
        return {"bdf": self.bdf, "driver": self.driver}


@dataclass(frozen=True, slots=True)
class Viability:
    group_id: int
    is_viable: bool
    offenders: tuple[Offender, ...]


def group_viability(
    snapshot: HostSnapshot,
    group_id: int,
    safe_drivers: Collection[str] = DEFAULT_DMA_SAFE_DRIVERS,
) -> Viability:
    """Whether ``group_id`` may be owned by userspace; names every offending device."""
    group = _group(snapshot, group_id)
    offenders: list[Offender] = []
    for dev in snapshot.group_devices(group_id):
        if dev.driver is not None and dev.driver not in safe_drivers:
            offenders.append(Offender(dev.bdf, dev.driver))
    for other in group.other_members:
        if other.driver is not None and other.driver not in safe_drivers:
            offenders.append(Offender(other.name, other.driver))
    return Viability(group_id, not offenders, tuple(offenders))


def dma_capable(device: PciDevice) -> bool:
    """Whether a device can master DMA for our purposes (bridges and ports cannot)."""
    return not device.is_bridge and device.driver != _PORT_DRIVER


class ClaimPath(enum.StrEnum):
    """The path a claim takes (or took): iommufd or the legacy VFIO group/container.

    The decision's side; a client's wish is a ``BackendRequest`` (``Backend`` on the wire).
    """

    IOMMUFD = "iommufd"
    LEGACY = "legacy"


class BackendRequest(enum.StrEnum):
    """The path a client asks for (``auto`` leaves the choice to :func:`select_path`)."""

    AUTO = "auto"
    IOMMUFD = "iommufd"
    LEGACY = "legacy"


ClientId = int | str


@dataclass(frozen=True, slots=True)
class ClaimIntent:
    """What a client asks for, restricted to one group.

    ``ioas_id=None`` asks for a new IOAS. ``ioas_backend`` is the kind of the target
    IOAS when it already exists (a legacy IOAS is a VFIO container), which constrains
    the path the same way an explicit ``backend`` does.
    """

    client: ClientId
    devices: tuple[str, ...]
    ioas_id: int | None = None
    backend: BackendRequest = BackendRequest.AUTO
    ioas_backend: ClaimPath | None = None


@dataclass(frozen=True, slots=True)
class ExistingClaim:
    """A device of the group already claimed (by whom, into which IOAS, which path)."""

    client: ClientId
    ioas_id: int
    backend: ClaimPath


@dataclass(frozen=True, slots=True)
class PathDecision:
    backend: ClaimPath
    reason: str


def _group(snapshot: HostSnapshot, group_id: int) -> IommuGroup:
    group = snapshot.groups.get(group_id)
    if group is None:
        raise NotFoundError(f"no IOMMU group {group_id}", group_id=group_id)
    return group


def _require_viable(snapshot: HostSnapshot, group_id: int, safe_drivers: Collection[str]) -> None:
    v = group_viability(snapshot, group_id, safe_drivers)
    if not v.is_viable:
        names = ", ".join(f"{o.bdf} ({o.driver})" for o in v.offenders)
        raise NotViableError(
            f"IOMMU group {group_id} is not viable: {names} bound to a driver that is not DMA-safe",
            group_id=group_id,
            offenders=[o.as_dict() for o in v.offenders],
        )


def select_path(
    snapshot: HostSnapshot,
    group_id: int,
    intent: ClaimIntent,
    existing_claims: Mapping[str, ExistingClaim],
    safe_drivers: Collection[str] = DEFAULT_DMA_SAFE_DRIVERS,
) -> PathDecision:
    """Decide the backend for claiming ``intent.devices`` of group ``group_id``.

    ``existing_claims`` maps each already-claimed BDF of this group to its claim.
    Raises NotFoundError (unknown group or device), BadRequestError (device outside the
    group, a bridge, an impossible backend), BusyError (device already claimed),
    NotViableError (offenders in details) or GroupSplitError.
    """
    group = _group(snapshot, group_id)
    requested = tuple(dict.fromkeys(intent.devices))  # order-preserving dedupe
    if not requested:
        raise BadRequestError("a claim needs at least one device", group_id=group_id)
    _check_requested(snapshot, group, requested)
    for bdf in requested:
        held = existing_claims.get(bdf)
        if held is not None:
            raise BusyError(
                f"{bdf} is already claimed",
                reason="already_claimed",
                bdf=bdf,
                group_id=group_id,
                ioas_id=held.ioas_id,
            )
    _require_viable(snapshot, group_id, safe_drivers)
    _check_split(group_id, intent, requested, existing_claims)

    # Constraints on the backend, each with why.
    constraints: list[tuple[ClaimPath, str]] = []
    existing_backends = {c.backend for c in existing_claims.values()}
    if len(existing_backends) > 1:  # the broker never creates this; refuse loudly
        raise GroupSplitError(
            f"group {group_id} already has claims on both backends",
            group_id=group_id,
            reason="mixed_backends",
        )
    if existing_backends:
        (fixed,) = existing_backends
        constraints.append((fixed, f"group {group_id} is already claimed through {fixed}"))
    if intent.ioas_backend is not None:
        constraints.append(
            (intent.ioas_backend, f"IOAS {intent.ioas_id} is a {intent.ioas_backend} IOAS")
        )
    if intent.backend is not BackendRequest.AUTO:
        constraints.append((ClaimPath(intent.backend), f"{intent.backend} was requested"))
    wanted = {b for b, _ in constraints}
    if len(wanted) > 1:
        raise BadRequestError(
            "conflicting backend constraints: " + "; ".join(why for _, why in constraints),
            group_id=group_id,
            requested=str(intent.backend),
            reason="conflicting_backends",
        )

    iommufd_ok, iommufd_why = _iommufd_possible(snapshot, group, intent, requested, existing_claims)
    legacy_ok = snapshot.has_legacy_container
    legacy_why = (
        "the host has /dev/vfio/vfio"
        if legacy_ok
        else "the host has no /dev/vfio/vfio (legacy VFIO container)"
    )
    if wanted:
        (backend,) = wanted
        ok, why = (
            (iommufd_ok, iommufd_why) if backend is ClaimPath.IOMMUFD else (legacy_ok, legacy_why)
        )
        if not ok:
            raise BadRequestError(
                f"backend {backend} is not possible for group {group_id}: {why}",
                group_id=group_id,
                requested=str(backend),
                reason=why,
            )
        return PathDecision(backend, f"{constraints[0][1]}; {why}")
    if iommufd_ok:
        return PathDecision(ClaimPath.IOMMUFD, iommufd_why)
    if legacy_ok:
        return PathDecision(ClaimPath.LEGACY, f"{iommufd_why}; {legacy_why}")
    raise BadRequestError(
        f"no backend can claim group {group_id}: {iommufd_why}; {legacy_why}",
        group_id=group_id,
        requested=str(intent.backend),
        reason=f"{iommufd_why}; {legacy_why}",
    )


def _check_requested(snapshot: HostSnapshot, group: IommuGroup, requested: tuple[str, ...]) -> None:
    members = set(group.devices)
    outside: list[str] = []
    for bdf in requested:
        dev = snapshot.devices.get(bdf)
        if dev is None:
            raise NotFoundError(f"no PCI device {bdf}", bdf=bdf)
        if bdf not in members:
            outside.append(bdf)
        elif not dma_capable(dev):
            raise BadRequestError(
                f"{bdf} is a bridge or port and cannot be claimed",
                bdf=bdf,
                group_id=group.group_id,
            )
    if outside:
        raise BadRequestError(
            f"not in IOMMU group {group.group_id}: {', '.join(outside)}",
            group_id=group.group_id,
            devices=outside,
        )


def _check_split(
    group_id: int,
    intent: ClaimIntent,
    requested: tuple[str, ...],
    existing_claims: Mapping[str, ExistingClaim],
) -> None:
    others = {b: c for b, c in existing_claims.items() if c.client != intent.client}
    if others:
        held = ", ".join(sorted(others))
        raise _split_error(
            f"IOMMU group {group_id} is split: {held} already claimed by another client, "
            f"so {', '.join(requested)} cannot be given to this one",
            group_id,
            "different_client",
            intent,
            requested,
            others,
        )
    mine = {b: c for b, c in existing_claims.items() if c.ioas_id != intent.ioas_id}
    if mine:
        where = ", ".join(f"{b} in IOAS {c.ioas_id}" for b, c in sorted(mine.items()))
        target = "a new IOAS" if intent.ioas_id is None else f"IOAS {intent.ioas_id}"
        raise _split_error(
            f"devices of IOMMU group {group_id} cannot be in different IOASes: "
            f"{', '.join(requested)} into {target} but {where}",
            group_id,
            "different_ioas",
            intent,
            requested,
            mine,
        )


def _split_error(
    message: str,
    group_id: int,
    reason: str,
    intent: ClaimIntent,
    requested: tuple[str, ...],
    clashing: Mapping[str, ExistingClaim],
) -> GroupSplitError:
    """The GroupSplitError details: what was asked, and the claims it clashes with."""
    return GroupSplitError(
        message,
        group_id=group_id,
        reason=reason,
        requested={"devices": list(requested), "ioas_id": intent.ioas_id},
        claimed=[{"bdf": b, "ioas_id": c.ioas_id} for b, c in sorted(clashing.items())],
    )


def _iommufd_possible(
    snapshot: HostSnapshot,
    group: IommuGroup,
    intent: ClaimIntent,
    requested: tuple[str, ...],
    existing_claims: Mapping[str, ExistingClaim],
) -> tuple[bool, str]:
    if not snapshot.has_iommufd:
        return False, "the host has no /dev/iommu"
    if group.other_members:
        names = ", ".join(m.name for m in group.other_members)
        return False, f"group {group.group_id} has non-PCI members ({names})"
    covered = set(requested) | set(existing_claims)  # _check_split: same client and IOAS
    unclaimed = [
        d.bdf
        for d in snapshot.group_devices(group.group_id)
        if dma_capable(d) and d.bdf not in covered
    ]
    if unclaimed:
        return False, (
            f"multi-device group {group.group_id}: {', '.join(unclaimed)} would stay "
            "unclaimed (iommufd needs every DMA-capable device of the group in one IOAS)"
        )
    if len(covered) == 1:
        return True, f"1:1 group {group.group_id} and the host has /dev/iommu"
    target = "one new IOAS" if intent.ioas_id is None else f"IOAS {intent.ioas_id}"
    return True, (
        f"every DMA-capable device of group {group.group_id} is claimed by this client "
        f"into {target}, and the host has /dev/iommu"
    )


def whole_group_path(
    snapshot: HostSnapshot,
    group_id: int,
    safe_drivers: Collection[str] = DEFAULT_DMA_SAFE_DRIVERS,
) -> ClaimPath | None:
    """The path a claim of every claimable device of an unclaimed group would take.

    None when the group is not viable, has nothing claimable (only bridges/ports), or
    the host has neither backend. For list_groups' ``path`` field.
    """
    group = _group(snapshot, group_id)
    claimable = tuple(d.bdf for d in snapshot.group_devices(group_id) if dma_capable(d))
    if not claimable or not group_viability(snapshot, group_id, safe_drivers).is_viable:
        return None
    if snapshot.has_iommufd and not group.other_members:
        return ClaimPath.IOMMUFD
    if snapshot.has_legacy_container:
        return ClaimPath.LEGACY
    return None
