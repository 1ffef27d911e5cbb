"""One client connection: glue between a SEQPACKET socket, the protocol and the broker.

The handler reads datagrams (fds owned from arrival), admits them through the sans-I/O
``ServerConnection`` (hello, version, in-flight limit, error counting), runs each
request in its own task in the connection's TaskGroup (so requests pipeline and replies
may leave out of order, matched by id), sends replies with their fds, and forwards the
broker's events. It decides nothing about devices, policy or quotas: that is the
broker's job. It answers ``hello`` itself (the handshake is about the connection, not
about kernel state). The broker queues every event for every session; which ones are
sent is the connection state's decision (``ServerConnection``: the subscription, and a
lease holder's own lease_revoked, which the queued item marks ``for_holder``).

Failure rules: an ``IommudError`` from the broker becomes an ``ErrorReply`` with its code
and details; a protocol violation becomes the ``ProtocolError``'s reply and, once the
client has broken the rules too often, closes the connection; anything else is a bug:
it is logged with its traceback and closes this one connection, never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import JsonValue, TypeAdapter, ValidationError

from iommud.broker import Outcome
from iommud.errors import IommudError
from iommud.fds import FdSet, OwnedFd
from iommud.policy import Identity
from iommud.protocol.connection import ServerConnection
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import DEFAULT_LIMITS, MAX_TEXT, Limits
from iommud.protocol.messages import (
    ErrorReply,
    Event,
    Hello,
    HelloReply,
    Reply,
    Request,
)
from iommud.protocol.v2 import ReplyV2
from iommud.transport import (
    Datagram,
    PeerCredentials,
    open_peer_pidfd,
    peer_credentials,
    recv_datagram,
    send_datagram,
)

log = structlog.get_logger(__name__)

_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
_JSON: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])


class QueuedEvent(Protocol):
    """One item of a session's event queue (``iommud.broker.events.Delivery``)."""

    @property
    def event(self) -> Event: ...
    @property
    def for_holder(self) -> bool: ...


class EventQueue(Protocol):
    """The consuming end of a session's event queue."""

    async def get(self) -> QueuedEvent: ...


