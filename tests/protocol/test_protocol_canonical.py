"""The codec's fast path (``_decode_canonical``) against the full one (``_decode``), for
both directions: decode_server (the client library reading the daemon) and
decode_request (the daemon reading a client).

The fast path may only ever return what the full path returns, and must take every
datagram ``encode`` writes (or it is dead weight); everything else falls through to the
full path with its exact errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from iommud.protocol.codec import (
    _REQUEST,
    _REQUEST_CORE,
    _SERVER,
    _SERVER_CORE,
    REQUEST_OPS,
    SERVER_OPS,
    _decode,
    _decode_canonical,
    _JsonValidator,
    decode_request,
    decode_server,
    encode,
)
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import MAX_FDS
from iommud.protocol.messages import IoasMap, MapRange, Message, PingReply, Subscribe
from iommud.protocol.v2 import V2_ONLY_EVENTS
from tests.protocol.protocol_strategies import JSON_VALUES, mutated, requests, server_messages

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NFDS = st.integers(min_value=-1, max_value=MAX_FDS + 1)
VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


@dataclass(frozen=True)
class Side:
    """One direction of the protocol: its two decoding paths and its golden vectors."""

    name: str
    full_adapters: dict[int, TypeAdapter[Any]]
    cores: dict[int, _JsonValidator[Any]]
    ops: frozenset[str]
    vector_files: tuple[str, ...]

    def full(self, data: bytes, nfds: int, version: int = 1) -> Any:
        """The full path's message, or its ProtocolError."""
        try:
            return _decode(self.full_adapters[version], self.ops, data, nfds)
        except ProtocolError as exc:
            return exc

    def fast(self, data: bytes, nfds: int, version: int = 1) -> Any:
        return _decode_canonical(self.cores[version], data, nfds)

    def same_as_full(self, data: bytes, nfds: int, version: int = 1) -> None:
        """If the fast path answers, the full path gives an equal message of that class."""
        got = self.fast(data, nfds, version)
        if got is not None:
            expected = self.full(data, nfds, version)
            assert not isinstance(expected, ProtocolError), f"took what {expected} refused"
            assert got == expected
            assert type(got) is type(expected)

    def vectors(self) -> list[tuple[int, dict[str, Any]]]:
        """The golden vectors of this side (v1 and v2), with their protocol version."""
        out = []
        for version, folder in ((1, VECTORS), (2, VECTORS / "v2")):
            for name in self.vector_files:
                path = folder / f"{name}.json"
                if path.exists():
                    out += [(version, v) for v in json.loads(path.read_text())]
        return out


SERVER = Side(
    "server", dict(_SERVER), dict(_SERVER_CORE), SERVER_OPS, ("replies", "errors", "events")
)
CLIENT = Side("client", dict(_REQUEST), dict(_REQUEST_CORE), REQUEST_OPS, ("requests",))
MESSAGES = st.one_of(
    server_messages.map(lambda msg: (SERVER, msg)), requests.map(lambda msg: (CLIENT, msg))
)


@SETTINGS
@given(MESSAGES)
def test_every_encoded_message_takes_the_fast_path(side_msg: tuple[Side, Message]) -> None:
    side, msg = side_msg
    data, nfds = encode(msg)
    got = side.fast(data, nfds)
    assert got is not None
    assert got == side.full(data, nfds)
    assert type(got) is type(msg)


VECTOR_CASES = [(side, version, v) for side in (SERVER, CLIENT) for version, v in side.vectors()]


@pytest.mark.parametrize(("side", "version", "vector"), VECTOR_CASES, ids=lambda v: str(v)[:60])
def test_golden_vectors_take_the_fast_path(
    side: Side, version: int, vector: dict[str, Any]
) -> None:
    data = vector["json"].encode()
    got = side.fast(data, vector["fds"], version)
    assert got is not None
    assert got == side.full(data, vector["fds"], version)


def test_vectors_were_found() -> None:
    for side in (SERVER, CLIENT):
        assert {version for version, _ in side.vectors()} == {1, 2}, side.name


@SETTINGS
@given(MESSAGES, st.data())
def test_byte_mutations_never_pass_the_fast_path_alone(
    side_msg: tuple[Side, Message], data: st.DataObject
) -> None:
    """Flipped, cut or spliced bytes: the fast path answers only as the full path does."""
    side, msg = side_msg
    side.same_as_full(mutated(encode(msg)[0], data), data.draw(NFDS))


@SETTINGS
@given(MESSAGES, st.text(max_size=8), JSON_VALUES, NFDS)
def test_json_edits_never_pass_the_fast_path_alone(
    side_msg: tuple[Side, Message], key: str, value: Any, nfds: int
) -> None:
    """A field set to any JSON value, compact and in place, as a canonical encoder would."""
    side, msg = side_msg
    obj = json.loads(encode(msg)[0])
    keys = list(obj)
    obj[keys[len(key) % len(keys)] if key.isdigit() else key] = value
    side.same_as_full(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), nfds)


