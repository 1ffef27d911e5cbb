"""The real server and client library over a real SEQPACKET socket with real memfds."""

from __future__ import annotations

import array
import asyncio
import json
import os
import resource
import socket
from typing import Any

import pytest

from iommud.broker.events import Delivery
from iommud.client import AsyncClient, Client, ClientClosedError, MapSpec
from iommud.errors import NotFoundError
from iommud.protocol import messages as m
from iommud.protocol.codec import encode
from iommud.protocol.limits import MAX_FDS
from tests.server.support import Running, StandInBroker
from tests.serving import FdSnapshot


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


class Raw:
    """A hand-driven client socket, to send what the client library never would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(5)
        self.sock.connect(path)

    def send(self, data: bytes, fds: list[int] = []) -> None:  # noqa: B006
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], anc if fds else [])

    def recv(self) -> dict[str, Any] | None:
        data = self.sock.recv(1 << 17)
        return json.loads(data) if data else None

    def hello(self) -> None:
        self.send(encode(m.Hello(id=1, version=1, client="raw"))[0])
        reply = self.recv()
        assert reply is not None
        assert reply["op"] == "hello_reply"

    def close(self) -> None:
        self.sock.close()


async def _raw(running: Running) -> Raw:
    raw = await asyncio.to_thread(Raw, running.path)
    await asyncio.to_thread(raw.hello)
    return raw


async def _exchange(raw: Raw, data: bytes, fds: list[int] = []) -> dict[str, Any] | None:  # noqa: B006
    raw.send(data, fds)
    return await asyncio.to_thread(raw.recv)


async def test_handshake_and_ping(running: Running) -> None:
    async with await AsyncClient.connect(running.path, "t") as client:
        assert client.hello is not None
        assert client.hello.capabilities == ("iommufd",)
        assert client.hello.limits.max_fds == MAX_FDS
        await client.ping()


async def test_peer_credentials_reach_the_broker(running: Running) -> None:
    """SO_PEERCRED uid/gid/pid and the supplementary groups become the broker's Identity."""
    async with await AsyncClient.connect(running.path, "t") as client:
        await client.ping()
        ident = running.broker.sessions[0].identity
        assert (ident.uid, ident.gid, ident.pid) == (os.getuid(), os.getgid(), os.getpid())
        assert set(os.getgroups()) <= set(ident.groups)
        assert running.broker.sessions[0].pidfd is not None


async def test_claim_passes_device_fds(running: Running) -> None:
    async with await AsyncClient.connect(running.path, "t") as client:
        before = FdSnapshot.take()
        with await client.claim(["0000:00:10.0", "0000:00:11.0"]) as result:
            assert (result.lease_id, result.group_id, result.ioas_id) == (3, 12, 7)
            assert [d.bdf for d in result.devices] == ["0000:00:10.0", "0000:00:11.0"]
            contents = [os.pread(d.fd.fileno(), 64, 0) for d in result.devices]
            assert contents == [b"0000:00:10.0", b"0000:00:11.0"]
            before.assert_unchanged(opened=2)
        before.assert_unchanged()


async def test_map_sends_memfds(running: Running) -> None:
    """Two ranges of one memfd and one of another: two fds travel, the broker reads them."""
    a, b = _memfd(b"A" * 8192), _memfd(b"B" * 4096)
    try:
        async with await AsyncClient.connect(running.path, "t") as client:
            ranges = [MapSpec(a, 0, 4096), MapSpec(b, 0, 4096), MapSpec(a, 4096, 4096)]
            mappings = await client.ioas_map(7, ranges)
        assert [(x.iova, x.length) for x in mappings] == [
            (0x100000, 4096),
            (0x100000, 4096),
            (0x101000, 4096),
        ]
        assert running.broker.mapped == [b"A" * 4096, b"B" * 4096, b"A" * 4096]
    finally:
        os.close(a)
        os.close(b)


async def test_broker_error_is_typed(running: Running) -> None:
    async with await AsyncClient.connect(running.path, "t") as client:
        with pytest.raises(NotFoundError) as info:
            await client.release(99)
        assert info.value.message == "no such lease"
        assert info.value.details == {"lease_id": 99}
        await client.ping()  # still served


