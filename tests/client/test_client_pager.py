"""Pager: the client's page-following logic, fed synthetic replies (no sockets)."""

from __future__ import annotations

import pytest

from iommud.client import PagingError
from iommud.client.calls import MAX_RESTARTS, device_pager, group_pager
from iommud.protocol import messages as m


def dev(i: int) -> m.DeviceEntry:
    return m.DeviceEntry(
        bdf=f"0000:{i >> 8:02x}:{(i & 0xFF) >> 3:02x}.{i & 7}",
        vendor=0x1234,
        device=0x11E8,
        class_code=0x00FF00,
        driver=None,
        driver_override=None,
        group_id=i,
        is_bridge=False,
        vfio_cdev=None,
    )


def grp(gid: int) -> m.GroupEntry:
    return m.GroupEntry(
        group_id=gid, devices=(), is_viable=True, offenders=(), path=None, owner=None
    )


def dpage(ids: range, total: int, nxt: int | None) -> m.ListDevicesReply:
    return m.ListDevicesReply(
        id=1, total=total, next_offset=nxt, devices=tuple(dev(i) for i in ids)
    )


def test_follows_next_offset_to_the_end() -> None:
    pager = device_pager()
    asked = []
    pages = {
        0: dpage(range(0, 4), 10, 4),
        4: dpage(range(4, 8), 10, 8),
        8: dpage(range(8, 10), 10, None),
    }
    while not pager.done:
        asked.append(pager.offset)
        pager.add(pages[pager.offset])
    assert asked == [0, 4, 8]
    assert pager.result() == tuple(dev(i) for i in range(10))
    assert (pager.pages, pager.restarts) == (3, 0)


def test_single_page() -> None:
    pager = group_pager()
    pager.add(m.ListGroupsReply(id=1, total=2, next_offset=None, groups=(grp(7), grp(3))))
    assert pager.done
    assert [g.group_id for g in pager.result()] == [3, 7]  # sorted by key


def test_restarts_from_zero_when_total_changes() -> None:
    """A device added between pages: start over, so nothing is skipped or stale."""
    pager = device_pager()
    pager.add(dpage(range(0, 4), 10, 4))
    pager.add(dpage(range(5, 9), 11, 8))  # the list grew: this page is thrown away
    assert (pager.offset, pager.restarts, pager.done) == (0, 1, False)
    pager.add(dpage(range(0, 11), 11, None))
    assert pager.done
    assert pager.result() == tuple(dev(i) for i in range(11))


def test_gives_up_restarting_and_merges_by_key() -> None:
    """A list that keeps changing: after MAX_RESTARTS the pages are merged, duplicates
    (an entry shifted onto the next page) counted once."""
    pager = device_pager()
    total = 10
    pager.add(dpage(range(0, 4), total, 4))
    for _ in range(MAX_RESTARTS):
        total += 1
        pager.add(dpage(range(0, 4), total, 4))  # each one triggers a restart
        assert pager.offset == 0
        pager.add(dpage(range(0, 4), total, 4))
    assert pager.restarts == MAX_RESTARTS
    pager.add(dpage(range(3, 8), total + 1, 8))  # changed again: merged this time
    pager.add(dpage(range(8, 12), total + 1, None))
    assert pager.done
    assert pager.result() == tuple(dev(i) for i in range(12))


@pytest.mark.parametrize("bad_next", [2, 4])
def test_next_offset_that_does_not_advance_is_an_error(bad_next: int) -> None:
    """A daemon that sends next_offset <= the page's offset would loop the client forever."""
    pager = device_pager()
    pager.add(dpage(range(0, 4), 10, 4))
    with pytest.raises(PagingError):
        pager.add(dpage(range(4, 5), 10, bad_next))
