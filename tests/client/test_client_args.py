"""Arguments the protocol refuses raise BadRequestError in the client, and nothing is sent.

The pure layer (``iommud.client.calls``) builds every request; a bad argument used to
escape as pydantic's ValidationError (or, for a MapSpec fd that is not one, as a
TypeError from sendmsg). Now it is the same ``BadRequestError`` a VMM catches for the
daemon's own refusals, with the daemon's ``errors`` details (``loc``, ``type``, ``msg``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from iommud.client import MapSpec, calls
from iommud.errors import BadRequestError
from iommud.fds import OwnedFd
from iommud.protocol import messages as m
from iommud.protocol.codec import encode
from iommud.protocol.connection import ClientConnection
from iommud.protocol.limits import DEFAULT_LIMITS
from tests.broker.support import EDU, PAGE


def ready() -> ClientConnection:
    conn = ClientConnection()
    conn.send(conn.hello("test"))
    reply = m.HelloReply(id=1, version=1, server="t", capabilities=(), limits=DEFAULT_LIMITS)
    conn.receive(encode(reply)[0], 0)
    return conn


def closed_fd() -> OwnedFd:
    fd = OwnedFd(os.dup(0))
    fd.close()
    return fd


Build = Callable[[ClientConnection], object]

CASES: list[tuple[str, Build, str]] = [
    ("negative offset", lambda c: calls.ioas_map(c, 1, [MapSpec(0, -1, PAGE)]), "ranges.0.offset"),
    ("zero length", lambda c: calls.ioas_map(c, 1, [MapSpec(0, 0, 0)]), "ranges.0.length"),
    ("negative iova", lambda c: calls.ioas_map(c, 1, [MapSpec(0, 0, PAGE, -1)]), "ranges.0.iova"),
    ("no ranges", lambda c: calls.ioas_map(c, 1, []), "ranges"),
    ("ioas id too big", lambda c: calls.ioas_unmap(c, 1 << 32, 0, PAGE), "ioas_id"),
    ("not a bdf", lambda c: calls.claim(c, ["eth0"]), "devices.0"),
    ("unknown backend", lambda c: calls.claim(c, [EDU], backend="vfio-magic"), "backend"),
    ("unknown event", lambda c: calls.subscribe(c, ["driver_bond"]), "events.0"),
    ("negative lease", lambda c: calls.release(c, -1), "lease_id"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "loc"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_refused_argument_is_bad_request_and_nothing_is_sent(build: Build, loc: str) -> None:
    conn = ready()
    with pytest.raises(BadRequestError) as info:
        build(conn)
    err = info.value
    assert err.details["errors"][0]["loc"] == loc
    assert err.message.startswith(f"invalid {err.details['op']} request: {loc}: ")
    assert not conn._pending  # nothing went out, nothing waits for a reply
    calls.ping(conn)  # the connection goes on


@pytest.mark.parametrize(
    ("fd", "says"),
    [
        ("3", "fd must be an open file descriptor (int or OwnedFd), not str '3'"),
        (-1, "fd must be an open file descriptor (int or OwnedFd), not int -1"),
        (True, "fd must be an open file descriptor (int or OwnedFd), not bool True"),
        (None, "fd must be an open file descriptor (int or OwnedFd), not NoneType None"),
    ],
)
def test_a_mapspec_fd_that_is_not_one_is_bad_request(fd: Any, says: str) -> None:
    conn = ready()
    good = MapSpec(0, 0, PAGE)
    with pytest.raises(BadRequestError) as info:
        calls.ioas_map(conn, 1, [good, MapSpec(fd, 0, PAGE)])
    assert info.value.message == f"range 1: {says}"
    assert info.value.details == {"range": 1}
    assert not conn._pending


def test_an_fd_number_that_is_not_open_is_bad_request() -> None:
    """Caught before sendmsg, whose EBADF the blocking client would take for a broken
    connection."""
    conn = ready()
    fd = os.dup(0)
    os.close(fd)
    with pytest.raises(BadRequestError) as info:
        calls.ioas_map(conn, 1, [MapSpec(fd, 0, PAGE)])
    assert info.value.message == f"range 0: fd {fd} is not open (Bad file descriptor)"
    assert info.value.details == {"range": 0, "fd": fd}
    assert not conn._pending


def test_a_closed_ownedfd_is_bad_request() -> None:
    conn = ready()
    with pytest.raises(BadRequestError, match="range 0: its OwnedFd is closed"):
        calls.ioas_map(conn, 1, [MapSpec(closed_fd(), 0, PAGE)])


def test_each_fd_goes_once_and_ranges_name_it_by_position() -> None:
    conn = ready()
    a, b = OwnedFd(os.dup(0)), os.dup(0)
    try:
        call = calls.ioas_map(
            conn, 3, [MapSpec(a, 0, PAGE), MapSpec(b, PAGE, PAGE, iova=0), MapSpec(a, 0, PAGE)]
        )
        assert call.fds == [a.fileno(), b]
        request = call.request
        assert isinstance(request, m.IoasMap)
        assert request.fds == 2
        assert [r.fd_index for r in request.ranges] == [0, 1, 0]
        assert request.ranges[1] == m.MapRange(fd_index=1, offset=PAGE, length=PAGE, iova=0)
    finally:
        a.close()
        os.close(b)
