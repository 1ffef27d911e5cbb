"""Datagram I/O on an AF_UNIX SOCK_SEQPACKET socket, with SCM_RIGHTS and peer credentials.

Shared by both ends: the daemon's server and the client library (``iommud.client``).
This module moves bytes and fds between a socket and the event loop (or a blocking
caller): one datagram in
(``recv_datagram``: data plus an ``FdSet`` that owns every received fd from the moment
the kernel installs it), one datagram out (``send_datagram``), and the peer's identity
(``peer_credentials``, ``open_peer_pidfd``). It knows nothing of JSON, messages or the
broker and must not: parsing belongs to ``iommud.protocol``, decisions to the broker.

Receiving uses ``recvmsg`` on a non-blocking socket and waits for readability with the
loop's reader callbacks, so it works the same on uvloop and on plain asyncio (neither
offers ``sock_recvmsg``). SEQPACKET keeps message boundaries, so one ``recvmsg`` is one
protocol message.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Final

from iommud.fds import FdSet, OwnedFd

DEFAULT_SOCKET: Final = "/run/iommud/iommud.sock"
"""Where the daemon listens unless configured otherwise (PROTOCOL.md, "Transport")."""

# Not exported by Python 3.11's socket module; values from include/uapi/asm-generic/socket.h.
SO_PEERGROUPS = 59  # Linux 4.13
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd for the peer, race-free unlike pidfd_open(pid)

_INT_SIZE = array.array("i").itemsize
# Plain ints: socket's IntFlag members cost a Python-level __and__ per test.
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_CUT: Final = _MSG_TRUNC | _MSG_CTRUNC
_RECV_FLAGS: Final = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_TRUNC)
_MAX_GROUPS = 65536  # NGROUPS_MAX


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of a connected peer, plus its supplementary groups (best effort)."""

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()


@dataclass(slots=True)
class Datagram:
    """One received message. ``fds`` owns every fd that arrived with it.

    ``truncated``: the payload did not fit the buffer (MSG_TRUNC, an oversized message);
    ``data`` then holds its first ``max_datagram`` bytes and ``size`` its real length.
    ``ctrunc``: more fds (or control data) were sent than the buffer holds (MSG_CTRUNC);
    the kernel dropped the excess, the ones that fit are in ``fds``.
    ``foreign_cmsgs``: control messages other than SCM_RIGHTS, e.g. SCM_CREDENTIALS.
    """

    data: bytes
    fds: FdSet
    truncated: bool = False
    ctrunc: bool = False
    foreign_cmsgs: list[tuple[int, int]] = field(default_factory=list)
    size: int = -1
    """The datagram's length as sent (the kernel's, even when ``truncated``); -1: ``len(data)``."""

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.data)

    @property
    def is_clean(self) -> bool:
        return not (self.truncated or self.ctrunc or self.foreign_cmsgs)


def _fds_from_cmsg(cmsg_data: bytes) -> list[int]:
    fds = array.array("i")
    usable = len(cmsg_data) - (len(cmsg_data) % _INT_SIZE)
    fds.frombytes(cmsg_data[:usable])
    return list(fds)


REUSED_BUFFER_MAX: Final = 1 << 16
"""The largest receive buffer a thread keeps for reuse (the protocol's datagram limit)."""


class _ThreadBuffer(threading.local):
    """The buffer ``recv_datagram_nowait`` receives into, one per thread, reused.

    Allocating (and zeroing) 64 KiB per datagram cost more than the receive itself.
    One per thread, not per socket: the daemon's loop and a blocking client in another
    thread each get their own, thousands of connections share one, and a thread runs
    one receive at a time (the data is copied out before ``recv_datagram_nowait``
    returns, so no datagram's bytes alias it). Larger requests (the VMM launcher's
    1 MiB control replies) get a fresh buffer each time: a thread keeps 64 KiB at most.
    """

    view: memoryview | None = None


_thread_buffer = _ThreadBuffer()


def _new_thread_buffer() -> memoryview:
    view = _thread_buffer.view = memoryview(bytearray(REUSED_BUFFER_MAX))
    return view


