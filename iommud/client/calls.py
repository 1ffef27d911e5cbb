"""The client's requests as I/O-free ``Call`` objects, shared by the async and blocking APIs.

A ``Call`` holds the encoded request, the fds to attach, and how to turn the reply (and
the fds that came with it) into the caller's result. ``AsyncClient`` and ``Client`` only
move bytes; every method is written once, here. Error replies become ``IommudError``
subclasses carrying the server's code, message and details. Arguments the protocol
refuses (a negative offset, a BDF that is not one, a MapSpec without an open fd) raise
``BadRequestError`` here, with the same ``errors`` details the daemon would reply, and
nothing is sent. No sockets, no asyncio.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from pydantic import ValidationError

from iommud import errors
from iommud.fds import FdSet, OwnedFd
from iommud.protocol import messages as m
from iommud.protocol.codec import describe_errors
from iommud.protocol.connection import ClientConnection
from iommud.protocol.limits import PROTOCOL_VERSION
from iommud.protocol.v2 import AnyServerMessage, ClaimMode, ClaimReplyV2, ClaimV2, StatusReplyV2

T = TypeVar("T")
L = TypeVar("L", "ClaimResult", "DelegatedClaim")
_Req = TypeVar("_Req", bound=m.RequestBase)

DEFAULT_NAME: Final = "iommud-client"
"""The ``hello.client`` name a client sends unless told another."""


class ClientClosedError(ConnectionError):
    """The connection to the daemon is closed (by us, or the daemon went away)."""


def error_from_reply(reply: m.ErrorReply) -> errors.IommudError:
    """The ``IommudError`` subclass for ``reply.code``, with its message and details."""
    return errors.from_reply(reply.code, reply.message, reply.details)


@dataclass(slots=True)
class ClaimedDeviceFd:
    """A claimed device and its fd (an ``OwnedFd``: steal it, or it closes with the result)."""

    bdf: str
    devid: int | None
    fd: OwnedFd


@dataclass(slots=True)
class ClaimResult:
    """A granted lease and its device fds.

    The client that returned it closes its device fds by itself when the daemon revokes
    the lease (``lease_revoked``: a violation, ``iommuctl revoke``, or the kernel asking
    for a hot-unplugged device back), as soon as it reads that event, and records the
    reason in ``revoked``. A hot-unplug cannot finish while any process holds the
    device open, so a VMM must let go of the fds it stole (``OwnedFd.steal``) itself,
    and must not register its own handler on vfio-pci's REQ irq: that would replace
    the daemon's (VFIO_DEVICE_SET_IRQS keeps one trigger per device).
    """

    lease_id: int
    group_id: int
    backend: m.BackendKind
    ioas_id: int
    devices: list[ClaimedDeviceFd] = field(default_factory=list)
    revoked: str | None = None

    def close(self) -> None:
        """Close every device fd the caller did not steal."""
        for dev in self.devices:
            dev.fd.close()

    def revoke(self, reason: str) -> None:
        """The lease is over: remember why and close the device fds."""
        self.revoked = reason
        self.close()

    def __enter__(self) -> ClaimResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class DelegatedClaim:
    """A delegated lease (protocol v2): the /dev/iommu fd (None when the claim joined an
    iommufd this client already holds) and the UNBOUND device cdev fds, for a VMM that
    binds and maps itself (QEMU: ``-object iommufd,fd=N -device vfio-pci,fd=M``).

    Pass the fds on (``OwnedFd.steal`` or inheritance) and close what is left; on
    ``lease_revoked`` the client closes what the caller did not steal.
    """

    lease_id: int
    group_id: int
    iommufd_id: int
    iommufd: OwnedFd | None
    devices: list[ClaimedDeviceFd] = field(default_factory=list)
    revoked: str | None = None

    def close(self) -> None:
        if self.iommufd is not None:
            self.iommufd.close()
        for dev in self.devices:
            dev.fd.close()

    def revoke(self, reason: str) -> None:
        self.revoked = reason
        self.close()

    def __enter__(self) -> DelegatedClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaseTracker:
    """The claims a client handed out and still holds, by lease id.

    Strong references: a caller that keeps only the device fds (not the ClaimResult)
    still has them closed on revocation. An entry goes on release or revocation.
    """

    def __init__(self) -> None:
        self._claims: dict[int, ClaimResult | DelegatedClaim] = {}

    def add(self, result: L) -> L:
        self._claims[result.lease_id] = result
        return result

    def get(self, lease_id: int) -> ClaimResult | DelegatedClaim | None:
        return self._claims.get(lease_id)

    def forget(self, lease_id: int) -> None:
        self._claims.pop(lease_id, None)

    def on_event(self, event: m.Event) -> None:
        """On ``lease_revoked`` for a lease of ours: close its device fds."""
        if isinstance(event, m.LeaseRevoked):
            result = self._claims.pop(event.lease_id, None)
            if result is not None:
                result.revoke(event.reason)


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One range to map: ``length`` bytes at ``offset`` of ``fd`` (memfd), at ``iova``."""

    fd: OwnedFd | int
    offset: int
    length: int
    iova: int | None = None
    read: bool = True
    write: bool = True


