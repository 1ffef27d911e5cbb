"""The Broker: the daemon's state owner and the server's only way to the kernel.

It keeps the sessions (one per connection), the groups they own, their leases, IOAS
objects and mappings, and answers every request op but ``hello`` (the server's
connection state machine owns that one). Each session's requests are serialised by the
session's lock; ownership changes (claim, release, revoke, teardown) additionally take
the claim lock (``ClaimManager.held()``), so two clients racing for a group see a
consistent owner.

This module is the facade and the request dispatch: ``Broker.routes`` maps each
request class to its answer, in the order of PROTOCOL.md section 5. The state the parts
share is one ``BrokerState`` (iommud.broker.state); the work lives in:

- iommud.broker.sessions: opening sessions, teardown (disconnect, peer exit, stop);
- iommud.broker.plan: what a claim will do (pure); iommud.broker.claim: claim and
  release, and the owned groups; iommud.broker.ioas: IOAS and mappings;
- iommud.broker.enforcement: host changes on owned groups, revoke, device requests;
- iommud.broker.freeze: a revoke's freeze of the session's iommufd (maps refused);
- iommud.broker.audit: the bind guard's reports;
- iommud.broker.listing: list_devices, list_groups and status;
- iommud.broker.hostview: the snapshot the broker decides on.

Teardown always blocks DMA first, then closes the daemon's fds, then puts drivers back,
and is shielded from cancellation. Nothing here knows about sockets or bytes; nothing
here opens /dev or writes sysfs except through the kernel layer's interface
(iommud.kernel.interface).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from iommud.broker.audit import GuardAudit
from iommud.broker.claim import ClaimManager
from iommud.broker.drivers import DriverManager
from iommud.broker.enforcement import DEVICE_REQUESTED, Enforcer
from iommud.broker.events import Delivery, EventHub
from iommud.broker.freeze import check_not_frozen, frozen_error, holding
from iommud.broker.hostview import HostChange, HostView
from iommud.broker.ioas import IoasManager
from iommud.broker.journal import Journal, JournalEntry
from iommud.broker.listing import Listing
from iommud.broker.revocation import Revoker
from iommud.broker.sessions import SessionManager
from iommud.broker.state import BrokerState, IoasState, LeaseState, Outcome, Session
from iommud.config import Config
from iommud.eager import shielded
from iommud.errors import (
    BadRequestError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
    RevokedError,
)
from iommud.fds import FdSet, OwnedFd
from iommud.host.snapshot import HostSnapshot
from iommud.host.viability import ClaimPath
from iommud.kernel import aio
from iommud.kernel.interface import Kernel
from iommud.policy import Identity
from iommud.protocol import messages as m

log = structlog.get_logger(__name__)


R = TypeVar("R", bound=m.RequestBase)


@dataclass(frozen=True, slots=True)
class Route(Generic[R]):
    """How the broker answers one op: the request class, the answer, and whether the
    answer runs under the session's lock (ops on the session's own leases and IOASes)."""

    request: type[R]
    answer: Callable[[Session, R, FdSet], Awaitable[Outcome]]
    in_session: bool = False


class Broker:
    """See the module docstring. The server calls only the public methods below."""

    def __init__(
        self,
        config: Config,
        kernel: Kernel,
        *,
        clock: Callable[[], float] = time.monotonic,
        sysfs_timeout: float = 10.0,
        restore_retries: int = 5,
        restore_retry_delay: float = 0.5,
        close_grace: float = 30.0,
    ) -> None:
        self._close_grace = close_grace
        self._clock = clock
        self._started = clock()
        self._journal = Journal(config.daemon.state_dir)
        self._state = state = BrokerState(
            config=config,
            kernel=kernel,
            journal=self._journal,
            drivers=DriverManager(
                kernel.binder,
                self._journal,
                timeout=sysfs_timeout,
                retries=restore_retries,
                retry_delay=restore_retry_delay,
            ),
            ioas=IoasManager(kernel, config),
            view=HostView(config),
            hub=EventHub(),
            sysfs_timeout=sysfs_timeout,
        )
        self._claims = ClaimManager(state)
        self._revoker = Revoker(state, self._claims)
        self._sessions = SessionManager(state, self._claims, self._revoker)
        self._enforcer = Enforcer(state, self._claims, self._revoker)
        self._audit = GuardAudit(state, self._enforcer)
        self._listing = Listing(state)
        self.routes: Mapping[type[m.RequestBase], Route[Any]] = {
            r.request: r for r in self._route_table()
        }
        self.event_source: str | None = None  # set by the udev layer

    # ------------------------------------------------------------------ lifecycle
    @property
    def snapshot(self) -> HostSnapshot:
        return self._state.view.snapshot

    @property
    def pending_restores(self) -> dict[str, str]:
        """BDF -> what its driver restore is still waiting for."""
        return dict(self._state.drivers.pending)

    @property
    def state(self) -> BrokerState:
        """The state the broker's parts share, for inspection (tests, debugging). The
        server uses only the methods."""
        return self._state

    async def start(self) -> None:
        """Replay the rebind journal of a previous run, then read the host."""
        entries = await aio.call("journal_read", self._journal.load)
        bad = self._journal.problem
        if bad is not None:
            # Loud, one line, and no stop: a daemon that refused to start would leave
            # every device a crashed run changed without its driver for good.
            log.error(
                "journal.unusable",
                error=bad.message,
                path=bad.path,
                problem=bad.problem,
                moved_to=bad.moved_to,
                not_moved=bad.not_moved,
            )
        if entries:
            log.warning(
                "journal.replay", devices=[e.bdf for e in entries], path=str(self._journal.path)
            )
            # One background restore per group, like a release: a group a client still
            # holds (it kept its device fd across the crash) waits for that fd to close,
            # for as long as it takes, and is answered busy meanwhile.
            groups: dict[int, list[JournalEntry]] = {}
            for e in entries:
                groups.setdefault(e.group_id, []).append(e)
            for group_id, members in groups.items():
                self._claims.restore_group(group_id, members)
            await self._claims.wait_restored(list(groups), self._state.sysfs_timeout)
            if self._state.drivers.pending:
                log.error("journal.replay_pending", waiting_for=self.pending_restores)
        snap = await self._state.view.start()
        self._started = self._clock()
        self._audit.start()
        started = log.error if bad is not None else log.info
        started(
            "broker.started",
            journal="UNUSABLE: started without replay" if bad is not None else "ok",
            devices=len(snap.devices),
            groups=len(snap.groups),
            iommufd=snap.has_iommufd,
            legacy=snap.has_legacy_container,
        )

    def begin_stop(self) -> None:
        """The daemon is stopping: sessions that end from now on (its connections being
        drained) are not client exits, so no delegated VMM is killed; DMA is still
        blocked and the devices given back once the VMMs let go (iommud.broker.revocation)."""
        self._state.stopping = True

    async def aclose(self, *, grace: float | None = None) -> None:
        """Release every session (shielded), then wait (bounded) for driver restores.

        ``grace`` (default: the constructor's ``close_grace``) bounds the wait for
        restores still running; a restore stuck in sysfs is abandoned to its daemon
        thread and stays in the journal for the next start (see drivers.py).
        """
        if grace is None:
            grace = self._close_grace

        async def _all() -> None:
            await self._sessions.close_all()
            for t in list(self._state.tasks):
                await t
            await self._state.drivers.aclose(grace)

        self._audit.close()  # our own restores are not attempts to report
        self.begin_stop()
        await asyncio.shield(_all())
        log.info("broker.closed", pending_restores=self._state.drivers.pending)

    # ------------------------------------------------------------------ sessions
    def open_session(self, identity: Identity, *, pidfd: OwnedFd | int | None = None) -> Session:
        """A session for a new connection (see SessionManager.open)."""
        return self._sessions.open(identity, pidfd=pidfd)

    async def close_session(self, session: Session) -> None:
        """Tear a session down (idempotent; concurrent callers wait for the first)."""
        await self._sessions.close(session)

    def events(self, session: Session) -> asyncio.Queue[Delivery]:
        """The session's event queue (the connection applies the subscription)."""
        return session.sink.queue

    def holds_resources(self, session: Session) -> bool:
        """Does the session hold anything (leases, IOASes, delegations, freezes)? A
        connection that holds nothing may be closed when idle (the server's policy)."""
        return bool(session.leases or session.ioases or session.delegated or session.freezes)

    # ------------------------------------------------------------------ requests
    def _route_table(self) -> list[Route[Any]]:
        """Every op the broker answers: PROTOCOL.md section 5, in its order."""
        return [
            Route(m.Hello, self._hello),
            Route(m.Ping, self._ping),
            Route(m.Status, self._status),
            Route(m.ListDevices, self._list_devices),
            Route(m.ListGroups, self._list_groups),
            Route(m.Claim, self._claim, in_session=True),
            Route(m.Release, self._release, in_session=True),
            Route(m.IoasCreate, self._ioas_create, in_session=True),
            Route(m.IoasDestroy, self._ioas_destroy, in_session=True),
            Route(m.IoasMap, self._ioas_map, in_session=True),
            Route(m.IoasUnmap, self._ioas_unmap, in_session=True),
            Route(m.IovaRanges, self._iova_ranges, in_session=True),
            Route(m.DeviceReset, self._device_reset, in_session=True),
            Route(m.Subscribe, self._subscribe),
            Route(m.Revoke, self._revoke),
        ]

    async def handle(self, session: Session, request: m.Request, fds: FdSet) -> Outcome:
        """Answer one request (:attr:`routes`). Raises IommudError subclasses for typed
        errors. Owns ``fds``: every received fd is closed before this returns (mappings
        keep their own reference: the daemon's mmap or the kernel's file reference)."""
        with fds:
            if session.closing:
                raise InvalidStateError("the session is closing")
            # v2 requests subclass their v1 class (ClaimV2 is a Claim): one route each
            route = self.routes.get(m.REQUEST_TYPES.get(request.op, type(request)))
            if route is None:
                raise BadRequestError(f"unexpected op {request.op!r}", op=request.op)
            if not route.in_session:
                return await route.answer(session, request, fds)
            async with session.lock:
                if session.closing:
                    raise InvalidStateError("the session is closing")
                return await route.answer(session, request, fds)

    async def _hello(self, session: Session, request: m.Hello, fds: FdSet) -> Outcome:
        raise BadRequestError("hello is answered by the connection, not the broker")

    async def _ping(self, session: Session, request: m.Ping, fds: FdSet) -> Outcome:
        return Outcome(m.PingReply(id=request.id))

    async def _status(self, session: Session, request: m.Status, fds: FdSet) -> Outcome:
        return Outcome(
            await self._listing.status(
                request,
                session.identity,
                event_source=self.event_source,
                uptime_s=self._clock() - self._started,
            )
        )

    async def _list_devices(self, session: Session, request: m.ListDevices, fds: FdSet) -> Outcome:
        return Outcome(await self._listing.list_devices(request))

    async def _list_groups(self, session: Session, request: m.ListGroups, fds: FdSet) -> Outcome:
        return Outcome(await self._listing.list_groups(request, session.identity))

    async def _claim(self, session: Session, request: m.Claim, fds: FdSet) -> Outcome:
        reply, out = await self._claims.claim(session, request)
        lease = session.leases[reply.lease_id]
        if not lease.is_delegated:
            # A delegated device's REQ irq is its VMM's: QEMU registers its own trigger
            # and the kernel keeps one (vfio_pci_intrs.c vfio_pci_set_req_trigger).
            self._enforcer.watch_requests(lease)
        return Outcome(reply, out)

    async def _release(self, session: Session, request: m.Release, fds: FdSet) -> Outcome:
        lease = session.leases.get(request.lease_id)
        if lease is not None and lease.is_delegated:
            # refused (revoked, holders_exit) while someone still holds its devices
            await self._claims.release(session, request.lease_id, via=self._revoker.release_locked)
            return Outcome(m.ReleaseReply(id=request.id))
        try:
            await self._claims.release(session, request.lease_id)
        finally:
            holding(session)  # a freeze this release ends lifts now, not at next map
        return Outcome(m.ReleaseReply(id=request.id))

    async def _ioas_create(self, session: Session, request: m.IoasCreate, fds: FdSet) -> Outcome:
        backend = ClaimPath.IOMMUFD if self.snapshot.has_iommufd else ClaimPath.LEGACY
        ioas = self._state.ioas.create(session, backend)
        return Outcome(m.IoasCreateReply(id=request.id, ioas_id=ioas.ioas_id))

    async def _ioas_destroy(self, session: Session, request: m.IoasDestroy, fds: FdSet) -> Outcome:
        ioases = self._state.ioas
        await ioases.destroy(session, ioases.get(session, request.ioas_id))
        return Outcome(m.IoasDestroyReply(id=request.id))

    async def _ioas_map(self, session: Session, request: m.IoasMap, fds: FdSet) -> Outcome:
        ioas = self._usable_ioas(session, request.ioas_id)
        mapped = await self._state.ioas.map(session, ioas, request.ranges, fds)
        if ioas.backend is ClaimPath.IOMMUFD and session.freezes:
            await self._undo_frozen_map(session, ioas)
        return Outcome(m.IoasMapReply(id=request.id, mappings=tuple(mapped)))

    async def _ioas_unmap(self, session: Session, request: m.IoasUnmap, fds: FdSet) -> Outcome:
        ioases = self._state.ioas
        ioas = ioases.get(session, request.ioas_id)
        n = await ioases.unmap(session, ioas, request.iova, request.length)
        await shielded(ioases.drop_if_unused(session, ioas))
        return Outcome(m.IoasUnmapReply(id=request.id, unmapped=n))

    async def _iova_ranges(self, session: Session, request: m.IovaRanges, fds: FdSet) -> Outcome:
        ioases = self._state.ioas
        ranges, align = ioases.iova_ranges(session, ioases.get(session, request.ioas_id))
        return Outcome(
            m.IovaRangesReply(
                id=request.id,
                ranges=tuple(m.IovaRange(start=r.start, last=r.last) for r in ranges),
                alignment=align,
            )
        )

    async def _device_reset(self, session: Session, request: m.DeviceReset, fds: FdSet) -> Outcome:
        await self._reset(session, request.bdf)
        return Outcome(m.DeviceResetReply(id=request.id))

    async def _subscribe(self, session: Session, request: m.Subscribe, fds: FdSet) -> Outcome:
        # The filter is connection state (iommud.protocol.connection): nothing to keep here.
        return Outcome(m.SubscribeReply(id=request.id))

    async def _revoke(self, session: Session, request: m.Revoke, fds: FdSet) -> Outcome:
        if not session.identity.is_root:
            raise PermissionDeniedError(
                "revoke is for root only",
                uid=session.identity.uid,
                rule="revoke",
                reason="revoke is root-only",
            )
        ids = await self.revoke_group(request.group_id, request.reason)
        return Outcome(m.RevokeReply(id=request.id, revoked_leases=tuple(ids)))

    async def _undo_frozen_map(self, session: Session, ioas: IoasState) -> None:
        """A revoke froze the iommufd while this map was pinning: take it back out."""
        f = next(iter(session.freezes.values()))
        await asyncio.shield(self._state.ioas.unmap_all(session, ioas))
        raise frozen_error(session, f, ioas_id=ioas.ioas_id)

    def _usable_ioas(self, session: Session, ioas_id: int) -> IoasState:
        ioas = self._state.ioas.get(session, ioas_id)
        if ioas.backend is ClaimPath.IOMMUFD:
            check_not_frozen(session, ioas_id=ioas_id)
        for lease in session.leases.values():
            if lease.ioas is ioas and lease.state is LeaseState.REVOKED:
                raise RevokedError(
                    f"IOAS {ioas_id} serves revoked lease {lease.lease_id}: release it first",
                    ioas_id=ioas_id,
                    lease_id=lease.lease_id,
                    reason=lease.revoke_reason,
                )
        return ioas

    async def _reset(self, session: Session, bdf: str) -> None:
        for lease in session.leases.values():
            for ld in lease.devices:
                if ld.bdf == bdf:
                    if lease.is_delegated:
                        raise InvalidStateError(
                            f"{bdf} is delegated: its VMM resets it",
                            reason="delegated",
                            bdf=bdf,
                            lease_id=lease.lease_id,
                        )
                    if lease.state is LeaseState.REVOKED:
                        raise RevokedError(
                            f"lease {lease.lease_id} was revoked", lease_id=lease.lease_id, bdf=bdf
                        )
                    await aio.call("VFIO_DEVICE_RESET", ld.device.reset)
                    log.info("device.reset", session=session.session_id, bdf=bdf)
                    return
        raise NotFoundError(f"{bdf} is not claimed by this session", bdf=bdf)

    # ------------------------------------------------------------------ host events
    @property
    def view(self) -> HostView:
        """The one owner of the host snapshot (the uevent watcher refreshes through it)."""
        return self._state.view

    async def on_host_change(self, group_id: int, change: HostChange | None = None) -> None:
        """A group changed on the host: publish what the view reported, then enforce.

        ``change`` is the host view's report of a uevent or rescan it already applied
        (its events go out first, so subscribers read bind -> viability lost -> lease
        revoked in order); without one (the bind guard's audit) the group is re-read.
        """
        if change is not None:
            sinks = [s.sink for s in self._state.sessions.values()]
            for ev in self._state.hub.host_events(change):
                self._state.hub.publish(ev, sinks)
        await self._enforcer.on_host_change(
            group_id,
            None if change is None else self._state.view.snapshot,
            () if change is None else change.events,
        )

    async def revoke_group(self, group_id: int, reason: str) -> list[int]:
        """Block DMA for the group's active leases and tell the owner (see Enforcer)."""
        return await self._enforcer.revoke_group(group_id, reason)

    def publish(self, name: m.EventName, **fields: Any) -> m.Event:
        """Publish a broker event (bind_refused); returns the event sent."""
        return self._state.publish(name, **fields)


__all__ = ["DEVICE_REQUESTED", "Broker", "Outcome", "Session"]
