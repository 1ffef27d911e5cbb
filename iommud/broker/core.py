"""The Broker: the daemon's state owner and the server's only way to the kernel.

It keeps the sessions (one per connection), the groups they own, their leases, IOAS
objects and mappings, and answers every request op but ``hello`` (the server's
connection state machine owns that one). Each session's requests are serialised by the
session's lock; ownership changes (claim, release, revoke, teardown) additionally take
the claim lock, so two clients racing for a group see a consistent owner.

Teardown (release, disconnect, peer exit seen on its pidfd, daemon stop) always blocks
DMA first, then closes the daemon's fds, then puts drivers back, and is shielded from
cancellation. Nothing here knows about sockets or bytes; nothing here opens /dev or
writes sysfs except through the kernel layer's interface (iommud.kernel.interface).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import structlog

from iommud import __version__
from iommud.broker.claim import ClaimManager, close_request_fd
from iommud.broker.drivers import VFIO_PCI, DriverManager
from iommud.broker.events import EventHub, EventSink, Subscription
from iommud.broker.ioas import IoasManager
from iommud.broker.journal import Journal, JournalEntry
from iommud.broker.state import (
    GroupHold,
    IoasState,
    Lease,
    LeasedDevice,
    LeaseState,
    Outcome,
    Session,
)
from iommud.config import Config
from iommud.errors import (
    BadRequestError,
    InvalidStateError,
    IommudError,
    KernelError,
    NotFoundError,
    PermissionDeniedError,
    RevokedError,
)
from iommud.fds import FdSet, OwnedFd
from iommud.guard import BindGuard, SysfsWrite, WriteKind
from iommud.host.snapshot import (
    HostSnapshot,
    IommuGroup,
    PciDevice,
    group_of,
    read_group,
    read_snapshot,
)
from iommud.host.viability import Backend, group_viability, whole_group_path
from iommud.kernel.interface import Kernel
from iommud.kernel.uapi import VFIO_PCI_REQ_IRQ_INDEX
from iommud.policy import Identity, quota_for
from iommud.protocol import messages as m

log = structlog.get_logger(__name__)

DEVICE_REQUESTED: Final = "device removal requested by the kernel"


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
    ) -> None:
        self._config = config
        self._kernel = kernel
        self._clock = clock
        self._started = clock()
        self._sysfs_timeout = sysfs_timeout
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
        self._sessions: dict[int, Session] = {}
        self._session_ids = itertools.count(1)
        self._hub = EventHub()
        self._claims = ClaimManager(
            config, kernel, self._drivers, self._ioas, self._holds, self._refresh_groups
        )
        self._snapshot: HostSnapshot | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.event_source: str | None = None  # set by the udev layer (issue 5)
        # Drivers each device was seen bound to: attributes a refused bind (inotify names
        # the driver's bind file, not the device written to it).
        self._seen_drivers: dict[str, set[str]] = {}
        self._guard: BindGuard | None = None
        self.guard_enabled = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def snapshot(self) -> HostSnapshot:
        if self._snapshot is None:
            raise InvalidStateError("the broker has not started")
        return self._snapshot

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
        d = self._config.daemon
        self._snapshot = await asyncio.to_thread(read_snapshot, d.sys_root, d.dev_root)
        self._started = self._clock()
        for dev in self._snapshot.devices.values():
            if dev.driver is not None:
                self._seen_drivers.setdefault(dev.bdf, set()).add(dev.driver)
        if self.guard_enabled:
            guard = BindGuard(
                d.sys_root, self._on_sysfs_write, dma_safe=self._config.dma_safe_drivers
            )
            try:
                guard.start()
            except KernelError as exc:
                log.warning("guard.unavailable", errno=exc.errno)
            else:
                self._guard = guard
        log.info(
            "broker.started",
            devices=len(self._snapshot.devices),
            groups=len(self._snapshot.groups),
            iommufd=self._snapshot.has_iommufd,
            legacy=self._snapshot.has_legacy_container,
        )

    async def aclose(self, *, grace: float = 30.0) -> None:
        """Release every session (shielded), then wait (bounded) for driver restores."""

        async def _all() -> None:
            for session in list(self._sessions.values()):
                await self.close_session(session)
            for t in list(self._tasks):
                await t
            await self._drivers.aclose(grace)

        if self._guard is not None:  # our own restores are not attempts to report
            self._guard.close()
            self._guard = None
        await asyncio.shield(_all())
        log.info("broker.closed", pending_restores=self._drivers.pending)

    # ------------------------------------------------------------------ sessions
    def open_session(self, identity: Identity, *, pidfd: OwnedFd | int | None = None) -> Session:
        """A session for a new connection. Takes ownership of ``pidfd``: when the peer
        exits (the pidfd turns readable) the session is torn down even if the socket
        lingers."""
        owned = OwnedFd(pidfd) if isinstance(pidfd, int) else pidfd
        session = Session(
            session_id=next(self._session_ids),
            identity=identity,
            quota=quota_for(self._config, identity),
            sink=EventSink(),
            pidfd=owned,
        )
        self._sessions[session.session_id] = session
        if owned is not None:
            asyncio.get_running_loop().add_reader(owned.fileno(), self._peer_exited, session)
        log.info(
            "session.opened",
            session=session.session_id,
            uid=identity.uid,
            pid=identity.pid,
            has_pidfd=owned is not None,
        )
        return session

    def _peer_exited(self, session: Session) -> None:
        self._stop_watching(session)
        log.info("session.peer_exited", session=session.session_id, pid=session.identity.pid)
        task = asyncio.get_running_loop().create_task(self.close_session(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_watching(self, session: Session) -> None:
        if session.pidfd is not None and not session.pidfd.closed:
            asyncio.get_running_loop().remove_reader(session.pidfd.fileno())

    async def close_session(self, session: Session) -> None:
        """Tear a session down (idempotent; concurrent callers wait for the first)."""
        if session.closing:
            await session.closed.wait()
            return
        session.closing = True
        await asyncio.shield(self._teardown(session))

    async def _teardown(self, session: Session) -> None:
        released = [lease.group_id for lease in session.leases.values()]
        try:
            await self._teardown_locked(session)
        finally:
            # Outside the lock, bounded: the drivers usually come back within a second;
            # a restore stalled by a lingering fd goes on in the background.
            try:
                await self._claims.wait_restored(released, self._sysfs_timeout)
            finally:
                session.closed.set()
                log.info("session.closed", session=session.session_id)

    async def _teardown_locked(self, session: Session) -> None:
        try:
            async with session.lock, self._claims._lock:
                # 1. Block DMA: unmap every IOAS, detach every device.
                for ioas in list(session.ioases.values()):
                    await self._quietly("ioas.unmap_all", self._ioas.unmap_all(session, ioas))
                for lease in list(session.leases.values()):
                    await self._quietly(
                        "lease.block_dma", self._claims.block_dma(lease, drop_shared_container=True)
                    )
                # 2. Reset and close devices, restore drivers (per lease).
                for lease in list(session.leases.values()):
                    await self._quietly(
                        "lease.release", self._claims.release_lease(lease, why="disconnect")
                    )
                # 3. Free the IOASes and the session's /dev/iommu.
                for ioas in list(session.ioases.values()):
                    await self._quietly(
                        "ioas.destroy", self._ioas.destroy(session, ioas, force=True)
                    )
                if session.iommufd is not None:
                    session.iommufd.close()
                    session.iommufd = None
        finally:
            self._sync_guard()
            self._stop_watching(session)
            if session.pidfd is not None:
                session.pidfd.close()
            self._sessions.pop(session.session_id, None)

    @staticmethod
    async def _quietly(what: str, coro: object) -> None:
        """Teardown keeps going past one failed step; the failure is logged."""
        assert asyncio.iscoroutine(coro)
        try:
            await coro
        except KernelError as exc:
            log.exception("session.teardown_step_failed", step=what, op=exc.op, errno=exc.errno)

    def events(self, session: Session) -> asyncio.Queue[m.Event]:
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
                return Outcome(await self._list_devices(request.id))
            if isinstance(request, m.ListGroups):
                return Outcome(await self._list_groups(request.id))
            if isinstance(request, m.Subscribe):
                session.sink.subscription = Subscription(
                    None if request.events is None else frozenset(request.events),
                    None if request.groups is None else frozenset(request.groups),
                )
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
            self._watch_requests(session.leases[reply.lease_id])
            self._sync_guard()
            return Outcome(reply, out)
        if isinstance(request, m.Release):
            try:
                await self._claims.release(session, request.lease_id)
            finally:
                self._sync_guard()
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

    def _usable_ioas(self, session: Session, ioas_id: int) -> IoasState:
        ioas = self._ioas.get(session, ioas_id)
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

    # ------------------------------------------------------------------ host view
    async def _refresh_groups(self, bdfs: list[str]) -> tuple[HostSnapshot, int]:
        """Re-read the one group these devices are in (BadRequest if they span groups)."""
        root = self._config.daemon.sys_root

        def work() -> tuple[int, IommuGroup, dict[str, PciDevice]]:
            groups = {b: group_of(root, b) for b in bdfs}
            ids = set(groups.values())
            if None in ids:
                orphans = [b for b, g in groups.items() if g is None]
                raise BadRequestError(
                    f"not in any IOMMU group: {', '.join(orphans)}", devices=orphans
                )
            if len(ids) > 1:
                raise BadRequestError(
                    "one claim covers one IOMMU group; these devices span several",
                    groups={b: g for b, g in groups.items()},
                )
            (gid,) = ids
            assert gid is not None
            group, devs = read_group(root, gid)
            return gid, group, devs

        gid, group, devs = await asyncio.to_thread(work)
        self._snapshot = self.snapshot.with_group(group, devs)
        return self._snapshot, gid

    async def _read_all(self) -> HostSnapshot:
        d = self._config.daemon
        self._snapshot = await asyncio.to_thread(read_snapshot, d.sys_root, d.dev_root)
        return self._snapshot

    async def _list_devices(self, rid: int) -> m.ListDevicesReply:
        snap = await self._read_all()
        return m.ListDevicesReply(
            id=rid,
            devices=tuple(
                m.DeviceEntry(
                    bdf=d.bdf,
                    vendor=d.vendor,
                    device=d.device,
                    class_code=d.class_code,
                    driver=d.driver,
                    driver_override=d.driver_override,
                    group_id=d.group_id,
                    is_bridge=d.is_bridge,
                    vfio_cdev=d.vfio_cdev,
                )
                for d in sorted(snap.devices.values(), key=lambda d: d.bdf)
            ),
        )

    async def _list_groups(self, rid: int) -> m.ListGroupsReply:
        snap = await self._read_all()
        safe = self._config.dma_safe_drivers
        out = []
        for gid in sorted(snap.groups):
            v = group_viability(snap, gid, safe)
            hold = self._holds.get(gid)
            path = hold.backend if hold else whole_group_path(snap, gid, safe)
            out.append(
                m.GroupEntry(
                    group_id=gid,
                    devices=snap.groups[gid].devices,
                    is_viable=v.is_viable,
                    offenders=tuple(
                        m.Offender(bdf=o.bdf, driver=o.driver)
                        for o in v.offenders
                        if o.bdf in snap.devices
                    ),
                    path=None if path is None else str(path),
                    owner=None
                    if hold is None
                    else m.Owner(uid=hold.session.identity.uid, pid=hold.session.identity.pid),
                )
            )
        return m.ListGroupsReply(id=rid, groups=tuple(out))

    def _status(self, rid: int) -> m.StatusReply:
        return m.StatusReply(
            id=rid,
            version=__version__,
            event_source=self.event_source,
            clients=len(self._sessions),
            leases=tuple(
                _lease_info(le) for s in self._sessions.values() for le in s.leases.values()
            ),
            uptime_s=max(0.0, self._clock() - self._started),
        )

    # ------------------------------------------------------------------ enforcement
    async def on_host_change(self, group_id: int, snapshot: HostSnapshot | None = None) -> None:
        """A uevent touched one group: take its fresh view, enforce on owned groups.

        ``snapshot`` is the udev watcher's view, which already holds this group as just
        re-read (so the group is not read twice per event); without it the group is read
        here. For an owned group: pin driver_override on devices that joined it
        (hot-add), re-pin overrides someone changed, forget devices that left, and
        revoke its leases if it lost viability; a group that vanished ends its leases.
        """
        if snapshot is not None:
            if group_id in snapshot.groups:
                group = snapshot.groups[group_id]
                devs = {d.bdf: d for d in snapshot.group_devices(group_id)}
                self._snapshot = self.snapshot.with_group(group, devs)
            else:
                self._snapshot = self.snapshot.without_group(group_id)
        else:
            try:
                group, devs = await asyncio.to_thread(
                    read_group, self._config.daemon.sys_root, group_id
                )
            except NotFoundError:
                self._snapshot = self.snapshot.without_group(group_id)
            else:
                self._snapshot = self.snapshot.with_group(group, devs)
        if group_id in self._snapshot.groups:
            for d in self._snapshot.group_devices(group_id):
                if d.driver is not None:
                    self._seen_drivers.setdefault(d.bdf, set()).add(d.driver)
        if group_id in self._holds:
            await asyncio.shield(self._enforce(group_id))

    async def _enforce(self, group_id: int) -> None:
        revoke: str | None = None
        gone = False
        async with self._claims._lock:
            hold = self._holds.get(group_id)
            if hold is None:
                return
            snap = self.snapshot
            if group_id not in snap.groups:
                gone = True
                members: dict[str, PciDevice] = {}
            else:
                members = {d.bdf: d for d in snap.group_devices(group_id)}
            await self._track_members(hold, members)
            if gone:
                revoke = f"IOMMU group {group_id} disappeared"
            else:
                v = group_viability(snap, group_id, self._config.dma_safe_drivers)
                if not v.is_viable:
                    names = ", ".join(f"{o.bdf} ({o.driver})" for o in v.offenders)
                    revoke = f"viability lost: {names}"
            if revoke is not None:
                await self._revoke_locked(group_id, revoke)
            if gone:
                # Nothing is left to give back: end the leases (the owner was told).
                for lease in list(hold.leases.values()):
                    await self._claims.release_lease(lease, why="group vanished")
        self._sync_guard()

    async def _track_members(self, hold: GroupHold, members: dict[str, PciDevice]) -> None:
        """Keep every device of an owned group pinned to vfio-pci (called with the lock)."""
        left = [b for b in hold.pinned if b not in members]
        if left:
            for b in left:
                hold.pinned.pop(b, None)
                hold.rebound.pop(b, None)
            await asyncio.to_thread(self._journal.drop, left)
            log.info("group.members_left", group_id=hold.group_id, devices=left)
        joined = [d for d in members.values() if d.bdf not in hold.pinned]
        if joined:
            await self._drivers.journal(
                [
                    JournalEntry(d.bdf, hold.group_id, d.driver, d.driver_override, rebound=False)
                    for d in joined
                ]
            )
        for d in joined:
            hold.pinned[d.bdf] = d.driver_override
            await self._quietly("driver.pin", self._drivers.pin(d.bdf))
            log.warning(
                "group.device_joined",
                group_id=hold.group_id,
                bdf=d.bdf,
                driver=d.driver,
                pinned=VFIO_PCI,
            )
        new = {d.bdf for d in joined}
        for d in members.values():
            if d.bdf not in new and d.driver_override != VFIO_PCI:
                log.warning(
                    "guard.override_repinned",
                    group_id=hold.group_id,
                    bdf=d.bdf,
                    found=d.driver_override,
                )
                await self._quietly("driver.pin", self._drivers.pin(d.bdf))

    async def revoke_group(self, group_id: int, reason: str) -> list[int]:
        """Block DMA for every active lease on the group at once and tell the owner.

        iommufd: detach the devices AND unmap their IOAS (the client holds the device fd
        and could re-attach it to that IOAS itself); legacy: unmap the container. The
        leases stay (state revoked, group still owned, overrides still pinned) until the
        client releases them or disconnects; maps into that IOAS are refused meanwhile.
        """

        async def work() -> list[int]:
            async with self._claims._lock:
                return await self._revoke_locked(group_id, reason)

        return await asyncio.shield(work())

    async def _revoke_locked(self, group_id: int, reason: str) -> list[int]:
        revoked: list[int] = []
        for lease in self._claims.active_leases(group_id):
            await self._claims.block_dma(lease, drop_shared_container=False)
            await self._ioas.unmap_all(lease.session, lease.ioas)
            lease.state = LeaseState.REVOKED
            lease.revoke_reason = reason
            revoked.append(lease.lease_id)
            ev = self._hub.make(
                m.EventName.LEASE_REVOKED,
                lease_id=lease.lease_id,
                group_id=group_id,
                reason=reason,
            )
            self._hub.publish(
                ev, [s.sink for s in self._sessions.values()], must_reach=lease.session.sink
            )
            log.warning(
                "group.revoked",
                group_id=group_id,
                lease_id=lease.lease_id,
                session=lease.session.session_id,
                uid=lease.session.identity.uid,
                reason=reason,
            )
        return revoked

    # ------------------------------------------------------------------ bind guard
    def _sync_guard(self) -> None:
        """Watch exactly the devices of the owned groups (see iommud.guard)."""
        if self._guard is not None:
            self._guard.guard(b for hold in self._holds.values() for b in hold.pinned)

    def _on_sysfs_write(self, write: SysfsWrite) -> None:
        self._spawn(self._audit(write))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _audit(self, write: SysfsWrite) -> None:
        """A guarded sysfs file was written: re-check the owned groups, report refusals."""
        try:
            for gid in list(self._holds):
                await self.on_host_change(gid)
        except IommudError as exc:
            log.warning("guard.audit_failed", code=exc.code, **exc.details)
        if write.kind is not WriteKind.BIND or write.accepted or write.name is None:
            if not write.accepted:
                log.warning("guard.write_refused", kind=str(write.kind), path=write.path)
            return
        driver = write.name
        targets = [
            (gid, bdf)
            for gid, hold in self._holds.items()
            for bdf in hold.pinned
            if driver in self._seen_drivers.get(bdf, ())
            and getattr(self.snapshot.devices.get(bdf), "driver", None) != driver
        ]
        if not targets:
            log.warning(
                "guard.bind_attempt_unattributed",
                driver=driver,
                path=write.path,
                owned_groups=sorted(self._holds),
            )
            return
        for gid, bdf in targets:
            reason = (
                f"a write to {write.path} was refused: driver_override of {bdf} is pinned "
                f"to {VFIO_PCI} while IOMMU group {gid} is owned"
            )
            log.warning("guard.bind_refused", bdf=bdf, driver=driver, group_id=gid, path=write.path)
            self.publish(
                m.EventName.BIND_REFUSED, bdf=bdf, driver=driver, group_id=gid, reason=reason
            )

    # ------------------------------------------------------------------ device requests
    def _watch_requests(self, lease: Lease) -> None:
        """Register an eventfd on each leased device's REQ irq and watch it on the loop.

        vfio-pci's remove path (drivers/vfio/vfio_main.c vfio_unregister_group_dev)
        waits until every fd of the device is closed and meanwhile signals this irq
        (vfio_pci_core_request); the remove uevent only comes after, so this is the
        daemon's only timely news of a hot-unplug of a device it handed out.
        """
        loop = asyncio.get_running_loop()
        for ld in lease.devices:
            efd = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            try:
                ld.device.set_irq_eventfd(VFIO_PCI_REQ_IRQ_INDEX, efd.fileno())
            except KernelError as exc:
                efd.close()
                log.warning("device.request_irq_unavailable", bdf=ld.bdf, errno=exc.errno)
                continue
            ld.request_fd = efd
            loop.add_reader(efd.fileno(), self._device_requested, lease, ld)

    def _device_requested(self, lease: Lease, ld: LeasedDevice) -> None:
        fd = ld.request_fd
        if fd is None or fd.closed:
            return
        try:
            os.eventfd_read(fd.fileno())
        except BlockingIOError:
            return
        log.warning(
            "device.removal_requested",
            bdf=ld.bdf,
            lease_id=lease.lease_id,
            group_id=lease.group_id,
            session=lease.session.session_id,
        )
        self._spawn(self._give_back(lease, ld))

    async def _give_back(self, lease: Lease, ld: LeasedDevice) -> None:
        """The kernel wants the device back: revoke the lease, close our fds of it."""

        async def work() -> None:
            async with self._claims._lock:
                if lease.state is LeaseState.ACTIVE:
                    await self._revoke_locked(lease.group_id, DEVICE_REQUESTED)
                for dev in lease.devices:
                    if dev.bdf == ld.bdf:
                        close_request_fd(dev)
                        dev.device.close()

        await asyncio.shield(work())

    def publish(self, name: m.EventName, **fields: object) -> m.Event:
        """Publish a host event (the udev layer's hook); returns the event sent."""
        ev = self._hub.make(name, **fields)
        self._hub.publish(ev, [s.sink for s in self._sessions.values()])
        return ev


def _lease_info(lease: Lease) -> m.LeaseInfo:
    ident = lease.session.identity
    return m.LeaseInfo(
        lease_id=lease.lease_id,
        group_id=lease.group_id,
        uid=ident.uid,
        pid=ident.pid,
        backend=str(lease.backend),
        devices=tuple(d.bdf for d in lease.devices),
        ioas_id=lease.ioas.ioas_id,
    )


__all__ = ["Broker", "Outcome", "Session"]
