"""Per-connection protocol state machines, server side and client side (h11-style).

``ServerConnection`` turns received datagrams into validated requests and enforces
the rules that need memory of the connection: hello first, a supported version,
at most MAX_INFLIGHT unanswered requests (a request counts until its reply has left:
``send_reply(..., until_sent=True)`` keeps its slot taken until ``reply_sent()``, so
replies waiting for a slow reader stay bounded too), no reuse of an id that is in flight,
events only after hello and only those the client subscribed to (the subscription is
this connection's state and lives nowhere else), except a lease holder's own
lease_revoked, which always passes. It counts the
peer's protocol errors so the server can drop a client that keeps breaking the
rules (``should_close``).

``ClientConnection`` is the mirror the client library uses: it numbers requests,
matches replies to them and separates events.

Neither does any I/O: bytes and fd counts in, messages out; messages in, bytes and
fd counts out. Who owns the fds themselves is the transport's business.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeVar

from pydantic import JsonValue

from iommud.protocol.codec import decode_request, decode_server, encode, encode_error
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import LocalProtocolError, ProtocolError
from iommud.protocol.limits import (
    DEFAULT_LIMITS,
    MAX_INFLIGHT,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    U32_MAX,
    Limits,
)
from iommud.protocol.messages import (
    REPLY_TYPES,
    REQUEST_TYPES,
    ErrorReply,
    Event,
    EventName,
    Hello,
    HelloReply,
    LeaseRevoked,
    Reply,
    ReplyBase,
    Request,
    RequestBase,
    Subscribe,
    SubscribeReply,
)
from iommud.protocol.v2 import (
    REPLY_TYPES_V2,
    REQUEST_TYPES_V2,
    AnyServerMessage,
    LeaseEnforced,
    ReplyV2,
    downgrade_event,
)

_REQUESTS: Final[Mapping[int, Mapping[str, type[RequestBase]]]] = {
    1: REQUEST_TYPES,
    2: REQUEST_TYPES_V2,
}
_REPLIES: Final[Mapping[int, Mapping[str, type[ReplyBase]]]] = {1: REPLY_TYPES, 2: REPLY_TYPES_V2}

MAX_PROTOCOL_ERRORS: Final = 8
"""Protocol errors after which a server should close the connection."""


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # nothing but hello until hello_reply went out
    READY = "ready"
    CLOSED = "closed"


# The members as plain names for ClientConnection's per-request checks: an Enum member
# looked up on its class costs ten times a global's load (Python 3.11).
_AWAIT_HELLO: Final = State.AWAIT_HELLO
_READY: Final = State.READY
_CLOSED: Final = State.CLOSED


class ServerConnection:
    """The server's view of one client connection.

    Typical use::

        try:
            request = conn.receive(data, nfds)
        except ProtocolError as exc:
            send(conn.send_error(exc)); close fds
            if conn.should_close: close the socket
        ... later ...
        data, nfds = conn.send_reply(reply)   # or ErrorReply(id=request.id, ...)
    """

    def __init__(
        self,
        *,
        supported_versions: Iterable[int] = SUPPORTED_VERSIONS,
        max_inflight: int = MAX_INFLIGHT,
        max_errors: int = MAX_PROTOCOL_ERRORS,
    ) -> None:
        self._supported = frozenset(supported_versions)
        self._max_inflight = max_inflight
        self._max_errors = max_errors
        self._inflight: dict[int, RequestBase] = {}
        self._unsent = 0  # replies encoded with until_sent=True and not yet sent
        self._events: frozenset[EventName] | None = None
        self._groups: frozenset[int] | None = None
        self.state = State.AWAIT_HELLO
        self.version: int | None = None
        self.is_subscribed = False
        self.error_count = 0

    @property
    def inflight(self) -> Mapping[int, RequestBase]:
        """Requests received and not yet answered, by id."""
        return dict(self._inflight)

    @property
    def unanswered(self) -> int:
        """Slots taken: requests in flight plus replies encoded and not yet sent."""
        return len(self._inflight) + self._unsent

    @property
    def should_close(self) -> bool:
        """True once the peer has broken the protocol ``max_errors`` times."""
        return self.error_count >= self._max_errors

    # ----------------------------------------------------------------- inbound

    def receive(self, data: bytes, nfds: int) -> Request:
        """Decode and admit one request; raise ProtocolError to reject it.

        A rejected request is not in flight: answer it with ``send_error``.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("receive() on a closed connection")
        try:
            request = decode_request(data, nfds, self.version or 1)
            self._admit(request)
        except ProtocolError:
            self.error_count += 1
            raise
        self._inflight[request.id] = request
        return request

    def _admit(self, request: Request) -> None:
        if request.id in self._inflight:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "request id is already in flight",
                request_id=request.id,
                details={"id": request.id},
            )
        if len(self._inflight) + self._unsent >= self._max_inflight:
            raise ProtocolError(
                ErrorCode.LIMIT_REACHED,
                "too many requests in flight",
                request_id=request.id,
                details={"max_inflight": self._max_inflight},
            )
        if self.state is State.AWAIT_HELLO:
            if not isinstance(request, Hello) or self._inflight:
                raise ProtocolError(
                    ErrorCode.INVALID_STATE,
                    "the first request must be hello, alone, awaiting hello_reply",
                    request_id=request.id,
                    details={"op": request.op},
                )
            if request.version not in self._supported:
                supported: list[JsonValue] = [*sorted(self._supported)]
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    "protocol version not supported",
                    request_id=request.id,
                    details={"version": request.version, "supported": supported},
                )
        elif isinstance(request, Hello):
            raise ProtocolError(
                ErrorCode.INVALID_STATE,
                "hello was already done on this connection",
                request_id=request.id,
                details={"op": request.op},
            )

    # ----------------------------------------------------------------- outbound

    def send_reply(
        self, reply: Reply | ReplyV2 | ErrorReply, *, until_sent: bool = False
    ) -> tuple[bytes, int]:
        """Encode the answer to an in-flight request and retire its id.

        ``reply`` is the request's ``<op>_reply`` or an ``ErrorReply`` with its id.
        ``until_sent``: the request keeps counting against ``max_inflight`` until the
        caller reports the bytes sent with ``reply_sent()`` (the id itself is free now).
        Sending ``hello_reply`` moves the connection to READY; ``subscribe_reply``
        applies that request's filters.
        """
        self._check_open()
        if reply.id is None or reply.id not in self._inflight:
            raise LocalProtocolError(f"no request {reply.id!r} in flight")
        request = self._inflight[reply.id]
        if isinstance(reply, ReplyBase) and reply.op != f"{request.op}_reply":
            raise LocalProtocolError(f"{reply.op} does not answer {request.op}")
        if isinstance(reply, ReplyBase) and self.version is not None:
            expected = _REPLIES[self.version][request.op]
            if type(reply) is not expected:
                raise LocalProtocolError(f"a version {self.version} connection sends {expected}")
        if isinstance(reply, HelloReply) and (
            not isinstance(request, Hello) or reply.version != request.version
        ):
            raise LocalProtocolError("hello_reply must carry the version the client asked for")
        out = encode_error(reply) if isinstance(reply, ErrorReply) else encode(reply)
        del self._inflight[reply.id]
        if until_sent:
            self._unsent += 1
        if isinstance(reply, HelloReply):
            self.state = State.READY
            self.version = reply.version
        elif isinstance(reply, SubscribeReply) and isinstance(request, Subscribe):
            self._events = None if request.events is None else frozenset(request.events)
            self._groups = None if request.groups is None else frozenset(request.groups)
            self.is_subscribed = True
        return out

    def reply_sent(self) -> None:
        """A reply encoded with ``until_sent=True`` has left: free its slot."""
        if self.state is State.CLOSED:
            return  # close() already dropped every slot
        if self._unsent <= 0:
            raise LocalProtocolError("reply_sent() without a reply waiting to be sent")
        self._unsent -= 1

    def send_error(self, error: ProtocolError) -> tuple[bytes, int]:
        """Encode the error reply for a request that ``receive`` rejected.

        Does not touch the in-flight set: a rejected request was never admitted.
        """
        self._check_open()
        return encode_error(error.to_reply())

    def wants_event(self, event: Event) -> bool:
        """Would ``send_event`` deliver this event (READY and matching the subscription)?"""
        if self.state is not State.READY or not self.is_subscribed:
            return False
        if self._events is not None and event.event not in self._events:
            return False
        return self._groups is None or event.event_group in self._groups

    def send_event(self, event: Event, *, for_holder: bool = False) -> tuple[bytes, int] | None:
        """Encode ``event`` if this client should get it, else return None.

        ``for_holder`` says the event is the lease_revoked (or v2's lease_enforced) of a
        lease this client holds: a lease holder always hears that its lease was revoked,
        subscribed or not, so it passes the subscription (not the handshake). The flag
        never goes on the wire. A version 1 connection gets v1's form of the event, and
        nothing of an event v1 does not have (``v2.downgrade_event``).
        """
        self._check_open()
        if self.state is not State.READY:
            return None
        if for_holder:
            if not isinstance(event, LeaseRevoked | LeaseEnforced):
                raise LocalProtocolError("only lease_revoked may bypass the subscription")
        elif not self.wants_event(event):
            return None
        if self.version == 1:
            downgraded = downgrade_event(event)
            if downgraded is None:
                return None
            event = downgraded
        return encode(event)

    def close(self) -> None:
        """Mark the connection closed; requests still in flight are dropped."""
        self.state = State.CLOSED
        self._inflight.clear()
        self._unsent = 0

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")


