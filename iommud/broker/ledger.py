"""The resource ledger: what each uid holds of the daemon's resources, and in total.

A peer could dodge a per-connection limit by opening more connections, so every limit a
map or an IOAS meets is per uid (``[quotas.*]``, the quota of the peer's first matching
access rule) over all its connections, plus a daemon-wide limit over every uid
(``[memory]``). The counters are kept, not summed: a resource is charged when the
daemon takes it and refunded when it gives it back, so a check costs the same however
much state the daemon holds.

Resources (the ``Quota`` / ``MemoryLimits`` key that bounds each):

- ``pinned_bytes`` (``pinned_bytes``): bytes of client memory the IOMMU has pinned;
- ``ioas`` (``max_ioas``): IOAS objects (an iommufd IOAS or a VFIO container fd);
- ``mappings`` (``max_mappings``): mapped IOVA ranges;
- ``memfds`` (``max_memfds``): client files the daemon keeps mmapped (one VMA each, the
  mmap path of kernels without IOMMU_IOAS_MAP_FILE; iommud.broker.filemaps);
- ``memfd_bytes`` (``memfd_bytes``): the address space those mappings take.

A refusal is ``QuotaExceededError`` with details ``quota`` (the key), ``limit``,
``used`` (by the uid, or by everyone when ``scope`` is ``"daemon"``) and ``requested``.
Pure bookkeeping: no I/O, no clocks; the callers charge only what they really took.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Final

from iommud.config import MemoryLimits, Quota
from iommud.errors import QuotaExceededError

# ledger counter -> the Quota / MemoryLimits field that bounds it
LIMIT_KEYS: Final = {
    "pinned_bytes": "pinned_bytes",
    "ioas": "max_ioas",
    "mappings": "max_mappings",
    "memfds": "max_memfds",
    "memfd_bytes": "memfd_bytes",
}
_WHAT: Final = {
    "pinned_bytes": "pinned-bytes",
    "ioas": "IOAS",
    "mappings": "mapping-count",
    "memfds": "mapped-memfd",
    "memfd_bytes": "mapped-memfd-bytes",
}


@dataclass(slots=True)
class Usage:
    """What one uid (or the whole daemon) holds."""

    pinned_bytes: int = 0
    ioas: int = 0
    mappings: int = 0
    memfds: int = 0
    memfd_bytes: int = 0

    def is_empty(self) -> bool:
        return not any(_COUNTERS(self))


_COUNTERS: Final = attrgetter(*(f.name for f in fields(Usage)))  # every counter, as a tuple


class Ledger:
    """Per-uid and daemon-wide counters, with the checks that bound them."""

    def __init__(self, limits: MemoryLimits) -> None:
        self.limits = limits
        self.total = Usage()
        self._by_uid: dict[int, Usage] = {}

    def usage(self, uid: int) -> Usage:
        """The uid's usage (a live record: read it, do not change it)."""
        return self._by_uid.get(uid) or Usage()

    def refusal(self, uid: int, quota: Quota, **want: int) -> QuotaExceededError | None:
        """The error taking ``want`` (counter -> amount) would meet, or None if it fits:
        the uid's quota first, then the daemon-wide limit."""
        return self._refusal(uid, quota, want)

    def _refusal(self, uid: int, quota: Quota, want: dict[str, int]) -> QuotaExceededError | None:
        mine = self._by_uid.get(uid)
        for name, amount in want.items():
            if not amount:
                continue
            key = LIMIT_KEYS[name]
            used = 0 if mine is None else getattr(mine, name)
            limit = getattr(quota, key)
            if used + amount > limit:
                return _exceeded(name, "uid", uid, limit, used, amount)
            used = getattr(self.total, name)
            limit = getattr(self.limits, key)
            if used + amount > limit:
                return _exceeded(name, "daemon", uid, limit, used, amount)
        return None

    def check(self, uid: int, quota: Quota, **want: int) -> None:
        """Raise the refusal of ``want``, if any (see :meth:`refusal`)."""
        error = self._refusal(uid, quota, want)
        if error is not None:
            raise error

    def charge(self, uid: int, **amounts: int) -> None:
        """Record resources taken (after the check, once they are really held)."""
        self._add(uid, amounts, 1)

    def refund(self, uid: int, **amounts: int) -> None:
        """Record resources given back; a uid that holds nothing is forgotten."""
        if self._add(uid, amounts, -1).is_empty():
            del self._by_uid[uid]

    def _add(self, uid: int, amounts: dict[str, int], sign: int) -> Usage:
        """Move the uid's and the total counters by ``sign`` times ``amounts``; the uid's
        record (made on first use: a refund of a uid never charged is a caller's bug, left
        visible as negative usage)."""
        mine = self._by_uid.get(uid)
        if mine is None:
            mine = self._by_uid[uid] = Usage()
        total = self.total
        for name, amount in amounts.items():
            amount *= sign
            setattr(mine, name, getattr(mine, name) + amount)
            setattr(total, name, getattr(total, name) + amount)
        return mine


def _exceeded(
    name: str, scope: str, uid: int, limit: int, used: int, requested: int
) -> QuotaExceededError:
    key = LIMIT_KEYS[name]
    whose = f"uid {uid}'s" if scope == "uid" else "the daemon-wide"
    details: dict[str, object] = {
        "quota": key,
        "limit": limit,
        "used": used,
        "requested": requested,
    }
    if scope == "daemon":
        details["scope"] = "daemon"
    return QuotaExceededError(
        f"{whose} {_WHAT[name]} quota exceeded: {used} used + {requested} requested > {limit}",
        **details,
    )
