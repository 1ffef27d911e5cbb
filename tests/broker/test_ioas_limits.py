"""Issue 11 on the memory side: limits per uid over all its connections and daemon-wide,
IOAS requests need an access rule, one daemon mapping per memfd, claim IOASes go with
their release, and maps that no device could use are bad requests."""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from iommud.broker import Broker
from iommud.config import MemoryLimits, Quota
from iommud.errors import BadRequestError, PermissionDeniedError, QuotaExceededError
from iommud.kernel import aio
from iommud.kernel.interface import IovaRange
from iommud.kernel.libc import libc
from iommud.kernel.memory import DaemonMap
from iommud.policy import Identity
from iommud.protocol import messages as m
from tests.broker.support import ALICE, BOB, EDU, MALLORY, PAGE, Client, make_config, memfd
from tests.fakekernel import FakeIommuFd, FakeKernel
from tests.fakesys import FakeSys


async def _ioas(c: Client) -> int:
    reply = await c.call(m.IoasCreate(id=c.next_id()))
    assert isinstance(reply, m.IoasCreateReply)
    return reply.ioas_id


def _one(offset: int, length: int = PAGE, iova: int | None = None) -> m.MapRange:
    return m.MapRange(fd_index=0, offset=offset, length=length, iova=iova)


def _daemon_maps_of(fd: int) -> int:
    """This process's VMAs of the file behind ``fd`` (the daemon is in-process here)."""
    st = os.fstat(fd)
    inode = str(st.st_ino)
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.split()[4:5] == [inode] and "memfd:" in line)


async def test_quotas_hold_across_connections_of_one_uid(
    broker: Broker, kernel: FakeKernel
) -> None:
    """ALICE and BOB are both uid 1000: one 1 MiB / 4 IOAS / 8 mapping quota between them."""
    a, b = Client(broker, ALICE), Client(broker, BOB)
    ram = memfd(1 << 20)
    ia, ib = await _ioas(a), await _ioas(b)
    await a.map(ia, ram, _one(0, 3 << 18))  # 768 KiB
    with pytest.raises(QuotaExceededError) as ei:
        await b.map(ib, ram, _one(0, 1 << 19))
    assert ei.value.details == {
        "quota": "pinned_bytes",
        "limit": 1 << 20,
        "used": 3 << 18,
        "requested": 1 << 19,
    }
    await _ioas(a)
    await _ioas(b)
    with pytest.raises(QuotaExceededError) as ei:
        await _ioas(b)  # the uid's fifth
    assert ei.value.details == {"quota": "max_ioas", "limit": 4, "used": 4, "requested": 1}
    # mappings: 1 held by a, 7 more fit, the 8th of b does not
    await b.map(ib, ram, *(_one((3 << 18) + i * PAGE) for i in range(7)))
    with pytest.raises(QuotaExceededError) as ei:
        await a.map(ia, ram, _one(1 << 19, iova=1 << 30))
    assert ei.value.details["quota"] == "max_mappings"
    assert ei.value.details["used"] == 8
    # a connection that goes gives its share back to the uid
    await b.close()
    await a.map(ia, ram, _one(3 << 18, 1 << 18))
    assert broker.state.ioas.ledger.usage(1000).pinned_bytes == 1 << 20
    await a.close()
    assert broker.state.ioas.ledger.usage(1000).is_empty()
    assert broker.state.ioas.ledger.total.is_empty()
    os.close(ram)


async def test_daemon_wide_limits_bound_every_uid_together(
    no_fd_leak: None, tmp_path: Path, fs: FakeSys, kernel: FakeKernel
) -> None:
    """Two uids under their own quotas still meet the [memory] limit they share."""
    config = make_config(tmp_path, fs, pinned_bytes=1 << 20, max_ioas=4, max_mappings=8)
    config = config.model_copy(
        update={
            "access": (*config.access, config.access[0].model_copy(update={"uid": 2000})),
            "memory": MemoryLimits(max_mappings=10, pinned_bytes=1 << 20),
        }
    )
    broker = Broker(config, kernel, sysfs_timeout=1.0)
    await broker.start()
    a, b = Client(broker, ALICE), Client(broker, MALLORY)
    ram = memfd(1 << 20)
    try:
        ia, ib = await _ioas(a), await _ioas(b)
        await a.map(ia, ram, *(_one(i * PAGE) for i in range(6)))
        with pytest.raises(QuotaExceededError) as ei:
            await b.map(ib, ram, *(_one(i * PAGE) for i in range(5)))
        assert ei.value.details == {
            "quota": "max_mappings",
            "limit": 10,
            "used": 6,
            "requested": 5,
            "scope": "daemon",
        }
        await b.map(ib, ram, *(_one(i * PAGE) for i in range(4)))
    finally:
        await a.close()
        await b.close()
        await broker.aclose(grace=5.0)
        os.close(ram)


