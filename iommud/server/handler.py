"""One client connection: glue between a SEQPACKET socket, the protocol and the broker.

The handler reads datagrams (fds owned from arrival), admits them through the sans-I/O
``ServerConnection`` (hello, version, in-flight limit, error counting), runs each
request's first step inline and, if it has to wait, the rest as a task in the
connection's TaskGroup (so requests pipeline and replies may leave out of order, matched
by id), hands replies with their fds to the connection's ``Outbox``, and forwards the
broker's events. What a connection may make the daemon hold is bounded
(``ConnectionLimits``): a request counts against max_inflight until its reply is sent,
reading pauses while unsent output or received fds pass their budgets, a peer that
never says hello or idles holding nothing is closed, and a peer that leaves has its
read-only requests cancelled. It decides nothing about devices, policy or quotas: that is the
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
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
from pydantic import JsonValue, TypeAdapter, ValidationError

from iommud.broker import Outcome
from iommud.eager import resume
from iommud.errors import IommudError
from iommud.fds import FdSet, OwnedFd
from iommud.policy import Identity
from iommud.protocol.codec import printable
from iommud.protocol.connection import ServerConnection, State
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
from iommud.server.outbox import Outbox
from iommud.transport import (
    Datagram,
    PeerCredentials,
    open_peer_pidfd,
    peer_credentials,
    recv_datagram_nowait,
)

log = structlog.get_logger(__name__)

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
    def holds_resources(self, session: Any) -> bool: ...


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one connection may make the daemon hold, and how long it may dawdle
    (PROTOCOL.md section 10; ``[connections]`` in the config)."""

    max_total: int = 1024
    """Connections served at once; more are answered ``limit_reached`` and closed."""
    max_per_uid: int = 64
    """Connections of one uid at once (so one user cannot lock the others out)."""
    hello_timeout: float = 10.0
    """A connection that has not completed hello after this long is closed."""
    idle_timeout: float = 600.0
    """A connection with nothing in flight, no request for this long and no leases,
    IOASes or event subscription is closed."""
    send_timeout: float = 10.0
    """A client that does not drain its socket for this long is disconnected."""
    max_unsent_bytes: int = 256 * 1024
    """Reading a connection's requests (and pulling its events) pauses while replies and
    events waiting for the socket exceed this. Together with ``max_inflight`` it bounds
    what one connection holds: at most this plus max_inflight replies (each at most
    max_datagram) plus one event."""
    max_held_fds: int = 64
    """Received fds of a connection's unfinished requests; reading pauses above this
    less max_fds, so at most this many are held."""
    fd_reserve: int = 256
    """fds the daemon keeps for its own work (claims, sysfs, journal): connections are
    refused while RLIMIT_NOFILE less what connections may hold leaves fewer."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ``hello_reply`` announces, and the per-connection limits the server enforces."""

    name: str = "iommud"
    capabilities: tuple[str, ...] = ()
    limits: Limits = DEFAULT_LIMITS
    connections: ConnectionLimits = ConnectionLimits()


class HandlerCrashedError(Exception):
    """A non-IommudError escaped the broker: a bug, this connection is closed."""


READ_ONLY_OPS: Final = frozenset(
    {"hello", "ping", "status", "list_devices", "list_groups", "iova_ranges", "subscribe"}
)
"""Requests that change no kernel or broker state: cancelled when their peer leaves."""