class BrokerAPI(Protocol):
    """The part of ``iommud.broker.Broker`` the server uses (structural, for tests)."""

    def open_session(self, identity: Identity, *, pidfd: OwnedFd | None = None) -> Any: ...
    async def close_session(self, session: Any) -> None: ...
    async def handle(self, session: Any, request: Request, fds: FdSet) -> Outcome: ...
    def events(self, session: Any) -> EventQueue: ...


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ``hello_reply`` announces."""

    name: str = "iommud"
    capabilities: tuple[str, ...] = ()
    limits: Limits = DEFAULT_LIMITS
    send_timeout: float = 10.0
    """A client that does not drain its socket for this long is disconnected."""


class HandlerCrashedError(Exception):
    """A non-IommudError escaped the broker: a bug, this connection is closed."""


@dataclass(eq=False)
class ConnectionHandler:
    """Serves one accepted socket until EOF, a fatal violation, or ``drain()``."""

    sock: socket.socket
    broker: BrokerAPI
    info: ServerInfo = field(default_factory=ServerInfo)
    on_close: Callable[[ConnectionHandler], None] | None = None
    proto: ServerConnection = field(init=False)
    peer: PeerCredentials | None = field(init=False, default=None)
    _send_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _draining: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _requests: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _log: Any = field(init=False, default=log)

    def __post_init__(self) -> None:
        self.proto = ServerConnection(max_inflight=self.info.limits.max_inflight)

    def drain(self) -> None:
        """Stop reading new requests; in-flight ones finish (the server bounds the wait)."""
        self._draining.set()

    @property
    def inflight(self) -> int:
        return len(self._requests)

    async def run(self) -> None:
        """Serve the connection; never raises except on cancellation."""
        try:
            await self._run()
        except* HandlerCrashedError:
            pass  # already logged with its traceback
        except* OSError as io_errors:
            for io_exc in io_errors.exceptions:
                self._log.info("connection.io_error", error=str(io_exc))
        except* Exception as bugs:
            for bug in bugs.exceptions:
                self._log.error("connection.crashed", exc_info=bug)
        finally:
            self.proto.close()
            self.sock.close()
            if self.on_close is not None:
                self.on_close(self)

    async def _run(self) -> None:
        self.sock.setblocking(False)
        creds = peer_credentials(self.sock)
        self.peer = creds
        self._log = log.bind(peer_pid=creds.pid, peer_uid=creds.uid, peer_gid=creds.gid)
        identity = Identity(
            uid=creds.uid, gid=creds.gid, groups=frozenset(creds.groups), pid=creds.pid
        )
        pidfd = open_peer_pidfd(self.sock, creds.pid)
        try:
            session = self.broker.open_session(identity, pidfd=pidfd)
        except BaseException:
            if pidfd is not None:
                pidfd.close()
            raise
        self._log.info("connection.opened", has_pidfd=pidfd is not None)
        try:
            async with asyncio.TaskGroup() as tg:
                pump = tg.create_task(self._pump_events(session))
                await self._read_loop(tg, session)
                # EOF or drain: let in-flight requests finish, then stop the pump.
                if self._requests:
                    await asyncio.wait(set(self._requests))
                pump.cancel()
        finally:
            # Releasing kernel resources must not be cut short by a cancellation.
            await asyncio.shield(self.broker.close_session(session))
            self._log.info("connection.closed", errors=self.proto.error_count)

    async def _read_loop(self, tg: asyncio.TaskGroup, session: Any) -> None:
        limits = self.info.limits
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            while not self._draining.is_set():
                # Room for one fd more than allowed: a datagram with too many is
                # then refused by the codec, with its id (the kernel closes the rest).
                recv = asyncio.ensure_future(
                    recv_datagram(self.sock, limits.max_datagram, limits.max_fds + 1)
                )
                done, _ = await asyncio.wait({recv, draining}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        dgram = await recv  # it may have completed just now: own its fds
                        if dgram is not None:
                            dgram.fds.close()
                    return
                dgram = recv.result()
                if dgram is None:
                    return
                if not await self._admit(tg, session, dgram):
                    self._log.warning("connection.too_many_errors", errors=self.proto.error_count)
                    return
        finally:
            draining.cancel()

    async def _admit(self, tg: asyncio.TaskGroup, session: Any, dgram: Datagram) -> bool:
        """Turn one datagram into a running request, or reply with its error.

        Returns False when the connection must be closed for repeated violations.
        """
        fds = dgram.fds
        try:
            request = self._receive(dgram)
        except ProtocolError as exc:
            fds.close()
            self._log.info("request.rejected", code=str(exc.code), reason=exc.message)
            await self._send(*self.proto.send_error(exc), [])
            return not self.proto.should_close
        except BaseException:
            fds.close()
            raise
        task = tg.create_task(self._serve(session, request, fds))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return True

    def _receive(self, dgram: Datagram) -> Request:
        error = _transport_error(dgram, self.info.limits)
        if error is not None:
            self.proto.error_count += 1  # counts toward should_close like any violation
            raise error
        return self.proto.receive(dgram.data, len(dgram.fds))

    async def _serve(self, session: Any, request: Request, fds: FdSet) -> None:
        out_fds: Sequence[OwnedFd] = ()
        try:
            with fds:
                try:
                    reply: Reply | ReplyV2 | ErrorReply
                    if isinstance(request, Hello):
                        reply = self._hello_reply(request)
                    else:
                        outcome = await self.broker.handle(session, request, fds)
                        reply, out_fds = outcome.reply, outcome.fds
                except IommudError as exc:
                    reply = _error_reply(request.id, exc)
                    self._log.info(
                        "request.failed", op=request.op, id=request.id, code=str(exc.code)
                    )
                except Exception as exc:
                    self._log.exception("request.crashed", op=request.op, id=request.id)
                    raise HandlerCrashedError(request.op) from exc
            await self._send_reply(reply, out_fds)
        finally:
            for fd in out_fds:
                fd.close()  # the client has its own copies now (or never will)

    def _hello_reply(self, hello: Hello) -> HelloReply:
        self._log.info("connection.hello", client=hello.client, version=hello.version)
        capabilities = self.info.capabilities
        if hello.version >= 2 and "iommufd" in capabilities:
            # v2's delegated claims hand out /dev/iommu and cdev fds: iommufd hosts only
            capabilities = (*capabilities, "delegate")
        return HelloReply(
            id=hello.id,
            version=hello.version,
            server=self.info.name,
            capabilities=capabilities,
            limits=self.info.limits,
        )

    async def _send_reply(
        self, reply: Reply | ReplyV2 | ErrorReply, fds: Sequence[OwnedFd]
    ) -> None:
        try:
            data, nfds = self.proto.send_reply(reply)
        except ProtocolError as exc:  # the reply itself is too big to send
            self._log.error("reply.unsendable", op=reply.op, reason=exc.message)
            data, nfds = self.proto.send_reply(
                ErrorReply(id=reply.id, code=exc.code, message=exc.message, details=exc.details)
            )
            fds = ()
        if nfds != len(fds):
            raise HandlerCrashedError(f"{reply.op}: declares {nfds} fds, broker gave {len(fds)}")
        await self._send(data, nfds, [fd.fileno() for fd in fds])

    async def _pump_events(self, session: Any) -> None:
        queue = self.broker.events(session)
        while True:
            item = await queue.get()
            out = self.proto.send_event(item.event, for_holder=item.for_holder)
            if out is not None:
                await self._send(out[0], out[1], [])

    async def _send(self, data: bytes, nfds: int, fds: list[int]) -> None:
        """Send one datagram; a vanished peer is not an error (EOF follows on read)."""
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.info.send_timeout):
                    await send_datagram(self.sock, data, fds)
            except TimeoutError:
                self._log.warning("connection.send_timeout", timeout=self.info.send_timeout)
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    raise
                self._log.debug("connection.peer_gone", error=str(exc))


def _transport_error(dgram: Datagram, limits: Limits) -> ProtocolError | None:
    """A violation visible before parsing: stray control data, too many fds, too big."""
    if dgram.foreign_cmsgs:
        kinds: list[JsonValue] = [[lvl, kind] for lvl, kind in dgram.foreign_cmsgs]
        return ProtocolError(
            ErrorCode.BAD_REQUEST, "unexpected control message", details={"cmsgs": kinds}
        )
    if dgram.truncated:
        return ProtocolError(
            ErrorCode.LIMIT_REACHED,
            "datagram exceeds the size limit",
            details={"size": dgram.size, "max_datagram": limits.max_datagram},
        )
    if dgram.ctrunc and len(dgram.fds) <= limits.max_fds:
        # not the fds (the buffer holds one more than allowed): other control data
        return ProtocolError(
            ErrorCode.LIMIT_REACHED,
            "control data truncated",
            details={"received": len(dgram.fds), "max_fds": limits.max_fds},
        )
    return None  # more than max_fds: the codec refuses it, with the request's id


def _error_reply(request_id: int, exc: IommudError) -> ErrorReply:
    try:
        details = _JSON.validate_python(exc.details)
    except ValidationError:
        details = {"repr": repr(exc.details)[:1024]}
    return ErrorReply(id=request_id, code=exc.code, message=exc.message[:MAX_TEXT], details=details)
