"""Protocol v2: delegated claims on a v2 connection, v1 untouched (vectors, schema, state)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from iommud.protocol.codec import decode_request, decode_server, encode
from iommud.protocol.connection import ClientConnection, ServerConnection, State
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import LocalProtocolError, ProtocolError
from iommud.protocol.limits import DEFAULT_LIMITS, LATEST_VERSION
from iommud.protocol.messages import (
    Claim,
    ClaimedDevice,
    ClaimReply,
    ErrorReply,
    Hello,
    HelloReply,
)
from iommud.protocol.v2 import REQUEST_TYPES_V2, ClaimMode, ClaimReplyV2, ClaimV2
from protocol import generate

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"
EDU = "0000:00:10.0"


def load(name: str) -> list[dict[str, Any]]:
    data = json.loads((PROTOCOL_DIR / "vectors" / "v2" / f"{name}.json").read_text())
    assert isinstance(data, list)
    return data


def valid_vectors() -> list[dict[str, Any]]:
    return [v for name in ("requests", "replies", "errors") for v in load(name)]


def hello_reply(version: int) -> HelloReply:
    return HelloReply(id=1, version=version, server="s", capabilities=(), limits=DEFAULT_LIMITS)


def delegated_reply(request_id: int) -> ClaimReplyV2:
    return ClaimReplyV2(
        id=request_id,
        lease_id=1,
        group_id=4,
        backend="iommufd",
        ioas_id=None,
        mode=ClaimMode.DELEGATED,
        iommufd_id=1,
        iommufd_fd_index=0,
        devices=(ClaimedDevice(bdf=EDU, fd_index=1, devid=None),),
    )


@pytest.mark.parametrize("vector", valid_vectors(), ids=lambda v: v["name"])
def test_v2_vector_round_trips_byte_exact(vector: dict[str, Any]) -> None:
    data = vector["json"].encode()
    if vector["direction"] == generate.TO_SERVER:
        msg: Any = decode_request(data, vector["fds"], 2)
    else:
        msg = decode_server(data, vector["fds"], 2)
    assert encode(msg) == (data, vector["fds"])


@pytest.mark.parametrize("vector", load("invalid"), ids=lambda v: v["name"])
def test_v2_invalid_vector_is_refused_with_code(vector: dict[str, Any]) -> None:
    """v2 claim rules on v2; v2 keys on a v1 connection are unknown keys (bad_request)."""
    with pytest.raises(ProtocolError) as info:
        decode_request(vector["json"].encode(), vector["fds"], vector["version"])
    assert info.value.code == ErrorCode(vector["error"])
    assert info.value.request_id == vector["id"]


def test_v2_vectors_cover_the_delegated_shapes() -> None:
    fds = {v["name"]: v["fds"] for v in valid_vectors()}
    assert fds["claim_reply_delegated_new_iommufd"] == 2  # the iommufd + one cdev
    assert fds["claim_reply_delegated_join_iommufd"] == 2  # two cdevs, no iommufd
    errors = [decode_server(v["json"].encode(), 0, 2) for v in load("errors")]
    assert ErrorCode.NOT_DELEGABLE in {e.code for e in errors if isinstance(e, ErrorReply)}


def test_v1_request_vectors_decode_on_v2() -> None:
    """Every v1 request vector is a valid v2 request (v2 only adds defaulted fields)."""
    v1 = json.loads((PROTOCOL_DIR / "vectors" / "requests.json").read_text())
    for vector in v1:
        msg = decode_request(vector["json"].encode(), vector["fds"], 2)
        assert msg.op in REQUEST_TYPES_V2


def test_schema_v2_has_the_v2_claim() -> None:
    schema = json.loads((PROTOCOL_DIR / "schema-v2.json").read_text())
    assert schema["$id"] == "iommud-protocol-v2.schema.json"
    mapping = schema["$defs"]["Request"]["discriminator"]["mapping"]
    assert mapping["claim"] == "#/$defs/ClaimV2"
    assert {"mode", "iommufd_id"} <= set(schema["$defs"]["ClaimV2"]["properties"])
    v1 = json.loads((PROTOCOL_DIR / "schema.json").read_text())
    assert "ClaimV2" not in v1["$defs"]


def test_delegated_reply_rules() -> None:
    """A delegated reply has null ioas_id and devids, backend iommufd, and its iommufd_id."""
    base = delegated_reply(1).model_dump(exclude={"fds"})
    assert ClaimReplyV2(**base).fds == 2
    for bad in (
        {"ioas_id": 3},
        {"iommufd_id": None},
        {"backend": "legacy"},
        {"iommufd_fd_index": 1},
        {"devices": (ClaimedDevice(bdf=EDU, fd_index=1, devid=7),)},
    ):
        with pytest.raises(ValidationError):
            ClaimReplyV2(**{**base, **bad})


def v2_server() -> ServerConnection:
    conn = ServerConnection()
    conn.receive(*encode(Hello(id=1, version=LATEST_VERSION, client="t")))
    conn.send_reply(hello_reply(2))
    assert (conn.state, conn.version) == (State.READY, 2)
    return conn


def test_v2_connection_takes_a_delegated_claim() -> None:
    conn = v2_server()
    request = conn.receive(*encode(ClaimV2(id=2, devices=(EDU,), mode=ClaimMode.DELEGATED)))
    assert isinstance(request, ClaimV2)
    assert request.mode is ClaimMode.DELEGATED
    assert conn.send_reply(delegated_reply(2))[1] == 2


def test_v2_connection_refuses_a_v1_claim_reply() -> None:
    """A v2 client decodes claim_reply with mode: the server must not send v1's."""
    conn = v2_server()
    conn.receive(*encode(Claim(id=2, devices=(EDU,))))
    v1 = ClaimReply(
        id=2,
        lease_id=1,
        group_id=4,
        backend="iommufd",
        ioas_id=3,
        devices=(ClaimedDevice(bdf=EDU, fd_index=0, devid=1),),
    )
    with pytest.raises(LocalProtocolError):
        conn.send_reply(v1)