@dataclass(eq=False)
class ConnectionHandler:
    """Serves one accepted socket until EOF, a fatal violation, a timeout, or ``drain()``.

    The read loop waits on the loop's reader callback for its own socket (no task per
    datagram): it reads one datagram per wake, admits it (hello, limits, decode) and
    runs the request's first step inline; a request that waits goes on as a task. It
    pauses while the outbox is over its budget or the requests hold too many received
    fds, and resumes when either drops.
    """

    sock: socket.socket
    broker: BrokerAPI
    info: ServerInfo = field(default_factory=ServerInfo)
    on_close: Callable[[ConnectionHandler], None] | None = None
    peer: PeerCredentials | None = None
    proto: ServerConnection = field(init=False)
    _outbox: Outbox = field(init=False)
    _stopping: str | None = field(init=False, default=None)
    _wake: asyncio.Future[None] | None = field(init=False, default=None)
    _pump_wake: asyncio.Future[None] | None = field(init=False, default=None)
    _requests: dict[asyncio.Task[None], str] = field(init=False, default_factory=dict)
    _held_fds: int = field(init=False, default=0)
    _cancelled: int = field(init=False, default=0)
    _pauses: int = field(init=False, default=0)
    _watching: bool = field(init=False, default=False)
    _last_request: float = field(init=False, default=0.0)
    _timer: asyncio.TimerHandle | None = field(init=False, default=None)
    _session: Any = field(init=False, default=None)
    _loop: asyncio.AbstractEventLoop = field(init=False)
    _log: Any = field(init=False, default=log)

    def __post_init__(self) -> None:
        self.proto = ServerConnection(max_inflight=self.info.limits.max_inflight)

    def drain(self) -> None:
        """Stop reading new requests; in-flight ones finish (the server bounds the wait)."""
        self._stop("drain")

    @property
    def inflight(self) -> int:
        return len(self._requests)

    @property
    def unsent_bytes(self) -> int:
        return self._outbox.unsent_bytes if hasattr(self, "_outbox") else 0

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
            if self._timer is not None:
                self._timer.cancel()
            if hasattr(self, "_outbox"):
                self._outbox.close()
            self.proto.close()
            self.sock.close()
            if self.on_close is not None:
                self.on_close(self)

    async def _run(self) -> None:
        self.sock.setblocking(False)
        creds = self.peer if self.peer is not None else peer_credentials(self.sock)
        self.peer = creds
        self._log = log.bind(peer_pid=creds.pid, peer_uid=creds.uid, peer_gid=creds.gid)
        identity = Identity(
            uid=creds.uid, gid=creds.gid, groups=frozenset(creds.groups), pid=creds.pid
        )
        limits = self.info.connections
        self._outbox = Outbox(
            self.sock,
            budget=limits.max_unsent_bytes,
            send_timeout=limits.send_timeout,
            on_stall=self._stop,
            on_drained=self._poke,
        )
        self._loop = loop = asyncio.get_running_loop()
        self._last_request = loop.time()
        self._timer = loop.call_later(limits.hello_timeout, self._hello_expired)
        pidfd = open_peer_pidfd(self.sock, creds.pid)
        try:
            session = self.broker.open_session(identity, pidfd=pidfd)
        except BaseException:
            if pidfd is not None:
                pidfd.close()
            raise
        self._session = session
        self._log.info("connection.opened", has_pidfd=pidfd is not None)
        try:
            async with asyncio.TaskGroup() as tg:
                pump = tg.create_task(self._pump_events(session))
                await self._read_loop(tg, session)
                if self._stopping not in ("drain", "too_many_errors"):
                    # The peer left (or was cut off): nobody will read what read-only
                    # requests would answer, so they stop here; the rest finish.
                    for task, op in self._requests.items():
                        if op in READ_ONLY_OPS:
                            self._cancelled += task.cancel()
                if self._requests:
                    await asyncio.wait(set(self._requests))
                pump.cancel()
                # Let the replies out (a peer that does not read is cut off by the
                # outbox's send_timeout; one that left fails the send at once).
                while not (self._outbox.is_empty or self._outbox.is_dead):
                    await self._wait(readable=False)
        finally:
            # Releasing kernel resources must not be cut short by a cancellation.
            await asyncio.shield(self.broker.close_session(session))
            self._log.info(
                "connection.closed",
                errors=self.proto.error_count,
                reason=self._stopping or "eof",
                peak_unsent=self._outbox.peak_bytes,
                cancelled=self._cancelled,
            )

    # ------------------------------------------------------------------ reading

    def _poke(self) -> None:
        """Wake the read loop (and the event pump) to look at their conditions again."""
        for wake in (self._wake, self._pump_wake):
            if wake is not None and not wake.done():
                wake.set_result(None)

    def _stop(self, reason: str) -> None:
        """End the connection: no more reading; a cut-off peer's socket is shut down."""
        if self._stopping is None:
            self._stopping = reason
        if reason != "drain":
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self._poke()

    def _must_pause(self) -> bool:
        limits = self.info.connections
        return (
            self._outbox.is_over_budget
            or self._held_fds > limits.max_held_fds - self.info.limits.max_fds
        )

    def _watch_readable(self, on: bool) -> None:
        # The reader stays registered while the loop reads (one epoll_ctl per pause,
        # not two per datagram); it is removed while paused, so a peer whose data we
        # leave unread does not wake the loop over and over.
        if on != self._watching:
            loop = asyncio.get_running_loop()
            if on:
                loop.add_reader(self.sock.fileno(), self._poke)
            else:
                loop.remove_reader(self.sock.fileno())
            self._watching = on

    async def _wait(self, *, readable: bool) -> None:
        self._watch_readable(readable)
        self._wake = wake = self._loop.create_future()
        try:
            await wake
        finally:
            self._wake = None

    async def _read_loop(self, tg: asyncio.TaskGroup, session: Any) -> None:
        try:
            await self._read_datagrams(tg, session)
        finally:
            if self.sock.fileno() >= 0:
                self._watch_readable(False)

    async def _read_datagrams(self, tg: asyncio.TaskGroup, session: Any) -> None:
        limits = self.info.limits
        while self._stopping is None:
            if self._must_pause():
                self._pauses += 1
                if self._pauses & (self._pauses - 1) == 0:  # 1, 2, 4, ...: logs stay few
                    self._log.info(
                        "connection.backpressure",
                        unsent=self._outbox.unsent_bytes,
                        held_fds=self._held_fds,
                        pauses=self._pauses,
                    )
                await self._wait(readable=False)
                continue
            # One datagram per wake of the (level-triggered) reader: every connection
            # with data gets its turn in each loop iteration, as with one recv task each.
            await self._wait(readable=True)
            if self._stopping is not None or self._must_pause():
                continue
            try:
                # Room for one fd more than allowed: a datagram with too many is then
                # refused by the codec, with its id (the kernel closes the rest).
                dgram = recv_datagram_nowait(self.sock, limits.max_datagram, limits.max_fds + 1)
            except (BlockingIOError, InterruptedError):
                continue
            if dgram is None:
                return
            if self._stopping is not None:  # stopped while this datagram arrived
                dgram.fds.close()
                return
            if not self._admit(tg, session, dgram):
                self._log.warning("connection.too_many_errors", errors=self.proto.error_count)
                self._stopping = "too_many_errors"  # no more reading; replies still go out
                return

    def _admit(self, tg: asyncio.TaskGroup, session: Any, dgram: Datagram) -> bool:
        """Turn one datagram into a running request, or reply with its error.

        Returns False when the connection must be closed for repeated violations.
        """
        fds = dgram.fds
        try:
            request = self._receive(dgram)
        except ProtocolError as exc:
            fds.close()
            self._log.info("request.rejected", code=str(exc.code), reason=exc.message)
            self._outbox.send(self.proto.send_error(exc)[0])
            return not self.proto.should_close
        except BaseException:
            fds.close()
            raise
        self._last_request = self._loop.time()
        # The request's first step runs here, inline, as Python 3.12's eager tasks do:
        # most answers (ping, status, a list page, a map) never wait, and then no task
        # is made at all. One that waits continues as a task of the connection.
        coro = self._serve(session, request, fds)
        try:
            step = coro.send(None)
        except StopIteration:
            return True
        nfds = len(fds)
        self._held_fds += nfds
        task = tg.create_task(resume(coro, step))
        self._requests[task] = request.op
        task.add_done_callback(lambda t: self._finished(t, nfds))
        return True

    def _finished(self, task: asyncio.Task[None], nfds: int) -> None:
        del self._requests[task]
        self._held_fds -= nfds
        if nfds:
            self._poke()

    def _receive(self, dgram: Datagram) -> Request:
        if dgram.ctrunc and not dgram.foreign_cmsgs and len(dgram.fds) <= self.info.limits.max_fds:
            # Room was left in the buffer (it holds max_fds + 1), so the kernel dropped
            # fds it could not install (scm_detach_fds: the daemon is out of fds), not
            # the peer's fault.
            self._log.error("connection.fds_dropped", received=len(dgram.fds))
            raise ProtocolError(
                ErrorCode.LIMIT_REACHED,
                "the daemon is out of file descriptors; try again later",
                details={"daemon_fds_exhausted": True},
            )
        error = _transport_error(dgram, self.info.limits)
        if error is not None:
            self.proto.error_count += 1  # counts toward should_close like any violation
            raise error
        return self.proto.receive(dgram.data, len(dgram.fds))

    # ------------------------------------------------------------------ timers

    def _hello_expired(self) -> None:
        self._timer = None
        if self.proto.state is not State.AWAIT_HELLO:
            self._arm_idle()
            return
        self._log.info("connection.hello_timeout", timeout=self.info.connections.hello_timeout)
        self._stop("hello_timeout")

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._last_request + self.info.connections.idle_timeout
        self._timer = loop.call_at(max(due, loop.time()), self._idle_check)

    def _idle_check(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        timeout = self.info.connections.idle_timeout
        if (
            loop.time() - self._last_request >= timeout
            and not self._requests
            and self._outbox.is_empty
            and not self.proto.is_subscribed
            and not self.broker.holds_resources(self._session)
        ):
            self._log.info("connection.idle_timeout", timeout=timeout)
            self._stop("idle_timeout")
            return
        if self._last_request + timeout <= loop.time():
            self._last_request = loop.time()  # busy or holding: look again a period later
        self._arm_idle()

    # ------------------------------------------------------------------ serving

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
        except BaseException:
            for fd in out_fds:
                fd.close()  # never handed to the outbox
            raise
        self._send_reply(reply, out_fds)  # the outbox owns (and closes) them now

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

    def _send_reply(self, reply: Reply | ReplyV2 | ErrorReply, fds: Sequence[OwnedFd]) -> None:
        try:
            data, nfds = self.proto.send_reply(reply, until_sent=True)
        except ProtocolError as exc:  # the reply itself is too big to send
            self._log.error("reply.unsendable", op=reply.op, reason=exc.message)
            for fd in fds:
                fd.close()
            fds = ()
            data, nfds = self.proto.send_reply(
                ErrorReply(id=reply.id, code=exc.code, message=exc.message, details=exc.details),
                until_sent=True,
            )
        if nfds != len(fds):
            self.proto.reply_sent()
            for fd in fds:
                fd.close()
            raise HandlerCrashedError(f"{reply.op}: declares {nfds} fds, broker gave {len(fds)}")
        self._outbox.send(data, fds, self.proto.reply_sent)

    async def _pump_events(self, session: Any) -> None:
        queue = self.broker.events(session)
        while True:
            while self._outbox.is_over_budget:
                self._pump_wake = asyncio.get_running_loop().create_future()
                try:
                    await self._pump_wake
                finally:
                    self._pump_wake = None
            item = await queue.get()
            out = self.proto.send_event(item.event, for_holder=item.for_holder)
            if out is not None:
                self._outbox.send(out[0])


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
    # MSG_CTRUNC with room left (at most max_fds of max_fds + 1) was answered before this
    # (ConnectionHandler._receive: the daemon is out of fds). What is left: more than
    # max_fds, which the codec refuses with the request's id.
    return None


def _error_reply(request_id: int, exc: IommudError) -> ErrorReply:
    try:
        details = _JSON.validate_python(exc.details)
    except ValidationError:
        details = {"repr": repr(exc.details)[:1024]}
    message = printable(exc.message, MAX_TEXT)
    assert isinstance(message, str)
    return ErrorReply(id=request_id, code=exc.code, message=message, details=details)
