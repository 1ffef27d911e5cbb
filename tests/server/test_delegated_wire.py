"""Protocol v2 over the real socket: version negotiation, a delegated claim's fds.

The real server and Broker on the fake kernel (tests/serving.py); the test process is the
client (root here, so the policy lets it delegate) and speaks the sans-I/O connection
directly, so the datagrams and the SCM_RIGHTS fds are exactly what a VMM gets.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.client import AsyncClient
from iommud.fds import FdSet
from iommud.protocol import messages as m
from iommud.protocol.connection import ClientConnection
from iommud.protocol.limits import MAX_DATAGRAM, MAX_FDS
from iommud.protocol.v2 import AnyServerMessage, ClaimMode, ClaimReplyV2, ClaimV2
from iommud.transport import recv_datagram, send_datagram
from tests.broker.support import EDU
from tests.serving import served_broker


@pytest.fixture
async def served(tmp_path: Path, sockdir: str) -> AsyncIterator[tuple[str, Broker]]:
    async with served_broker(tmp_path, sockdir, sysfs_timeout=1.0) as pair:
        yield pair


class Wire:
    """One client connection driven by hand: request out, the answer and its fds in."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sock.connect(path)
        self.conn = ClientConnection()

    async def call(self, request: m.Request) -> tuple[AnyServerMessage, FdSet]:
        data, _ = self.conn.send(request)
        await send_datagram(self.sock, data, [])
        while True:
            dgram = await recv_datagram(self.sock, MAX_DATAGRAM, MAX_FDS)
            assert dgram is not None
            msg = self.conn.receive(dgram.data, len(dgram.fds))
            if not isinstance(msg, m.Event):
                return msg, dgram.fds
            dgram.fds.close()

    def close(self) -> None:
        self.sock.close()


async def test_v1_hello_is_unchanged_and_v2_announces_delegate(served: tuple[str, Broker]) -> None:
    path, _ = served
    for version, caps in ((1, ("iommufd",)), (2, ("iommufd", "delegate"))):
        wire = Wire(path)
        reply, fds = await wire.call(wire.conn.hello("t", version=version))
        assert isinstance(reply, m.HelloReply)
        assert (reply.version, reply.capabilities) == (version, caps)
        fds.close()
        wire.close()


async def test_delegated_claim_over_the_socket(served: tuple[str, Broker]) -> None:
    """The reply's fds arrive with SCM_RIGHTS: /dev/iommu first, then the cdev."""
    path, broker = served
    wire = Wire(path)
    try:
        hello, _ = await wire.call(wire.conn.hello("vmm", version=2))
        assert isinstance(hello, m.HelloReply)
        claim = wire.conn.build(ClaimV2, devices=(EDU,), mode=ClaimMode.DELEGATED)
        reply, fds = await wire.call(claim)
        with fds:
            assert isinstance(reply, ClaimReplyV2)
            assert (reply.fds, len(fds), reply.iommufd_fd_index) == (2, 2, 0)
            kernel = broker.state.kernel
            ictx = kernel.iommufd_of_fd(fds[0].fileno())  # type: ignore[attr-defined]
            assert ictx.rlimit_per_process
            assert stat.S_ISREG(os.fstat(fds[1].fileno()).st_mode)  # the fake's cdev file
            assert kernel.device_of_fd(fds[1].fileno()).bound_to is None  # type: ignore[attr-defined]
        done, extra = await wire.call(wire.conn.build(m.Release, lease_id=reply.lease_id))
        extra.close()
        assert isinstance(done, m.ReleaseReply)
    finally:
        wire.close()


async def test_client_library_speaks_v2(served: tuple[str, Broker]) -> None:
    """AsyncClient(version=2): brokered claims still work; a delegated claim gives OwnedFds."""
    path, broker = served
    async with await AsyncClient.connect(path, "vmm", version=2) as client:
        assert client.hello is not None
        assert "delegate" in client.hello.capabilities
        brokered = await client.claim([EDU])
        assert brokered.devices[0].devid is not None
        brokered.close()  # our fds first: vfio-pci lets go of the device only then
        await client.release(brokered.lease_id)
        lease = await client.claim_delegated([EDU])
        with lease:
            assert lease.iommufd is not None
            assert [(d.bdf, d.devid) for d in lease.devices] == [(EDU, None)]
            kernel = broker.state.kernel
            ictx = kernel.iommufd_of_fd(lease.iommufd.fileno())  # type: ignore[attr-defined]
            assert ictx.rlimit_per_process
        await client.release(lease.lease_id)
