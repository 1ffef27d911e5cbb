"""Sessions: one per connection, and their teardown.

Opens a session (its quota, its event sink, a watch on the peer's pidfd) and tears it
down on disconnect, on the peer exiting (the pidfd turns readable even if the socket
lingers) or at daemon stop. Teardown always blocks DMA first (unmap every IOAS, detach
every device), then releases the leases (reset, close the daemon's fds, start the driver
restores; a delegated lease's remaining holders are killed first,
iommud.broker.revocation), then frees the IOASes and the session's /dev/iommu. It holds
the session's lock and the claim lock, is shielded from cancellation, and keeps going
past one failed step (logged). It waits for the driver restores only outside the locks, and bounded.

Decides nothing about ownership beyond giving it up; never touches sockets.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from typing import Any

import structlog

from iommud.broker.claim import ClaimManager
from iommud.broker.events import EventSink
from iommud.broker.revocation import Revoker
from iommud.broker.state import BrokerState, Session
from iommud.errors import KernelError
from iommud.fds import OwnedFd
from iommud.policy import Identity, check_ioas, quota_for

log = structlog.get_logger(__name__)


async def quietly(what: str, coro: Coroutine[Any, Any, object]) -> None:
    """Teardown keeps going past one failed step; the failure is logged."""
    try:
        await coro
    except KernelError as exc:
        log.exception("session.teardown_step_failed", step=what, op=exc.op, errno=exc.errno)


class SessionManager:
    """Opens sessions and tears them down (see the module docstring)."""

    def __init__(self, state: BrokerState, claims: ClaimManager, revoker: Revoker) -> None:
        self._state = state
        self._config = state.config
        self._claims = claims
        self._revoker = revoker
        self._ioas = state.ioas
        self._ids = itertools.count(1)

    @property
    def sessions(self) -> dict[int, Session]:
        """The open sessions by id (``BrokerState.sessions``; changed only here)."""
        return self._state.sessions

    def open(self, identity: Identity, *, pidfd: OwnedFd | int | None = None) -> Session:
        """A session for a new connection. Takes ownership of ``pidfd``: when the peer
        exits (the pidfd turns readable) the session is torn down even if the socket
        lingers."""
        owned = OwnedFd(pidfd) if isinstance(pidfd, int) else pidfd
        sid = next(self._ids)
        session = Session(
            session_id=sid,
            identity=identity,
            quota=quota_for(self._config, identity),
            sink=EventSink(session_id=sid),
            pidfd=owned,
            may_use_ioas=check_ioas(self._config, identity).allowed,
        )
        self.sessions[session.session_id] = session
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
        self._state.spawn(self.close(session))

    def _stop_watching(self, session: Session) -> None:
        if session.pidfd is not None and not session.pidfd.closed:
            asyncio.get_running_loop().remove_reader(session.pidfd.fileno())

    async def close(self, session: Session) -> None:
        """Tear a session down (idempotent; concurrent callers wait for the first)."""
        if session.closing:
            await session.closed.wait()
            return
        session.closing = True
        await asyncio.shield(self._teardown(session))

    async def close_all(self) -> None:
        """Tear every session down; their bounded waits for restores overlap."""
        await asyncio.gather(*(self.close(s) for s in list(self.sessions.values())))

    async def _teardown(self, session: Session) -> None:
        released = [lease.group_id for lease in session.leases.values()]
        try:
            await self._teardown_locked(session)
        finally:
            # Outside the lock, bounded: the drivers usually come back within a second;
            # a restore stalled by a lingering fd goes on in the background.
            try:
                await self._claims.wait_restored(released, self._state.sysfs_timeout)
            finally:
                session.closed.set()
                log.info("session.closed", session=session.session_id)

    async def _teardown_locked(self, session: Session) -> None:
        try:
            async with session.lock, self._claims.held():
                # 1. Block DMA: unmap every IOAS, detach every device.
                for ioas in list(session.ioases.values()):
                    await quietly("ioas.unmap_all", self._ioas.unmap_all(session, ioas))
                for lease in list(session.leases.values()):
                    await quietly(
                        "lease.block_dma", self._claims.block_dma(lease, drop_shared_container=True)
                    )
                # 2. Reset and close devices, restore drivers (per lease). A delegated
                # lease's devices may still be held by its VMM (the launcher died,
                # QEMU lives): nobody is left to tell, so they are enforced at once.
                for lease in list(session.leases.values()):
                    if lease.is_delegated:
                        await quietly("lease.enforce", self._revoker.end_locked(lease))
                    else:
                        await quietly(
                            "lease.release", self._claims.release_lease(lease, why="disconnect")
                        )
                # 3. Free the IOASes and the session's /dev/iommu.
                for ioas in list(session.ioases.values()):
                    await quietly("ioas.destroy", self._ioas.destroy(session, ioas, force=True))
                if session.iommufd is not None:
                    session.iommufd.close()
                    session.iommufd = None
        finally:
            self._stop_watching(session)
            if session.pidfd is not None:
                session.pidfd.close()
            self.sessions.pop(session.session_id, None)
