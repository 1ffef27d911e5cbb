"""iommud.broker.ledger: kept counters per uid and in total, and the refusals they give."""

from __future__ import annotations

import pytest

from iommud.broker.ledger import Ledger, Usage
from iommud.config import MemoryLimits, Quota
from iommud.errors import QuotaExceededError

QUOTA = Quota(pinned_bytes=8192, max_mappings=2)
LIMITS = MemoryLimits(pinned_bytes=12288, max_mappings=100)


def test_charge_and_refund_move_the_uid_and_the_total_and_forget_an_empty_uid() -> None:
    ledger = Ledger(LIMITS)
    ledger.charge(1000, pinned_bytes=4096, mappings=1)
    ledger.charge(1001, pinned_bytes=8192, mappings=2, memfds=1, memfd_bytes=1 << 20)
    assert ledger.usage(1000) == Usage(pinned_bytes=4096, mappings=1)
    assert ledger.total == Usage(pinned_bytes=12288, mappings=3, memfds=1, memfd_bytes=1 << 20)
    ledger.refund(1000, pinned_bytes=4096, mappings=1)
    assert ledger.usage(1000) == Usage()
    assert 1000 not in ledger._by_uid  # a uid that holds nothing is forgotten
    ledger.refund(1001, pinned_bytes=8192, mappings=2)
    assert ledger.usage(1001) == Usage(memfds=1, memfd_bytes=1 << 20)  # still holds a file
    ledger.refund(1001, memfds=1, memfd_bytes=1 << 20)
    assert ledger.total == Usage()
    assert ledger._by_uid == {}


def test_every_counter_counts_toward_is_empty() -> None:
    for name in ("pinned_bytes", "ioas", "mappings", "memfds", "memfd_bytes"):
        assert not Usage(**{name: 1}).is_empty(), name
    assert Usage().is_empty()


def test_the_uid_quota_refuses_first_with_its_numbers() -> None:
    ledger = Ledger(LIMITS)
    ledger.charge(1000, pinned_bytes=4096, mappings=1)
    ledger.check(1000, QUOTA, pinned_bytes=4096, mappings=1)  # exactly at the quota: fits
    with pytest.raises(QuotaExceededError) as err:
        ledger.check(1000, QUOTA, pinned_bytes=8192, mappings=1)
    assert err.value.details == {
        "quota": "pinned_bytes",
        "limit": 8192,
        "used": 4096,
        "requested": 8192,
    }
    assert "uid 1000's pinned-bytes quota exceeded" in err.value.message
    refusal = ledger.refusal(1000, QUOTA, mappings=2)
    assert refusal is not None
    assert refusal.details["quota"] == "max_mappings"
    assert ledger.refusal(1000, QUOTA, pinned_bytes=0, mappings=0) is None


def test_the_daemon_wide_limit_refuses_what_every_uid_holds_together() -> None:
    ledger = Ledger(LIMITS)
    ledger.charge(1000, pinned_bytes=8192)
    with pytest.raises(QuotaExceededError) as err:
        ledger.check(1001, QUOTA, pinned_bytes=8192)  # fits 1001's quota, not the total
    assert err.value.details == {
        "quota": "pinned_bytes",
        "limit": 12288,
        "used": 8192,
        "requested": 8192,
        "scope": "daemon",
    }
    assert ledger.usage(1001) == Usage()  # a check charges nothing
