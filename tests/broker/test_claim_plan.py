"""The claim plan, tested like select_path: snapshots built in memory, no sysfs, no kernel.

The host is the lab's (tests/broker/conftest.py draws it), as a HostSnapshot::

    group 3:  0000:00:10.0  edu (driver-less)
    group 4:  0000:00:11.0  pci-bridge (no driver)
              0000:01:01.0  edu, 0000:01:02.0 edu (driver-less)
              0000:01:03.0  e1000 (bound to e1000)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from topology import BRIDGE

from iommud.broker.journal import JournalEntry
from iommud.broker.plan import Claimant, GroupOwner, plan_claim
from iommud.config import AccessRule, Config, DaemonConfig, ManageConfig, Quota
from iommud.errors import (
    BusyError,
    GroupSplitError,
    NotDelegableError,
    NotFoundError,
    NotViableError,
    PermissionDeniedError,
    QuotaExceededError,
    RevokedError,
)
from iommud.host.snapshot import HostSnapshot, IommuGroup, PciDevice
from iommud.host.viability import ClaimPath, ExistingClaim
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.protocol.v2 import ClaimMode, ClaimV2
from tests.broker.support import ALICE, BOB, BR_EDU1, BR_EDU2, E1000, EDU, MALLORY, ROOT

QUOTA = Quota(pinned_bytes=1 << 20, max_ioas=4, max_mappings=8)


def _edu(bdf: str, group: int) -> PciDevice:
    return PciDevice(bdf, 0x1234, 0x11E8, 0x00FF00, None, None, group)


def lab(*, iommufd: bool = True, legacy: bool = True) -> HostSnapshot:
    devices = [
        _edu(EDU, 3),
        PciDevice(BRIDGE, 0x1B36, 0x0001, 0x060400, None, None, 4),
        _edu(BR_EDU1, 4),
        _edu(BR_EDU2, 4),
        PciDevice(E1000, 0x8086, 0x100E, 0x020000, "e1000", None, 4),
    ]
    return HostSnapshot(
        devices={d.bdf: d for d in devices},
        groups={3: IommuGroup(3, (EDU,)), 4: IommuGroup(4, (BRIDGE, BR_EDU1, BR_EDU2, E1000))},
        has_iommufd=iommufd,
        has_legacy_container=legacy,
    )


def config(rebind: tuple[str, ...] = ("1234:11e8", "8086:100e")) -> Config:
    return Config(
        daemon=DaemonConfig(state_dir=Path("/nonexistent")),
        manage=ManageConfig(rebind=rebind),
        access=(AccessRule(uid=1000, devices=("1234:11e8",), quota="vm"),),
        quotas={"vm": QUOTA},
    )


def alice(**kw: object) -> Claimant:
    return Claimant(1, ALICE, QUOTA, **kw)  # type: ignore[arg-type]


def claim(*devices: str, **kw: object) -> m.Claim:
    return m.Claim(id=1, devices=devices, **kw)


def test_policy_refuses_before_anything_else() -> None:
    """A peer without a rule is refused even where the group is owned and restoring."""
    owner = GroupOwner(1, ALICE, lease_ids=(7,))
    with pytest.raises(PermissionDeniedError) as ei:
        plan_claim(
            lab(),
            3,
            config(),
            Claimant(2, MALLORY, QUOTA),
            claim(EDU),
            owner=owner,
            restoring={EDU: "unbind"},
        )
    assert ei.value.details == {
        "bdf": EDU,
        "uid": 2000,
        "gid": 2000,
        "rule": None,
        "reason": "no rule matched uid 2000 gid 2000",
    }


def test_busy_while_the_group_goes_back_to_its_drivers() -> None:
    with pytest.raises(BusyError) as ei:
        plan_claim(lab(), 3, config(), alice(), claim(EDU), restoring={EDU: "unbind"})
    assert ei.value.details == {
        "reason": "restoring",
        "group_id": 3,
        "restoring": {EDU: "unbind"},
    }


@pytest.mark.parametrize("viewer", [BOB, ROOT], ids=["same-uid", "root"])
def test_busy_names_the_owner_and_its_first_lease(viewer: Identity) -> None:
    """The holder's uid (another session of it) and root learn who holds the group."""
    owner = GroupOwner(1, ALICE, lease_ids=(7, 9))
    with pytest.raises(BusyError) as ei:
        plan_claim(lab(), 3, config(), Claimant(2, viewer, QUOTA), claim(EDU), owner=owner)
    assert ei.value.message == "IOMMU group 3 is owned by uid 1000 (pid 4242)"
    assert ei.value.details == {
        "reason": "held",
        "group_id": 3,
        "uid": 1000,
        "pid": 4242,
        "lease_id": 7,
    }


