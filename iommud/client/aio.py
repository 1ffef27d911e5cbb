"""``AsyncClient``: the asyncio client of the iommud protocol, for async VMMs and tools.

A reader callback on the loop owns the socket's receive side: each time the socket
is readable it reads one datagram, decodes it with the sans-I/O ``ClientConnection``
(received fds owned in an ``FdSet`` from arrival), hands a reply to the waiting call
by id and queues events for ``events()``. A callback, not a reader task: a task would
re-arm the loop's reader (two epoll_ctl calls) and take two task steps per reply.
Requests from concurrent tasks pipeline up to the server's in-flight limit; a request
is sent at once when the socket has room, and otherwise waits its turn for room.
Methods and their results are defined once in ``iommud.client.calls``; this module
only moves datagrams. A claim's device fds close as soon as its ``lease_revoked``
arrives (``ClaimResult``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from iommud.client import calls
from iommud.client.calls import (
    Call,
    ClaimResult,
    ClientClosedError,
    DelegatedClaim,
    E,
    K,
    LeaseTracker,
    MapSpec,
    P,
)
from iommud.fds import FdSet
from iommud.protocol import messages as m
from iommud.protocol.connection import ClientConnection
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import MAX_DATAGRAM, MAX_FDS, PROTOCOL_VERSION
from iommud.protocol.v2 import AnyServerMessage, StatusReplyV2
from iommud.transport import (
    DEFAULT_SOCKET,
    recv_datagram_nowait,
    send_datagram,
    send_datagram_nowait,
)

T = TypeVar("T")


class AsyncClient:
    """A connection to iommud. Create with ``await AsyncClient.connect(path, name)``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._conn = ClientConnection()
        self._waiting: dict[int, asyncio.Future[tuple[AnyServerMessage, FdSet]]] = {}
        self._events: asyncio.Queue[m.Event | None] = asyncio.Queue()
        self._send_lock = asyncio.Lock()  # held while a send waits for room
        self._slots = asyncio.Semaphore(1)  # until hello_reply tells the server's limit
        self._reading = False
        self._closed: BaseException | None = None
        self.hello: m.HelloReply | None = None
        self._leases = LeaseTracker()

    @classmethod
    async def connect(
        cls,
        path: str = DEFAULT_SOCKET,
        name: str = calls.DEFAULT_NAME,
        *,
        version: int = PROTOCOL_VERSION,
    ) -> AsyncClient:
        """Connect and do the handshake; the server's hello_reply is in ``.hello``.
        ``version`` 2 allows delegated claims (:meth:`claim_delegated`)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        client = cls(sock)
        client._loop.add_reader(sock.fileno(), client._on_readable)
        client._reading = True
        try:
            client.hello = await client._call(calls.hello(client._conn, name, version))
        except BaseException:
            await client.aclose()
            raise
        client._slots = asyncio.Semaphore(client._conn.limits.max_inflight)
        return client

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with ClientClosedError."""
        self._stop_reading()
        self._shutdown(ClientClosedError("client closed"))
        self._sock.close()

    # ---------------------------------------------------------------- transport

    def _on_readable(self) -> None:
        """The loop's reader callback: one datagram per call (the reader is level-
        triggered, so a second queued datagram brings the loop back at once)."""
        try:
            dgram = recv_datagram_nowait(self._sock, MAX_DATAGRAM, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return  # a spurious wake-up: nothing is queued
        except OSError as exc:
            self._lost(ClientClosedError(f"connection failed: {exc}"))
            return
        if dgram is None:
            self._lost(ClientClosedError("daemon closed the connection"))
            return
        fds = dgram.fds
        try:
            msg = self._conn.receive(dgram.data, len(fds))
            if isinstance(msg, m.Event):
                self._leases.on_event(msg)  # a revoked lease's fds close now
                self._events.put_nowait(msg)
            else:
                fut = self._waiting.pop(msg.id, None) if msg.id is not None else None
                if fut is not None and not fut.done():
                    fut.set_result((msg, fds))  # the call owns the fds now
                    return
            fds.close()
        except ProtocolError as exc:
            fds.close()
            self._lost(ClientClosedError(f"daemon broke the protocol: {exc.message}"))
        except OSError as exc:
            fds.close()
            self._lost(ClientClosedError(f"connection failed: {exc}"))
        except BaseException as exc:  # a bug: fail the calls, let the loop report it
            fds.close()
            self._lost(ClientClosedError(f"client failed: {exc!r}"))
            raise

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _lost(self, reason: BaseException) -> None:
        self._stop_reading()  # a closed socket stays readable: stop the callbacks
        self._shutdown(reason)

    def _shutdown(self, reason: BaseException) -> None:
        if self._closed is None:
            self._closed = reason
            self._conn.close()
            self._events.put_nowait(None)
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(reason)

    async def _call(self, call: Call[T]) -> T:
        if self._closed is not None:
            raise ClientClosedError(str(self._closed))
        fut = self._loop.create_future()
        self._waiting[call.request.id] = fut
        try:
            await self._send(call)
            msg, fds = await fut  # the reader callback took it out of _waiting
        except BaseException:
            self._waiting.pop(call.request.id, None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result()[1].close()  # the reply came as we were cancelled: its fds
            raise
        return calls.finish(call, msg, fds)

    async def _send(self, call: Call[T]) -> None:
        if not self._send_lock.locked():  # nobody waits for room: try at once
            try:
                send_datagram_nowait(self._sock, call.data, call.fds)
            except BlockingIOError:
                pass
            else:
                return
        async with self._send_lock:  # one waiter for room at a time (one writer callback)
            await send_datagram(self._sock, call.data, call.fds)

    async def _limited(self, build: Callable[[ClientConnection], Call[T]]) -> T:
        if self._closed is not None:
            raise ClientClosedError(str(self._closed))
        async with self._slots:
            return await self._call(build(self._conn))

    # ---------------------------------------------------------------- API

    async def ping(self) -> None:
        await self._limited(calls.ping)

    async def status(self) -> m.StatusReply | StatusReplyV2:
        return await self._limited(calls.status)

    async def _read_all(self, pager: calls.Pager[P, E, K]) -> tuple[E, ...]:
        while not pager.done:
            pager.add(await self._limited(pager.request))
        return pager.result()

    async def list_devices(self) -> tuple[m.DeviceEntry, ...]:
        """Every device, sorted by bdf, read page by page (one request per page)."""
        return await self._read_all(calls.device_pager())

    async def list_devices_page(
        self, offset: int = 0, limit: int | None = None
    ) -> m.ListDevicesReply:
        """One page: devices from index ``offset`` (``next_offset`` says where to go on)."""
        return await self._limited(lambda c: calls.list_devices_page(c, offset, limit))

    async def list_groups(self) -> tuple[m.GroupEntry, ...]:
        """Every IOMMU group, sorted by id, read page by page."""
        return await self._read_all(calls.group_pager())

    async def list_groups_page(
        self, offset: int = 0, limit: int | None = None
    ) -> m.ListGroupsReply:
        """One page: groups from index ``offset``."""
        return await self._limited(lambda c: calls.list_groups_page(c, offset, limit))

    async def claim(
        self,
        devices: Sequence[str],
        backend: m.Backend | str = m.Backend.AUTO,
        ioas_id: int | None = None,
    ) -> ClaimResult:
        result = await self._limited(lambda c: calls.claim(c, devices, backend, ioas_id))
        return self._leases.add(result)

    async def claim_delegated(
        self, devices: Sequence[str], iommufd_id: int | None = None
    ) -> DelegatedClaim:
        """A fresh /dev/iommu (or ``iommufd_id``'s) and unbound cdevs (protocol v2)."""
        result = await self._limited(lambda c: calls.claim_delegated(c, devices, iommufd_id))
        return self._leases.add(result)

    async def release(self, lease_id: int) -> None:
        await self._limited(lambda c: calls.release(c, lease_id))
        self._leases.forget(lease_id)

    def lease(self, lease_id: int) -> ClaimResult | None:
        """The ClaimResult of a brokered lease this client holds (None once released or
        revoked, and for a delegated lease)."""
        found = self._leases.get(lease_id)
        return found if isinstance(found, ClaimResult) else None

    async def ioas_create(self) -> int:
        return await self._limited(calls.ioas_create)

    async def ioas_destroy(self, ioas_id: int) -> None:
        await self._limited(lambda c: calls.ioas_destroy(c, ioas_id))

    async def ioas_map(self, ioas_id: int, ranges: Sequence[MapSpec]) -> tuple[m.MappedRange, ...]:
        return await self._limited(lambda c: calls.ioas_map(c, ioas_id, ranges))

    async def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        return await self._limited(lambda c: calls.ioas_unmap(c, ioas_id, iova, length))

    async def iova_ranges(self, ioas_id: int) -> m.IovaRangesReply:
        return await self._limited(lambda c: calls.iova_ranges(c, ioas_id))

    async def device_reset(self, bdf: str) -> None:
        await self._limited(lambda c: calls.device_reset(c, bdf))

    async def subscribe(
        self,
        events: Sequence[m.EventName | str] | None = None,
        groups: Sequence[int] | None = None,
    ) -> None:
        await self._limited(lambda c: calls.subscribe(c, events, groups))

    async def revoke(self, group_id: int, reason: str) -> tuple[int, ...]:
        return await self._limited(lambda c: calls.revoke(c, group_id, reason))

    async def events(self) -> AsyncIterator[m.Event]:
        """Events as they arrive (after ``subscribe``); ends when the connection closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # wake other iterators too
                return
            yield event