@dataclass(slots=True)
class Call(Generic[T]):
    """One request ready to send, and how to read its reply."""

    request: m.Request
    data: bytes
    fds: list[int]
    parse: Callable[[AnyServerMessage, FdSet], T]


def finish(call: Call[T], reply: AnyServerMessage, fds: FdSet) -> T:
    """The call's result; raises the mapped IommudError for an error reply.

    ``fds`` are closed unless ``parse`` moved them into the result.
    """
    try:
        if isinstance(reply, m.ErrorReply):
            raise error_from_reply(reply)
        return call.parse(reply, fds)
    finally:
        fds.close()


def _expect(reply: AnyServerMessage, cls: type[T]) -> T:
    if not isinstance(reply, cls):  # ClientConnection already matched op to id
        raise errors.BadRequestError("unexpected reply", op=getattr(reply, "op", None))
    return reply


def _build(conn: ClientConnection, cls: type[_Req], **fields: Any) -> _Req:
    """``conn.build``, with arguments the protocol refuses raised as ``BadRequestError``."""
    try:
        return conn.build(cls, **fields)
    except ValidationError as exc:
        op = cls.model_fields["op"].default
        found = describe_errors(exc)
        first = found[0] if found else {}
        assert isinstance(first, dict)
        where = f"{first.get('loc')}: " if first.get("loc") else ""
        raise errors.BadRequestError(
            f"invalid {op} request: {where}{first.get('msg', exc)}", op=op, errors=found
        ) from None


def _fileno(i: int, fd: object) -> int:
    """A MapSpec's fd as a number, or BadRequestError (nothing is sent).

    An fd number that is not open is caught here (one F_GETFD): sendmsg would fail with
    EBADF, which the blocking client takes for a broken connection."""
    if isinstance(fd, OwnedFd):
        if fd.closed:
            raise errors.BadRequestError(f"range {i}: its OwnedFd is closed", range=i)
        return fd.fileno()
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise errors.BadRequestError(
            f"range {i}: fd must be an open file descriptor (int or OwnedFd), "
            f"not {type(fd).__name__} {fd!r}"[:200],
            range=i,
        )
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        raise errors.BadRequestError(
            f"range {i}: fd {fd} is not open ({os.strerror(exc.errno or 0)})", range=i, fd=fd
        ) from None
    return fd


def _make(conn: ClientConnection, request: m.Request, fds: Sequence[int], parse: Any) -> Call[Any]:
    data, nfds = conn.send(request)
    if nfds != len(fds):
        conn.close()  # unreachable unless a model disagrees with its own fd count
        raise errors.BadRequestError("fd count mismatch", declared=nfds, attached=len(fds))
    return Call(request, data, list(fds), parse)


@functools.cache  # one parser per reply class, not a new closure per call
def _none(cls: type[Any]) -> Callable[[AnyServerMessage, FdSet], None]:
    def parse(reply: AnyServerMessage, _fds: FdSet) -> None:
        _expect(reply, cls)

    return parse


def hello(conn: ClientConnection, name: str, version: int = PROTOCOL_VERSION) -> Call[m.HelloReply]:
    req = conn.hello(name, version)
    return _make(conn, req, [], lambda r, _f: _expect(r, m.HelloReply))


def ping(conn: ClientConnection) -> Call[None]:
    return _make(conn, _build(conn, m.Ping), [], _none(m.PingReply))


def status(conn: ClientConnection) -> Call[m.StatusReply | StatusReplyV2]:
    """v1's reply, or on a version 2 connection v2's (leases with mode, state, pinned
    bytes)."""
    cls = StatusReplyV2 if conn.version == 2 else m.StatusReply
    return _make(conn, _build(conn, m.Status), [], lambda r, _f: _expect(r, cls))


