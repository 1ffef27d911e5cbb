"""IOAS create/map/unmap: validation, quotas, all-or-nothing, both pinning paths."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.errors import (
    BadRequestError,
    InvalidRangeError,
    InvalidStateError,
    KernelError,
    NotFoundError,
    OverlapError,
    QuotaExceededError,
)
from iommud.protocol import messages as m
from tests.broker.support import ALICE, BR_EDU1, EDU, PAGE, Client, make_config, memfd
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys


async def _ioas(c: Client) -> int:
    reply = await c.call(m.IoasCreate(id=c.next_id()))
    assert isinstance(reply, m.IoasCreateReply)
    return reply.ioas_id


async def test_quota_exceeded_before_pinning(broker: Broker, kernel: FakeKernel) -> None:
    """The vm quota pins at most 1 MiB: a 2 MiB map is refused and the kernel never sees it."""
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(2 << 20)
    with pytest.raises(QuotaExceededError) as ei:
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=2 << 20))
    assert ei.value.details == {
        "quota": "pinned_bytes",
        "limit": 1 << 20,
        "used": 0,
        "requested": 2 << 20,
    }
    assert kernel.ops("ioas_map", "ioas_map_file") == []
    # Within quota it works, and a second map that crosses the limit is refused.
    await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=1 << 19))
    with pytest.raises(QuotaExceededError) as ei:
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=1 << 19, length=(1 << 19) + PAGE))
    assert ei.value.details["used"] == 1 << 19
    await c.close()
    os.close(ram)


async def test_ioas_count_quota(broker: Broker) -> None:
    c = Client(broker, ALICE)
    for _ in range(4):
        await _ioas(c)
    with pytest.raises(QuotaExceededError) as ei:
        await _ioas(c)
    assert ei.value.details == {"quota": "max_ioas", "limit": 4, "used": 4, "requested": 1}
    await c.close()


async def test_mapping_count_quota(broker: Broker) -> None:
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(16 * PAGE)
    ranges = [m.MapRange(fd_index=0, offset=i * PAGE, length=PAGE) for i in range(9)]
    with pytest.raises(QuotaExceededError) as ei:
        await c.map(ioas, ram, *ranges)
    assert ei.value.details == {"quota": "max_mappings", "limit": 8, "used": 0, "requested": 9}
    await c.close()
    os.close(ram)


async def test_unsealed_memfd_is_refused(broker: Broker, kernel: FakeKernel) -> None:
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(PAGE, seal=False)
    with pytest.raises(BadRequestError) as ei:
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=PAGE))
    assert ei.value.details == {
        "range": 0,
        "fd_index": 0,
        "reason": "not_sealed",
        "seals": 0,
        "required": "F_SEAL_SHRINK",
    }
    # Sealed against growing only is not enough either.
    fcntl.fcntl(ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    with pytest.raises(BadRequestError):
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=PAGE))
    assert kernel.ops("ioas_map") == []
    await c.close()
    os.close(ram)


async def test_regular_file_cannot_be_sealed(broker: Broker, tmp_path: Path) -> None:
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    f = tmp_path / "ram"
    f.write_bytes(b"\0" * PAGE)
    fd = os.open(f, os.O_RDWR)
    with pytest.raises(BadRequestError) as ei:
        await c.map(ioas, fd, m.MapRange(fd_index=0, offset=0, length=PAGE))
    assert ei.value.details["reason"] == "not_sealed"
    r, w = os.pipe()
    with pytest.raises(BadRequestError) as ei:
        await c.map(ioas, r, m.MapRange(fd_index=0, offset=0, length=PAGE))
    assert ei.value.details == {"range": 0, "fd_index": 0, "reason": "not_a_file"}
    for x in (fd, r, w):
        os.close(x)
    await c.close()


@pytest.mark.parametrize(
    ("offset", "length", "iova", "details"),
    [
        (
            100,
            PAGE,
            None,
            {"range": 0, "reason": "misaligned", "offset": 100, "length": PAGE, "page_size": PAGE},
        ),
        (
            0,
            PAGE + 1,
            None,
            {
                "range": 0,
                "reason": "misaligned",
                "offset": 0,
                "length": PAGE + 1,
                "page_size": PAGE,
            },
        ),
        (0, PAGE, 0x1234, {"range": 0, "reason": "misaligned", "iova": 0x1234, "alignment": PAGE}),
        (
            3 * PAGE,
            2 * PAGE,
            None,
            {
                "range": 0,
                "reason": "outside_file",
                "offset": 3 * PAGE,
                "length": 2 * PAGE,
                "file_size": 4 * PAGE,
            },
        ),
    ],
)
async def test_misaligned_or_outside_file(
    broker: Broker,
    kernel: FakeKernel,
    offset: int,
    length: int,
    iova: int | None,
    details: dict[str, int | str],
) -> None:
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(4 * PAGE)
    with pytest.raises(InvalidRangeError) as ei:
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=offset, length=length, iova=iova))
    assert ei.value.details == details
    assert kernel.ops("ioas_map") == []
    await c.close()
    os.close(ram)


async def test_iova_in_reserved_window_is_refused(broker: Broker) -> None:
    """The fake reports VT-d's MSI hole (0xfee00000) as not allowed once a device is
    attached, like the kernel (an IOAS without a device allows every IOVA)."""
    c = Client(broker, ALICE)
    ioas = (await c.claim(EDU)).ioas_id
    ram = memfd(PAGE)
    with pytest.raises(InvalidRangeError) as ei:
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0xFEE00000))
    assert ei.value.details["reason"] == "outside_allowed"
    reply = await c.call(m.IovaRanges(id=c.next_id(), ioas_id=ioas))
    assert isinstance(reply, m.IovaRangesReply)
    assert reply.ranges[0] == m.IovaRange(start=0, last=0xFEDFFFFF)
    assert reply.alignment == PAGE
    await c.close()
    c.close_received()
    os.close(ram)


async def test_overlap_names_the_conflicting_range(broker: Broker) -> None:
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(8 * PAGE)
    await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=4 * PAGE, iova=0x10000))
    with pytest.raises(OverlapError) as ei:
        await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x13000))
    assert ei.value.details == {
        "range": 0,
        "iova": 0x13000,
        "length": PAGE,
        "conflict": {"iova": 0x10000, "length": 4 * PAGE},
    }
    # Two ranges of one request overlapping each other.
    with pytest.raises(OverlapError) as ei:
        await c.map(
            ioas,
            ram,
            m.MapRange(fd_index=0, offset=0, length=2 * PAGE, iova=0x40000),
            m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x41000),
        )
    assert ei.value.details["range"] == 1
    await c.close()
    os.close(ram)


async def test_several_ranges_are_all_or_nothing(broker: Broker, kernel: FakeKernel) -> None:
    """The kernel fails the second pin: the first range is unmapped, quota usage is unchanged."""
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(4 * PAGE)
    kernel.fail_next("ioas_map", errno.EFAULT, after=1)
    with pytest.raises(KernelError) as ei:
        await c.map(
            ioas,
            ram,
            m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x1000),
            m.MapRange(fd_index=0, offset=PAGE, length=PAGE, iova=0x2000),
        )
    assert ei.value.errno == errno.EFAULT
    assert kernel.ops("ioas_map", "ioas_unmap") == [
        ("ioas_map", 1, 0x1000, PAGE),
        ("ioas_unmap", 1, 0x1000, PAGE),
    ]
    assert c.session.pinned_bytes == 0
    assert c.session.ioases[ioas].mappings == {}
    # The same request succeeds afterwards: nothing was left behind in the IOAS.
    await c.map(
        ioas,
        ram,
        m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x1000),
        m.MapRange(fd_index=0, offset=PAGE, length=PAGE, iova=0x2000),
    )
    await c.close()
    os.close(ram)


async def test_unmap_exact_and_covering_and_split(broker: Broker, kernel: FakeKernel) -> None:
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(4 * PAGE)
    await c.map(
        ioas,
        ram,
        m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x10000),
        m.MapRange(fd_index=0, offset=PAGE, length=2 * PAGE, iova=0x20000),
    )
    with pytest.raises(InvalidRangeError) as ei:
        await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0x20000, length=PAGE))
    assert ei.value.details["reason"] == "splits_mapping"
    with pytest.raises(NotFoundError):
        await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0x90000, length=PAGE))
    reply = await c.call(m.IoasUnmap(id=c.next_id(), ioas_id=ioas, iova=0, length=0x30000))
    assert reply == m.IoasUnmapReply(id=reply.id, unmapped=3 * PAGE)
    assert c.session.pinned_bytes == 0
    await c.close()
    os.close(ram)


async def test_kernel_chosen_iova_does_not_steal_a_fixed_one(broker: Broker) -> None:
    """Fixed ranges are pinned first; the reply keeps the request's order."""
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(4 * PAGE)
    reply = await c.map(
        ioas,
        ram,
        m.MapRange(fd_index=0, offset=0, length=PAGE),
        m.MapRange(fd_index=0, offset=PAGE, length=PAGE, iova=0),
    )
    assert reply.mappings == (
        m.MappedRange(iova=PAGE, length=PAGE),
        m.MappedRange(iova=0, length=PAGE),
    )
    await c.close()
    os.close(ram)