async def test_a_peer_without_a_rule_cannot_make_an_ioas(
    broker: Broker, kernel: FakeKernel
) -> None:
    """MALLORY (uid 2000) matches no [[access]] rule: permission_denied, nothing allocated."""
    c = Client(broker, MALLORY)
    with pytest.raises(PermissionDeniedError) as ei:
        await _ioas(c)
    assert ei.value.details == {
        "uid": 2000,
        "gid": 2000,
        "rule": None,
        "reason": "no_access_rule",
    }
    assert kernel.ops("ioas_alloc") == []
    root = Client(broker, Identity(uid=0, gid=0, pid=1))
    await _ioas(root)  # root needs no rule
    await c.close()
    await root.close()


async def test_read_and_write_both_false_is_a_bad_request(
    broker: Broker, kernel: FakeKernel
) -> None:
    """A mapping no device could use is refused by the daemon, never sent to the kernel."""
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd()
    with pytest.raises(BadRequestError) as ei:
        await c.map(
            ioas, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, read=False, write=False)
        )
    assert ei.value.details == {"range": 0, "reason": "no_access"}
    assert kernel.ops("ioas_map", "ioas_map_file") == []
    await c.close()
    os.close(ram)


async def test_one_daemon_mapping_per_memfd_reused(broker: Broker) -> None:
    """Eight one-page maps of one memfd at offsets that cannot merge: one daemon VMA;
    another connection of the uid reuses it too; it goes with the last range using it."""
    a, b = Client(broker, ALICE), Client(broker, BOB)
    ram = memfd(16 * PAGE)
    ia, ib = await _ioas(a), await _ioas(b)
    for i in range(4):
        await a.map(ia, ram, _one(2 * i * PAGE, iova=(2 * i) << 20))
    await b.map(ib, ram, *(_one((2 * i + 8) * PAGE) for i in range(4)))
    assert _daemon_maps_of(ram) == 1
    ledger = broker.state.ioas.ledger
    assert (ledger.usage(1000).memfds, ledger.usage(1000).memfd_bytes) == (1, 16 * PAGE)
    await b.close()
    for i in range(4):
        await a.call(m.IoasUnmap(id=a.next_id(), ioas_id=ia, iova=(2 * i) << 20, length=PAGE))
    assert _daemon_maps_of(ram) == 0  # the daemon holds nothing of the file any more
    await a.map(ia, ram, _one(0, iova=0))
    assert _daemon_maps_of(ram) == 1
    await a.close()
    assert _daemon_maps_of(ram) == 0
    assert ledger.total.is_empty()
    os.close(ram)


FALLOC_FL_KEEP_SIZE = 0x01  # include/uapi/linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02


