"""Helpers for server tests: a stand-in broker (the real server runs it: conftest.py).

The stand-in broker implements the broker API the server uses (``BrokerAPI``) with
real fds (memfds as "device fds") so the socket path, SCM_RIGHTS and the fd ownership
rules are exercised for real; it holds no kernel state. The server runs in-process on
an AF_UNIX SOCK_SEQPACKET socket in a short temp dir (sun_path is limited to 108 bytes).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from iommud.broker import Outcome
from iommud.broker.events import Delivery
from iommud.errors import NotFoundError
from iommud.fds import FdSet, OwnedFd
from iommud.host.snapshot import HostSnapshot
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.protocol.messages import EVENT_TYPES
from iommud.server import Server


@dataclass
class Session:
    identity: Identity
    pidfd: OwnedFd | None
    events: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    closed: bool = False
    holds: bool = False  # set by ioas_create: an idle connection holding this stays open


class StandInBroker:
    """Answers requests from memory; ``device_reset`` of 0000:00:1f.7 raises a bug."""

    CRASH_BDF = "0000:00:1f.7"

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.mapped: list[bytes] = []
        self.started = 0
        self.finished = 0
        self.delays: dict[int, float] = {}  # ioas_destroy(ioas_id) sleeps this long

    def open_session(self, identity: Identity, *, pidfd: OwnedFd | None = None) -> Session:
        session = Session(identity, pidfd)
        self.sessions.append(session)
        return session

    async def close_session(self, session: Session) -> None:
        session.closed = True
        if session.pidfd is not None:
            session.pidfd.close()

    def events(self, session: Session) -> asyncio.Queue[Delivery]:
        return session.events

    def holds_resources(self, session: Session) -> bool:
        return session.holds

    async def handle(self, session: Session, request: m.Request, fds: FdSet) -> Outcome:
        self.started += 1
        try:
            return await self._handle(session, request, fds)
        finally:
            self.finished += 1

    async def _handle(self, session: Session, request: m.Request, fds: FdSet) -> Outcome:
        match request:
            case m.Ping():
                return Outcome(m.PingReply(id=request.id))
            case m.Subscribe():
                return Outcome(m.SubscribeReply(id=request.id))
            case m.IoasCreate():
                session.holds = True
                return Outcome(m.IoasCreateReply(id=request.id, ioas_id=7))
            case m.IoasDestroy():
                await asyncio.sleep(self.delays.get(request.ioas_id, 0.0))
                return Outcome(m.IoasDestroyReply(id=request.id))
            case m.IoasMap():
                out = []
                for r in request.ranges:
                    fd = fds[r.fd_index].fileno()
                    self.mapped.append(os.pread(fd, r.length, r.offset))
                    out.append(m.MappedRange(iova=0x100000 + r.offset, length=r.length))
                return Outcome(m.IoasMapReply(id=request.id, mappings=tuple(out)))
            case m.Claim():
                dev_fds: list[OwnedFd] = []
                for bdf in request.devices:
                    dev = OwnedFd(os.memfd_create("dev", os.MFD_CLOEXEC))
                    os.write(dev.fileno(), bdf.encode())
                    dev_fds.append(dev)
                devices = tuple(
                    m.ClaimedDevice(bdf=b, fd_index=i, devid=i + 1)
                    for i, b in enumerate(request.devices)
                )
                reply = m.ClaimReply(
                    id=request.id,
                    lease_id=3,
                    group_id=12,
                    backend=m.BackendKind.IOMMUFD,
                    ioas_id=7,
                    devices=devices,
                )
                return Outcome(reply, dev_fds)
            case m.Release():
                raise NotFoundError("no such lease", lease_id=request.lease_id)
            case m.DeviceReset() if request.bdf == self.CRASH_BDF:
                raise RuntimeError("simulated bug in the broker")
            case _:
                return Outcome(m.PingReply(id=request.id))  # wrong op on purpose


@dataclass
class Running:
    server: Server
    broker: StandInBroker
    path: str
    task: asyncio.Task[None]


class EmptyHostView:
    """A host view that never sees a device (iommud.watch.HostOwner)."""

    async def apply(self, event: Any) -> list[Any]:
        return []

    async def rescan(self, reason: str) -> list[Any]:
        return []


class StandInDaemonBroker(StandInBroker):
    """The stand-in with the lifecycle the daemon process drives (start/aclose) and the
    host watcher's hooks (iommud.watch.BrokerHooks): an empty host view, events dropped."""

    capabilities = ("iommufd", "legacy")

    def __init__(self) -> None:
        super().__init__()
        self.event_source: str | None = None
        self.host_changes: list[int] = []

    @property
    def snapshot(self) -> HostSnapshot:
        return HostSnapshot({}, {}, has_iommufd=False, has_legacy_container=False)

    def publish(self, name: m.EventName, **fields: Any) -> m.Event:
        return EVENT_TYPES[name](ts=0.0, seq=1, **fields)

    @property
    def view(self) -> EmptyHostView:
        return EmptyHostView()

    async def on_host_change(self, group_id: int, change: Any = None) -> None:
        self.host_changes.append(group_id)

    async def start(self) -> None:
        self.started_up = True

    def begin_stop(self) -> None:
        pass

    async def aclose(self) -> None:
        print("broker.aclose", flush=True)  # the process test looks for this line
