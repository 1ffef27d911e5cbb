"""``AsyncClient``: the asyncio client of the iommud protocol, for async VMMs and tools.

One reader task owns the socket's receive side: it decodes every datagram with the
sans-I/O ``ClientConnection`` (received fds owned in an ``FdSet`` from arrival), hands
replies to the waiting call by id and queues events for ``events()``. Requests from
concurrent tasks pipeline up to the server's in-flight limit. Methods and their results
are defined once in ``iommud.client.calls``; this module only moves datagrams. A
claim's device fds close as soon as its ``lease_revoked`` arrives (``ClaimResult``).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from iommud.transport import DEFAULT_SOCKET, recv_datagram, send_datagram

T = TypeVar("T")


class AsyncClient:
    """A connection to iommud. Create with ``await AsyncClient.connect(path, name)``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._conn = ClientConnection()
        self._waiting: dict[int, asyncio.Future[tuple[AnyServerMessage, FdSet]]] = {}
        self._events: asyncio.Queue[m.Event | None] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(1)  # until hello_reply tells the server's limit
        self._reader: asyncio.Task[None] | None = None
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
        client._reader = asyncio.create_task(client._read_loop())
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._shutdown(ClientClosedError("client closed"))
        self._sock.close()

    # ---------------------------------------------------------------- transport

    async def _read_loop(self) -> None:
        reason: BaseException = ClientClosedError("daemon closed the connection")
        try:
            while True:
                dgram = await recv_datagram(self._sock, MAX_DATAGRAM, MAX_FDS)
                if dgram is None:
                    break
                with contextlib.ExitStack() as stack:
                    stack.callback(dgram.fds.close)
                    msg = self._conn.receive(dgram.data, len(dgram.fds))
                    if isinstance(msg, m.Event):
                        self._leases.on_event(msg)  # a revoked lease's fds close now
                        self._events.put_nowait(msg)
                        continue
                    fut = self._waiting.pop(msg.id, None) if msg.id is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result((msg, dgram.fds))
                        stack.pop_all()  # the call owns the fds now
        except ProtocolError as exc:
            reason = ClientClosedError(f"daemon broke the protocol: {exc.message}")
        except OSError as exc:
            reason = ClientClosedError(f"connection failed: {exc}")
        finally:
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
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call.request.id] = fut
        try:
            async with self._send_lock:
                await send_datagram(self._sock, call.data, call.fds)
            msg, fds = await fut
        finally:
            self._waiting.pop(call.request.id, None)
        return calls.finish(call, msg, fds)

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
