"""The accept loop: one ``ConnectionHandler`` task per client, and a bounded shutdown.

``Server.serve()`` accepts on every listening socket until ``stop()`` is called, then
stops accepting, lets each connection finish its in-flight requests for at most
``grace`` seconds, cancels what is left, and returns once every connection has closed
its broker session. It owns the listening sockets and the accepted ones; it never
touches the broker's state except through the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence

import structlog

from iommud.server.handler import BrokerAPI, ConnectionHandler, ServerInfo

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
        self.accepted = 0

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
            self.accepted += 1
            handler = ConnectionHandler(conn, self.broker, self.info, on_close=self._forget)
            self._handlers[handler] = tg.create_task(handler.run())

    def _forget(self, handler: ConnectionHandler) -> None:
        with contextlib.suppress(KeyError):
            del self._handlers[handler]
