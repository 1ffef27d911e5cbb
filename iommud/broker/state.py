"""The broker's state: ``BrokerState``, and the records it holds (sessions, group holds,
leases, IOAS objects, mappings).

``BrokerState`` is the one object the broker's parts share (config, kernel, journal,
drivers, IOAS manager, host view, event hub, owned groups, sessions, background tasks,
bind guard); each manager receives it rather than pieces of it. The records are plain
mutable dataclasses owned by the Broker (one event loop, no threads touch them). Every
kernel object here is owned by exactly one record; whoever removes the record closes
the object. No I/O and no decisions here.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from iommud.broker.drivers import DriverManager
from iommud.broker.events import EventHub, EventSink
from iommud.broker.guard import BindGuard
from iommud.broker.hostview import HostView
from iommud.broker.journal import Journal
from iommud.config import Config, Quota
from iommud.fds import OwnedFd
from iommud.host.viability import ClaimPath
from iommud.kernel.interface import (
    IommuFd,
    IovaRange,
    Kernel,
    VfioContainer,
    VfioDevice,
    VfioGroup,
)
from iommud.policy import Identity
from iommud.protocol.messages import Event, EventName, Reply
from iommud.protocol.v2 import ReplyV2

if TYPE_CHECKING:  # iommud.broker.ioas imports the records below
    from iommud.broker.ioas import IoasManager


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``Broker.handle`` returns: the reply and the fds to send with it, in order."""

    reply: Reply | ReplyV2
    fds: list[OwnedFd] = field(default_factory=list)


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class IoasMapping:
    """One mapped range of an IOAS: what the client gave and what the daemon holds.

    ``mm`` is the daemon's hold on its mapping of the client's file (mmap path; shared
    by every range of that file, iommud.broker.filemaps), given back at unmap.
    """

    iova: int
    length: int
    mm: Closeable | None = None

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


@dataclass(eq=False)
class IoasState:
    """An IOAS as the client sees it (``ioas_id`` is per session, chosen by the broker).

    iommufd: ``kernel_id`` names the IOAS in the session's /dev/iommu. legacy: the IOAS
    is a VFIO container; it takes maps once a group is attached (``container_ready``).
    """

    ioas_id: int
    backend: ClaimPath
    kernel_id: int | None = None
    container: VfioContainer | None = None
    container_ready: bool = False
    by_claim: bool = False  # made by a claim: destroyed when a release leaves it unused
    # by iova; change it only through add_mapping / remove_mapping / clear_mappings,
    # which keep ``starts`` (the IOVAs, sorted) and ``pinned_bytes`` with it
    mappings: dict[int, IoasMapping] = field(default_factory=dict)
    groups: set[int] = field(default_factory=set)  # groups with devices attached here
    starts: list[int] = field(default_factory=list)
    pinned_bytes: int = 0
    # IOMMU_IOAS_IOVA_RANGES as last read; they change only when a device attaches or
    # detaches, and whoever does that calls forget_ranges()
    ranges_cache: tuple[tuple[IovaRange, ...], int] | None = None

    def add_mapping(self, m: IoasMapping) -> None:
        self.mappings[m.iova] = m
        bisect.insort(self.starts, m.iova)
        self.pinned_bytes += m.length

    def remove_mapping(self, m: IoasMapping) -> None:
        if self.mappings.pop(m.iova, None) is m:
            del self.starts[bisect.bisect_left(self.starts, m.iova)]
            self.pinned_bytes -= m.length

    def clear_mappings(self) -> list[IoasMapping]:
        gone = list(self.mappings.values())
        self.mappings.clear()
        self.starts.clear()
        self.pinned_bytes = 0
        return gone

    def overlapping(self, iova: int, last: int) -> list[IoasMapping]:
        """The mappings that meet [iova, last], by IOVA: O(log n + hits) (mappings
        never overlap each other, so only the one starting before ``iova`` can reach in
        from the left)."""
        lo = bisect.bisect_left(self.starts, iova)
        hi = bisect.bisect_right(self.starts, last)
        hits = [self.mappings[s] for s in self.starts[lo:hi]]
        if lo:
            before = self.mappings[self.starts[lo - 1]]
            if before.last >= iova:
                hits.insert(0, before)
        return hits

    def forget_ranges(self) -> None:
        self.ranges_cache = None


@dataclass(eq=False)
class LeasedDevice:
    bdf: str
    device: VfioDevice  # the daemon's own fd; the client got a dup
    devid: int | None = None
    attached: bool = False
    # An eventfd registered on vfio-pci's REQ irq: readable when the kernel asks for the
    # device back (hot-unplug). Watched on the loop while the lease holds the device.
    request_fd: OwnedFd | None = None


