"""An asyncio QMP client for the launcher: commands (with fds for ``getfd``) and events.

QMP (QEMU's docs/interop/qmp-spec.rst): JSON objects, one per line, over a stream
socket; a greeting, then ``qmp_capabilities``, then commands answered in order, with
events interleaved. ``getfd`` takes an fd in SCM_RIGHTS on the same socket (QEMU keeps
it under a name until a ``device_add``/``object-add`` property consumes it, monitor/fds.c
``monitor_get_fd``). One reader task owns the receive side; one command is in flight at a
time (QMP answers in order and the launcher never needs more). Events go to a bounded
queue: when it is full the oldest is dropped (counted in ``dropped_events``), so a
chatty VMM cannot grow the launcher. No QEMU-specific policy here: the launcher decides
what to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final

MAX_LINE: Final = 1 << 20  # a QMP reply line (query-pci of a big VM is tens of KiB)
MAX_EVENTS: Final = 256  # events kept until read


class QmpError(Exception):
    """QEMU answered a command with an error (``class`` and ``desc`` from QMP)."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", "GenericError"))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QmpClosedError(ConnectionError):
    """The QMP connection is gone (the VMM exited or closed it)."""


def _greeting(msg: dict[str, Any] | None) -> dict[str, Any]:
    if msg is None or "QMP" not in msg:
        raise QmpClosedError(f"no QMP greeting (got {msg!r})")
    return msg


def _message(line: bytes) -> dict[str, Any]:
    """One QMP line as an object (ValueError for anything else, or an overlong line)."""
    if len(line) > MAX_LINE:
        raise ValueError(f"a QMP line over {MAX_LINE} bytes")
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"a QMP line that is no object: {line[:80]!r}")  # noqa: TRY004
    return msg


class QmpClient:
    """QMP over a connected unix stream socket. Create with ``await QmpClient.start(sock)``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = asyncio.Lock()
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._events: deque[dict[str, Any]] = deque()
        self._event_ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.greeting: dict[str, Any] = {}
        self.dropped_events = 0
        self.failure: str | None = None  # why the reader stopped, if not a clean EOF

    @classmethod
    async def start(cls, sock: socket.socket) -> QmpClient:
        """Read the greeting and negotiate (``qmp_capabilities``); the socket is ours now."""
        sock.setblocking(False)
        client = cls(sock)
        client._reader = asyncio.create_task(client._read_loop())
        try:
            client.greeting = _greeting(await client._replies.get())
            await client.execute("qmp_capabilities")
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while True:
                while b"\n" not in buf and len(buf) <= MAX_LINE:
                    chunk = await loop.sock_recv(self._sock, 65536)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                if not line.strip():
                    continue
                msg = _message(line)
                if "event" in msg:
                    if len(self._events) >= MAX_EVENTS:
                        self._events.popleft()
                        self.dropped_events += 1
                    self._events.append(msg)
                    self._event_ready.set()
                else:
                    self._replies.put_nowait(msg)
        except (OSError, ValueError) as exc:
            self.failure = str(exc)
        finally:
            self._closed = True
            self._replies.put_nowait(None)
            self._event_ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fds: Iterable[int] = ()
    ) -> Any:
        """Run ``command``; its ``return`` value, or ``QmpError``. ``fds`` ride in
        SCM_RIGHTS with the command (the caller keeps and closes its copies)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        async with self._lock:
            if self._closed:
                raise QmpClosedError("QMP connection closed")
            await self._send(data, list(fds))
            reply = await self._replies.get()
        if reply is None:
            raise QmpClosedError(f"QMP connection closed during {command}")
        if "error" in reply:
            raise QmpError(command, reply["error"])
        return reply.get("return")

    async def _send(self, data: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        if fds:
            while True:
                try:
                    sent = socket.send_fds(self._sock, [data], fds)
                    break
                except (BlockingIOError, InterruptedError):
                    ready = loop.create_future()
                    loop.add_writer(self._sock, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(self._sock)
            data = data[sent:]  # the fds went with the first byte
        if data:
            await loop.sock_sendall(self._sock, data)

    async def next_event(self) -> dict[str, Any] | None:
        """The next event (oldest first); None once the connection is closed and drained."""
        while not self._events:
            if self._closed:
                return None
            self._event_ready.clear()
            await self._event_ready.wait()
        return self._events.popleft()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._closed = True
        self._sock.close()
