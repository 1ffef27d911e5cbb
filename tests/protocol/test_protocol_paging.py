"""Paging fields of list_devices / list_groups: defaults, bounds, page consistency."""

from __future__ import annotations

import pytest

from iommud.protocol.codec import decode_request, decode_server
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.messages import ListDevices, ListGroups

DEVICE = (
    '{"bdf":"0000:00:10.0","vendor":4660,"device":4584,"class_code":65280,"driver":null,'
    '"driver_override":null,"group_id":4,"is_bridge":false,"vfio_cdev":null}'
)


@pytest.mark.parametrize(
    ("op", "cls"), [("list_devices", ListDevices), ("list_groups", ListGroups)]
)
def test_request_without_paging_fields_is_the_first_page(op: str, cls: type[object]) -> None:
    """A pre-paging request (no offset, no limit) still decodes: offset 0, no limit."""
    msg = decode_request(b'{"op":"%s","fds":0,"id":4}' % op.encode(), 0)
    assert msg == cls(id=4, offset=0, limit=None)  # type: ignore[call-arg]


def bad_request_locs(data: bytes, decode: object = decode_request) -> list[object]:
    with pytest.raises(ProtocolError) as info:
        decode(data, 0)  # type: ignore[operator]
    assert info.value.code is ErrorCode.BAD_REQUEST
    errors = info.value.details["errors"]
    assert isinstance(errors, list)
    return [e["loc"] for e in errors]  # type: ignore[index,call-overload]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ('"limit":0', "limit"),
        ('"limit":4294967296', "limit"),
        ('"limit":1.5', "limit"),
        ('"offset":-1', "offset"),
        ('"offset":"3"', "offset"),
        ('"offset":null', "offset"),
        ('"offset":true', "offset"),
    ],
)
def test_request_bounds(fields: str, loc: str) -> None:
    data = b'{"op":"list_devices","fds":0,"id":4,%s}' % fields.encode()
    assert bad_request_locs(data) == [loc]


def reply(total: int, next_offset: str, devices: int) -> bytes:
    body = ",".join([DEVICE] * devices)
    return (
        b'{"op":"list_devices_reply","fds":0,"id":4,"total":%d,"next_offset":%s,"devices":[%s]}'
        % (total, next_offset.encode(), body.encode())
    )


@pytest.mark.parametrize(
    ("total", "next_offset", "devices"),
    [
        (3, "5", 1),  # next_offset past the end
        (3, "3", 1),  # next_offset == total: nothing left to ask for
        (3, "0", 1),  # next_offset below the entries on this page
        (0, "null", 1),  # more entries than total
        (5, "2", 0),  # an empty page that is not the last: a client would loop
    ],
)
def test_inconsistent_page_is_refused(total: int, next_offset: str, devices: int) -> None:
    """A client can trust next_offset to make progress: bad pages do not decode."""
    assert bad_request_locs(reply(total, next_offset, devices), decode_server) == [""]


@pytest.mark.parametrize(
    ("total", "next_offset", "devices"),
    [(1, "null", 1), (3000, "1", 1), (3000, "2999", 1), (7, "null", 0), (2, "1", 1)],
)
def test_consistent_pages_decode(total: int, next_offset: str, devices: int) -> None:
    msg = decode_server(reply(total, next_offset, devices), 0)
    assert getattr(msg, "total", None) == total
    assert getattr(msg, "next_offset", None) == (
        None if next_offset == "null" else int(next_offset)
    )