@dataclass(eq=False)
class DelegatedIommufd:
    """A /dev/iommu file handed to a client by a delegated claim (protocol v2).

    ``ictx`` is the daemon's own fd of the very file the client got a dup of: the client
    (its VMM) binds the delegated devices to it and maps its memory through it, and the
    daemon unmaps through it on release. ``leases`` are the leases whose devices the
    client may bind to it; the file is closed with the last of them.
    """

    iommufd_id: int
    ictx: IommuFd
    leases: set[int] = field(default_factory=set)


class LeaseState(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"  # DMA blocked, the holder told; delegated: a grace period runs
    ENFORCING = "enforcing"  # delegated: holders killed, or they survived (stuck)


@dataclass(eq=False)
class Lease:
    lease_id: int
    session: Session
    group_id: int
    backend: ClaimPath
    ioas: IoasState | None  # None: delegated, the client's VMM makes its own IOAS
    devices: list[LeasedDevice]
    state: LeaseState = LeaseState.ACTIVE
    revoke_reason: str | None = None
    delegated: DelegatedIommufd | None = None  # set for a delegated lease (protocol v2)
    # A revoked delegated lease: when (unix time) the daemon kills whoever still holds
    # its device files, and the event that brings that moment forward (session end,
    # daemon stop). See iommud.broker.revocation.
    enforce_at: float | None = None
    hurry: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def is_delegated(self) -> bool:
        return self.delegated is not None


@dataclass(eq=False)
class Freeze:
    """A revoke's hold on its session's iommufd (see iommud.broker.freeze).

    ``devices`` maps each revoked device's BDF to its devid in that iommufd; an entry
    goes once the device is seen unbound (every copy of its fd closed).
    """

    lease_id: int
    group_id: int
    reason: str
    devices: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class GroupHold:
    """A group owned by one session: its leases, and what the daemon changed in sysfs.

    ``pinned`` maps each BDF whose driver_override the daemon set to the original value;
    ``rebound`` maps each BDF the daemon moved to vfio-pci to its original driver.
    """

    group_id: int
    session: Session
    backend: ClaimPath
    group: VfioGroup | None = None  # legacy path: the daemon's /dev/vfio/N
    leases: dict[int, Lease] = field(default_factory=dict)
    pinned: dict[str, str | None] = field(default_factory=dict)
    rebound: dict[str, str | None] = field(default_factory=dict)


@dataclass(eq=False)
class Session:
    """One client connection."""

    session_id: int
    identity: Identity
    quota: Quota
    sink: EventSink
    pidfd: OwnedFd | None = None
    iommufd: IommuFd | None = None
    ioases: dict[int, IoasState] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    # Revoked leases (by id) whose devices may still reach this session's iommufd.
    freezes: dict[int, Freeze] = field(default_factory=dict)
    delegated: dict[int, DelegatedIommufd] = field(default_factory=dict)  # by iommufd_id
    next_iommufd_id: int = 1
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_ioas_id: int = 1
    closing: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    may_use_ioas: bool = True  # an access rule applies to the peer (iommud.policy)

    @property
    def pinned_bytes(self) -> int:
        """This connection's pinned bytes (the quota counts the uid's: BrokerState.ledger)."""
        return sum(i.pinned_bytes for i in self.ioases.values())


@dataclass(eq=False)
class BrokerState:
    """What the broker's parts share; one per Broker.

    ``holds`` (owned groups by id) changes only in iommud.broker.claim, under the claim
    lock; ``sessions`` only in iommud.broker.sessions. ``guard`` is the bind guard while
    inotify works (iommud.broker.audit starts and closes it). ``tasks`` are the broker's
    background tasks (:meth:`spawn`), awaited at close.
    """

    config: Config
    kernel: Kernel
    journal: Journal
    drivers: DriverManager
    ioas: IoasManager
    view: HostView
    hub: EventHub
    sysfs_timeout: float
    holds: dict[int, GroupHold] = field(default_factory=dict)
    sessions: dict[int, Session] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    guard: BindGuard | None = None
    stopping: bool = False  # the daemon is stopping: sessions end, but no VMM is killed

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the broker owns (awaited at close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def publish(self, name: EventName, *, holder: Session | None = None, **fields: Any) -> Event:
        """Send an event to every session whose subscription takes it, and always to
        ``holder`` (the session the event is about, e.g. a revoked lease's)."""
        event = self.hub.make(name, **fields)
        self.hub.publish(
            event,
            [s.sink for s in self.sessions.values()],
            must_reach=None if holder is None else holder.sink,
        )
        return event