_R = TypeVar("_R", bound=RequestBase)


class ClientConnection:
    """The client's view of its connection to the server.

    Typical use::

        hello = conn.build(Hello, version=PROTOCOL_VERSION, client="my-vmm")
        send(*conn.send(hello))
        msg = conn.receive(data, nfds)     # HelloReply -> READY
        req = conn.build(Claim, devices=["0000:00:10.0"])
        send(*conn.send(req))
        msg = conn.receive(data, nfds)     # ClaimReply, ErrorReply or an Event
    """

    def __init__(self, *, first_id: int = 1) -> None:
        if not 0 <= first_id <= U32_MAX:
            raise ValueError("first_id must be a uint32")
        self._next_id = first_id
        self._pending: dict[int, RequestBase] = {}
        self.state = State.AWAIT_HELLO
        self.version: int | None = None
        self.limits: Limits = DEFAULT_LIMITS
        self.capabilities: frozenset[str] = frozenset()

    @property
    def pending(self) -> Mapping[int, RequestBase]:
        """Requests sent and not yet answered, by id."""
        return dict(self._pending)

    def next_id(self) -> int:
        """A fresh request id: not in flight, counting up, wrapping at 2**32."""
        if len(self._pending) > U32_MAX:  # pragma: no cover - needs 2**32 requests
            raise LocalProtocolError("no free request id")
        while True:
            candidate = self._next_id
            self._next_id = 0 if candidate == U32_MAX else candidate + 1
            if candidate not in self._pending:
                return candidate

    def build(self, cls: type[_R], **fields: Any) -> _R:
        """Construct a request of type ``cls`` with a fresh id."""
        return cls(id=self.next_id(), **fields)

    def hello(self, client: str, version: int = PROTOCOL_VERSION) -> Hello:
        """The hello request to send first."""
        return self.build(Hello, version=version, client=client)

    def send(self, request: Request) -> tuple[bytes, int]:
        """Encode ``request`` and remember it until its reply arrives."""
        state = self.state
        if state is _CLOSED:
            raise LocalProtocolError("connection is closed")
        if state is _AWAIT_HELLO and (not isinstance(request, Hello) or self._pending):
            raise LocalProtocolError("send hello first, alone, and wait for hello_reply")
        if state is _READY and isinstance(request, Hello):
            raise LocalProtocolError("hello was already done")
        if request.id in self._pending:
            raise LocalProtocolError(f"request id {request.id} is already in flight")
        # v1's classes are valid in every version (v2 only adds fields with defaults)
        if type(request) not in (
            REQUEST_TYPES[request.op],
            _REQUESTS[self.version or 1][request.op],
        ):
            raise LocalProtocolError(f"{type(request).__name__} needs another protocol version")
        if len(self._pending) >= self.limits.max_inflight:
            raise LocalProtocolError("too many requests in flight")
        out = encode(request)
        self._pending[request.id] = request
        return out

    def receive(self, data: bytes, nfds: int) -> AnyServerMessage:
        """Decode one server datagram; replies retire their request, events pass through.

        An ErrorReply with a null id (the server could not read our id) retires
        nothing. Raises ProtocolError if the server broke the protocol (a reply to no
        pending request, a reply of the wrong op, an event before hello).
        """
        if self.state is _CLOSED:
            raise LocalProtocolError("receive() on a closed connection")
        msg = decode_server(data, nfds, self.version or 1)
        if isinstance(msg, Event):
            if self.state is not _READY:
                raise ProtocolError(ErrorCode.INVALID_STATE, "event before hello_reply")
            return msg
        if msg.id is None:
            return msg
        request = self._pending.get(msg.id)
        if request is None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "reply to no pending request", request_id=msg.id
            )
        if isinstance(msg, ReplyBase) and msg.op != f"{request.op}_reply":
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "reply op does not match the request",
                request_id=msg.id,
                details={"op": msg.op, "request_op": request.op},
            )
        if isinstance(msg, HelloReply) and msg.version != getattr(request, "version", None):
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                "hello_reply carries a version the client did not ask for",
                request_id=msg.id,
                details={"version": msg.version},
            )
        del self._pending[msg.id]
        if isinstance(msg, HelloReply):
            self.state = State.READY
            self.version = msg.version
            self.limits = msg.limits
            self.capabilities = frozenset(msg.capabilities)
        return msg

    def close(self) -> None:
        self.state = State.CLOSED
        self._pending.clear()