def test_busy_hides_a_holder_of_another_uid() -> None:
    """F4: a peer learns that another uid holds the group, not who (uid, pid, lease)."""
    owner = GroupOwner(9, ROOT, lease_ids=(7,))
    with pytest.raises(BusyError) as ei:
        plan_claim(lab(), 3, config(), alice(), claim(EDU), owner=owner)
    assert ei.value.message == "IOMMU group 3 is held by another client"
    assert ei.value.details == {"reason": "held", "group_id": 3}


def test_another_client_in_the_group_is_busy_not_group_split() -> None:
    """F3: a claim of another device of a group someone else holds is busy (the group
    has one owner), whatever device that owner claimed."""
    owner = GroupOwner(
        1,
        ALICE,
        lease_ids=(7,),
        claims={BR_EDU1: ExistingClaim(1, 3, ClaimPath.LEGACY)},
    )
    with pytest.raises(BusyError) as ei:
        plan_claim(lab(), 4, config(), Claimant(2, BOB, QUOTA), claim(BR_EDU2), owner=owner)
    assert (ei.value.details["reason"], ei.value.details["group_id"]) == ("held", 4)


def test_claiming_an_own_device_again_is_busy_already_claimed() -> None:
    """The same client claiming a device it holds: busy, reason already_claimed."""
    owner = GroupOwner(
        1, ALICE, lease_ids=(7,), claims={EDU: ExistingClaim(1, 3, ClaimPath.IOMMUFD)}
    )
    with pytest.raises(BusyError) as ei:
        plan_claim(
            lab(),
            3,
            config(),
            alice(ioases={3: ClaimPath.IOMMUFD}),
            claim(EDU, ioas_id=3),
            owner=owner,
        )
    assert ei.value.details == {
        "reason": "already_claimed",
        "bdf": EDU,
        "group_id": 3,
        "ioas_id": 3,
    }


def test_own_revoked_group_must_be_released_first() -> None:
    owner = GroupOwner(1, ALICE, lease_ids=(7,), is_revoked=True)
    with pytest.raises(RevokedError) as ei:
        plan_claim(lab(), 3, config(), alice(), claim(EDU), owner=owner)
    assert ei.value.details == {"group_id": 3}


def test_alone_in_its_group_takes_iommufd_pins_and_rebinds_the_device() -> None:
    plan = plan_claim(lab(), 3, config(), alice(), claim(EDU))
    assert (plan.group_id, plan.devices, plan.backend) == (3, (EDU,), ClaimPath.IOMMUFD)
    assert (plan.ioas_id, plan.new_hold) == (None, True)
    assert [d.bdf for d in plan.pin] == [EDU]
    assert [d.bdf for d in plan.rebind] == [EDU]
    assert plan.journal == (JournalEntry(EDU, 3, None, None, rebound=True),)


def test_without_dev_iommu_the_path_is_legacy() -> None:
    plan = plan_claim(lab(iommufd=False), 3, config(), alice(), claim(EDU))
    assert plan.backend is ClaimPath.LEGACY


def test_bridge_group_rebinds_the_claimed_edus_and_the_e1000_offender() -> None:
    """Every member is pinned and journalled; the offender and the claimed devices move."""
    plan = plan_claim(lab(), 4, config(), alice(), claim(BR_EDU1, BR_EDU2))
    assert plan.backend is ClaimPath.LEGACY
    assert [d.bdf for d in plan.pin] == [BRIDGE, BR_EDU1, BR_EDU2, E1000]
    assert [d.bdf for d in plan.rebind] == [BR_EDU1, BR_EDU2, E1000]
    assert plan.journal == (
        JournalEntry(BRIDGE, 4, None, None, rebound=False),
        JournalEntry(BR_EDU1, 4, None, None, rebound=True),
        JournalEntry(BR_EDU2, 4, None, None, rebound=True),
        JournalEntry(E1000, 4, "e1000", None, rebound=True),
    )


