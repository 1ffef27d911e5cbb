"""The accept loop: one ``ConnectionHandler`` task per client, and a bounded shutdown.

``Server.serve()`` accepts on every listening socket until ``stop()`` is called, then
stops accepting, lets each connection finish its in-flight requests for at most
``grace`` seconds, cancels what is left, and returns once every connection has closed
its broker session. It owns the listening sockets and the accepted ones; it never
touches the broker's state except through the handlers.

Admission (``ConnectionLimits``): a connection past the per-uid limit, the total limit,
or the number the daemon's fds allow (RLIMIT_NOFILE less ``fd_reserve``, at what one
connection may hold: its socket, its peer's pidfd and ``max_held_fds`` received fds) is
answered with one ``limit_reached`` error (id null) and closed at once, so a peer that
opens connections by the thousand neither starves other uids nor leaves the daemon
without fds for its own work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import resource
import socket
from collections.abc import Callable, Sequence

import structlog

from iommud.protocol.codec import encode_error
from iommud.protocol.errors import ErrorCode
from iommud.protocol.messages import ErrorReply
from iommud.server.handler import BrokerAPI, ConnectionHandler, ServerInfo
from iommud.transport import peer_credentials

log = structlog.get_logger(__name__)


class Server:
    """Serves ``broker`` on ``listeners`` (already bound and listening, non-blocking)."""

    def __init__(
        self,
        broker: BrokerAPI,
        listeners: Sequence[socket.socket],
        *,
        info: ServerInfo | None = None,
        grace: float = 5.0,
    ) -> None:
        self.broker = broker
        self.info = info or ServerInfo()
        self.grace = grace
        self._listeners = list(listeners)
        self._handlers: dict[ConnectionHandler, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._per_uid: collections.Counter[int] = collections.Counter()
        self.accepted = 0
        self.refused = 0
        limits = self.info.connections
        self.max_connections = min(limits.max_total, fd_budget(limits.fd_reserve, self.info))

    @property
    def connections(self) -> int:
        return len(self._handlers)

    def stop(self) -> None:
        """Ask ``serve()`` to shut down (idempotent, safe from a signal handler)."""
        self._stop.set()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Accept until ``stop()``; then drain and close everything. Returns when done."""
        try:
            async with asyncio.TaskGroup() as tg:
                accepters = [tg.create_task(self._accept_loop(tg, lst)) for lst in self._listeners]
                if on_ready is not None:
                    on_ready()
                await self._stop.wait()
                for task in accepters:
                    task.cancel()
                for lst in self._listeners:
                    lst.close()
                await self._drain()
        finally:
            for lst in self._listeners:
                lst.close()

    async def _drain(self) -> None:
        handlers = dict(self._handlers)
        log.info(
            "server.draining",
            connections=len(handlers),
            inflight=sum(h.inflight for h in handlers),
        )
        for handler in handlers:
            handler.drain()
        if not handlers:
            return
        _, pending = await asyncio.wait(handlers.values(), timeout=self.grace)
        if pending:
            log.warning("server.grace_expired", cancelled=len(pending), grace=self.grace)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    async def _accept_loop(self, tg: asyncio.TaskGroup, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning; never give up serving.
                log.warning("server.accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            try:
                peer = peer_credentials(conn)
            except OSError as exc:
                log.info("server.peer_unknown", error=str(exc))
                conn.close()
                continue
            refusal = self._refusal(peer.uid)
            if refusal is not None:
                self._refuse(conn, peer.uid, refusal)
                continue
            self.accepted += 1
            self._per_uid[peer.uid] += 1
            handler = ConnectionHandler(
                conn, self.broker, self.info, on_close=self._forget, peer=peer
            )
            self._handlers[handler] = tg.create_task(handler.run())

    def _refusal(self, uid: int) -> ErrorReply | None:
        limits = self.info.connections
        if self._per_uid[uid] >= limits.max_per_uid:
            return ErrorReply(
                id=None,
                code=ErrorCode.LIMIT_REACHED,
                message="too many connections for this uid",
                details={"max_connections_per_uid": limits.max_per_uid},
            )
        if len(self._handlers) >= self.max_connections:
            return ErrorReply(
                id=None,
                code=ErrorCode.LIMIT_REACHED,
                message="too many connections",
                details={"max_connections": self.max_connections},
            )
        return None

    def _refuse(self, conn: socket.socket, uid: int, reply: ErrorReply) -> None:
        """Say why in one datagram (best effort, never waits) and close."""
        self.refused += 1
        with conn:
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(encode_error(reply)[0])
        if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, 8, ...: a flood logs little
            log.warning(
                "server.connection_refused",
                uid=uid,
                reason=reply.message,
                refused=self.refused,
                connections=len(self._handlers),
            )

    def _forget(self, handler: ConnectionHandler) -> None:
        with contextlib.suppress(KeyError):
            del self._handlers[handler]
        if handler.peer is not None:
            self._per_uid[handler.peer.uid] -= 1
            if self._per_uid[handler.peer.uid] <= 0:
                del self._per_uid[handler.peer.uid]


def fd_budget(reserve: int, info: ServerInfo) -> int:
    """How many connections RLIMIT_NOFILE allows once ``reserve`` fds are kept back."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return info.connections.max_total
    per_connection = 2 + info.connections.max_held_fds  # socket, pidfd, received fds
    return max(1, (soft - reserve) // per_connection)
