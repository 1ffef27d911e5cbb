"""The daemon's own mappings of client files, one per file, reused across maps.

On kernels without IOMMU_IOAS_MAP_FILE (6.12), and always on the legacy container path,
the kernel pins pages of the daemon's address space, so the daemon mmaps the client's
memfd and maps that address. Mapping every range afresh made one VMA per range: 4,096
one-page maps at offsets that cannot merge were 4,096 VMAs, and a few uids together
reached vm.max_map_count (mm/mmap.c: mmap then fails ENOMEM, and so does every thread
start and large malloc of the daemon). So a file is mapped once, whole (MAP_SHARED, from
offset 0 to its size when first mapped), and every range of it is an offset into that
one mapping: one VMA per (uid, file, writability) however many ranges use it.

The mapping stays valid because the broker requires F_SEAL_SHRINK (a shmem file that
shrank would leave the daemon a mapping past its end). A file that grew since is mapped
again, whole; the old mapping goes when its last range is unmapped. A mapping goes
with the last range that uses it: once a client has unmapped every range of a file the
daemon holds nothing of it (its memory is the client's to free), so the reuse is for a
file that stays mapped while other ranges of it come and go (a VMM's guest RAM).

Each mapping also remembers which of its ranges the daemon has faulted in (``Faulted``,
sorted disjoint extents): a range it has already populated and that is still resident
(mincore) is pinned without a second populate, and small enough (``aio.pin_resident``)
without leaving the loop. The record is a hint, never a promise: a page the client
punched out or the kernel swapped out since fails the mincore check, and then the range
takes the cold path (populate, large pins on a worker) again.

Every mapping is charged to its uid in the ledger (``memfds``, ``memfd_bytes``) before
the mmap and refunded at munmap: per uid and daemon-wide. No policy beyond that; no
pinning here (iommud.broker.ioas does it).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from iommud.broker.ledger import Ledger
from iommud.config import Quota
from iommud.kernel.memory import DaemonMap, FileInfo

MapKey = tuple[int, tuple[int, int], bool]  # (uid, (st_dev, st_ino), writable)


class Faulted:
    """Sorted, disjoint, non-adjacent [start, end) extents of one mapping that the daemon
    faulted in: O(log n) to ask, merging on add (n is at most the number of ranges ever
    mapped from the file, itself bounded by the uid's ``max_mappings``)."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def covers(self, start: int, end: int) -> bool:
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def add(self, start: int, end: int) -> None:
        starts, ends = self._starts, self._ends
        lo = bisect_right(ends, start - 1)  # first extent ending at or after start
        hi = bisect_right(starts, end)  # extents from lo to hi touch [start, end)
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def extents(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))


@dataclass(eq=False)
class SharedMap:
    """One daemon mapping of a whole client file, and how many ranges use it."""

    key: MapKey
    dmap: DaemonMap
    size: int
    refs: int = 0
    faulted: Faulted = field(default_factory=Faulted)

    @property
    def uid(self) -> int:
        return self.key[0]

    @property
    def addr(self) -> int:
        assert self.dmap.addr is not None
        return self.dmap.addr

    def is_warm(self, offset: int, length: int, *, verify: bool = True) -> bool:
        """The daemon faulted ``[offset, offset+length)`` in before and (``verify``:
        mincore says) every page of it is still resident: its pin allocates and faults
        nothing. ``verify=False`` trusts the record alone, for a range small enough that
        a page punched out since costs no more than a cold pin the loop takes anyway."""
        if not self.faulted.covers(offset, offset + length):
            return False
        return not verify or self.dmap.is_resident(offset, length)


class Hold:
    """One range's use of a SharedMap (an IoasMapping's ``mm``); ``close()`` gives it
    back (idempotent)."""

    __slots__ = ("_maps", "shared")

    def __init__(self, maps: FileMaps, shared: SharedMap) -> None:
        self._maps: FileMaps | None = maps
        self.shared = shared

    @property
    def addr(self) -> int:
        return self.shared.addr

    def close(self) -> None:
        maps, self._maps = self._maps, None
        if maps is not None:
            maps.release(self.shared)


class FileMaps:
    """The daemon's file mappings, by (uid, file, writability); see the module docstring."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._live: dict[MapKey, SharedMap] = {}

    def hold(
        self, uid: int, quota: Quota, fd: int, info: FileInfo, *, write: bool, end: int
    ) -> Hold:
        """A hold on the uid's mapping of the file behind ``fd``, covering [0, end).

        Maps the file (whole, ``info.size``) when no mapping of it covers ``end`` yet;
        QuotaExceededError when that mapping does not fit the uid's or the daemon's
        limits; KernelError("mmap") if mmap fails.
        """
        key: MapKey = (uid, info.inode, write)
        shared = self._live.get(key)
        if shared is None or shared.size < end:
            shared = self._map(key, quota, fd, info.size, write)
        shared.refs += 1
        return Hold(self, shared)

    def _map(self, key: MapKey, quota: Quota, fd: int, size: int, write: bool) -> SharedMap:
        uid = key[0]
        self._ledger.check(uid, quota, memfds=1, memfd_bytes=size)
        dmap = DaemonMap(fd, 0, size, write=write)
        self._ledger.charge(uid, memfds=1, memfd_bytes=size)
        # A mapping of the file before it grew stays for the ranges that use it; it is
        # closed at their last release (no longer the one new ranges find).
        shared = self._live[key] = SharedMap(key, dmap, size)
        return shared

    def release(self, shared: SharedMap) -> None:
        """One range stopped using ``shared``: unmap it after its last one."""
        shared.refs -= 1
        if shared.refs == 0:
            self._close(shared)

    def _close(self, shared: SharedMap) -> None:
        if self._live.get(shared.key) is shared:
            del self._live[shared.key]
        shared.dmap.close()
        self._ledger.refund(shared.uid, memfds=1, memfd_bytes=shared.size)