async def test_a_warm_range_is_pinned_on_the_loop_without_a_second_populate(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10 (e): the daemon faulted a range in and it is still resident, so its next
    map has no madvise and pins on the loop; a hole the client punches in it makes it
    cold again (madvise, and the pin leaves the loop)."""
    monkeypatch.setattr(aio, "INLINE_PIN_BYTES", 0)  # a cold pin always leaves the loop
    populated: list[tuple[int, int]] = []
    pinned_on: list[int] = []
    real_populate, real_map = DaemonMap.populate, FakeIommuFd.ioas_map

    def populate(self: DaemonMap, offset: int, length: int) -> None:
        populated.append((offset, length))
        real_populate(self, offset, length)

    def ioas_map(self: FakeIommuFd, *args: Any) -> int:
        pinned_on.append(threading.get_ident())
        return real_map(self, *args)

    monkeypatch.setattr(DaemonMap, "populate", populate)
    monkeypatch.setattr(FakeIommuFd, "ioas_map", ioas_map)
    loop = threading.get_ident()
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(4 * PAGE)
    ranges = [_one(0, 2 * PAGE, iova=0)]

    async def map_unmap() -> None:
        await c.map(ioas, ram, *ranges)
        await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0, length=2 * PAGE))

    # the last page stays mapped, so the daemon keeps its mapping of the file
    await c.map(ioas, ram, _one(3 * PAGE, iova=1 << 20))
    await map_unmap()  # cold: faulted in by the daemon, pinned on a worker
    assert populated[-1] == (0, 2 * PAGE)
    assert pinned_on[-1] != loop
    before = len(populated)
    await map_unmap()  # warm
    assert len(populated) == before
    assert pinned_on[-1] == loop
    # a page the client punched out is not resident: the range is cold again
    flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert libc.fallocate(ram, flags, ctypes.c_long(PAGE), ctypes.c_long(PAGE)) == 0
    await map_unmap()
    assert populated[-1] == (0, 2 * PAGE)
    assert pinned_on[-1] != loop
    await map_unmap()  # and warm once more
    assert pinned_on[-1] == loop
    await c.close()
    os.close(ram)


async def test_a_small_warm_range_is_trusted_without_mincore(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to INLINE_PIN_BYTES the record alone makes a range warm: no mincore, no second
    populate, even after a punched hole (the pin faults that page inline, as a cold pin
    of that size would); the same range above the limit is checked with mincore."""
    asked: list[tuple[int, int]] = []
    populated: list[tuple[int, int]] = []
    real_resident, real_populate = DaemonMap.is_resident, DaemonMap.populate

    def is_resident(self: DaemonMap, offset: int, length: int) -> bool:
        asked.append((offset, length))
        return real_resident(self, offset, length)

    def populate(self: DaemonMap, offset: int, length: int) -> None:
        populated.append((offset, length))
        real_populate(self, offset, length)

    monkeypatch.setattr(DaemonMap, "is_resident", is_resident)
    monkeypatch.setattr(DaemonMap, "populate", populate)
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(4 * PAGE)
    await c.map(ioas, ram, _one(3 * PAGE, iova=1 << 20))  # keeps the daemon's mapping
    for _ in range(2):
        await c.map(ioas, ram, _one(0, 2 * PAGE, iova=0))
        await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0, length=2 * PAGE))
    flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert libc.fallocate(ram, flags, ctypes.c_long(PAGE), ctypes.c_long(PAGE)) == 0
    await c.map(ioas, ram, _one(0, 2 * PAGE, iova=0))
    assert populated == [(3 * PAGE, PAGE), (0, 2 * PAGE)]  # each range once, when cold
    assert asked == []
    await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0, length=2 * PAGE))
    monkeypatch.setattr(aio, "INLINE_PIN_BYTES", PAGE)
    await c.map(ioas, ram, _one(0, 2 * PAGE, iova=0))
    assert asked == [(0, 2 * PAGE)]  # above the limit: mincore, which sees the hole
    assert populated[-1] == (0, 2 * PAGE)
    await c.close()
    os.close(ram)


async def test_distinct_memfds_are_bounded_per_uid(
    no_fd_leak: None, tmp_path: Path, fs: FakeSys, kernel: FakeKernel
) -> None:
    """max_memfds = 3: a fourth file in use is quota_exceeded; unmapping one makes room."""
    config = make_config(tmp_path, fs, max_memfds=3, max_mappings=100)
    broker = Broker(config, kernel, sysfs_timeout=1.0)
    await broker.start()
    c = Client(broker, ALICE)
    rams = [memfd(PAGE) for _ in range(5)]
    try:
        ioas = await _ioas(c)
        for i, ram in enumerate(rams[:3]):
            await c.map(ioas, ram, _one(0, iova=i << 20))
        with pytest.raises(QuotaExceededError) as ei:
            await c.map(ioas, rams[3], _one(0, iova=3 << 20))
        assert ei.value.details == {"quota": "max_memfds", "limit": 3, "used": 3, "requested": 1}
        await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0, length=PAGE))
        assert _daemon_maps_of(rams[0]) == 0
        await c.map(ioas, rams[3], _one(0, iova=3 << 20))
        assert broker.state.ioas.ledger.usage(1000).memfds == 3
    finally:
        await c.close()
        await broker.aclose(grace=5.0)
        for ram in rams:
            os.close(ram)


