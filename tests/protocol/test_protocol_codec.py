"""Codec examples: exact error codes, ids and details for each way a datagram can be wrong."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from iommud.protocol.codec import decode_request, decode_server, encode
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import MAX_DATAGRAM, MAX_FDS, MAX_RANGES
from iommud.protocol.messages import (
    Claim,
    ClaimedDevice,
    ClaimReply,
    DriverBound,
    ErrorReply,
    IoasMap,
    IovaRange,
    ListDevicesReply,
    MapRange,
    Ping,
    Subscribe,
)

EDU = "0000:00:10.0"


def refused(data: bytes | str, nfds: int = 0, *, server: bool = False) -> ProtocolError:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(ProtocolError) as info:
        (decode_server if server else decode_request)(raw, nfds)
    return info.value


def test_encode_is_compact_in_field_order() -> None:
    assert encode(Claim(id=5, devices=[EDU])) == (
        b'{"op":"claim","fds":0,"id":5,"devices":["0000:00:10.0"],"backend":"auto","ioas_id":null}',
        0,
    )


def test_non_ascii_is_utf8_not_escaped() -> None:
    data, _ = encode(ErrorReply(id=1, code=ErrorCode.BUSY, message="groupe occupé"))
    assert "occupé".encode() in data
    assert decode_server(data, 0) == ErrorReply(id=1, code=ErrorCode.BUSY, message="groupe occupé")


def test_oversize_datagram_is_limit_reached() -> None:
    err = refused(b" " * (MAX_DATAGRAM + 1))
    assert (err.code, err.request_id, err.details) == (
        ErrorCode.LIMIT_REACHED,
        None,
        {"size": MAX_DATAGRAM + 1, "max_datagram": MAX_DATAGRAM},
    )


def test_datagram_of_exactly_max_size_is_accepted() -> None:
    data = b'{"op":"ping","fds":0,"id":1}'
    padded = data + b" " * (MAX_DATAGRAM - len(data))
    assert decode_request(padded, 0) == Ping(id=1)


def test_encode_refuses_oversize_message() -> None:
    """A reply too big for one datagram raises LIMIT_REACHED (with the request id)."""
    device = {
        "vendor": 0x8086,
        "device": 0x1234,
        "class_code": 0x020000,
        "driver": "e1000e",
        "driver_override": None,
        "group_id": 1,
        "is_bridge": False,
        "vfio_cdev": None,
    }
    devices = [{"bdf": f"0000:{b:02x}:{d:02x}.0", **device} for b in range(256) for d in range(2)]
    reply = ListDevicesReply.model_validate(
        {"id": 9, "total": len(devices), "next_offset": None, "devices": devices}
    )
    with pytest.raises(ProtocolError) as info:
        encode(reply)
    assert info.value.code is ErrorCode.LIMIT_REACHED
    assert info.value.request_id == 9
    assert info.value.details["max_datagram"] == MAX_DATAGRAM


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe{}",
        '{"op":"ping","fds":0,"id":1}'.encode("utf-16"),
        b'\xef\xbb\xbf{"op":"ping","fds":0,"id":1}',
        b'{"op":"ping","fds":0,"id":1} x',
        b"",
        b"[" * 50000,
        b'{"op":"ping","fds":0,"id":' + b"1" * 5000 + b"}",
        b'{"op":"ping","fds":0,"id":1,"x":Infinity}',
    ],
    ids=["bad-utf8", "utf16", "bom", "trailing", "empty", "deep", "huge-int", "infinity"],
)
def test_undecodable_is_bad_request_without_id(data: bytes) -> None:
    err = refused(data)
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, None)


@pytest.mark.parametrize("value", ["3", "[1]", "true", "null", "1.5"])
def test_top_level_must_be_object(value: str) -> None:
    err = refused(value)
    assert (err.code, err.message) == (ErrorCode.BAD_REQUEST, "datagram is not a JSON object")


def test_negative_fd_count_is_bad_request() -> None:
    assert refused('{"op":"ping","fds":0,"id":1}', -1).code is ErrorCode.BAD_REQUEST


def test_too_many_fds_reports_id() -> None:
    err = refused('{"op":"ping","fds":0,"id":77}', MAX_FDS + 1)
    assert (err.code, err.request_id, err.details) == (
        ErrorCode.LIMIT_REACHED,
        77,
        {"received": MAX_FDS + 1, "max_fds": MAX_FDS},
    )


def test_unknown_op_echo_is_truncated() -> None:
    err = refused(json.dumps({"op": "x" * 1000, "fds": 0, "id": 2}))
    assert (err.code, err.request_id, err.details) == (ErrorCode.UNKNOWN_OP, 2, {"op": "x" * 64})


@pytest.mark.parametrize("op", [None, 5, ["ping"]])
def test_op_must_be_string(op: object) -> None:
    err = refused(json.dumps({"op": op, "fds": 0, "id": 2}))
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, 2)


def test_request_decoder_refuses_server_ops_and_vice_versa() -> None:
    assert refused('{"op":"event","fds":0}').code is ErrorCode.UNKNOWN_OP
    assert refused('{"op":"ping","fds":0,"id":1}', server=True).code is ErrorCode.UNKNOWN_OP


def test_validation_errors_name_the_field() -> None:
    err = refused(
        '{"op":"ioas_map","fds":1,"id":6,"ioas_id":3,'
        '"ranges":[{"fd_index":0,"offset":0,"length":4096,"read":"yes"}]}',
        1,
    )
    assert (err.code, err.request_id, err.message) == (ErrorCode.BAD_REQUEST, 6, "invalid message")
    assert err.details == {
        "errors": [
            {"loc": "ranges.0.read", "type": "bool_type", "msg": "Input should be a valid boolean"},
            # pydantic also reports the tuple as empty once its only item failed
            {
                "loc": "ranges",
                "type": "too_short",
                "msg": "Tuple should have at least 1 item after validation, not 0",
            },
        ]
    }


def test_event_error_loc_drops_both_tags() -> None:
    err = refused(
        '{"op":"event","fds":0,"event":"driver_bound","ts":-1.0,"seq":1,'
        '"bdf":"0000:00:10.0","driver":"x","group_id":1}',
        server=True,
    )
    assert err.details["errors"] == [
        {
            "loc": "ts",
            "type": "greater_than_equal",
            "msg": "Input should be greater than or equal to 0",
        }
    ]


def test_fds_mismatch_details() -> None:
    data, nfds = encode(
        IoasMap(
            id=4,
            ioas_id=1,
            ranges=[
                MapRange(fd_index=1, offset=0, length=1),
                MapRange(fd_index=0, offset=0, length=1),
            ],
        )
    )
    assert nfds == 2
    err = refused(data, 1)
    assert (err.code, err.request_id, err.details) == (
        ErrorCode.BAD_REQUEST,
        4,
        {"fds": 2, "received": 1},
    )


def test_error_reply_from_protocol_error() -> None:
    err = refused('{"op":"nope","fds":0,"id":3}')
    data, nfds = encode(err.to_reply())
    assert (data, nfds) == (
        b'{"op":"error","fds":0,"id":3,"code":"unknown_op","message":"unknown op",'
        b'"details":{"op":"nope"}}',
        0,
    )


@pytest.mark.parametrize(
    "bdf",
    ["0000:00:10.0", "ffff:ff:1f.7", "0000:0a:00.1"],
)
def test_bdf_accepted(bdf: str) -> None:
    assert Claim(id=1, devices=[bdf]).devices == (bdf,)


@pytest.mark.parametrize(
    "bdf",
    ["0000:00:20.0", "0000:00:10.8", "0000:00:1F.0", "00:10.0", "0000:00:10.0\n", " 0000:00:10.0"],
)
def test_bdf_refused(bdf: str) -> None:
    with pytest.raises(ValidationError):
        Claim(id=1, devices=[bdf])


def test_model_rules() -> None:
    """Cross-field rules the models enforce, constructed from Python."""
    with pytest.raises(ValidationError):
        Claim(id=1, devices=[EDU, EDU])
    with pytest.raises(ValidationError):
        Claim(id=1, devices=[f"0000:00:{i:02x}.0" for i in range(MAX_FDS + 1)])
    with pytest.raises(ValidationError):
        IovaRange(start=2, last=1)
    with pytest.raises(ValidationError):
        IoasMap(id=1, ioas_id=1, ranges=[MapRange(fd_index=1, offset=0, length=1)], fds=3)
    with pytest.raises(ValidationError):
        IoasMap(
            id=1, ioas_id=1, ranges=[MapRange(fd_index=0, offset=0, length=1)] * (MAX_RANGES + 1)
        )
    with pytest.raises(ValidationError):
        ClaimReply(
            id=1,
            lease_id=1,
            group_id=1,
            backend="iommufd",
            ioas_id=1,
            devices=[ClaimedDevice(bdf=EDU, fd_index=1, devid=None)],
        )
    with pytest.raises(ValidationError):
        ErrorReply(id=1, code=ErrorCode.BUSY, message="x", details={"v": [float("nan")]})
    with pytest.raises(ValidationError):
        Ping(id=True)
    with pytest.raises(ValidationError):
        Ping(id=1, fds=1)
    with pytest.raises(ValidationError):
        Ping(id=1, extra=1)  # type: ignore[call-arg]


def test_models_are_frozen() -> None:
    ping = Ping(id=1)
    with pytest.raises(ValidationError):
        ping.id = 2  # type: ignore[misc]
    assert hash(Subscribe(id=1, events=None, groups=(1, 2))) == hash(Subscribe(id=1, groups=[1, 2]))


def test_fds_default_from_fd_indexes() -> None:
    ranges = [
        MapRange(fd_index=2, offset=0, length=1),
        MapRange(fd_index=0, offset=0, length=1),
        MapRange(fd_index=1, offset=0, length=1),
    ]
    assert IoasMap(id=1, ioas_id=1, ranges=ranges).fds == 3


def test_event_group_property() -> None:
    assert DriverBound(ts=0.0, seq=0, bdf=EDU, driver="d", group_id=3).event_group == 3
    assert DriverBound(ts=0.0, seq=0, bdf=EDU, driver="d", group_id=None).event_group is None