def list_devices_page(
    conn: ClientConnection, offset: int = 0, limit: int | None = None
) -> Call[m.ListDevicesReply]:
    """One page of devices (see ``Pager`` for reading them all)."""
    req = _build(conn, m.ListDevices, offset=offset, limit=limit)
    return _make(conn, req, [], lambda r, _f: _expect(r, m.ListDevicesReply))


def list_groups_page(
    conn: ClientConnection, offset: int = 0, limit: int | None = None
) -> Call[m.ListGroupsReply]:
    """One page of groups (see ``Pager`` for reading them all)."""
    req = _build(conn, m.ListGroups, offset=offset, limit=limit)
    return _make(conn, req, [], lambda r, _f: _expect(r, m.ListGroupsReply))


class PagingError(RuntimeError):
    """The daemon's pages do not lead to the end of the list (``next_offset`` did not
    advance): a daemon bug, reported instead of looping forever."""


E = TypeVar("E")
K = TypeVar("K", str, int)
P = TypeVar("P", m.ListDevicesReply, m.ListGroupsReply)

MAX_RESTARTS = 3
"""How often ``Pager`` starts over when the list changes size between pages."""


class Pager(Generic[P, E, K]):
    """Reads a whole list page by page (PROTOCOL.md, "Paging"); no I/O.

    The caller sends ``request(conn)`` (the page at ``offset``) until ``done``, feeding
    each reply to ``add``. When ``total`` changes between pages (devices came or went) the pager
    starts over from offset 0, at most ``MAX_RESTARTS`` times; after that it merges
    what it got. Entries are kept by key, so an entry seen on two pages counts once,
    and ``result`` is sorted by key, as the daemon orders them.
    """

    def __init__(
        self,
        page: Callable[[ClientConnection, int], Call[P]],
        entries: Callable[[P], tuple[E, ...]],
        key: Callable[[E], K],
    ) -> None:
        self._page: Callable[[ClientConnection, int], Call[P]] = page
        self._entries: Callable[[P], tuple[E, ...]] = entries
        self._key: Callable[[E], K] = key
        self._seen: dict[K, E] = {}
        self._total: int | None = None
        self.offset = 0
        self.pages = 0
        self.restarts = 0
        self.done = False

    def request(self, conn: ClientConnection) -> Call[P]:
        """The request for the page at ``offset``; feed its reply to ``add``."""
        return self._page(conn, self.offset)

    def add(self, reply: P) -> None:
        self.pages += 1
        if self._total is not None and reply.total != self._total and self.restarts < MAX_RESTARTS:
            self.restarts += 1
            self._seen.clear()
            self._total = None
            self.offset = 0
            return
        self._total = reply.total
        for entry in self._entries(reply):
            self._seen[self._key(entry)] = entry
        if reply.next_offset is None:
            self.done = True
        elif reply.next_offset <= self.offset:
            raise PagingError(
                f"daemon sent next_offset {reply.next_offset} for a page at offset {self.offset}"
            )
        else:
            self.offset = reply.next_offset

    def result(self) -> tuple[E, ...]:
        return tuple(self._seen[k] for k in sorted(self._seen))


def device_pager() -> Pager[m.ListDevicesReply, m.DeviceEntry, str]:
    return Pager(list_devices_page, lambda r: r.devices, lambda d: d.bdf)


def group_pager() -> Pager[m.ListGroupsReply, m.GroupEntry, int]:
    return Pager(list_groups_page, lambda r: r.groups, lambda g: g.group_id)


def claim(
    conn: ClientConnection,
    devices: Sequence[str],
    backend: m.Backend | str = m.Backend.AUTO,
    ioas_id: int | None = None,
) -> Call[ClaimResult]:
    def parse(reply: AnyServerMessage, fds: FdSet) -> ClaimResult:
        r: m.ClaimReply | ClaimReplyV2 = (  # v2's reply to a brokered claim has an ioas_id
            reply if isinstance(reply, ClaimReplyV2) else _expect(reply, m.ClaimReply)
        )
        if r.ioas_id is None:
            raise errors.BadRequestError("a brokered claim_reply without ioas_id", op=r.op)
        result = ClaimResult(r.lease_id, r.group_id, r.backend, r.ioas_id)
        for dev in r.devices:
            result.devices.append(
                ClaimedDeviceFd(dev.bdf, dev.devid, OwnedFd(fds[dev.fd_index].steal()))
            )
        return result

    req = _build(conn, m.Claim, devices=tuple(devices), backend=backend, ioas_id=ioas_id)
    return _make(conn, req, [], parse)