async def test_a_file_that_grew_is_mapped_again(broker: Broker) -> None:
    """Sealed against shrinking only: a range past the old size gets a new, larger daemon
    mapping; the old one goes when its last range is unmapped."""
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(2 * PAGE, seal=False)
    fcntl.fcntl(ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    await c.map(ioas, ram, _one(0, iova=0))
    os.ftruncate(ram, 4 * PAGE)
    await c.map(ioas, ram, _one(3 * PAGE, iova=1 << 20))
    assert _daemon_maps_of(ram) == 2
    ledger = broker.state.ioas.ledger
    assert (ledger.usage(1000).memfds, ledger.usage(1000).memfd_bytes) == (2, 6 * PAGE)
    await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0, length=PAGE))
    assert _daemon_maps_of(ram) == 1
    await c.close()
    os.close(ram)


async def test_claim_and_release_in_a_loop_never_hits_the_ioas_quota(
    broker: Broker, kernel: FakeKernel
) -> None:
    """max_ioas is 4: ten claim/release cycles (with and without a map in between) work,
    because the IOAS a claim made goes with its release (or with its last unmap)."""
    c = Client(broker, ALICE)
    ram = memfd()
    for cycle in range(10):
        reply = await c.claim(EDU)
        if cycle % 2:
            await c.map(reply.ioas_id, ram, _one(0, iova=0x100000))
        c.close_received()
        await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
        if cycle % 2:
            assert list(c.session.ioases) == [reply.ioas_id]  # its mapping keeps it
            await c.call(
                m.IoasUnmap(id=c.next_id(), ioas_id=reply.ioas_id, iova=0x100000, length=PAGE)
            )
        assert c.session.ioases == {}
    assert broker.state.ioas.ledger.total.is_empty()
    # An IOAS made by ioas_create is not the claim's: it stays after the release.
    own = await _ioas(c)
    reply = await c.claim(EDU, ioas_id=own)
    c.close_received()
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    assert list(c.session.ioases) == [own]
    await c.close()
    os.close(ram)


async def test_a_claim_over_the_uids_ioas_quota_touches_nothing(
    broker: Broker, kernel: FakeKernel, fs: FakeSys
) -> None:
    """L2 across connections: BOB's 4 IOASes fill uid 1000's quota; ALICE's claim is
    refused before any journal entry, override or driver change."""
    a, b = Client(broker, ALICE), Client(broker, BOB)
    for _ in range(4):
        await _ioas(b)
    calls = len(kernel.calls)
    override = fs.sys_root / "bus/pci/devices" / EDU / "driver_override"
    before = override.read_text()
    with pytest.raises(QuotaExceededError) as ei:
        await a.claim(EDU)
    assert ei.value.details == {"quota": "max_ioas", "limit": 4, "used": 4, "requested": 1}
    assert kernel.calls[calls:] == []
    assert override.read_text() == before
    assert broker.state.journal.load() == []
    await a.close()
    await b.close()


def test_quota_defaults() -> None:
    assert Quota().max_memfds == 64
    assert MemoryLimits().max_memfds == 8192


async def test_allowed_iova_ranges_are_read_once_per_attach(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maps reuse the IOVA ranges read after the device attached; a release (detach)
    makes the next request read them again."""
    c = Client(broker, ALICE)
    reply = await c.claim(EDU)
    ictx = c.session.iommufd
    assert ictx is not None
    reads: list[int] = []
    real = ictx.ioas_iova_ranges

    def counted(ioas_id: int) -> tuple[list[IovaRange], int]:
        reads.append(ioas_id)
        return real(ioas_id)

    monkeypatch.setattr(ictx, "ioas_iova_ranges", counted)
    ram = memfd(8 * PAGE)
    for i in range(5):
        await c.map(reply.ioas_id, ram, _one(i * PAGE, iova=0x100000 + i * PAGE))
    assert len(reads) == 1
    own = await _ioas(c)
    await c.map(own, ram, _one(0, iova=0))  # another IOAS: its own reading
    assert len(reads) == 2
    c.close_received()
    await c.call(m.Release(id=c.next_id(), lease_id=reply.lease_id))
    got = await c.call(m.IovaRanges(id=c.next_id(), ioas_id=reply.ioas_id))
    assert isinstance(got, m.IovaRangesReply)
    assert got.alignment == 1  # nothing attached any more: the fake allows every IOVA
    assert len(reads) == 3
    await c.close()
    os.close(ram)
