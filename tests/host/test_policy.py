"""Access policy decisions, quotas and rebind permission (pure functions)."""

from __future__ import annotations

import pytest
import topology

from iommud.config import Quota, parse_config
from iommud.errors import PermissionDeniedError
from iommud.host.snapshot import PciDevice
from iommud.policy import Decision, Identity, check_claim, may_rebind, quota_for
from iommud.protocol.errors import ErrorCode

EDU = PciDevice(topology.EDU1, 0x1234, 0x11E8, 0x00FF00, None, None, 4)
EDU_SOLO = PciDevice(topology.EDU0, 0x1234, 0x11E8, 0x00FF00, None, None, 3)
NIC = PciDevice(topology.NIC, 0x8086, 0x100E, 0x020000, "e1000", None, 4)
BRIDGE = PciDevice(topology.BRIDGE, 0x1B36, 0x0001, 0x060400, None, None, 4)
PORT = PciDevice("0000:00:01.0", 0x8086, 0x347A, 0x060400, "pcieport", None, 1)

CONFIG = parse_config(
    """
    [[access]]
    uid = 1000
    devices = ["1234:11e8"]
    quota = "vm"

    [[access]]
    gid = 36
    devices = ["0000:01:03.0"]

    [[access]]
    uid = 1001
    gid = 36
    devices = ["*"]
    quota = "big"

    [[access]]
    uid = 1000
    devices = ["0000:01:03.0"]
    quota = "big"

    [quotas.vm]
    pinned_bytes = "512MiB"
    max_ioas = 2
    [quotas.big]
    pinned_bytes = "8GiB"

    [manage]
    rebind = ["1234:11e8", "*"]
    """
)

ALICE = Identity(uid=1000, gid=1000, pid=10)
KVM_USER = Identity(uid=1002, gid=1002, groups=frozenset({36}), pid=11)
BOB_IN_KVM = Identity(uid=1001, gid=36, pid=12)
BOB_NOT_IN_KVM = Identity(uid=1001, gid=1001, pid=13)
ROOT = Identity(uid=0, gid=0, pid=1)


def test_root_may_claim_anything() -> None:
    assert check_claim(CONFIG, ROOT, NIC) == Decision(True, None, "uid 0 may claim any device")
    assert check_claim(parse_config(""), ROOT, EDU).allowed


def test_uid_rule_by_vendor_device() -> None:
    assert check_claim(CONFIG, ALICE, EDU) == Decision(
        True, 0, "allowed by access[0] (uid 1000: 1234:11e8)"
    )
    assert check_claim(CONFIG, ALICE, EDU_SOLO).rule_index == 0


def test_later_rule_for_same_uid_can_grant() -> None:
    """Rules only grant: a later rule covering the device allows it (and is reported)."""
    assert check_claim(CONFIG, ALICE, NIC) == Decision(
        True, 3, "allowed by access[3] (uid 1000: 0000:01:03.0)"
    )


def test_gid_rule_matches_supplementary_group() -> None:
    assert check_claim(CONFIG, KVM_USER, NIC) == Decision(
        True, 1, "allowed by access[1] (gid 36: 0000:01:03.0)"
    )


def test_uid_and_gid_must_both_match() -> None:
    assert check_claim(CONFIG, BOB_IN_KVM, EDU) == Decision(
        True, 2, "allowed by access[2] (uid 1001 and gid 36: *)"
    )
    assert check_claim(CONFIG, BOB_NOT_IN_KVM, EDU) == Decision(
        False, None, "no rule matched uid 1001 gid 1001"
    )


def test_denial_names_the_rules_that_applied() -> None:
    d = check_claim(CONFIG, KVM_USER, EDU)
    assert d == Decision(
        False, 1, "0000:01:01.0 (1234:11e8) is not covered by access[1] (gid 36: 0000:01:03.0)"
    )
    with pytest.raises(PermissionDeniedError) as exc:
        d.raise_if_denied(KVM_USER, EDU)
    assert exc.value.code is ErrorCode.PERMISSION_DENIED
    assert exc.value.details == {
        "bdf": "0000:01:01.0",
        "uid": 1002,
        "gid": 1002,
        "rule": 1,
        "reason": d.reason,
    }


def test_no_rule_denial_payload() -> None:
    stranger = Identity(uid=4242, gid=4242)
    d = check_claim(CONFIG, stranger, EDU)
    with pytest.raises(PermissionDeniedError) as exc:
        d.raise_if_denied(stranger, EDU)
    assert exc.value.details == {
        "bdf": "0000:01:01.0",
        "uid": 4242,
        "gid": 4242,
        "rule": None,
        "reason": "no rule matched uid 4242 gid 4242",
    }
    assert exc.value.message == "claim of 0000:01:01.0 denied: no rule matched uid 4242 gid 4242"


