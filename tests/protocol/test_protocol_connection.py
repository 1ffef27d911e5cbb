"""The per-connection state machines: hello first, versions, in-flight ids, limits."""

from __future__ import annotations

import pytest

from iommud.protocol.codec import decode_request, decode_server, encode
from iommud.protocol.connection import (
    MAX_PROTOCOL_ERRORS,
    ClientConnection,
    ServerConnection,
    State,
)
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import LocalProtocolError, ProtocolError
from iommud.protocol.limits import DEFAULT_LIMITS, MAX_INFLIGHT, Limits
from iommud.protocol.messages import (
    Claim,
    ClaimedDevice,
    ClaimReply,
    DeviceAdded,
    DriverBound,
    ErrorReply,
    EventName,
    Hello,
    HelloReply,
    LeaseRevoked,
    Ping,
    PingReply,
    Status,
    Subscribe,
    SubscribeReply,
)

BDF = "0000:00:10.0"


def hello_reply(request_id: int, version: int = 1) -> HelloReply:
    return HelloReply(
        id=request_id,
        version=version,
        server="iommud-test",
        capabilities=("iommufd",),
        limits=DEFAULT_LIMITS,
    )


def ready_server() -> ServerConnection:
    conn = ServerConnection()
    conn.receive(*encode(Hello(id=1, version=1, client="t")))
    conn.send_reply(hello_reply(1))
    assert conn.state is State.READY
    return conn


