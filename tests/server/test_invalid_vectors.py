"""Every invalid golden vector through the real server on a real socket: the error reply
has exactly the vector's code, id and details, and the connection still serves."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from iommud.protocol import messages as m
from iommud.protocol.codec import encode
from tests.server.support import Running
from tests.server.test_server import Raw

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def _load(rel: str) -> list[dict[str, Any]]:
    data = json.loads((VECTORS / rel).read_text())
    assert isinstance(data, list)
    return data


CASES = [(1, v) for v in _load("invalid.json")] + [
    (v["version"], v) for v in _load("v2/invalid.json")
]


def _exchange(path: str, version: int, vector: dict[str, Any]) -> list[dict[str, Any] | None]:
    raw = Raw(path)
    try:
        raw.send(encode(m.Hello(id=1, version=version, client="vectors"))[0])
        assert (raw.recv() or {}).get("op") == "hello_reply"
        fds = [os.memfd_create("v", os.MFD_CLOEXEC) for _ in range(vector["fds"])]
        try:
            raw.send(vector["json"].encode(), fds)
        finally:
            for fd in fds:
                os.close(fd)
        error = raw.recv()
        raw.send(b'{"op":"ping","fds":0,"id":99}')
        return [error, raw.recv()]
    finally:
        raw.close()


@pytest.mark.parametrize(("version", "vector"), CASES, ids=[f"v{v}-{x['name']}" for v, x in CASES])
async def test_invalid_vector_gets_its_exact_error(
    running: Running, version: int, vector: dict[str, Any]
) -> None:
    error, pong = await asyncio.to_thread(_exchange, running.path, version, vector)
    assert error is not None
    assert (error["op"], error["code"], error["id"], error["details"]) == (
        "error",
        vector["error"],
        vector["id"],
        vector["details"],
    )
    assert pong == {"op": "ping_reply", "fds": 0, "id": 99}
    assert running.broker.started == 1  # only the ping reached the broker