@pytest.mark.parametrize(
    ("side", "data"),
    [
        (SERVER, b'{"op":"ping_reply","fds":0,"id":1,"id":1}'),
        (SERVER, b'{"op":"ping_reply","fds":0,"id":2,"id":1}'),
        (SERVER, b'{"op":"ping_reply","op":"ping_reply","fds":0,"id":1}'),
        (
            SERVER,
            b'{"op":"error","fds":0,"id":1,"code":"busy","message":"m","details":{"a":1,"a":1}}',
        ),
        (CLIENT, b'{"op":"ping","fds":0,"id":1,"id":1}'),
        (
            CLIENT,
            b'{"op":"ioas_unmap","fds":0,"id":1,"ioas_id":1,"iova":0,"iova":4096,"length":4096}',
        ),
        (
            CLIENT,
            b'{"op":"ioas_map","fds":1,"id":1,"ioas_id":1,"ranges":[{"fd_index":0,"offset":0,'
            b'"offset":4096,"length":4096,"iova":null,"read":true,"write":true}]}',
        ),
    ],
    ids=[
        "same-value",
        "other-value",
        "op-twice",
        "nested",
        "request-same-value",
        "request-other-value",
        "request-nested",
    ],
)
def test_duplicate_keys_are_refused(side: Side, data: bytes) -> None:
    """pydantic-core keeps the last duplicate; the canonical check sends these to the full
    path, which refuses them as before."""
    assert side.fast(data, data.count(b'"fds":1')) is None
    decode = decode_server if side is SERVER else decode_request
    with pytest.raises(ProtocolError) as info:
        decode(data, data.count(b'"fds":1'))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message == "datagram is not valid JSON"


@pytest.mark.parametrize(
    "data",
    [
        b'{"op": "ping_reply", "fds": 0, "id": 7}',
        b'{"id":7,"op":"ping_reply","fds":0}',
        b'{"op":"ping_reply","fds":0,"id":7}\n',
        b'{"op":"ping\\u005freply","fds":0,"id":7}',
    ],
    ids=["spaces", "order", "newline", "escape"],
)
def test_other_spellings_still_decode_by_the_full_path(data: bytes) -> None:
    assert SERVER.fast(data, 0) is None
    assert decode_server(data, 0) == PingReply(id=7)


def test_a_canonical_datagram_with_other_fds_gets_the_full_error() -> None:
    data, _ = encode(PingReply(id=3))
    with pytest.raises(ProtocolError) as info:
        decode_server(data, 1)
    assert info.value.message == "'fds' does not match the fds received"
    assert info.value.details == {"fds": 0, "received": 1}


MAP = IoasMap(id=4, ioas_id=1, ranges=(MapRange(fd_index=0, offset=0, length=4096),))


def test_a_request_in_another_spelling_decodes_by_the_full_path() -> None:
    """What a C or Rust client may send: other key order, spaces, defaults left out."""
    data = (
        b'{"id": 4, "op": "ioas_map", "fds": 1, "ioas_id": 1,'
        b' "ranges": [{"fd_index": 0, "offset": 0, "length": 4096}]}'
    )
    assert CLIENT.fast(data, 1) is None
    assert decode_request(data, 1) == MAP


def test_a_request_without_fds_is_refused_on_both_paths() -> None:
    """Python callers may leave ``fds`` out of an IoasMap; the wire may not."""
    assert MAP.fds == 1
    data = encode(MAP)[0].replace(b'"fds":1,', b"")
    assert CLIENT.fast(data, 1) is None
    with pytest.raises(ProtocolError) as info:
        decode_request(data, 1)
    assert info.value.message == "missing 'fds'"


def test_a_canonical_request_with_other_fds_gets_the_full_error() -> None:
    data, _ = encode(MAP)
    with pytest.raises(ProtocolError) as info:
        decode_request(data, 0)
    assert info.value.message == "'fds' does not match the fds received"
    assert info.value.details == {"fds": 1, "received": 0}


def test_v2_events_on_a_v1_connection_are_refused_after_the_fast_path() -> None:
    late = sorted(V2_ONLY_EVENTS)[0]
    data, nfds = encode(Subscribe(id=9, events=(late,)))
    assert CLIENT.fast(data, nfds, 1) is not None  # valid in the shared schema...
    with pytest.raises(ProtocolError) as info:
        decode_request(data, nfds, 1)  # ...but not on a version 1 connection
    assert info.value.details == {"events": [str(late)]}
    on_v2 = decode_request(data, nfds, 2)
    assert isinstance(on_v2, Subscribe)
    assert on_v2.events == (late,)
