"""list_devices / list_groups on a host of 3,000 PCI functions, through the real server.

The fake sysfs tree is tests.fakesys.large_host: 3,000 edu-like functions on buses
01..0c, spread round-robin over 1,500 IOMMU groups (two functions each, like SR-IOV
VFs), every 7th on vfio-pci, every 11th on e1000. It is built once per module, on
/dev/shm when there is one. The real Broker on the fake kernel serves it behind the
real Server on an AF_UNIX socket. Unpaged, the device list alone would be ~600 KB,
about ten datagrams' worth: every answer here must still be one datagram.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.broker.paging import PAGE_BUDGET
from iommud.client import AsyncClient, Client
from iommud.protocol import messages as m
from iommud.protocol.connection import ClientConnection
from iommud.protocol.limits import MAX_DATAGRAM
from iommud.protocol.v2 import AnyServerMessage
from iommud.server import Server, ServerInfo
from iommud.server.listen import bind_listener
from tests.broker.support import make_config
from tests.cli.support import ctl
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, large_host
from tests.serving import FdSnapshot

N_DEVICES = 3000
N_GROUPS = 1500


def bdf(i: int) -> str:
    """The bdf large_host gives its i-th device."""
    bus, rest = divmod(i, 256)
    return f"0000:{bus + 1:02x}:{rest >> 3:02x}.{rest & 7}"


ALL_BDFS = sorted(bdf(i) for i in range(N_DEVICES))


@pytest.fixture(scope="module")
def big_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSys]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="iommud-paging-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("paging")
    try:
        yield large_host(root / "host", N_DEVICES, N_GROUPS)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def served(big_host: FakeSys, tmp_path: Path, sockdir: str) -> AsyncIterator[str]:
    """A started Broker over the big host behind the real server; no fd may leak."""
    before = FdSnapshot.take()
    broker = Broker(make_config(tmp_path, big_host), FakeKernel(big_host), sysfs_timeout=5.0)
    await broker.start()
    path = os.path.join(sockdir, "s")
    server = Server(broker, [bind_listener(path)], info=ServerInfo(capabilities=("iommufd",)))
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready.set))
    await ready.wait()
    yield path
    server.stop()
    await asyncio.wait_for(task, 10)
    await broker.aclose(grace=5.0)
    before.assert_unchanged()


def raw_walk(path: str, op: type[m.ListDevices] | type[m.ListGroups]) -> list[tuple[int, int]]:
    """Follow next_offset with a bare socket; (datagram bytes, entries) per page.

    Reads with a buffer one byte over MAX_DATAGRAM and checks MSG_TRUNC, so a page
    that broke the limit would show here rather than in a decoder error.
    """
    out: list[tuple[int, int]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(30)
        sock.connect(path)
        conn = ClientConnection()

        def ask(request: m.Request) -> tuple[bytes, AnyServerMessage]:
            sock.send(conn.send(request)[0])
            data, _anc, flags, _addr = sock.recvmsg(MAX_DATAGRAM + 1)
            assert not flags & socket.MSG_TRUNC
            return data, conn.receive(data, 0)

        ask(conn.hello("raw-pager"))
        offset: int | None = 0
        while offset is not None:
            data, reply = ask(conn.build(op, offset=offset))
            assert isinstance(reply, m.ListDevicesReply | m.ListGroupsReply)
            entries = reply.devices if isinstance(reply, m.ListDevicesReply) else reply.groups
            out.append((len(data), len(entries)))
            offset = reply.next_offset
    return out


@pytest.mark.parametrize(
    ("op", "total"),
    [(m.ListDevices, N_DEVICES), (m.ListGroups, N_GROUPS)],
    ids=["devices", "groups"],
)
async def test_every_page_is_one_datagram_under_the_limit(
    served: str, op: type[m.ListDevices] | type[m.ListGroups], total: int
) -> None:
    """Pages fill up to the budget (less than one entry short) and add up to the total."""
    pages = await asyncio.to_thread(raw_walk, served, op)
    sizes = [size for size, _ in pages]
    assert sum(n for _, n in pages) == total
    assert max(sizes) <= PAGE_BUDGET < MAX_DATAGRAM
    assert len(pages) >= 2
    assert all(size > PAGE_BUDGET - 300 for size in sizes[:-1])  # an entry is < 300 bytes


async def test_async_client_lists_everything(served: str) -> None:
    async with await AsyncClient.connect(served, "lister") as client:
        devices = await client.list_devices()
        groups = await client.list_groups()
    assert [d.bdf for d in devices] == ALL_BDFS
    assert sum(d.driver == "vfio-pci" for d in devices) == len(range(0, N_DEVICES, 7))
    assert [g.group_id for g in groups] == list(range(N_GROUPS))
    assert sorted(b for g in groups for b in g.devices) == ALL_BDFS
    by_group = {g.group_id: set(g.devices) for g in groups}
    assert all(d.bdf in by_group[d.group_id] for d in devices if d.group_id is not None)


async def test_page_call_with_offset_and_limit(served: str) -> None:
    async with await AsyncClient.connect(served, "pager") as client:
        page = await client.list_devices_page(2990, 5)
        assert [d.bdf for d in page.devices] == ALL_BDFS[2990:2995]
        assert (page.total, page.next_offset) == (N_DEVICES, 2995)
        tail = await client.list_devices_page(2995)
        assert [d.bdf for d in tail.devices] == ALL_BDFS[2995:]
        assert tail.next_offset is None
        past = await client.list_groups_page(N_GROUPS + 10)
        assert (past.groups, past.total, past.next_offset) == ((), N_GROUPS, None)


def blocking_list(path: str) -> tuple[float, list[str], int]:
    with Client(path, "blocking-lister") as client:
        start = time.monotonic()
        devices = client.list_devices()
        elapsed = time.monotonic() - start
        groups = client.list_groups()
    return elapsed, [d.bdf for d in devices], len(groups)


async def test_blocking_client_lists_everything(served: str) -> None:
    elapsed, bdfs, n_groups = await asyncio.to_thread(blocking_list, served)
    assert bdfs == ALL_BDFS
    assert n_groups == N_GROUPS
    assert elapsed < 30  # measured ~1 s on the 2-core build machine; this only catches a hang


async def test_iommuctl_ls_json(served: str) -> None:
    """iommuctl (in a thread: it runs its own event loop) lists the whole host."""
    r = await asyncio.to_thread(ctl, "--socket", served, "ls", "--json")
    assert (r.code, r.err) == (0, "")
    out = json.loads(r.out)
    assert [d["bdf"] for d in out["devices"]] == ALL_BDFS
    assert len(out["groups"]) == N_GROUPS
