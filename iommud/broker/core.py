"""The Broker: the daemon's state owner and the server's only way to the kernel.

It keeps the sessions (one per connection), the groups they own, their leases, IOAS
objects and mappings, and answers every request op but ``hello`` (the server's
connection state machine owns that one). Each session's requests are serialised by the
session's lock; ownership changes (claim, release, revoke, teardown) additionally take
the claim lock (``ClaimManager.held()``), so two clients racing for a group see a
consistent owner.

This module is the facade and the request dispatch; the work lives in:

- iommud.broker.sessions: opening sessions, teardown (disconnect, peer exit, stop);
- iommud.broker.claim: claim and release; iommud.broker.ioas: IOAS and mappings;
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
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from iommud.broker.audit import GuardAudit
from iommud.broker.claim import ClaimManager
from iommud.broker.drivers import DriverManager
from iommud.broker.enforcement import DEVICE_REQUESTED, Enforcer
from iommud.broker.events import Delivery, EventHub
from iommud.broker.freeze import check_not_frozen, frozen_error, holding
from iommud.broker.hostview import HostChange, HostView
from iommud.broker.ioas import IoasManager
from iommud.broker.journal import Journal
from iommud.broker.listing import Listing
from iommud.broker.sessions import SessionManager
from iommud.broker.state import GroupHold, IoasState, LeaseState, Outcome, Session
from iommud.config import Config
from iommud.errors import (
    BadRequestError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
    RevokedError,
)
from iommud.fds import FdSet, OwnedFd
from iommud.guard import BindGuard
from iommud.host.snapshot import HostSnapshot
from iommud.host.viability import Backend
from iommud.kernel.interface import Kernel
from iommud.policy import Identity
from iommud.protocol import messages as m

log = structlog.get_logger(__name__)


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
        self._config = config
        self._close_grace = close_grace
        self._kernel = kernel
        self._clock = clock
        self._started = clock()
        self._journal = Journal(config.daemon.state_dir)
        self._drivers = DriverManager(
            kernel.binder,
            self._journal,
            timeout=sysfs_timeout,
            retries=restore_retries,
            retry_delay=restore_retry_delay,
        )
        self._ioas = IoasManager(kernel)
        self._holds: dict[int, GroupHold] = {}
        self._hub = EventHub()
        self._view = HostView(config)
        self._claims = ClaimManager(
            config, kernel, self._drivers, self._ioas, self._holds, self._view.refresh_groups
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._audit = GuardAudit(
            self._view,
            self._holds,
            spawn=self._spawn,
            recheck=self.on_host_change,
            publish=self.publish,
        )
        self._sessions = SessionManager(
            config,
            self._claims,
            self._ioas,
            spawn=self._spawn,
            on_owners_changed=self._audit.sync,
            sysfs_timeout=sysfs_timeout,
        )
        self._enforcer = Enforcer(
            config,
            self._view,
            self._claims,
            self._ioas,
            self._drivers,
            self._journal,
            self._holds,
            self._sessions.sessions,
            self._hub,
            spawn=self._spawn,
            on_owners_changed=self._audit.sync,
        )
        self._listing = Listing(config, self._view, self._holds, self._sessions.sessions)
        self.event_source: str | None = None  # set by the uevent watcher (iommud.watch)
        self.guard_enabled = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def snapshot(self) -> HostSnapshot:
        return self._view.snapshot

    @property
    def pending_restores(self) -> dict[str, str]:
        """BDF -> what its driver restore is still waiting for."""
        return dict(self._drivers.pending)

    async def start(self) -> None:
        """Replay the rebind journal of a previous run, then read the host."""
        entries = await asyncio.to_thread(self._journal.load)
        if entries:
            log.warning(
                "journal.replay", devices=[e.bdf for e in entries], path=str(self._journal.path)
            )
            pending = await self._drivers.restore(entries)
            if pending:
                log.error("journal.replay_pending", devices=pending)
        snap = await self._view.start()
        self._started = self._clock()
        if self.guard_enabled:
            self._audit.start(self._config.daemon.sys_root, self._config.dma_safe_drivers)
        log.info(
            "broker.started",
            devices=len(snap.devices),
            groups=len(snap.groups),
            iommufd=snap.has_iommufd,
            legacy=snap.has_legacy_container,
        )

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
            for t in list(self._tasks):
                await t
            await self._drivers.aclose(grace)

        self._audit.close()  # our own restores are not attempts to report
        await asyncio.shield(_all())
        log.info("broker.closed", pending_restores=self._drivers.pending)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    # ------------------------------------------------------------------ requests
    async def handle(self, session: Session, request: m.Request, fds: FdSet) -> Outcome:
        """Answer one request. Raises IommudError subclasses for typed errors. Owns
        ``fds``: every received fd is closed before this returns (mappings keep their
        own reference: the daemon's mmap or the kernel's file reference)."""
        with fds:
            if session.closing:
                raise InvalidStateError("the session is closing")
            if isinstance(request, m.Ping):
                return Outcome(m.PingReply(id=request.id))
            if isinstance(request, m.Status):
                return Outcome(self._status(request.id))
            if isinstance(request, m.ListDevices):
                return Outcome(await self._listing.list_devices(request))
            if isinstance(request, m.ListGroups):
                return Outcome(await self._listing.list_groups(request))
            if isinstance(request, m.Subscribe):  # the connection state holds the filter
                return Outcome(m.SubscribeReply(id=request.id))
            if isinstance(request, m.Revoke):
                if not session.identity.is_root:
                    raise PermissionDeniedError(
                        "revoke is for root only",
                        uid=session.identity.uid,
                        rule="revoke",
                        reason="revoke is root-only",
                    )
                ids = await self.revoke_group(request.group_id, request.reason)
                return Outcome(m.RevokeReply(id=request.id, revoked_leases=tuple(ids)))
            if isinstance(request, m.Hello):
                raise BadRequestError("hello is answered by the connection, not the broker")
            async with session.lock:
                if session.closing:
                    raise InvalidStateError("the session is closing")
                return await self._session_op(session, request, fds)

    async def _session_op(self, session: Session, request: m.Request, fds: FdSet) -> Outcome:
        if isinstance(request, m.Claim):
            reply, out = await self._claims.claim(session, request)
            self._enforcer.watch_requests(session.leases[reply.lease_id])
            self._audit.sync()
            return Outcome(reply, out)
        if isinstance(request, m.Release):
            try:
                await self._claims.release(session, request.lease_id)
            finally:
                self._audit.sync()
                holding(session)  # a freeze this release ends lifts now, not at next map
            return Outcome(m.ReleaseReply(id=request.id))
        if isinstance(request, m.IoasCreate):
            backend = Backend.IOMMUFD if self.snapshot.has_iommufd else Backend.LEGACY
            ioas = self._ioas.create(session, backend)
            return Outcome(m.IoasCreateReply(id=request.id, ioas_id=ioas.ioas_id))
        if isinstance(request, m.IoasDestroy):
            await self._ioas.destroy(session, self._ioas.get(session, request.ioas_id))
            return Outcome(m.IoasDestroyReply(id=request.id))
        if isinstance(request, m.IoasMap):
            ioas = self._usable_ioas(session, request.ioas_id)
            mapped = await self._ioas.map(session, ioas, request.ranges, fds)
            if ioas.backend is Backend.IOMMUFD and session.freezes:
                await self._undo_frozen_map(session, ioas)
            return Outcome(m.IoasMapReply(id=request.id, mappings=tuple(mapped)))
        if isinstance(request, m.IoasUnmap):
            ioas = self._ioas.get(session, request.ioas_id)
            n = await self._ioas.unmap(session, ioas, request.iova, request.length)
            return Outcome(m.IoasUnmapReply(id=request.id, unmapped=n))
        if isinstance(request, m.IovaRanges):
            ranges, align = self._ioas.iova_ranges(
                session, self._ioas.get(session, request.ioas_id)
            )
            return Outcome(
                m.IovaRangesReply(
                    id=request.id,
                    ranges=tuple(m.IovaRange(start=r.start, last=r.last) for r in ranges),
                    alignment=align,
                )
            )
        if isinstance(request, m.DeviceReset):
            await self._reset(session, request.bdf)
            return Outcome(m.DeviceResetReply(id=request.id))
        raise BadRequestError(f"unexpected op {request.op!r}", op=request.op)

    async def _undo_frozen_map(self, session: Session, ioas: IoasState) -> None:
        """A revoke froze the iommufd while this map was pinning: take it back out."""
        f = next(iter(session.freezes.values()))
        await asyncio.shield(self._ioas.unmap_all(session, ioas))
        raise frozen_error(session, f, ioas_id=ioas.ioas_id)

    def _usable_ioas(self, session: Session, ioas_id: int) -> IoasState:
        ioas = self._ioas.get(session, ioas_id)
        if ioas.backend is Backend.IOMMUFD:
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
                    if lease.state is LeaseState.REVOKED:
                        raise RevokedError(
                            f"lease {lease.lease_id} was revoked", lease_id=lease.lease_id, bdf=bdf
                        )
                    await asyncio.to_thread(ld.device.reset)
                    log.info("device.reset", session=session.session_id, bdf=bdf)
                    return
        raise NotFoundError(f"{bdf} is not claimed by this session", bdf=bdf)

    def _status(self, rid: int) -> m.StatusReply:
        return self._listing.status(
            rid, event_source=self.event_source, uptime_s=self._clock() - self._started
        )

    # ------------------------------------------------------------------ host events
    @property
    def view(self) -> HostView:
        """The one owner of the host snapshot (the uevent watcher refreshes through it)."""
        return self._view

    async def on_host_change(self, group_id: int, change: HostChange | None = None) -> None:
        """A group changed on the host: publish what the view reported, then enforce.

        ``change`` is the host view's report of a uevent or rescan it already applied
        (its events go out first, so subscribers read bind -> viability lost -> lease
        revoked in order); without one (the bind guard's audit) the group is re-read.
        """
        if change is not None:
            sinks = [s.sink for s in self._sessions.sessions.values()]
            for ev in self._hub.host_events(change):
                self._hub.publish(ev, sinks)
        await self._enforcer.on_host_change(
            group_id, None if change is None else self._view.snapshot
        )

    async def revoke_group(self, group_id: int, reason: str) -> list[int]:
        """Block DMA for the group's active leases and tell the owner (see Enforcer)."""
        return await self._enforcer.revoke_group(group_id, reason)

    def publish(self, name: m.EventName, **fields: object) -> m.Event:
        """Publish a broker event (bind_refused); returns the event sent."""
        ev = self._hub.make(name, **fields)
        self._hub.publish(ev, [s.sink for s in self._sessions.sessions.values()])
        return ev

    # The bind guard, as tests/udev inspect it.
    @property
    def _guard(self) -> BindGuard | None:
        return self._audit.guard

    def _sync_guard(self) -> None:
        self._audit.sync()


__all__ = ["DEVICE_REQUESTED", "Broker", "Outcome", "Session"]