async def test_map_file_path_keeps_no_daemon_mmap(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None
) -> None:
    """Where IOMMU_IOAS_MAP_FILE exists the broker hands the fd to the kernel instead."""
    kernel = FakeKernel(fs, map_file=True)
    b = Broker(make_config(tmp_path, fs), kernel)
    await b.start()
    c = Client(b, ALICE)
    ioas = await _ioas(c)
    ram = memfd(2 * PAGE, data=b"file-backed")
    await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=2 * PAGE, iova=0x8000))
    assert kernel.ops("ioas_map_file") == [("ioas_map_file", 1, 0x8000, 2 * PAGE)]
    assert kernel.ops("ioas_map") == []
    ictx = c.session.iommufd
    assert kernel.dma_read(ictx, 1, 0x8000, 11) == b"file-backed"  # type: ignore[arg-type]
    await c.close()
    await b.aclose()
    os.close(ram)


async def test_legacy_ioas_takes_maps_only_once_attached(
    broker: Broker, kernel: FakeKernel
) -> None:
    c = Client(broker, ALICE)
    first = await c.claim(BR_EDU1, backend="legacy")
    ram = memfd(PAGE)
    await c.map(first.ioas_id, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x5000))
    assert kernel.ops("map_dma") == [("map_dma", 0x5000, PAGE)]
    with pytest.raises(InvalidStateError):
        await c.call(m.IoasDestroy(id=c.next_id(), ioas_id=first.ioas_id))
    await c.close()
    os.close(ram)


async def test_destroy_unknown_ioas(broker: Broker) -> None:
    c = Client(broker, ALICE)
    with pytest.raises(NotFoundError) as ei:
        await c.call(m.IoasDestroy(id=c.next_id(), ioas_id=77))
    assert ei.value.details == {"ioas_id": 77}
    await c.close()


async def test_claim_into_existing_ioas_keeps_mappings(broker: Broker, kernel: FakeKernel) -> None:
    """Map first, then claim the edu into that IOAS: one attach, no second IOAS."""
    c = Client(broker, ALICE)
    ioas = await _ioas(c)
    ram = memfd(PAGE)
    await c.map(ioas, ram, m.MapRange(fd_index=0, offset=0, length=PAGE, iova=0x3000))
    reply = await c.claim(EDU, ioas_id=ioas)
    assert reply.ioas_id == ioas
    assert kernel.ops("ioas_alloc") == [("ioas_alloc", 1)]
    await c.close()
    os.close(ram)
