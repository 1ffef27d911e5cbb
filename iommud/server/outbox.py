"""One connection's outgoing datagrams: sent at once when the socket takes them, else queued.

``Outbox.send`` tries ``sendmsg`` straight away (the common case: no task, no lock, no
timer); only when the socket is full does the datagram join a FIFO queue that a writer
callback flushes as the peer reads. The queue is what a slow reader makes the daemon
hold, so it is measured (``unsent_bytes``) and the handler stops reading requests and
pulling events while it is over ``budget``. A peer that does not drain for
``send_timeout`` seconds is cut off (``on_stall``). SEQPACKET sends are atomic: on
EAGAIN nothing went out, so retrying the same datagram later is safe.

The outbox owns the fds it sends (``OwnedFd``, e.g. the dups of a claim's device fds):
they are closed once the kernel holds its own reference (after ``sendmsg``), when the
peer is gone, or at ``close``. It knows nothing of JSON or requests; ``on_sent`` tells
the caller a datagram has left (the handler frees the request's in-flight slot then).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from iommud.fds import OwnedFd
from iommud.transport import rights

log = structlog.get_logger(__name__)

PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})


@dataclass(slots=True)
class _Pending:
    data: bytes
    fds: Sequence[OwnedFd]
    on_sent: Callable[[], None] | None


def _close_all(fds: Sequence[OwnedFd]) -> None:
    for fd in fds:
        fd.close()


class Outbox:
    """The send side of one connection (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        budget: int,
        send_timeout: float,
        on_stall: Callable[[str], None],
        on_drained: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.budget = budget
        self._send_timeout = send_timeout
        self._on_stall = on_stall
        self._on_drained = on_drained
        self._queue: collections.deque[_Pending] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.unsent_bytes = 0
        self.peak_bytes = 0
        self.is_dead = False  # the peer is gone or the socket failed: sends are dropped

    @property
    def is_over_budget(self) -> bool:
        return self.unsent_bytes >= self.budget

    @property
    def is_empty(self) -> bool:
        return not self._queue

    def send(
        self,
        data: bytes,
        fds: Sequence[OwnedFd] = (),
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Send ``data`` with ``fds`` now, or queue it behind what is waiting. Takes the fds."""
        if not self._queue and not self.is_dead:
            try:
                if fds:
                    self._sock.sendmsg([data], rights([fd.fileno() for fd in fds]))
                else:
                    self._sock.send(data)  # the common case; cheaper than sendmsg
            except (BlockingIOError, InterruptedError):
                pass  # full: queue it below
            except OSError as exc:
                self._failed(exc)
            else:
                _close_all(fds)
                if on_sent is not None:
                    on_sent()
                return
        if self.is_dead:
            _close_all(fds)
            if on_sent is not None:
                on_sent()
            return
        if not self._queue:
            self._loop.add_writer(self._fd, self._flush)
            self._arm()
        self._queue.append(_Pending(data, fds, on_sent))
        self.unsent_bytes += len(data)
        self.peak_bytes = max(self.peak_bytes, self.unsent_bytes)

    def _flush(self) -> None:
        progressed = False
        while self._queue:
            item = self._queue[0]
            try:
                self._sock.sendmsg([item.data], rights([fd.fileno() for fd in item.fds]))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._failed(exc)
                return
            self._queue.popleft()
            self.unsent_bytes -= len(item.data)
            progressed = True
            _close_all(item.fds)
            if item.on_sent is not None:
                item.on_sent()
        if not self._queue:
            self._stop_writing()
            self._on_drained()
        elif progressed:
            self._arm()
            if not self.is_over_budget:
                self._on_drained()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._send_timeout, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        log.warning("connection.send_timeout", timeout=self._send_timeout)
        self._on_stall("send_timeout")
        self.close()

    def _failed(self, exc: OSError) -> None:
        if exc.errno not in PEER_GONE:
            log.warning("connection.send_failed", errno=exc.errno, error=exc.strerror)
            self._on_stall("send_failed")
        self.close()

    def _stop_writing(self) -> None:
        self._loop.remove_writer(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Drop what is queued (closing its fds); later sends are dropped too."""
        self.is_dead = True
        if self._queue:
            self._stop_writing()
        while self._queue:
            item = self._queue.popleft()
            _close_all(item.fds)
            if item.on_sent is not None:
                item.on_sent()
        self.unsent_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_drained()