def test_v1_connection_refuses_mode_as_unknown_key() -> None:
    conn = ServerConnection()
    conn.receive(*encode(Hello(id=1, version=1, client="t")))
    conn.send_reply(hello_reply(1))
    data, nfds = encode(ClaimV2(id=2, devices=(EDU,), mode=ClaimMode.DELEGATED))
    with pytest.raises(ProtocolError) as info:
        conn.receive(data, nfds)
    assert (info.value.code, info.value.request_id) == (ErrorCode.BAD_REQUEST, 2)
    assert info.value.details == {
        "errors": [
            {"loc": "mode", "type": "extra_forbidden", "msg": "Extra inputs are not permitted"},
            {
                "loc": "iommufd_id",
                "type": "extra_forbidden",
                "msg": "Extra inputs are not permitted",
            },
        ]
    }


def test_client_sends_v2_claims_only_on_v2() -> None:
    client = ClientConnection()
    client.send(client.hello("t"))
    client.receive(*encode(hello_reply(1)))
    with pytest.raises(LocalProtocolError):
        client.send(client.build(ClaimV2, devices=(EDU,), mode=ClaimMode.DELEGATED))
    client.send(client.build(Claim, devices=(EDU,)))


def test_client_decodes_v2_claim_reply_on_v2() -> None:
    client = ClientConnection()
    client.send(client.hello("t", version=2))
    client.receive(*encode(hello_reply(2)))
    claim = client.build(ClaimV2, devices=(EDU,), mode=ClaimMode.DELEGATED)
    client.send(claim)
    assert isinstance(client.receive(*encode(delegated_reply(claim.id))), ClaimReplyV2)


def doc_examples_v2() -> list[str]:
    text = (PROTOCOL_DIR / "PROTOCOL.md").read_text()
    blocks = text.split("```json-v2\n")[1:]
    return [line for block in blocks for line in block.split("```")[0].splitlines() if line]


@pytest.mark.parametrize("line", doc_examples_v2())
def test_protocol_md_v2_examples_are_canonical(line: str) -> None:
    """Every ``json-v2`` example in PROTOCOL.md round-trips on a v2 connection."""
    data = line.encode()
    nfds, op = json.loads(line)["fds"], json.loads(line)["op"]
    if op in REQUEST_TYPES_V2:
        msg: Any = decode_request(data, nfds, 2)
    else:
        msg = decode_server(data, nfds, 2)
    assert encode(msg) == (data, nfds)


def test_protocol_md_has_v2_examples() -> None:
    assert len(doc_examples_v2()) >= 4
