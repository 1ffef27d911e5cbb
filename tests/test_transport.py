"""transport.recv_datagram_nowait on a real SEQPACKET socketpair: the reused receive buffer
never shows through in received data, oversize datagrams keep their size, fds stay owned.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from iommud import transport
from iommud.transport import REUSED_BUFFER_MAX, Datagram, recv_datagram_nowait, rights
from tests.serving import FdSnapshot

MAX_FDS = 16


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def receive(sock: socket.socket, max_datagram: int = 65536, max_fds: int = MAX_FDS) -> Datagram:
    dgram = recv_datagram_nowait(sock, max_datagram, max_fds)
    assert dgram is not None
    return dgram


def test_received_datagrams_keep_their_own_bytes(pair: tuple[socket.socket, socket.socket]) -> None:
    """A long datagram, then a short one, then another: each keeps exactly its bytes."""
    a, b = pair
    sent = [b"a" * 5000, b"short", bytes(range(256)) * 40, b"z"]
    got = []
    for data in sent:
        a.send(data)
        got.append(receive(b))
    assert [d.data for d in got] == sent
    assert all(type(d.data) is bytes and d.size == len(d.data) and d.is_clean for d in got)


def test_oversize_datagram_reports_its_size_and_the_next_is_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """MSG_TRUNC: the first max_datagram bytes, the real size, and no spill into the next."""
    a, b = pair
    a.send(b"x" * 1000)
    a.send(b"next")
    big = receive(b, max_datagram=100)
    assert (big.truncated, big.size, big.data) == (True, 1000, b"x" * 100)
    assert receive(b, max_datagram=100).data == b"next"


def test_room_for_max_fds_and_ctrunc_beyond(pair: tuple[socket.socket, socket.socket]) -> None:
    """Exactly max_fds fit (CMSG_LEN, not CMSG_SPACE); one more is MSG_CTRUNC and every fd
    received is owned, so closing the FdSets leaves no fd open."""
    a, b = pair
    before = FdSnapshot.take()
    memfds = [os.memfd_create("t", os.MFD_CLOEXEC) for _ in range(MAX_FDS + 2)]
    try:
        a.sendmsg([b"fits"], rights(memfds[: MAX_FDS + 1]))
        a.sendmsg([b"too many"], rights(memfds))
    finally:
        for fd in memfds:
            os.close(fd)
    fits = receive(b, max_fds=MAX_FDS + 1)
    cut = receive(b, max_fds=MAX_FDS + 1)
    assert (fits.data, len(fits.fds), fits.ctrunc) == (b"fits", MAX_FDS + 1, False)
    assert (cut.data, len(cut.fds), cut.ctrunc) == (b"too many", MAX_FDS + 1, True)
    fits.fds.close()
    cut.fds.close()
    before.assert_unchanged()


def test_a_larger_limit_than_the_kept_buffer_gets_a_fresh_one(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A datagram above REUSED_BUFFER_MAX arrives whole; the thread still keeps 64 KiB."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    data = os.urandom(REUSED_BUFFER_MAX + 4096)
    a.send(data)
    a.send(b"small")
    assert receive(b, max_datagram=1 << 20).data == data
    assert receive(b).data == b"small"
    view = transport._thread_buffer.view
    assert view is not None
    assert len(view) == REUSED_BUFFER_MAX


def test_threads_receive_into_their_own_buffers() -> None:
    """Two threads receiving at once (the syscall runs without the GIL) never see each
    other's bytes: each has its own buffer."""
    buffers: dict[str, memoryview | None] = {}
    errors: list[str] = []

    def run(name: str, fill: int) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            for i in range(2000):
                data = bytes([fill]) * (1 + i % 3000)
                a.send(data)
                got = recv_datagram_nowait(b, 65536, MAX_FDS)
                if got is None or got.data != data:
                    errors.append(f"{name}: datagram {i} came back changed")
                    return
        buffers[name] = transport._thread_buffer.view

    threads = [threading.Thread(target=run, args=(n, f)) for n, f in (("x", 0x78), ("y", 0x79))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    x, y = buffers["x"], buffers["y"]
    assert x is not None
    assert y is not None
    assert x.obj is not y.obj


def test_end_of_stream_is_none(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert recv_datagram_nowait(b, 65536, MAX_FDS) is None
