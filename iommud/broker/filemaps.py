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
again, whole; the old mapping goes when its last range is unmapped. A mapping whose
last range went stays for reuse while idle (``IDLE_KEEP`` per uid), because a VMM maps
and unmaps the same guest RAM over and over; idle mappings go first when a limit is
reached, and all of a uid's when one of its connections closes (they hold its memory).

Every mapping is charged to its uid in the ledger (``memfds``, ``memfd_bytes``) before
the mmap and refunded at munmap: per uid and daemon-wide. No policy beyond that; no
pinning here (iommud.broker.ioas does it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from iommud.broker.ledger import Ledger
from iommud.config import Quota
from iommud.kernel.memory import DaemonMap, FileInfo

IDLE_KEEP: Final = 4  # idle mappings kept per uid for the next map of the same file

MapKey = tuple[int, tuple[int, int], bool]  # (uid, (st_dev, st_ino), writable)


@dataclass(eq=False)
class SharedMap:
    """One daemon mapping of a whole client file, and how many ranges use it."""

    key: MapKey
    dmap: DaemonMap
    size: int
    refs: int = 0
    retired: bool = False  # replaced by a larger mapping of the grown file

    @property
    def uid(self) -> int:
        return self.key[0]

    @property
    def addr(self) -> int:
        assert self.dmap.addr is not None
        return self.dmap.addr


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

    def __init__(self, ledger: Ledger, *, idle_keep: int = IDLE_KEEP) -> None:
        self._ledger = ledger
        self._idle_keep = idle_keep
        self._live: dict[MapKey, SharedMap] = {}
        self._idle: OrderedDict[MapKey, SharedMap] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        """Mappings held (live, idle and retired ones still in use are all VMAs)."""
        return self._ledger.total.memfds

    def hold(
        self, uid: int, quota: Quota, fd: int, info: FileInfo, *, write: bool, end: int
    ) -> Hold:
        """A hold on the uid's mapping of the file behind ``fd``, covering [0, end).

        Maps the file (whole, ``info.size``) when no mapping of it covers ``end`` yet;
        QuotaExceededError when that mapping does not fit the uid's or the daemon's
        limits even after dropping idle mappings; KernelError("mmap") if mmap fails.
        """
        key: MapKey = (uid, info.inode, write)
        shared = self._live.get(key)
        if shared is None or shared.size < end:
            shared = self._map(key, quota, fd, info.size, write)
        else:
            self._idle.pop(key, None)
        shared.refs += 1
        return Hold(self, shared)

    def _map(self, key: MapKey, quota: Quota, fd: int, size: int, write: bool) -> SharedMap:
        uid = key[0]
        old = self._live.get(key)
        if old is not None and old.refs == 0:
            self._close(old)  # grown file: its old idle mapping is no use any more
        while (error := self._ledger.refusal(uid, quota, memfds=1, memfd_bytes=size)) is not None:
            victim = self._oldest_idle(uid if error.details.get("scope") != "daemon" else None)
            if victim is None:
                raise error
            self._close(victim)
        dmap = DaemonMap(fd, 0, size, write=write)
        self._ledger.charge(uid, memfds=1, memfd_bytes=size)
        old = self._live.get(key)
        if old is not None:
            old.retired = True  # still used by some range; closed at its last release
        shared = self._live[key] = SharedMap(key, dmap, size)
        return shared

    def _oldest_idle(self, uid: int | None) -> SharedMap | None:
        for shared in self._idle.values():
            if uid is None or shared.uid == uid:
                return shared
        return None

    def release(self, shared: SharedMap) -> None:
        """One range stopped using ``shared``: keep it idle, or unmap it."""
        shared.refs -= 1
        if shared.refs > 0:
            return
        if shared.retired:
            self._close(shared)
            return
        self._idle[shared.key] = shared
        idle_of_uid = [s for s in self._idle.values() if s.uid == shared.uid]
        for victim in idle_of_uid[: max(0, len(idle_of_uid) - self._idle_keep)]:
            self._close(victim)

    def drop_idle(self, uid: int) -> None:
        """Unmap every idle mapping of ``uid`` (one of its connections closed)."""
        for shared in [s for s in self._idle.values() if s.uid == uid]:
            self._close(shared)

    def _close(self, shared: SharedMap) -> None:
        self._idle.pop(shared.key, None)
        if self._live.get(shared.key) is shared:
            del self._live[shared.key]
        shared.dmap.close()
        self._ledger.refund(shared.uid, memfds=1, memfd_bytes=shared.size)