def reject(conn: ServerConnection, data: tuple[bytes, int]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive(*data)
    return info.value


# ------------------------------------------------------------------------ server


def test_hello_then_ready() -> None:
    conn = ServerConnection()
    req = conn.receive(*encode(Hello(id=7, version=1, client="vmm")))
    assert isinstance(req, Hello)
    assert set(conn.inflight) == {7}
    data, nfds = conn.send_reply(hello_reply(7))
    assert nfds == 0
    assert decode_server(data, nfds) == hello_reply(7)
    assert conn.state is State.READY
    assert conn.version == 1
    assert conn.inflight == {}


def test_request_before_hello_is_invalid_state() -> None:
    conn = ServerConnection()
    err = reject(conn, encode(Ping(id=3)))
    assert (err.code, err.request_id, err.details) == (
        ErrorCode.INVALID_STATE,
        3,
        {"op": "ping"},
    )
    assert conn.state is State.AWAIT_HELLO
    assert conn.inflight == {}
    assert conn.error_count == 1


def test_request_while_hello_in_flight_is_invalid_state() -> None:
    """A client must wait for hello_reply before its next request."""
    conn = ServerConnection()
    conn.receive(*encode(Hello(id=1, version=1, client="t")))
    err = reject(conn, encode(Ping(id=2)))
    assert (err.code, err.request_id) == (ErrorCode.INVALID_STATE, 2)
    assert set(conn.inflight) == {1}


def test_unsupported_version_then_retry() -> None:
    """A wrong version is refused with the supported list; the client may hello again."""
    conn = ServerConnection()
    err = reject(conn, encode(Hello(id=1, version=3, client="t")))
    assert (err.code, err.request_id, err.details) == (
        ErrorCode.UNSUPPORTED_VERSION,
        1,
        {"version": 3, "supported": [1, 2]},
    )
    reply = decode_server(*conn.send_error(err))
    assert reply == ErrorReply(
        id=1,
        code=ErrorCode.UNSUPPORTED_VERSION,
        message="protocol version not supported",
        details={"version": 3, "supported": [1, 2]},
    )
    assert conn.version is None
    conn.receive(*encode(Hello(id=1, version=1, client="t")))
    conn.send_reply(hello_reply(1))
    assert conn.state is State.READY


def test_second_hello_is_invalid_state() -> None:
    conn = ready_server()
    err = reject(conn, encode(Hello(id=2, version=1, client="t")))
    assert (err.code, err.request_id) == (ErrorCode.INVALID_STATE, 2)


def test_duplicate_inflight_id_is_bad_request() -> None:
    """Reusing an id still in flight is refused, and the original stays in flight."""
    conn = ready_server()
    conn.receive(*encode(Ping(id=5)))
    err = reject(conn, encode(Status(id=5)))
    assert (err.code, err.request_id, err.details) == (ErrorCode.BAD_REQUEST, 5, {"id": 5})
    assert isinstance(conn.inflight[5], Ping)
    conn.send_reply(PingReply(id=5))
    conn.receive(*encode(Status(id=5)))  # retired ids may be reused


def test_inflight_limit() -> None:
    conn = ready_server()
    for i in range(MAX_INFLIGHT):
        conn.receive(*encode(Ping(id=100 + i)))
    err = reject(conn, encode(Ping(id=99)))
    assert (err.code, err.request_id, err.details) == (
        ErrorCode.LIMIT_REACHED,
        99,
        {"max_inflight": MAX_INFLIGHT},
    )
    conn.send_reply(PingReply(id=100))
    conn.receive(*encode(Ping(id=99)))
    assert len(conn.inflight) == MAX_INFLIGHT


def test_decode_errors_count_and_close_after_limit() -> None:
    conn = ready_server()
    for n in range(1, MAX_PROTOCOL_ERRORS):
        reject(conn, (b"not json", 0))
        assert conn.error_count == n
        assert not conn.should_close
    err = reject(conn, (b'{"op":"nope","id":4,"fds":0}', 0))
    assert (err.code, err.request_id) == (ErrorCode.UNKNOWN_OP, 4)
    assert conn.should_close


def test_good_requests_do_not_count_as_errors() -> None:
    conn = ready_server()
    for i in range(3 * MAX_PROTOCOL_ERRORS):
        conn.receive(*encode(Ping(id=i)))
        conn.send_reply(PingReply(id=i))
    assert conn.error_count == 0


def test_send_reply_checks_id_and_op() -> None:
    conn = ready_server()
    with pytest.raises(LocalProtocolError):
        conn.send_reply(PingReply(id=9))  # nothing in flight
    conn.receive(*encode(Status(id=9)))
    with pytest.raises(LocalProtocolError):
        conn.send_reply(PingReply(id=9))  # wrong op for a status request
    assert set(conn.inflight) == {9}
    err = ErrorReply(id=9, code=ErrorCode.PERMISSION_DENIED, message="no", details={})
    data, nfds = conn.send_reply(err)
    assert decode_server(data, nfds) == err
    assert conn.inflight == {}


def test_hello_reply_must_echo_version() -> None:
    conn = ServerConnection(supported_versions=(1, 2))
    conn.receive(*encode(Hello(id=1, version=2, client="t")))
    with pytest.raises(LocalProtocolError):
        conn.send_reply(hello_reply(1, version=1))
    conn.send_reply(hello_reply(1, version=2))
    assert conn.version == 2


def test_claim_reply_carries_fds() -> None:
    conn = ready_server()
    conn.receive(*encode(Claim(id=3, devices=(BDF, "0000:00:11.0"))))
    reply = ClaimReply(
        id=3,
        lease_id=1,
        group_id=4,
        backend="iommufd",
        ioas_id=2,
        devices=(
            ClaimedDevice(bdf=BDF, fd_index=1, devid=5),
            ClaimedDevice(bdf="0000:00:11.0", fd_index=0, devid=6),
        ),
    )
    data, nfds = conn.send_reply(reply)
    assert nfds == 2
    assert decode_server(data, 2) == reply


def ev_bound(seq: int, group_id: int | None = 4) -> DriverBound:
    return DriverBound(ts=1.0, seq=seq, bdf=BDF, driver="e1000e", group_id=group_id)


def subscribe(conn: ServerConnection, req_id: int, **filters: object) -> None:
    conn.receive(*encode(Subscribe(id=req_id, **filters)))
    conn.send_reply(SubscribeReply(id=req_id))


def test_events_need_hello_and_subscription() -> None:
    conn = ServerConnection()
    assert conn.send_event(ev_bound(1)) is None  # before hello
    conn.receive(*encode(Hello(id=1, version=1, client="t")))
    conn.send_reply(hello_reply(1))
    assert conn.send_event(ev_bound(2)) is None  # not subscribed
    conn.receive(*encode(Subscribe(id=2)))
    assert conn.send_event(ev_bound(3)) is None  # subscribe not answered yet
    conn.send_reply(SubscribeReply(id=2))
    out = conn.send_event(ev_bound(4))
    assert out is not None
    assert decode_server(*out) == ev_bound(4)


def test_refused_subscribe_changes_nothing() -> None:
    conn = ready_server()
    conn.receive(*encode(Subscribe(id=2)))
    conn.send_reply(ErrorReply(id=2, code=ErrorCode.PERMISSION_DENIED, message="no"))
    assert conn.send_event(ev_bound(1)) is None


def test_subscription_filters_events_and_groups() -> None:
    conn = ready_server()
    subscribe(conn, 2, events=[EventName.DRIVER_BOUND], groups=[4])
    assert conn.send_event(ev_bound(1, group_id=4)) is not None
    assert conn.send_event(ev_bound(2, group_id=5)) is None
    assert conn.send_event(ev_bound(3, group_id=None)) is None
    assert conn.send_event(DeviceAdded(ts=1.0, seq=4, bdf=BDF, group_id=4)) is None
    subscribe(conn, 3)  # a new subscribe replaces the filters
    assert conn.send_event(DeviceAdded(ts=1.0, seq=5, bdf=BDF, group_id=None)) is not None


def test_lease_revoked_for_its_holder_bypasses_subscription_only() -> None:
    """A lease holder hears of its revocation unsubscribed; no other event can pass as one."""
    revoked = LeaseRevoked(ts=2.0, seq=9, lease_id=1, group_id=4, reason="viability lost")
    conn = ServerConnection()
    assert conn.send_event(revoked, for_holder=True) is None  # never before hello
    conn = ready_server()
    assert conn.send_event(revoked) is None
    out = conn.send_event(revoked, for_holder=True)
    assert out is not None
    assert decode_server(*out) == revoked
    with pytest.raises(LocalProtocolError):
        conn.send_event(ev_bound(1), for_holder=True)


def test_closed_connection_refuses_everything() -> None:
    conn = ready_server()
    conn.receive(*encode(Ping(id=2)))
    conn.close()
    assert conn.state is State.CLOSED
    assert conn.inflight == {}
    with pytest.raises(LocalProtocolError):
        conn.receive(*encode(Ping(id=3)))
    with pytest.raises(LocalProtocolError):
        conn.send_reply(PingReply(id=2))
    with pytest.raises(LocalProtocolError):
        conn.send_event(ev_bound(1))


# ------------------------------------------------------------------------ client


def ready_client() -> ClientConnection:
    client = ClientConnection()
    hello = client.hello("vmm")
    client.send(hello)
    limits = Limits(max_inflight=4)
    reply = HelloReply(id=hello.id, version=1, server="s", capabilities=(), limits=limits)
    assert client.receive(*encode(reply)) == reply
    assert client.state is State.READY
    assert client.limits == limits
    return client


def test_client_hello_first() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send(client.build(Ping))
    client.send(client.hello("vmm"))
    with pytest.raises(LocalProtocolError):
        client.send(client.build(Ping))  # must wait for hello_reply


def test_client_fresh_ids_and_matching() -> None:
    client = ready_client()
    a, b = client.build(Ping), client.build(Ping)
    assert a.id != b.id
    client.send(a)
    client.send(b)
    assert client.receive(*encode(PingReply(id=b.id))) == PingReply(id=b.id)
    assert set(client.pending) == {a.id}
    with pytest.raises(ProtocolError) as info:
        client.receive(*encode(PingReply(id=b.id)))  # already answered
    assert (info.value.code, info.value.request_id) == (ErrorCode.BAD_REQUEST, b.id)


def test_client_ids_skip_pending_and_wrap() -> None:
    client = ClientConnection(first_id=2**32 - 2)
    hello = client.hello("vmm")
    assert hello.id == 2**32 - 2
    client.send(hello)
    assert [client.next_id() for _ in range(3)] == [2**32 - 1, 0, 1]
    client2 = ClientConnection(first_id=5)
    client2.send(client2.hello("vmm"))
    client2._next_id = 5  # force a collision with the pending hello
    assert client2.next_id() == 6


def test_client_events_and_errors_pass_through() -> None:
    client = ready_client()
    event = DriverBound(ts=1.0, seq=1, bdf=BDF, driver="vfio-pci", group_id=4)
    assert client.receive(*encode(event)) == event
    unsolicited = ErrorReply(id=None, code=ErrorCode.BAD_REQUEST, message="x")
    assert client.receive(*encode(unsolicited)) == unsolicited
    req = client.build(Ping)
    client.send(req)
    err = ErrorReply(id=req.id, code=ErrorCode.BUSY, message="held", details={"uid": 1})
    assert client.receive(*encode(err)) == err
    assert client.pending == {}


def test_client_event_before_hello_is_error() -> None:
    client = ClientConnection()
    event = DriverBound(ts=1.0, seq=1, bdf=BDF, driver="vfio-pci", group_id=4)
    with pytest.raises(ProtocolError) as info:
        client.receive(*encode(event))
    assert info.value.code is ErrorCode.INVALID_STATE


def test_client_wrong_reply_op_is_error() -> None:
    client = ready_client()
    req = client.build(Status)
    client.send(req)
    with pytest.raises(ProtocolError) as info:
        client.receive(*encode(PingReply(id=req.id)))
    assert info.value.details == {"op": "ping_reply", "request_op": "status"}
    assert set(client.pending) == {req.id}


def test_client_respects_server_inflight_limit() -> None:
    client = ready_client()  # server announced max_inflight=4
    for _ in range(4):
        client.send(client.build(Ping))
    with pytest.raises(LocalProtocolError):
        client.send(client.build(Ping))


def test_client_server_pair_in_memory() -> None:
    """A client and a server state machine talk through bytes only."""
    client, server = ClientConnection(), ServerConnection()
    req = server.receive(*client.send(client.hello("vmm")))
    assert isinstance(req, Hello)
    client.receive(*server.send_reply(hello_reply(req.id)))
    claim = client.build(Claim, devices=[BDF])
    got = server.receive(*client.send(claim))
    assert got == claim
    reply = ClaimReply(
        id=got.id,
        lease_id=1,
        group_id=4,
        backend="legacy",
        ioas_id=1,
        devices=[ClaimedDevice(bdf=BDF, fd_index=0, devid=None)],
    )
    data, nfds = server.send_reply(reply)
    assert client.receive(data, nfds) == reply
    assert client.pending == {}
    assert server.inflight == {}
    assert decode_request(*encode(claim)) == claim
