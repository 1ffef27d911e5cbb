"""Fixtures for broker tests: the lab topology as a fake sysfs tree, the fake kernel,
a config like the demo's, a started Broker, and an fd-leak check around every test.

The tree (tests/fakesys.py, lab_topology)::

    group 3:  0000:00:10.0  edu    (alone, driver-less)
    group 4:  0000:00:11.0  pci-bridge (no driver)
              0000:01:01.0  edu, 0000:01:02.0 edu (driver-less)
              0000:01:03.0  e1000  (bound to e1000)
    group 5:  0000:00:1f.0 lpc_ich + 0000:00:1f.2 ahci
    group 6:  0000:00:01.0  virtio-pci
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import topology

from iommud.broker import Broker, Session
from iommud.config import AccessRule, Config, DaemonConfig, ManageConfig, Quota
from iommud.fds import FdSet
from iommud.policy import Identity
from iommud.protocol import messages as m
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, lab_topology

EDU = topology.EDU0
BR_EDU1 = topology.EDU1
BR_EDU2 = topology.EDU2
E1000 = topology.NIC
PAGE = 4096

ALICE = Identity(uid=1000, gid=1000, pid=4242)
BOB = Identity(uid=1000, gid=1000, pid=4343)
MALLORY = Identity(uid=2000, gid=2000, pid=666)
ROOT = Identity(uid=0, gid=0, pid=1)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


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


@pytest.fixture
def fs(tmp_path: Path) -> FakeSys:
    return lab_topology(tmp_path / "host")


@pytest.fixture
def fd_baseline() -> Iterator[None]:
    """Fails the test if it leaves more (or fewer) fds open than it started with."""
    before = open_fds()
    yield
    after = open_fds()
    assert after == before, f"fd leak: opened {after - before}, closed {before - after}"


@pytest.fixture
def kernel(fs: FakeSys) -> FakeKernel:
    return FakeKernel(fs, unbind_block_limit=5.0)


@pytest.fixture
async def broker(
    fd_baseline: None, tmp_path: Path, fs: FakeSys, kernel: FakeKernel
) -> AsyncIterator[Broker]:
    b = Broker(make_config(tmp_path, fs), kernel, sysfs_timeout=1.0, restore_retry_delay=0.01)
    await b.start()
    yield b
    await b.aclose(grace=5.0)


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

    async def call(self, request: m.RequestBase, fds: list[int] | None = None) -> m.Reply:
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