def claim_delegated(
    conn: ClientConnection, devices: Sequence[str], iommufd_id: int | None = None
) -> Call[DelegatedClaim]:
    """A delegated claim (needs a version 2 connection and the ``delegate`` right)."""

    def parse(reply: AnyServerMessage, fds: FdSet) -> DelegatedClaim:
        r = _expect(reply, ClaimReplyV2)
        if r.iommufd_id is None:
            raise errors.BadRequestError("a delegated claim_reply without iommufd_id", op=r.op)
        index = r.iommufd_fd_index
        result = DelegatedClaim(
            r.lease_id,
            r.group_id,
            r.iommufd_id,
            None if index is None else OwnedFd(fds[index].steal()),
        )
        for dev in r.devices:
            result.devices.append(
                ClaimedDeviceFd(dev.bdf, None, OwnedFd(fds[dev.fd_index].steal()))
            )
        return result

    req = _build(
        conn, ClaimV2, devices=tuple(devices), mode=ClaimMode.DELEGATED, iommufd_id=iommufd_id
    )
    return _make(conn, req, [], parse)


def release(conn: ClientConnection, lease_id: int) -> Call[None]:
    return _make(conn, _build(conn, m.Release, lease_id=lease_id), [], _none(m.ReleaseReply))


def ioas_create(conn: ClientConnection) -> Call[int]:
    return _make(
        conn, _build(conn, m.IoasCreate), [], lambda r, _f: _expect(r, m.IoasCreateReply).ioas_id
    )


def ioas_destroy(conn: ClientConnection, ioas_id: int) -> Call[None]:
    req = _build(conn, m.IoasDestroy, ioas_id=ioas_id)
    return _make(conn, req, [], _none(m.IoasDestroyReply))


def ioas_map(
    conn: ClientConnection, ioas_id: int, ranges: Sequence[MapSpec]
) -> Call[tuple[m.MappedRange, ...]]:
    """Each distinct fd is attached once; ranges name it by position (``fd_index``).

    The ranges go to pydantic as plain dicts: the request is validated in one call of its
    core (as the daemon validates it off the wire), not model by model."""
    index: dict[int, int] = {}
    wire: list[dict[str, Any]] = []
    for i, spec in enumerate(ranges):
        fd = _fileno(i, spec.fd)
        wire.append(
            {
                "fd_index": index.setdefault(fd, len(index)),
                "offset": spec.offset,
                "length": spec.length,
                "iova": spec.iova,
                "read": spec.read,
                "write": spec.write,
            }
        )
    req = _build(conn, m.IoasMap, ioas_id=ioas_id, ranges=wire)  # fds: one per distinct fd
    return _make(conn, req, list(index), lambda r, _f: _expect(r, m.IoasMapReply).mappings)


def ioas_unmap(conn: ClientConnection, ioas_id: int, iova: int, length: int) -> Call[int]:
    req = _build(conn, m.IoasUnmap, ioas_id=ioas_id, iova=iova, length=length)
    return _make(conn, req, [], lambda r, _f: _expect(r, m.IoasUnmapReply).unmapped)


def iova_ranges(conn: ClientConnection, ioas_id: int) -> Call[m.IovaRangesReply]:
    req = _build(conn, m.IovaRanges, ioas_id=ioas_id)
    return _make(conn, req, [], lambda r, _f: _expect(r, m.IovaRangesReply))


def device_reset(conn: ClientConnection, bdf: str) -> Call[None]:
    return _make(conn, _build(conn, m.DeviceReset, bdf=bdf), [], _none(m.DeviceResetReply))


def subscribe(
    conn: ClientConnection,
    events: Sequence[m.EventName | str] | None = None,
    groups: Sequence[int] | None = None,
) -> Call[None]:
    req = _build(
        conn,
        m.Subscribe,
        events=None if events is None else tuple(events),
        groups=None if groups is None else tuple(groups),
    )
    return _make(conn, req, [], _none(m.SubscribeReply))


def revoke(conn: ClientConnection, group_id: int, reason: str) -> Call[tuple[int, ...]]:
    req = _build(conn, m.Revoke, group_id=group_id, reason=reason)
    return _make(conn, req, [], lambda r, _f: _expect(r, m.RevokeReply).revoked_leases)