def test_an_offender_the_daemon_may_not_rebind_leaves_the_group_not_viable() -> None:
    with pytest.raises(NotViableError) as ei:
        plan_claim(lab(), 4, config(rebind=("1234:11e8",)), alice(), claim(BR_EDU1, BR_EDU2))
    assert ei.value.details == {"group_id": 4, "offenders": [{"bdf": E1000, "driver": "e1000"}]}


def test_a_claimed_device_the_daemon_may_not_rebind_is_refused() -> None:
    with pytest.raises(PermissionDeniedError) as ei:
        plan_claim(lab(), 3, config(rebind=()), alice(), claim(EDU))
    assert ei.value.details == {"bdf": EDU, "driver": None, "rule": "manage.rebind"}


def test_a_second_claim_in_a_held_group_into_a_new_ioas_splits_it() -> None:
    owner = GroupOwner(
        1,
        ALICE,
        lease_ids=(7,),
        pinned={BRIDGE: None, BR_EDU1: None, BR_EDU2: None, E1000: None},
        claims={BR_EDU1: ExistingClaim(1, 1, ClaimPath.LEGACY)},
    )
    with pytest.raises(GroupSplitError) as ei:
        plan_claim(
            lab(), 4, config(), alice(ioases={1: ClaimPath.LEGACY}), claim(BR_EDU2), owner=owner
        )
    assert ei.value.details["reason"] == "different_ioas"


def test_a_second_claim_into_the_same_ioas_pins_nothing_again() -> None:
    """Already pinned members are not pinned twice; a rebind of one is journalled with
    the override from before the first claim."""
    snap = lab()
    held = {d.bdf: d for d in snap.group_devices(4)}
    held[BR_EDU1] = PciDevice(BR_EDU1, 0x1234, 0x11E8, 0x00FF00, "vfio-pci", "vfio-pci", 4)
    held[E1000] = PciDevice(E1000, 0x8086, 0x100E, 0x020000, "vfio-pci", "vfio-pci", 4)
    held[BR_EDU2] = PciDevice(BR_EDU2, 0x1234, 0x11E8, 0x00FF00, None, "vfio-pci", 4)
    snap = snap.with_group(snap.groups[4], held)
    owner = GroupOwner(
        1,
        ALICE,
        lease_ids=(7,),
        pinned={BRIDGE: None, BR_EDU1: None, BR_EDU2: "old", E1000: None},
        claims={BR_EDU1: ExistingClaim(1, 1, ClaimPath.LEGACY)},
    )
    plan = plan_claim(
        snap,
        4,
        config(),
        alice(ioases={1: ClaimPath.LEGACY}),
        claim(BR_EDU2, ioas_id=1),
        owner=owner,
    )
    assert (plan.backend, plan.ioas_id, plan.new_hold) == (ClaimPath.LEGACY, 1, False)
    assert plan.pin == ()
    assert [d.bdf for d in plan.rebind] == [BR_EDU2]
    assert plan.journal == (JournalEntry(BR_EDU2, 4, None, "old", rebound=True),)


def test_an_unknown_ioas_is_not_found() -> None:
    with pytest.raises(NotFoundError) as ei:
        plan_claim(lab(), 3, config(), alice(), claim(EDU, ioas_id=5))
    assert (ei.value.message, ei.value.details) == ("no IOAS 5 in this session", {"ioas_id": 5})


def test_the_ioas_quota_is_checked_before_anything_changes() -> None:
    """A claim that would create a fifth IOAS is refused; one into an existing IOAS is not."""
    full = alice(ioases=dict.fromkeys(range(1, 5), ClaimPath.IOMMUFD))
    with pytest.raises(QuotaExceededError) as ei:
        plan_claim(lab(), 3, config(), full, claim(EDU))
    assert ei.value.details == {"quota": "max_ioas", "limit": 4, "used": 4, "requested": 1}
    assert plan_claim(lab(), 3, config(), full, claim(EDU, ioas_id=2)).ioas_id == 2