async def test_pipelined_replies_come_out_of_order(running: Running) -> None:
    """A slow request does not hold up later ones: replies are matched by id."""
    running.broker.delays = {1: 0.3}
    async with await AsyncClient.connect(running.path, "t") as client:
        done: list[str] = []

        async def slow() -> None:
            await client.ioas_destroy(1)
            done.append("slow")

        async def fast() -> None:
            await asyncio.sleep(0.05)
            for _ in range(5):
                await client.ping()
            done.append("fast")

        await asyncio.gather(slow(), fast())
        assert done == ["fast", "slow"]


async def test_many_concurrent_requests_respect_inflight_limit(running: Running) -> None:
    async with await AsyncClient.connect(running.path, "t") as client:
        results = await asyncio.gather(*(client.ioas_create() for _ in range(100)))
        assert results == [7] * 100


@pytest.mark.parametrize(
    ("data", "nfds", "expected"),
    [
        (
            b"{not json",
            0,
            {
                "id": None,
                "code": "bad_request",
                "message": "datagram is not valid JSON",
                "details": {},
            },
        ),
        (
            b'{"op":"teleport","id":5,"fds":0}',
            0,
            {"id": 5, "code": "unknown_op", "message": "unknown op", "details": {"op": "teleport"}},
        ),
        (
            b'{"op":"ping","id":6,"fds":0}',
            1,
            {
                "id": 6,
                "code": "bad_request",
                "message": "'fds' does not match the fds received",
                "details": {"fds": 0, "received": 1},
            },
        ),
        (
            b"x" * 70000,
            0,
            {
                "id": None,
                "code": "limit_reached",
                "message": "datagram exceeds the size limit",
                "details": {"max_datagram": 65536},
            },
        ),
        (
            b'{"op":"ping","id":8,"fds":0}',
            MAX_FDS + 1,
            {
                "id": None,
                "code": "limit_reached",
                "message": "too many fds attached",
                "details": {"max_fds": MAX_FDS},
            },
        ),
    ],
    ids=["bad-json", "unknown-op", "wrong-fd-count", "oversized", "ctrunc"],
)
async def test_bad_input_gets_typed_error(
    running: Running, data: bytes, nfds: int, expected: dict[str, Any]
) -> None:
    """Each violation gets its exact error reply, no fd leaks, and the connection still works."""
    raw = await _raw(running)
    fds = [_memfd(b"x") for _ in range(nfds)]
    try:
        reply = await _exchange(raw, data, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert reply == {"op": "error", "fds": 0, **expected}
    reply = await _exchange(raw, b'{"op":"ping","id":9,"fds":0}')
    assert reply == {"op": "ping_reply", "fds": 0, "id": 9}
    raw.close()


async def test_repeated_violations_close_the_connection(running: Running) -> None:
    raw = await _raw(running)
    replies = [await _exchange(raw, b"garbage") for _ in range(8)]
    assert all(r is not None and r["code"] == "bad_request" for r in replies)
    assert await asyncio.to_thread(raw.recv) is None  # EOF: the server hung up
    raw.close()
    async with await AsyncClient.connect(running.path, "t") as client:
        await client.ping()  # the daemon serves others


async def test_broker_bug_closes_only_that_connection(running: Running) -> None:
    async with await AsyncClient.connect(running.path, "other") as other:
        async with await AsyncClient.connect(running.path, "t") as client:
            with pytest.raises(ClientClosedError):
                await client.device_reset(StandInBroker.CRASH_BDF)
        await other.ping()


async def test_disconnect_mid_request(running: Running) -> None:
    """The client vanishes while its request runs: the reply is dropped, the session closed."""
    running.broker.delays = {1: 0.2}
    raw = await _raw(running)
    raw.send(encode(m.IoasDestroy(id=2, ioas_id=1))[0])
    await asyncio.sleep(0.05)
    raw.close()
    for _ in range(50):
        if running.broker.sessions[0].closed:
            break
        await asyncio.sleep(0.02)
    assert running.broker.sessions[0].closed
    assert running.broker.finished == running.broker.started == 1


async def test_events_reach_subscribers_only(running: Running) -> None:
    async with (
        await AsyncClient.connect(running.path, "sub") as sub,
        await AsyncClient.connect(running.path, "quiet") as quiet,
    ):
        await sub.subscribe(["viability_changed"])
        await quiet.ping()
        ev = m.ViabilityChanged(group_id=12, is_viable=False, offenders=(), ts=1.0, seq=1)
        dropped = m.DeviceAdded(bdf="0000:00:10.0", group_id=12, ts=1.0, seq=2)
        for session in running.broker.sessions:
            session.events.put_nowait(Delivery(dropped))
            session.events.put_nowait(Delivery(ev))
        got = await asyncio.wait_for(anext(sub.events()), 2)
        assert got == ev
        await quiet.ping()
        assert quiet._events.empty()


async def test_shutdown_finishes_inflight_requests(running: Running) -> None:
    """stop() while a request runs: it completes and the reply still arrives."""
    running.broker.delays = {1: 0.2}
    client = await AsyncClient.connect(running.path, "t")
    pending = asyncio.create_task(client.ioas_destroy(1))
    await asyncio.sleep(0.05)
    running.server.stop()
    await pending
    await asyncio.wait_for(running.task, 2)
    with pytest.raises(ClientClosedError):
        await client.ping()
    await client.aclose()


async def test_blocking_client(running: Running) -> None:
    def work() -> tuple[int, bytes]:
        with Client(running.path, "sync") as client:
            client.ping()
            with pytest.raises(NotFoundError):
                client.release(1)
            with client.claim(["0000:00:10.0"]) as result:
                return client.ioas_create(), os.pread(result.devices[0].fd.fileno(), 32, 0)

    assert await asyncio.to_thread(work) == (7, b"0000:00:10.0")


async def test_blocking_client_deadlines(sockdir: str) -> None:
    """The blocking client's deadlines are the kernel's (SO_RCVTIMEO): next_event(0) and
    next_event(0.2) return None when nothing comes, a daemon that never answers hello
    fails the connect with ClientClosedError instead of hanging."""
    path = os.path.join(sockdir, "mute")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(path)
    mute.listen(1)
    try:
        with pytest.raises(ClientClosedError, match="connection failed"):
            await asyncio.to_thread(Client, path, "t", timeout=0.2)
    finally:
        mute.close()


async def test_blocking_client_next_event_times_out(running: Running) -> None:
    def work() -> tuple[object, object]:
        with Client(running.path, "sync") as client:
            first = client.next_event(0)
            second = client.next_event(0.2)
            client.ping()  # the call deadline is back in force and the connection fine
            return first, second

    assert await asyncio.to_thread(work) == (None, None)


async def test_fds_the_kernel_drops_for_want_of_fds_are_not_blamed_on_the_client(
    running: Running,
) -> None:
    """H3: with the daemon's fd table nearly full, the kernel installs only some of a
    request's fds and sets MSG_CTRUNC (net/core/scm.c, scm_detach_fds). That is the
    daemon's shortage, not 'too many fds attached', and no protocol error of the peer."""
    raw = await _raw(running)
    fds = [_memfd(b"x") for _ in range(8)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # (listdir's own fd is among these and closed again: 3 or 4 stay free)
        open_fds = {int(n) for n in os.listdir("/proc/self/fd")}
        limit, free = 0, 0
        while free < 3:  # new fds take the lowest free numbers below the limit
            free += limit not in open_fds
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        reply = await _exchange(raw, b'{"op":"ping","id":9,"fds":8}', fds)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fds:
            os.close(fd)
    assert reply == {
        "op": "error",
        "fds": 0,
        "id": None,
        "code": "limit_reached",
        "message": "the daemon is out of file descriptors; try again later",
        "details": {"daemon_fds_exhausted": True},
    }
    (handler,) = running.server._handlers
    assert handler.proto.error_count == 0
    assert await _exchange(raw, b'{"op":"ping","id":10,"fds":0}') == {
        "op": "ping_reply",
        "fds": 0,
        "id": 10,
    }
    raw.close()
