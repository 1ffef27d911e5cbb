"""Helpers for broker tests: the lab's devices, identities, a config like the demo's,
sealed memfds and a ``Client`` that drives one broker session (fixtures, and the drawing
of the fake lab tree they use: conftest.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import topology

from iommud.broker import Broker, Session
from iommud.config import AccessRule, Config, DaemonConfig, ManageConfig, Quota
from iommud.fds import FdSet
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.protocol.v2 import ReplyV2
from tests.fakesys import FakeSys

EDU = topology.EDU0
BR_EDU1 = topology.EDU1
BR_EDU2 = topology.EDU2
E1000 = topology.NIC
PAGE = 4096

ALICE = Identity(uid=1000, gid=1000, pid=4242)
BOB = Identity(uid=1000, gid=1000, pid=4343)
MALLORY = Identity(uid=2000, gid=2000, pid=666)
ROOT = Identity(uid=0, gid=0, pid=1)


def make_config(tmp_path: Path, fs: FakeSys, **quota: int) -> Config:
    return Config(
        daemon=DaemonConfig(
            sys_root=fs.sys_root, dev_root=fs.dev_root, state_dir=tmp_path / "state"
        ),
        manage=ManageConfig(rebind=("1234:11e8", "8086:100e")),
        access=(AccessRule(uid=1000, devices=("1234:11e8",), quota="vm"),),
        quotas={
            "vm": Quota(**quota)
            if quota
            else Quota(pinned_bytes=1 << 20, max_ioas=4, max_mappings=8)
        },
    )


def memfd(size: int = 4 * PAGE, *, seal: bool = True, data: bytes = b"") -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Client:
    """Drives one broker session like the server would (ids, fd sets)."""

    def __init__(self, broker: Broker, identity: Identity, pidfd: int | None = None) -> None:
        self.broker = broker
        self.session: Session = broker.open_session(identity, pidfd=pidfd)
        self._id = 0
        self.received: list[int] = []

    async def call(self, request: m.RequestBase, fds: list[int] | None = None) -> m.Reply | ReplyV2:
        outcome = await self.broker.handle(self.session, request, FdSet(fds or []))  # type: ignore[arg-type]
        self.received += [fd.steal() for fd in outcome.fds]
        return outcome.reply

    def next_id(self) -> int:
        self._id += 1
        return self._id

    async def claim(self, *devices: str, **kw: object) -> m.ClaimReply:
        reply = await self.call(m.Claim(id=self.next_id(), devices=devices, **kw))
        assert isinstance(reply, m.ClaimReply)
        return reply

    async def map(self, ioas_id: int, fd: int, *ranges: m.MapRange) -> m.IoasMapReply:
        reply = await self.call(
            m.IoasMap(id=self.next_id(), ioas_id=ioas_id, ranges=ranges), [os.dup(fd)]
        )
        assert isinstance(reply, m.IoasMapReply)
        return reply

    def close_received(self) -> None:
        for fd in self.received:
            os.close(fd)
        self.received.clear()

    async def close(self) -> None:
        self.close_received()
        await self.broker.close_session(self.session)