def test_a_frozen_iommufd_refuses_iommufd_claims_only() -> None:
    """While a revoke's freeze holds, the iommufd path is refused; legacy is not."""
    refusal = RevokedError("frozen", lease_id=1, group_id=6)
    with pytest.raises(RevokedError) as ei:
        plan_claim(lab(), 3, config(), alice(frozen=refusal), claim(EDU))
    assert ei.value is refusal
    plan = plan_claim(lab(), 4, config(), alice(frozen=refusal), claim(BR_EDU1, BR_EDU2))
    assert plan.backend is ClaimPath.LEGACY


def delegating_config() -> Config:
    return config().model_copy(
        update={"access": (AccessRule(uid=1000, devices=("*",), quota="vm", delegate=True),)}
    )


def delegated(*devices: str, **kw: object) -> ClaimV2:
    return ClaimV2(id=1, devices=devices, mode=ClaimMode.DELEGATED, **kw)


def test_a_delegated_claim_plans_the_host_side_and_no_ioas() -> None:
    """Same pin, rebind and journal as a brokered claim; no IOAS, no IOAS quota."""
    full = Quota(pinned_bytes=1 << 20, max_ioas=0, max_mappings=8)
    plan = plan_claim(lab(), 3, delegating_config(), Claimant(1, ALICE, full), delegated(EDU))
    assert (plan.backend, plan.delegate, plan.iommufd_id, plan.ioas_id) == (
        ClaimPath.IOMMUFD,
        True,
        None,
        None,
    )
    assert [d.bdf for d in plan.rebind] == [EDU]
    assert plan.journal == (JournalEntry(EDU, 3, None, None, rebound=True),)


def test_a_delegated_claim_of_a_legacy_only_group_is_not_delegable() -> None:
    with pytest.raises(NotDelegableError) as ei:
        plan_claim(lab(), 4, delegating_config(), alice(), delegated(BR_EDU1))
    assert ei.value.details["reason"] == "legacy_only"
    with pytest.raises(NotDelegableError):
        plan_claim(lab(iommufd=False), 3, delegating_config(), alice(), delegated(EDU))


def test_the_whole_bridge_group_is_delegable() -> None:
    """Every DMA-capable member in one claim: iommufd, the e1000 rebound."""
    plan = plan_claim(
        lab(),
        4,
        delegating_config(),
        alice(iommufds=frozenset({2})),
        delegated(BR_EDU1, BR_EDU2, E1000, iommufd_id=2),
    )
    assert (plan.backend, plan.iommufd_id) == (ClaimPath.IOMMUFD, 2)
    assert {d.bdf for d in plan.rebind} == {BR_EDU1, BR_EDU2, E1000}


def test_a_delegated_claim_names_its_own_iommufd() -> None:
    with pytest.raises(NotFoundError) as ei:
        plan_claim(lab(), 3, delegating_config(), alice(), delegated(EDU, iommufd_id=5))
    assert ei.value.details == {"iommufd_id": 5}


def test_modes_never_share_a_group() -> None:
    """A brokered claim in a delegated group, or the reverse: group_split different_mode."""
    owner = GroupOwner(1, ALICE, lease_ids=(7,), delegated=frozenset({True}))
    with pytest.raises(GroupSplitError) as ei:
        plan_claim(lab(), 4, delegating_config(), alice(), claim(BR_EDU2), owner=owner)
    assert ei.value.details == {
        "group_id": 4,
        "reason": "different_mode",
        "requested": "brokered",
        "held": "delegated",
    }
    owner = GroupOwner(1, ALICE, lease_ids=(7,), delegated=frozenset({False}))
    with pytest.raises(GroupSplitError) as ei:
        plan_claim(lab(), 4, delegating_config(), alice(), delegated(BR_EDU2), owner=owner)
    assert ei.value.details["reason"] == "different_mode"


def test_delegated_claims_ignore_a_freeze_of_the_sessions_iommufd() -> None:
    """The freeze guards the session's own iommufd; a delegated claim binds elsewhere."""
    frozen = RevokedError("frozen", group_id=9)
    plan = plan_claim(lab(), 3, delegating_config(), alice(frozen=frozen), delegated(EDU))
    assert plan.delegate
