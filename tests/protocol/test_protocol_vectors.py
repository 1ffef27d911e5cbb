"""Golden vectors and schema in protocol/: no drift from the code, byte-exact round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from iommud.protocol.codec import decode_request, decode_server, encode
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import ProtocolError
from iommud.protocol.limits import MAX_FDS
from iommud.protocol.messages import (
    EVENT_TYPES,
    REPLY_TYPES,
    REQUEST_TYPES,
    ErrorReply,
    Event,
)
from protocol import generate

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"
VALID_FILES = ("requests", "replies", "events", "errors")
OUTPUTS = generate.outputs()


def load(name: str) -> list[dict[str, Any]]:
    data = json.loads((PROTOCOL_DIR / "vectors" / f"{name}.json").read_text())
    assert isinstance(data, list)
    return data


def valid_vectors() -> list[dict[str, Any]]:
    return [v for name in VALID_FILES for v in load(name)]


@pytest.mark.parametrize("rel", sorted(OUTPUTS))
def test_checked_in_files_match_generator(rel: str) -> None:
    """Run `python protocol/generate.py` if this fails after a model change."""
    assert (PROTOCOL_DIR / rel).read_text() == OUTPUTS[rel]


def test_generate_check_mode_reports_drift(tmp_path: Path) -> None:
    """--check exits 1 on a stale tree and writes nothing; a regenerated tree passes."""
    assert generate.main(["--root", str(tmp_path), "--check"]) == 1
    assert list(tmp_path.iterdir()) == []
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert generate.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "vectors" / "events.json").write_text("[]\n")
    assert generate.main(["--root", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("vector", valid_vectors(), ids=lambda v: v["name"])
def test_vector_round_trips_byte_exact(vector: dict[str, Any]) -> None:
    data = vector["json"].encode()
    if vector["direction"] == generate.TO_SERVER:
        msg: Any = decode_request(data, vector["fds"])
    else:
        assert vector["direction"] == generate.TO_CLIENT
        msg = decode_server(data, vector["fds"])
    assert encode(msg) == (data, vector["fds"])


def test_vectors_cover_every_op_and_event() -> None:
    requests = {json.loads(v["json"])["op"] for v in load("requests")}
    assert requests == set(REQUEST_TYPES)
    replies = {json.loads(v["json"])["op"] for v in load("replies")}
    assert replies == {cls.model_fields["op"].default for cls in REPLY_TYPES.values()}
    events = {json.loads(v["json"])["event"] for v in load("events")}
    assert events == {str(name) for name in EVENT_TYPES}
    errors = [decode_server(v["json"].encode(), v["fds"]) for v in load("errors")]
    assert all(isinstance(e, ErrorReply) for e in errors)
    assert len({e.code for e in errors if isinstance(e, ErrorReply)}) >= 5
    assert all(isinstance(decode_server(v["json"].encode(), 0), Event) for v in load("events"))


def test_vectors_carry_fds() -> None:
    """Claim replies and ioas_map requests exercise fd counts above one."""
    fds = {v["name"]: v["fds"] for v in valid_vectors()}
    assert fds["claim_reply_two_devices"] == 2
    assert fds["ioas_map_two_fds_kernel_iova_readonly"] == 2


@pytest.mark.parametrize("vector", load("invalid"), ids=lambda v: v["name"])
def test_invalid_vector_is_refused_with_code(vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(vector["json"].encode(), vector["fds"])
    assert info.value.code == ErrorCode(vector["error"])
    assert info.value.request_id == vector["id"]


def test_schema_lists_every_message() -> None:
    schema = json.loads((PROTOCOL_DIR / "schema.json").read_text())
    request_map = schema["$defs"]["Request"]["discriminator"]["mapping"]
    assert set(request_map) == set(REQUEST_TYPES)
    server_map = schema["$defs"]["ServerMessage"]["discriminator"]["mapping"]
    event_map = server_map["event"]["discriminator"]["mapping"]
    assert set(event_map) == {str(name) for name in EVENT_TYPES}
    claim = schema["$defs"]["Claim"]
    assert {"op", "fds", "id", "devices"} <= set(claim["required"])
    assert claim["additionalProperties"] is False


def test_schema_states_what_the_codec_checks() -> None:
    """Claim devices are distinct (uniqueItems); a required ``fds`` has no default (0
    contradicted ioas_map's minimum of 1); an owner's uid and pid may be hidden (null)."""
    defs = json.loads((PROTOCOL_DIR / "schema.json").read_text())["$defs"]
    assert defs["Claim"]["properties"]["devices"]["uniqueItems"] is True
    for name in ("IoasMap", "ClaimReply", "Ping"):
        fds = defs[name]["properties"]["fds"]
        assert "default" not in fds
        assert "fds" in defs[name]["required"]
    assert defs["IoasMap"]["properties"]["fds"]["minimum"] == 1
    for key in ("uid", "pid"):
        kinds = {s.get("type") for s in defs["Owner"]["properties"][key]["anyOf"]}
        assert kinds == {"integer", "null"}


def test_invalid_vectors_carry_the_reference_details() -> None:
    """Each invalid vector names the details the reference server sends (F5: too many
    fds is answered with the request's id and {received, max_fds})."""
    by_name = {v["name"]: v for v in load("invalid")}
    assert by_name["too_many_fds"]["id"] == 3
    assert by_name["too_many_fds"]["details"] == {"received": MAX_FDS + 1, "max_fds": MAX_FDS}
    for vector in load("invalid"):
        with pytest.raises(ProtocolError) as info:
            decode_request(vector["json"].encode(), vector["fds"])
        assert info.value.details == vector["details"]


def doc_examples() -> list[str]:
    text = (PROTOCOL_DIR / "PROTOCOL.md").read_text()
    blocks = text.split("```json\n")[1:]
    return [line for block in blocks for line in block.split("```")[0].splitlines() if line]


@pytest.mark.parametrize("line", doc_examples())
def test_protocol_md_examples_are_canonical(line: str) -> None:
    """Every JSON example in PROTOCOL.md decodes and re-encodes to the same text."""
    data = line.encode()
    nfds = json.loads(line)["fds"]
    op = json.loads(line)["op"]
    msg: Any = decode_request(data, nfds) if op in REQUEST_TYPES else decode_server(data, nfds)
    assert encode(msg) == (data, nfds)


def test_protocol_md_has_examples() -> None:
    assert len(doc_examples()) >= 12
