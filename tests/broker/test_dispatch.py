"""The broker's request table: it reads like PROTOCOL.md section 5 and keeps the
refusals that do not depend on the op."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.errors import BadRequestError, InvalidStateError
from iommud.fds import FdSet
from iommud.protocol import messages as m
from iommud.protocol.messages import REQUEST_TYPES
from tests.broker.support import ALICE, Client

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "protocol" / "PROTOCOL.md"


def section_5_ops() -> list[str]:
    """The request ops of PROTOCOL.md section 5, in the order their headings give."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text[text.index("\n## 5.") : text.index("\n## 6.")]
    ops: list[str] = []
    for heading in re.findall(r"^### (.+)$", section, flags=re.M):
        ops += [name for name in heading.split(", ") if name in REQUEST_TYPES]
    return ops


def test_routes_follow_protocol_section_5(broker: Broker) -> None:
    """Every request op has one route, in the spec's order, under the spec's name."""
    assert section_5_ops() == list(REQUEST_TYPES)
    assert [r.request for r in broker.routes.values()] == [
        REQUEST_TYPES[op] for op in section_5_ops()
    ]
    assert all(key is route.request for key, route in broker.routes.items())


def test_session_ops_are_the_ones_that_touch_the_session(broker: Broker) -> None:
    """Claims, releases and IOAS work queue behind the session's lock; lookups do not."""
    locked = {r.request for r in broker.routes.values() if r.in_session}
    assert locked == {
        m.Claim,
        m.Release,
        m.IoasCreate,
        m.IoasDestroy,
        m.IoasMap,
        m.IoasUnmap,
        m.IovaRanges,
        m.DeviceReset,
    }


async def test_a_closing_session_is_refused_for_every_op(broker: Broker) -> None:
    c = Client(broker, ALICE)
    c.session.closing = True
    for request in (m.Ping(id=1), m.Status(id=2), m.IoasCreate(id=3)):
        with pytest.raises(InvalidStateError) as ei:
            await broker.handle(c.session, request, FdSet())
        assert ei.value.message == "the session is closing"
    c.session.closing = False
    await c.close()


async def test_hello_is_the_connections(broker: Broker) -> None:
    c = Client(broker, ALICE)
    with pytest.raises(BadRequestError) as ei:
        await broker.handle(c.session, m.Hello(id=1, version=1, client="t/1"), FdSet())
    assert ei.value.message == "hello is answered by the connection, not the broker"
    await c.close()
