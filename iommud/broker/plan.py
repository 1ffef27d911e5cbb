"""The claim plan: everything a claim decides, before anything is touched.

``plan_claim`` is a pure function of (snapshot, config, claimant, request, the group's
owner): no I/O, no clocks, no globals, like ``iommud.host.viability.select_path`` and
``iommud.policy``, and tested the same way (tests/broker/test_claim_plan.py). Its checks
run in the order a client meets their errors:

1. policy, device by device (a peer that may not claim these devices learns nothing
   about who holds them);
2. busy: the group is being given back to its host drivers, or another session owns it;
3. revoked: this session's own hold on the group has a revoked lease;
4. the named IOAS exists in the session;
5. the path, chosen by ``select_path`` on the snapshot as it will be after the rebind
   (not viable, group split, device already claimed, impossible backend);
6. frozen: the iommufd path while a revoke's freeze holds (iommud.broker.freeze);
7. rebind refused: a claimed device off vfio-pci that ``[manage] rebind`` does not let
   the daemon move;
8. quota: a new IOAS beyond the ``max_ioas`` of the claimant's uid (over all its
   connections) or the daemon-wide one.

A delegated claim (protocol v2) needs the ``delegate`` right (step 1), names a delegated
iommufd of its own session if any (``not_found``), never shares a group with a brokered
lease (``group_split``, reason ``different_mode``), and takes the iommufd path only: a
group that would go the legacy way is ``not_delegable`` (``legacy_only``; QEMU opens
/dev/vfio/N by path and takes no legacy fd). It makes no daemon IOAS (no IOAS quota)
and binds into its own iommufd, so a freeze on the session's iommufd does not touch it.

The result, a ``ClaimPlan``, says which group, which path, what to journal, which
devices to pin and to rebind, and whether the IOAS is new; ``ClaimManager`` carries it
out. Must not read sysfs, call the kernel layer, or change anything it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from iommud.broker.drivers import VFIO_PCI
from iommud.broker.journal import JournalEntry
from iommud.config import Config, Quota
from iommud.errors import (
    BusyError,
    GroupSplitError,
    NotDelegableError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RevokedError,
)
from iommud.host.snapshot import HostSnapshot, PciDevice
from iommud.host.viability import (
    BackendRequest,
    ClaimIntent,
    ClaimPath,
    ExistingClaim,
    PathDecision,
    select_path,
)
from iommud.policy import Identity, check_claim, may_rebind
from iommud.protocol.messages import Claim
from iommud.protocol.v2 import ClaimMode, ClaimV2


@dataclass(frozen=True, slots=True)
class Claimant:
    """The claiming session, as far as a claim depends on it.

    ``frozen`` is what a claim on the iommufd path is refused with while a revoke's
    freeze holds on the session's iommufd (None when none holds).
    """

    session_id: int
    identity: Identity
    quota: Quota
    ioases: Mapping[int, ClaimPath] = field(default_factory=dict)  # its IOAS ids -> kind
    frozen: RevokedError | None = None
    iommufds: frozenset[int] = frozenset()  # its delegated iommufd ids
    # What one more IOAS meets in the uid's (all its connections') and the daemon-wide
    # counts (iommud.broker.ledger); None: it fits.
    ioas_refusal: QuotaExceededError | None = None


@dataclass(frozen=True, slots=True)
class GroupOwner:
    """The session holding the group now, as far as a claim depends on it."""

    session_id: int
    identity: Identity
    lease_ids: tuple[int, ...] = ()
    is_revoked: bool = False  # one of its leases on the group was revoked
    pinned: Mapping[str, str | None] = field(default_factory=dict)  # bdf -> override before
    claims: Mapping[str, ExistingClaim] = field(default_factory=dict)  # claimed bdf -> claim
    delegated: frozenset[bool] = frozenset()  # is_delegated of each of its leases on the group


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    """What a claim will do, in the order it does it (see ClaimManager.execute).

    ``journal`` goes to disk first (the original state of every device about to
    change), then ``pin`` get driver_override=vfio-pci, then ``rebind`` move to
    vfio-pci. ``ioas_id`` None means a new IOAS of the plan's backend.
    """

    group_id: int
    devices: tuple[str, ...]
    path: PathDecision
    ioas_id: int | None
    new_hold: bool
    journal: tuple[JournalEntry, ...]
    pin: tuple[PciDevice, ...]
    rebind: tuple[PciDevice, ...]
    delegate: bool = False
    iommufd_id: int | None = None  # delegated: join this iommufd (None: a fresh one)

    @property
    def backend(self) -> ClaimPath:
        return self.path.backend


def plan_claim(
    snapshot: HostSnapshot,
    group_id: int,
    config: Config,
    claimant: Claimant,
    request: Claim,
    *,
    owner: GroupOwner | None = None,
    restoring: Mapping[str, str] | None = None,
) -> ClaimPlan:
    """Decide the claim of ``request.devices``, all of group ``group_id`` in ``snapshot``.

    ``owner`` is the group's current holder (None: nobody). ``restoring`` is given while
    the group's released devices are still going back to their drivers: what every
    pending restore waits for (the BusyError's details). Raises the claim's refusals
    (see the module docstring for their order).
    """
    devices = tuple(request.devices)
    delegate = is_delegated(request)
    for bdf in devices:
        dev = snapshot.devices[bdf]
        decision = check_claim(config, claimant.identity, dev, delegate=delegate)
        decision.raise_if_denied(claimant.identity, dev)
    _check_owner(group_id, claimant, owner, restoring)
    iommufd_id = request.iommufd_id if isinstance(request, ClaimV2) else None
    if delegate:
        _check_delegation(group_id, claimant, owner, iommufd_id)
    elif owner is not None and True in owner.delegated:
        raise _mode_split(group_id, "brokered", "delegated")

    members = snapshot.group_devices(group_id)
    rebind, refused = _rebind_set(config, members, devices)
    ioas_backend = _target_ioas(claimant, request.ioas_id)
    path = select_path(
        _after_rebind(snapshot, group_id, members, rebind),
        group_id,
        ClaimIntent(
            client=claimant.session_id,
            devices=devices,
            ioas_id=request.ioas_id,
            backend=BackendRequest(str(request.backend)),
            ioas_backend=ioas_backend,
        ),
        owner.claims if owner is not None else {},
        config.dma_safe_drivers,
    )
    if delegate and path.backend is not ClaimPath.IOMMUFD:
        raise NotDelegableError(
            f"group {group_id} can only be claimed the legacy way ({path.reason}); "
            "a delegated claim hands out iommufd cdevs only",
            reason="legacy_only",
            group_id=group_id,
        )
    if path.backend is ClaimPath.IOMMUFD and claimant.frozen is not None and not delegate:
        # A new bind could take a revoked device's id while the freeze waits for it.
        raise claimant.frozen
    _check_rebind_allowed(refused, devices)
    if request.ioas_id is None and not delegate:
        if claimant.ioas_refusal is not None:
            raise claimant.ioas_refusal
        check_ioas_quota(claimant.quota, len(claimant.ioases))
    pinned = owner.pinned if owner is not None else {}
    pin = tuple(d for d in members if d.bdf not in pinned)
    return ClaimPlan(
        group_id=group_id,
        devices=devices,
        path=path,
        ioas_id=request.ioas_id,
        new_hold=owner is None,
        journal=_journal(group_id, pin, rebind, pinned),
        pin=pin,
        rebind=rebind,
        delegate=delegate,
        iommufd_id=iommufd_id,
    )


def _check_delegation(
    group_id: int, claimant: Claimant, owner: GroupOwner | None, iommufd_id: int | None
) -> None:
    if iommufd_id is not None and iommufd_id not in claimant.iommufds:
        raise NotFoundError(
            f"no delegated iommufd {iommufd_id} in this session", iommufd_id=iommufd_id
        )
    if owner is not None and False in owner.delegated:
        raise _mode_split(group_id, "delegated", "brokered")


def _mode_split(group_id: int, wanted: str, held: str) -> GroupSplitError:
    """A group is either brokered or delegated: its DMA ownership is one iommufd's."""
    return GroupSplitError(
        f"IOMMU group {group_id} is held in {held} mode; a {wanted} claim cannot join it",
        group_id=group_id,
        reason="different_mode",
        requested=wanted,
        held=held,
    )


def _check_owner(
    group_id: int,
    claimant: Claimant,
    owner: GroupOwner | None,
    restoring: Mapping[str, str] | None,
) -> None:
    if restoring is not None:
        raise BusyError(
            f"IOMMU group {group_id} is being given back to its host drivers",
            group_id=group_id,
            restoring=dict(restoring),
        )
    if owner is None:
        return
    if owner.session_id != claimant.session_id:
        ident = owner.identity
        raise BusyError(
            f"IOMMU group {group_id} is owned by uid {ident.uid} (pid {ident.pid})",
            group_id=group_id,
            uid=ident.uid,
            pid=ident.pid,
            lease_id=owner.lease_ids[0] if owner.lease_ids else None,
        )
    if owner.is_revoked:
        raise RevokedError(
            f"IOMMU group {group_id} was revoked; release it first", group_id=group_id
        )


def _rebind_set(
    config: Config, members: tuple[PciDevice, ...], devices: tuple[str, ...]
) -> tuple[tuple[PciDevice, ...], tuple[PciDevice, ...]]:
    """Members that must move to vfio-pci (offenders, claimed devices off it): those
    config lets the daemon move, and those it does not."""
    safe = config.dma_safe_drivers
    rebind: list[PciDevice] = []
    refused: list[PciDevice] = []
    for dev in members:
        offender = dev.driver is not None and dev.driver not in safe
        needs_vfio = dev.bdf in devices and dev.driver != VFIO_PCI
        if offender or needs_vfio:
            (rebind if may_rebind(config, dev) else refused).append(dev)
    return tuple(rebind), tuple(refused)


def _check_rebind_allowed(refused: tuple[PciDevice, ...], devices: tuple[str, ...]) -> None:
    """A claimed device the daemon may not move to vfio-pci is refused. (A refused
    offender that is not claimed leaves the group not viable: select_path says so.)"""
    for dev in refused:
        if dev.bdf in devices:
            raise PermissionDeniedError(
                f"{dev.bdf} is bound to {dev.driver or 'no driver'}, not vfio-pci, and "
                "[manage] rebind does not let the daemon rebind it",
                bdf=dev.bdf,
                driver=dev.driver,
                rule="manage.rebind",
            )


def _after_rebind(
    snapshot: HostSnapshot,
    group_id: int,
    members: tuple[PciDevice, ...],
    rebind: tuple[PciDevice, ...],
) -> HostSnapshot:
    """The snapshot as it will be once ``rebind`` are on vfio-pci."""
    if not rebind:
        return snapshot
    devs = {d.bdf: d for d in members}
    devs.update({d.bdf: replace(d, driver=VFIO_PCI) for d in rebind})
    return snapshot.with_group(snapshot.groups[group_id], devs)


def _target_ioas(claimant: Claimant, ioas_id: int | None) -> ClaimPath | None:
    if ioas_id is None:
        return None
    backend = claimant.ioases.get(ioas_id)
    if backend is None:
        raise unknown_ioas(ioas_id)
    return backend


def _journal(
    group_id: int,
    pin: tuple[PciDevice, ...],
    rebind: tuple[PciDevice, ...],
    pinned: Mapping[str, str | None],
) -> tuple[JournalEntry, ...]:
    """How to put back every device this claim changes, before it changes them."""
    rebound = {d.bdf for d in rebind}
    entries = [
        JournalEntry(d.bdf, group_id, d.driver, d.driver_override, rebound=d.bdf in rebound)
        for d in pin
    ]
    # A later claim in a group already held: those devices are pinned already, and the
    # override to restore is the one from before the first claim.
    entries += [
        JournalEntry(d.bdf, group_id, d.driver, pinned[d.bdf], rebound=True)
        for d in rebind
        if d.bdf in pinned
    ]
    return tuple(entries)


def is_delegated(request: Claim) -> bool:
    """A v2 claim in delegated mode (a v1 claim is always brokered)."""
    return isinstance(request, ClaimV2) and request.mode is ClaimMode.DELEGATED


def check_ioas_quota(quota: Quota, used: int) -> None:
    """One more IOAS must fit the session's ``max_ioas`` (claims and ioas_create)."""
    if used >= quota.max_ioas:
        raise QuotaExceededError(
            f"IOAS quota reached ({quota.max_ioas})",
            quota="max_ioas",
            limit=quota.max_ioas,
            used=used,
            requested=1,
        )


def unknown_ioas(ioas_id: int) -> NotFoundError:
    """The refusal for an IOAS id the session does not have."""
    return NotFoundError(f"no IOAS {ioas_id} in this session", ioas_id=ioas_id)
