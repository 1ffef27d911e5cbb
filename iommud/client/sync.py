"""``Client``: the blocking client of the iommud protocol, for scripts and non-async VMMs.

Plain blocking socket, one request at a time: send, then read datagrams until the reply
with the request's id arrives; events read meanwhile are queued for ``next_event()``.
Received fds are owned in an ``FdSet`` from arrival; a claim's device fds close when its
``lease_revoked`` event is read (see ``ClaimResult``). Methods and their results are
defined once in ``iommud.client.calls``; this module only moves datagrams.
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Iterator, Sequence
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
from iommud.transport import DEFAULT_SOCKET, recv_datagram_nowait, send_datagram_blocking

T = TypeVar("T")


class Client:
    """A blocking connection to iommud; ``Client(path, name)`` connects and says hello."""

    def __init__(
        self,
        path: str = DEFAULT_SOCKET,
        name: str = calls.DEFAULT_NAME,
        *,
        timeout: float = 30.0,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        """``version`` 2 allows delegated claims (:meth:`claim_delegated`)."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._conn = ClientConnection()
        self._events: collections.deque[m.Event] = collections.deque()
        self._closed: str | None = None
        self._leases = LeaseTracker()
        self._timeout = timeout
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            # From here on the socket blocks in the kernel with SO_RCVTIMEO/SO_SNDTIMEO
            # as its deadline: Python's own timeout mode would poll() before every
            # send and receive, two extra syscalls per call.
            self._sock.settimeout(None)
            self._set_timeout(socket.SO_SNDTIMEO, timeout)
            self._set_timeout(socket.SO_RCVTIMEO, timeout)
            self.hello: m.HelloReply = self._call(calls.hello(self._conn, name, version))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed is None:
            self._closed = "client closed"
        self._conn.close()
        self._sock.close()

    def fileno(self) -> int:
        """The socket, for callers that poll for events with select/poll."""
        return self._sock.fileno()

    # ---------------------------------------------------------------- transport

    def _set_timeout(self, option: int, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            seconds = 1e-6  # "do not wait": the kernel's 0 would mean "wait forever"
        whole, frac = divmod(seconds or 0.0, 1.0)  # None -> 0: no deadline
        self._sock.setsockopt(
            socket.SOL_SOCKET, option, struct.pack("ll", int(whole), int(frac * 1e6))
        )

    def _receive(self) -> tuple[AnyServerMessage, FdSet]:
        """Read and decode one datagram (blocking up to SO_RCVTIMEO: TimeoutError)."""
        try:
            dgram = recv_datagram_nowait(self._sock, MAX_DATAGRAM, MAX_FDS)
        except BlockingIOError as exc:  # what SO_RCVTIMEO's expiry looks like
            raise TimeoutError("no reply from the daemon in time") from exc
        if dgram is None:
            raise self._fail("daemon closed the connection")
        fds = dgram.fds
        try:
            return self._conn.receive(dgram.data, len(fds)), fds
        except ProtocolError as exc:
            fds.close()
            raise self._fail(f"daemon broke the protocol: {exc.message}") from exc
        except BaseException:
            fds.close()
            raise

    def _fail(self, reason: str) -> ClientClosedError:
        self._closed = reason
        self._conn.close()
        self._sock.close()
        return ClientClosedError(reason)

    def _call(self, call: Call[T]) -> T:
        if self._closed is not None:
            raise ClientClosedError(self._closed)
        try:
            try:
                send_datagram_blocking(self._sock, call.data, call.fds)
            except BlockingIOError as exc:  # SO_SNDTIMEO expired
                raise TimeoutError("the daemon does not read its socket") from exc
            while True:
                msg, fds = self._receive()
                if isinstance(msg, m.Event):
                    fds.close()
                    self._leases.on_event(msg)
                    self._events.append(msg)
                elif msg.id == call.request.id:
                    return calls.finish(call, msg, fds)
                else:
                    fds.close()  # an error reply without id: nothing waits for it
        except ClientClosedError:
            raise
        except OSError as exc:
            raise self._fail(f"connection failed: {exc}") from exc

    # ---------------------------------------------------------------- API

    def ping(self) -> None:
        self._call(calls.ping(self._conn))

    def status(self) -> m.StatusReply | StatusReplyV2:
        return self._call(calls.status(self._conn))

    def _read_all(self, pager: calls.Pager[P, E, K]) -> tuple[E, ...]:
        while not pager.done:
            pager.add(self._call(pager.request(self._conn)))
        return pager.result()

    def list_devices(self) -> tuple[m.DeviceEntry, ...]:
        """Every device, sorted by bdf, read page by page (one request per page)."""
        return self._read_all(calls.device_pager())

    def list_devices_page(self, offset: int = 0, limit: int | None = None) -> m.ListDevicesReply:
        """One page: devices from index ``offset`` (``next_offset`` says where to go on)."""
        return self._call(calls.list_devices_page(self._conn, offset, limit))

    def list_groups(self) -> tuple[m.GroupEntry, ...]:
        """Every IOMMU group, sorted by id, read page by page."""
        return self._read_all(calls.group_pager())

    def list_groups_page(self, offset: int = 0, limit: int | None = None) -> m.ListGroupsReply:
        """One page: groups from index ``offset``."""
        return self._call(calls.list_groups_page(self._conn, offset, limit))

    def claim(
        self,
        devices: Sequence[str],
        backend: m.Backend | str = m.Backend.AUTO,
        ioas_id: int | None = None,
    ) -> ClaimResult:
        return self._leases.add(self._call(calls.claim(self._conn, devices, backend, ioas_id)))

    def claim_delegated(
        self, devices: Sequence[str], iommufd_id: int | None = None
    ) -> DelegatedClaim:
        """A fresh /dev/iommu (or ``iommufd_id``'s) and unbound cdevs (protocol v2)."""
        call = calls.claim_delegated(self._conn, devices, iommufd_id)
        return self._leases.add(self._call(call))

    def release(self, lease_id: int) -> None:
        self._call(calls.release(self._conn, lease_id))
        self._leases.forget(lease_id)

    def lease(self, lease_id: int) -> ClaimResult | None:
        """The ClaimResult of a brokered lease this client holds (None once released or
        revoked, and for a delegated lease)."""
        found = self._leases.get(lease_id)
        return found if isinstance(found, ClaimResult) else None

    def ioas_create(self) -> int:
        return self._call(calls.ioas_create(self._conn))

    def ioas_destroy(self, ioas_id: int) -> None:
        self._call(calls.ioas_destroy(self._conn, ioas_id))

    def ioas_map(self, ioas_id: int, ranges: Sequence[MapSpec]) -> tuple[m.MappedRange, ...]:
        return self._call(calls.ioas_map(self._conn, ioas_id, ranges))

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        return self._call(calls.ioas_unmap(self._conn, ioas_id, iova, length))

    def iova_ranges(self, ioas_id: int) -> m.IovaRangesReply:
        return self._call(calls.iova_ranges(self._conn, ioas_id))

    def device_reset(self, bdf: str) -> None:
        self._call(calls.device_reset(self._conn, bdf))

    def subscribe(
        self,
        events: Sequence[m.EventName | str] | None = None,
        groups: Sequence[int] | None = None,
    ) -> None:
        self._call(calls.subscribe(self._conn, events, groups))

    def revoke(self, group_id: int, reason: str) -> tuple[int, ...]:
        return self._call(calls.revoke(self._conn, group_id, reason))

    def next_event(self, timeout: float | None = None) -> m.Event | None:
        """The next event (queued or read now); ``None`` if none came within ``timeout``."""
        if self._events:
            return self._events.popleft()
        if self._closed is not None:
            raise ClientClosedError(self._closed)
        self._set_timeout(socket.SO_RCVTIMEO, timeout)
        try:
            while True:
                msg, fds = self._receive()
                fds.close()
                if isinstance(msg, m.Event):
                    self._leases.on_event(msg)
                    return msg
        except TimeoutError:
            return None
        finally:
            if self._closed is None:
                self._set_timeout(socket.SO_RCVTIMEO, self._timeout)

    def events(self) -> Iterator[m.Event]:
        """Events forever (blocking), until the connection closes."""
        while True:
            event = self.next_event(None)
            if event is not None:
                yield event