def test_allowed_decision_does_not_raise() -> None:
    check_claim(CONFIG, ALICE, EDU).raise_if_denied(ALICE, EDU)


def test_user_name_rule_matches_resolved_uid() -> None:
    cfg = parse_config('[[access]]\nuser = "root"\ndevices = ["0000:00:10.0"]')
    # uid 0 short-circuits, so exercise the resolved rule through a non-root gid rule too.
    assert cfg.access[0].uid == 0
    cfg2 = parse_config('[[access]]\ngid = 0\ndevices = ["0000:00:10.0"]')
    assert check_claim(cfg2, Identity(uid=5, gid=0), EDU_SOLO).allowed
    assert not check_claim(cfg2, Identity(uid=5, gid=0), EDU).allowed


def test_quota_for() -> None:
    """The first rule that applies to the peer names its quota, whatever the device."""
    assert quota_for(CONFIG, ALICE) == Quota(pinned_bytes=512 << 20, max_ioas=2)
    assert quota_for(CONFIG, BOB_IN_KVM) == Quota()  # rule 1 (gid 36) comes before rule 2
    shuffled = parse_config(
        '[[access]]\nuid = 1001\ndevices = ["*"]\nquota = "big"\n'
        '[[access]]\ngid = 36\ndevices = ["*"]\n[quotas.big]\npinned_bytes = "8GiB"'
    )
    assert quota_for(shuffled, BOB_IN_KVM) == Quota(pinned_bytes=8 << 30)
    assert quota_for(CONFIG, KVM_USER) == Quota()  # rule 1 names no quota: default
    assert quota_for(CONFIG, Identity(uid=4242, gid=4242)) == Quota()
    assert quota_for(CONFIG, ROOT) == Quota()


def test_may_rebind() -> None:
    assert may_rebind(CONFIG, EDU)
    assert may_rebind(CONFIG, NIC)  # "*"
    assert not may_rebind(CONFIG, BRIDGE)  # never, even with "*"
    assert not may_rebind(CONFIG, PORT)
    narrow = parse_config('[manage]\nrebind = ["0000:01:01.0"]')
    assert may_rebind(narrow, EDU)
    assert not may_rebind(narrow, EDU_SOLO)
    assert not may_rebind(parse_config(""), EDU)


DELEGATING = parse_config(
    """
    [[access]]
    uid = 1000
    devices = ["0000:01:03.0"]

    [[access]]
    uid = 1000
    devices = ["1234:11e8"]
    delegate = true

    [[access]]
    uid = 1001
    devices = ["*"]
    """
)


def test_delegate_is_off_unless_a_rule_grants_it() -> None:
    """A v1 configuration (no ``delegate`` key) allows brokered claims only."""
    assert CONFIG.access[0].delegate is False
    assert check_claim(CONFIG, ALICE, EDU).allowed
    assert check_claim(CONFIG, ALICE, EDU, delegate=True) == Decision(
        False,
        0,
        "access[0] (uid 1000: 1234:11e8) does not grant delegate = true",
        code="delegate_not_allowed",
    )


def test_delegate_granted_by_a_later_rule() -> None:
    """Rules only grant: the first matching rule with delegate = true allows it."""
    d = check_claim(DELEGATING, ALICE, EDU, delegate=True)
    assert (d.allowed, d.rule_index) == (True, 1)
    assert check_claim(DELEGATING, ROOT, EDU, delegate=True).allowed


def test_delegate_denial_payload() -> None:
    """The refusal says delegate_not_allowed and names the rule that matched the device."""
    bob = Identity(uid=1001, gid=1001, pid=13)
    d = check_claim(DELEGATING, bob, EDU, delegate=True)
    with pytest.raises(PermissionDeniedError) as exc:
        d.raise_if_denied(bob, EDU)
    assert exc.value.details == {
        "bdf": "0000:01:01.0",
        "uid": 1001,
        "gid": 1001,
        "rule": 2,
        "reason": "delegate_not_allowed",
    }
    assert exc.value.message == (
        "claim of 0000:01:01.0 denied: access[2] (uid 1001: *) does not grant delegate = true"
    )


def test_delegate_denied_device_not_covered_keeps_v1_reason() -> None:
    """A device no rule covers is refused as before, delegated or not."""
    d = check_claim(DELEGATING, ALICE, PORT, delegate=True)
    assert d.code is None
    assert not d.allowed
