"""decode_server's fast path (``_decode_canonical``) against the full one (``_decode``).

The fast path may only ever return what the full path returns, and must take every
datagram ``encode`` writes (or it is dead weight); everything else falls through to the
full path with its exact errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iommud.protocol.codec import (
    _SERVER,
    _SERVER_CORE,
    SERVER_OPS,
    _decode,
    _decode_canonical,
    decode_server,
    encode,
)
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import MAX_FDS
from iommud.protocol.messages import Message, PingReply
from tests.protocol.protocol_strategies import JSON_VALUES, server_messages

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NFDS = st.integers(min_value=-1, max_value=MAX_FDS + 1)
VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def full(data: bytes, nfds: int, version: int = 1) -> Any:
    """The full path's message, or its ProtocolError."""
    try:
        return _decode(_SERVER[version], SERVER_OPS, data, nfds)
    except ProtocolError as exc:
        return exc


def fast(data: bytes, nfds: int, version: int = 1) -> Any:
    return _decode_canonical(_SERVER_CORE[version], data, nfds)


def same_as_full(data: bytes, nfds: int, version: int = 1) -> None:
    """If the fast path answers, the full path gives an equal message of the same class."""
    got = fast(data, nfds, version)
    if got is not None:
        expected = full(data, nfds, version)
        assert not isinstance(expected, ProtocolError), f"fast path took what {expected} refuses"
        assert got == expected
        assert type(got) is type(expected)


@SETTINGS
@given(server_messages)
def test_every_encoded_server_message_takes_the_fast_path(msg: Message) -> None:
    data, nfds = encode(msg)
    got = fast(data, nfds)
    assert got is not None
    assert got == full(data, nfds)
    assert type(got) is type(msg)


def server_vectors() -> list[tuple[int, dict[str, Any]]]:
    """The golden vectors the daemon sends (v1 and v2), with their protocol version."""
    out = []
    for version, folder in ((1, VECTORS), (2, VECTORS / "v2")):
        for name in ("replies", "errors", "events"):
            path = folder / f"{name}.json"
            if path.exists():
                out += [(version, v) for v in json.loads(path.read_text())]
    return out


@pytest.mark.parametrize(("version", "vector"), server_vectors(), ids=lambda v: str(v))
def test_golden_vectors_take_the_fast_path(version: int, vector: dict[str, Any]) -> None:
    data = vector["json"].encode()
    got = fast(data, vector["fds"], version)
    assert got is not None
    assert got == full(data, vector["fds"], version)


def test_vectors_were_found() -> None:
    versions = {version for version, _ in server_vectors()}
    assert versions == {1, 2}


@SETTINGS
@given(server_messages, st.data())
def test_byte_mutations_never_pass_the_fast_path_alone(msg: Message, data: st.DataObject) -> None:
    """Flipped, cut or spliced bytes: the fast path answers only as the full path does."""
    raw = bytearray(encode(msg)[0])
    index = data.draw(st.integers(0, len(raw) - 1))
    action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "flip":
        raw[index] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del raw[index:]
    else:
        raw[index:index] = data.draw(st.binary(min_size=1, max_size=4))
    same_as_full(bytes(raw), data.draw(NFDS))


@SETTINGS
@given(server_messages, st.text(max_size=8), JSON_VALUES, NFDS)
def test_json_edits_never_pass_the_fast_path_alone(
    msg: Message, key: str, value: Any, nfds: int
) -> None:
    """A field set to any JSON value, compact and in place, as a canonical encoder would."""
    obj = json.loads(encode(msg)[0])
    keys = list(obj)
    obj[keys[len(key) % len(keys)] if key.isdigit() else key] = value
    same_as_full(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), nfds)


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"ping_reply","fds":0,"id":1,"id":1}',
        b'{"op":"ping_reply","fds":0,"id":2,"id":1}',
        b'{"op":"ping_reply","op":"ping_reply","fds":0,"id":1}',
        b'{"op":"error","fds":0,"id":1,"code":"busy","message":"m","details":{"a":1,"a":1}}',
    ],
    ids=["same-value", "other-value", "op-twice", "nested"],
)
def test_duplicate_keys_are_refused(data: bytes) -> None:
    """pydantic-core keeps the last duplicate; the canonical check sends these to the full
    path, which refuses them as before."""
    assert fast(data, 0) is None
    with pytest.raises(ProtocolError) as info:
        decode_server(data, 0)
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
    assert fast(data, 0) is None
    assert decode_server(data, 0) == PingReply(id=7)


def test_a_canonical_datagram_with_other_fds_gets_the_full_error() -> None:
    data, _ = encode(PingReply(id=3))
    with pytest.raises(ProtocolError) as info:
        decode_server(data, 1)
    assert info.value.message == "'fds' does not match the fds received"
    assert info.value.details == {"fds": 0, "received": 1}
