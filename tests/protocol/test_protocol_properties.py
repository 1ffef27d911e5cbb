"""Hypothesis properties of the codec: identity on valid messages, only ProtocolError on junk."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iommud.protocol.codec import REQUEST_OPS, SERVER_OPS, decode_request, decode_server, encode
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import MAX_FDS
from iommud.protocol.messages import Message
from tests.protocol.protocol_strategies import JSON_VALUES, mutated, requests, server_messages

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODERS = (decode_request, decode_server)
NFDS = st.integers(min_value=-2, max_value=MAX_FDS + 3)


@SETTINGS
@given(requests)
def test_request_round_trip(msg: Message) -> None:
    data, nfds = encode(msg)
    decoded = decode_request(data, nfds)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert encode(decoded) == (data, nfds)


@SETTINGS
@given(server_messages)
def test_server_message_round_trip(msg: Message) -> None:
    data, nfds = encode(msg)
    decoded = decode_server(data, nfds)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert encode(decoded) == (data, nfds)


@SETTINGS
@given(requests)
def test_encoding_is_compact_and_op_first(msg: Message) -> None:
    data, _ = encode(msg)
    obj = json.loads(data)
    assert next(iter(obj)) == "op"
    assert data == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decodes_or_protocol_error(data: bytes, nfds: int) -> None:
    """Each decoder either returns a message that re-encodes, or raises ProtocolError."""
    for decode in DECODERS:
        try:
            msg = decode(data, nfds)
        except ProtocolError as exc:
            error = exc
        else:
            assert encode(msg)[1] == nfds
            continue
        assert isinstance(error.code, ErrorCode)
        error.to_reply()  # every error must be reportable as an error datagram


@SETTINGS
@given(st.binary(max_size=512), NFDS)
def test_arbitrary_bytes_only_protocol_error(data: bytes, nfds: int) -> None:
    decodes_or_protocol_error(data, nfds)


@SETTINGS
@given(JSON_VALUES, NFDS)
def test_arbitrary_json_only_protocol_error(value: Any, nfds: int) -> None:
    decodes_or_protocol_error(json.dumps(value).encode(), nfds)


OPS = sorted(REQUEST_OPS | SERVER_OPS)
mutations = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 30), st.none()),
    st.tuples(st.just("set"), st.integers(0, 30), JSON_VALUES),
    st.tuples(st.just("add"), st.text(max_size=8), JSON_VALUES),
    st.tuples(st.just("op"), st.sampled_from(OPS), st.none()),
)


@SETTINGS
@given(requests | server_messages, st.lists(mutations, min_size=1, max_size=3), NFDS)
def test_mutated_messages_only_protocol_error(
    msg: Message, edits: list[tuple[str, Any, Any]], nfds: int
) -> None:
    """Drop, replace or add fields, or swap the op, of a valid message."""
    obj = json.loads(encode(msg)[0])
    for kind, where, value in edits:
        keys = list(obj)
        if kind == "drop" and keys:
            del obj[keys[where % len(keys)]]
        elif kind == "set" and keys:
            obj[keys[where % len(keys)]] = value
        elif kind == "add":
            obj[where] = value
        elif kind == "op":
            obj["op"] = where
    decodes_or_protocol_error(json.dumps(obj).encode(), nfds)


@SETTINGS
@given(requests | server_messages, st.data())
def test_byte_mutations_only_protocol_error(msg: Message, data: st.DataObject) -> None:
    """Flip, cut or splice bytes of a valid datagram."""
    decodes_or_protocol_error(mutated(encode(msg)[0], data), data.draw(NFDS))


@SETTINGS
@given(requests, st.integers(min_value=0, max_value=MAX_FDS))
def test_wrong_fd_count_is_refused(msg: Message, nfds: int) -> None:
    """A datagram whose fds field disagrees with the fds received is a bad request."""
    data, declared = encode(msg)
    if nfds == declared:
        return
    with pytest.raises(ProtocolError) as info:
        decode_request(data, nfds)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id == msg.id  # type: ignore[attr-defined]
