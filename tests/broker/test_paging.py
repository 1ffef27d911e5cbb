"""fill_page (pages of list replies that fit in a datagram, measured by encoding) and
the broker's list handlers that use it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommud.broker import Broker
from iommud.broker.paging import PAGE_BUDGET, encoded_size, fill_page
from iommud.errors import LimitReachedError
from iommud.protocol import messages as m
from iommud.protocol.codec import decode_server, encode
from iommud.protocol.limits import MAX_DATAGRAM, U32_MAX
from tests.broker.support import ALICE, Client
from tests.fakesys import FakeSys


def device(i: int, *, driver: str | None = "vfio-pci") -> m.DeviceEntry:
    bus, rest = divmod(i, 256)
    return m.DeviceEntry(
        bdf=f"0000:{bus:02x}:{rest >> 3:02x}.{rest & 7}",
        vendor=0x8086,
        device=0x10CA,
        class_code=0x020000,
        driver=driver,
        driver_override=None,
        group_id=i,
        is_bridge=False,
        vfio_cdev=f"/dev/vfio/devices/vfio{i}" if driver else None,
    )


DEVICES = tuple(device(i, driver=None if i % 3 else "vfio-pci") for i in range(3000))


def page(
    offset: int,
    limit: int | None = None,
    *,
    rid: int = 7,
    budget: int = PAGE_BUDGET,
    entries: tuple[m.DeviceEntry, ...] = DEVICES,
) -> m.ListDevicesReply:
    def build(items: tuple[m.DeviceEntry, ...], total: int, nxt: int | None) -> m.ListDevicesReply:
        return m.ListDevicesReply(id=rid, total=total, next_offset=nxt, devices=items)

    return fill_page(entries, offset, limit, build, budget=budget)


def walk(entries: tuple[m.DeviceEntry, ...], limit: int | None = None) -> list[m.ListDevicesReply]:
    pages = [page(0, limit, entries=entries)]
    while (nxt := pages[-1].next_offset) is not None:
        pages.append(page(nxt, limit, entries=entries))
    return pages


def test_following_next_offset_yields_every_entry_once_in_order() -> None:
    pages = walk(DEVICES)
    assert [d for p in pages for d in p.devices] == list(DEVICES)
    assert {p.total for p in pages} == {3000}
    sizes = [len(encode(p)[0]) for p in pages]
    assert max(sizes) <= PAGE_BUDGET < MAX_DATAGRAM
    # every page but the last is full: less than one more entry (~200 bytes) left over
    assert all(size > PAGE_BUDGET - 250 for size in sizes[:-1])


def test_page_is_filled_up_to_the_budget_not_a_fixed_count() -> None:
    """A tighter budget gives smaller pages; the page size tracks the encoded size."""
    small = page(0, budget=4096)
    assert len(encode(small)[0]) <= 4096
    big = page(0)
    assert 0 < len(small.devices) < len(big.devices)
    assert big.next_offset == len(big.devices)


def test_limit_caps_the_page_and_offset_starts_it() -> None:
    p = page(100, 5)
    assert p.devices == DEVICES[100:105]
    assert (p.total, p.next_offset) == (3000, 105)


def test_last_page_has_null_next_offset() -> None:
    p = page(2998)
    assert p.devices == DEVICES[2998:]
    assert p.next_offset is None
    exact = page(2990, 10)
    assert exact.devices == DEVICES[2990:]
    assert exact.next_offset is None


@pytest.mark.parametrize("offset", [3000, 3001, U32_MAX])
def test_offset_at_or_past_the_end_is_an_empty_last_page(offset: int) -> None:
    p = page(offset)
    assert (p.devices, p.total, p.next_offset) == ((), 3000, None)


def test_empty_list() -> None:
    p = page(0, entries=())
    assert (p.devices, p.total, p.next_offset) == ((), 0, None)


def test_entry_too_big_for_a_datagram_is_limit_reached() -> None:
    """A group of 5,000 devices cannot be listed even alone: limit_reached with sizes."""
    bdfs = tuple(device(i).bdf for i in range(5000))
    group = m.GroupEntry(
        group_id=1, devices=bdfs, is_viable=True, offenders=(), path=None, owner=None
    )

    def build(items: tuple[m.GroupEntry, ...], total: int, nxt: int | None) -> m.ListGroupsReply:
        return m.ListGroupsReply(id=3, total=total, next_offset=nxt, groups=items)

    with pytest.raises(LimitReachedError) as info:
        fill_page([group], 0, None, build)
    assert info.value.details["max_datagram"] == MAX_DATAGRAM
    assert info.value.details["size"] == encoded_size(build((group,), 1, None)) > MAX_DATAGRAM


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 400),
    offset=st.integers(0, 450),
    limit=st.none() | st.integers(1, 500),
    budget=st.integers(1200, 20000),
    rid=st.sampled_from([0, 9, U32_MAX]),
)
def test_size_is_exact_and_page_is_maximal(
    n: int, offset: int, limit: int | None, budget: int, rid: int
) -> None:
    """Any list, offset, limit, budget and id: the page fits, is as full as allowed,
    and decodes back; one more entry would break the budget or the limit."""
    entries = DEVICES[:n]
    p = page(offset, limit, rid=rid, budget=budget, entries=entries)
    data, _ = encode(p)
    assert len(data) <= budget
    assert decode_server(data, 0) == p
    start = min(offset, n)
    assert p.devices == entries[start : start + len(p.devices)]
    end = start + len(p.devices)
    assert p.next_offset == (end if end < n else None)
    if end < n and (limit is None or len(p.devices) < limit):
        grown = m.ListDevicesReply(
            id=rid, total=n, next_offset=None, devices=(*p.devices, entries[end])
        )
        # with next_offset as a number instead of null the reply would only be longer
        assert len(encode(grown)[0]) - 4 + max(4, len(str(n))) > budget


# ------------------------------------------------------------------ through the broker


async def test_broker_pages_from_one_reading_and_rereads_at_offset_zero(
    broker: Broker, fs: FakeSys
) -> None:
    """Page 0 re-reads sysfs; later pages come from that reading, so a walk sees one
    consistent list even if sysfs changes under it; the next walk sees the change."""
    c = Client(broker, ALICE)
    first = await c.call(m.ListDevices(id=1, limit=3))
    assert isinstance(first, m.ListDevicesReply)
    total = first.total
    assert (len(first.devices), first.next_offset) == (3, 3)
    fs.add_device("0000:00:1f.7", 0x1234, 0x11E8, 0x00FF00, group=77)  # no uevent
    rest = await c.call(m.ListDevices(id=2, offset=3))
    assert isinstance(rest, m.ListDevicesReply)
    assert (rest.total, rest.next_offset) == (total, None)
    walked = [d.bdf for d in (*first.devices, *rest.devices)]
    assert walked == sorted(walked)
    assert "0000:00:1f.7" not in walked
    again = await c.call(m.ListDevices(id=3))
    assert isinstance(again, m.ListDevicesReply)
    assert again.total == total + 1
    assert "0000:00:1f.7" in [d.bdf for d in again.devices]
    groups = await c.call(m.ListGroups(id=4, offset=1, limit=2))
    assert isinstance(groups, m.ListGroupsReply)
    everything = await c.call(m.ListGroups(id=5))
    assert isinstance(everything, m.ListGroupsReply)
    assert everything.next_offset is None
    assert groups.groups == everything.groups[1:3]
    assert groups.next_offset == 3
    await c.close()