def recv_datagram_nowait(sock: socket.socket, max_datagram: int, max_fds: int) -> Datagram | None:
    """One non-blocking ``recvmsg``; ``None`` at end of stream.

    Raises BlockingIOError when nothing is queued. Every fd found in SCM_RIGHTS goes into
    the returned ``FdSet`` before anything else looks at the message; fds in a
    malformed or foreign control message are collected the same way so none leak.
    An empty datagram without fds is read as end of stream: on SEQPACKET the two are
    indistinguishable to ``recvmsg``, and the protocol never sends empty datagrams.
    """
    # MSG_TRUNC in flags: an AF_UNIX datagram socket then returns the datagram's real
    # length even when it did not fit (net/unix/af_unix.c __unix_dgram_recvmsg), so an
    # oversize datagram can be reported with its size. recvmsg_into, not recvmsg: the
    # latter would resize its bytes object to that larger length. The buffer is this
    # thread's, reused (``_thread_buffer``); the data is copied out of it at once.
    if max_datagram <= REUSED_BUFFER_MAX:
        view = (_thread_buffer.view or _new_thread_buffer())[:max_datagram]
    else:  # a thread keeps at most REUSED_BUFFER_MAX bytes
        view = memoryview(bytearray(max_datagram))
    size, ancdata, flags, _addr = sock.recvmsg_into((view,), _ancbuf(max_fds), _RECV_FLAGS)
    # (flags echo MSG_CMSG_CLOEXEC back: net/socket.c ____sys_recvmsg keeps it in msg_flags)
    if not ancdata and not flags & _CUT:  # the common case: data only, nothing cut
        return Datagram(view[:size].tobytes(), FdSet(), size=size) if size else None
    data = view[: min(size, max_datagram)].tobytes()
    fds = FdSet()
    foreign: list[tuple[int, int]] = []
    try:
        for level, kind, cmsg_data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in _fds_from_cmsg(cmsg_data):
                    fds.append(OwnedFd(fd))
            else:
                foreign.append((level, kind))
    except BaseException:
        fds.close()
        raise
    if not data and not ancdata and not flags & _CUT:
        return None
    return Datagram(
        data=data,
        fds=fds,
        truncated=bool(flags & _MSG_TRUNC),
        ctrunc=bool(flags & _MSG_CTRUNC),
        foreign_cmsgs=foreign,
        size=size,
    )


@functools.cache
def _ancbuf(max_fds: int) -> int:
    # CMSG_LEN, not CMSG_SPACE: room for exactly max_fds (SPACE pads to 8 bytes, which
    # holds one more fd when max_fds is odd; the kernel fills what fits, net/core/scm.c)
    return socket.CMSG_LEN(max_fds * _INT_SIZE)


async def _wait(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def recv_datagram(sock: socket.socket, max_datagram: int, max_fds: int) -> Datagram | None:
    """Receive one datagram, waiting on the running loop; ``None`` at end of stream."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return recv_datagram_nowait(sock, max_datagram, max_fds)
        except (BlockingIOError, InterruptedError):
            await _wait(loop, sock, write=False)


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data of ``sendmsg`` that passes ``fds`` (SCM_RIGHTS), if any."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


async def send_datagram(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send one datagram with ``fds`` in SCM_RIGHTS (the caller keeps and closes its copies).

    SEQPACKET sends are atomic: on EAGAIN nothing was sent, so retrying is safe.
    """
    while True:
        try:
            send_datagram_nowait(sock, data, fds)
        except (BlockingIOError, InterruptedError):
            await _wait(asyncio.get_running_loop(), sock, write=True)
        else:
            return


def send_datagram_nowait(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send one datagram now; on a non-blocking socket whose buffer is full, raise
    BlockingIOError (nothing was sent). On a blocking socket this waits instead."""
    if fds:
        sock.sendmsg([data], rights(fds))
    else:
        sock.send(data)  # cheaper than an empty sendmsg


send_datagram_blocking: Final = send_datagram_nowait
"""The blocking twin of ``send_datagram`` for plain (blocking) sockets: the same call."""


def _groups_from_proc(pid: int, proc_root: str) -> tuple[int, ...]:
    try:
        with open(os.path.join(proc_root, str(pid), "status"), encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def peer_credentials(sock: socket.socket, *, proc_root: str = "/proc") -> PeerCredentials:
    """SO_PEERCRED, plus supplementary groups from SO_PEERGROUPS (or /proc as a fallback).

    SO_PEERCRED is fixed at connect() time by the kernel, so it cannot be spoofed by a
    later setuid in the peer. The groups are best effort: an empty tuple if unreadable.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...]
    try:
        buf = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS * 4)
        groups = struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) - len(buf) % 4])
    except OSError:
        groups = _groups_from_proc(pid, proc_root)
    return PeerCredentials(uid=uid, gid=gid, pid=pid, groups=tuple(groups))


def open_peer_pidfd(sock: socket.socket, pid: int) -> OwnedFd | None:
    """A pidfd for the peer process, or ``None`` where the kernel offers none.

    SO_PEERPIDFD (Linux 6.5) names exactly the process that connected; ``pidfd_open(pid)``
    is the fallback and could in theory race with pid reuse, which is why it is second.
    """
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
        (fd,) = struct.unpack("i", raw)
        if fd >= 0:
            os.set_inheritable(fd, False)
            return OwnedFd(fd)
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None or pid <= 0:
        return None
    try:
        return OwnedFd(pidfd_open(pid))
    except OSError:
        return None
