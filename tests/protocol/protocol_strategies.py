"""Hypothesis strategies for every protocol message, derived from the models' fields.

Walks each model's annotations and constraints (Ge/Le, MinLen/MaxLen, patterns,
literals, enums, nested models) so a new field is covered without editing this file.
Cross-field rules (fd indexes, distinct devices, start <= last) are repaired by small
per-model fix-ups before validation.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any

import annotated_types
from hypothesis import strategies as st
from pydantic import BaseModel, StringConstraints

from iommud.protocol import messages as m
from iommud.protocol.v2 import V2_ONLY_EVENTS

MAX_LIST = 4  # keep generated containers small: the suite must stay fast

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            out["min_value"] = item.ge
        elif isinstance(item, annotated_types.Le):
            out["max_value"] = item.le
        elif isinstance(item, annotated_types.MinLen):
            out["min_size"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            out["max_size"] = item.max_length
        elif isinstance(item, StringConstraints) and item.pattern is not None:
            out["pattern"] = item.pattern
    return out


def for_type(tp: Any, metadata: list[Any] | None = None) -> st.SearchStrategy[Any]:
    """A strategy of valid Python values for annotation ``tp`` with constraint ``metadata``."""
    meta = list(metadata or [])
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        return for_type(base, meta + extra)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([for_type(arg, meta) for arg in typing.get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    bounds = _bounds(meta)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(bounds.get("min_value"), bounds.get("max_value"))
    if tp is float:
        return st.floats(
            min_value=bounds.get("min_value"),
            max_value=1e12,
            allow_nan=False,
            allow_infinity=False,
        )
    if tp is str:
        if "pattern" in bounds:
            return st.from_regex(bounds["pattern"], fullmatch=True)
        return st.text(max_size=min(bounds.get("max_size", 16), 16))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if origin is tuple:
        item, _ellipsis = typing.get_args(tp)
        min_size = bounds.get("min_size", 0)
        max_size = max(min_size, min(bounds.get("max_size", MAX_LIST), MAX_LIST))
        return st.lists(for_type(item), min_size=min_size, max_size=max_size).map(tuple)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model(tp)
    raise NotImplementedError(f"no strategy for {tp!r}")


def _dense_fd_indexes(data: dict[str, Any]) -> dict[str, Any]:
    used = sorted({r.fd_index for r in data["ranges"]})
    rank = {fd: i for i, fd in enumerate(used)}
    ranges = tuple(r.model_copy(update={"fd_index": rank[r.fd_index]}) for r in data["ranges"])
    return {**data, "ranges": ranges, "fds": len(used)}


def _claim_reply(data: dict[str, Any]) -> dict[str, Any]:
    n = len(data["devices"])
    devices = tuple(
        d.model_copy(update={"fd_index": n - 1 - i}) for i, d in enumerate(data["devices"])
    )
    return {**data, "devices": devices, "fds": n}


def _page(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Make total and next_offset consistent with the page's entries."""

    def fix(data: dict[str, Any]) -> dict[str, Any]:
        count = len(data[field])
        total = max(data["total"], count)
        nxt = data["next_offset"]
        if nxt is not None:
            nxt = None if count == 0 or total <= count else min(max(nxt, count), total - 1)
        return {**data, "total": total, "next_offset": nxt}

    return fix


FIXUPS: dict[type[BaseModel], Callable[[dict[str, Any]], dict[str, Any]]] = {
    m.IovaRange: lambda d: {
        **d,
        "start": min(d["start"], d["last"]),
        "last": max(d["start"], d["last"]),
    },
    m.Claim: lambda d: {**d, "devices": tuple(dict.fromkeys(d["devices"]))},
    # v1's subscribe names v1's events only (v2.V2_ONLY_EVENTS are refused on v1)
    m.Subscribe: lambda d: {
        **d,
        "events": None
        if d["events"] is None
        else tuple(e for e in d["events"] if e not in V2_ONLY_EVENTS),
    },
    m.IoasMap: _dense_fd_indexes,
    m.ClaimReply: _claim_reply,
    m.ListDevicesReply: _page("devices"),
    m.ListGroupsReply: _page("groups"),
}


def _unchanged(data: dict[str, Any]) -> dict[str, Any]:
    return data


_CACHE: dict[type[BaseModel], st.SearchStrategy[Any]] = {}


def model(cls: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Valid instances of ``cls``: every field filled, cross-field rules repaired."""
    if cls not in _CACHE:
        fields = {
            name: for_type(info.annotation, info.metadata)
            for name, info in cls.model_fields.items()
        }
        fixup = FIXUPS.get(cls, _unchanged)
        _CACHE[cls] = st.fixed_dictionaries(fields).map(lambda d: cls.model_validate(fixup(d)))
    return _CACHE[cls]


REQUEST_CLASSES: tuple[type[BaseModel], ...] = tuple(m.REQUEST_TYPES.values())
SERVER_CLASSES: tuple[type[BaseModel], ...] = (
    *m.REPLY_TYPES.values(),
    m.ErrorReply,
    *m.EVENT_TYPES.values(),
)

requests = st.one_of([model(cls) for cls in REQUEST_CLASSES])
server_messages = st.one_of([model(cls) for cls in SERVER_CLASSES])


def mutated(datagram: bytes, data: st.DataObject) -> bytes:
    """``datagram`` with one byte flipped, its tail cut, or a few bytes spliced in."""
    raw = bytearray(datagram)
    index = data.draw(st.integers(0, len(raw) - 1))
    action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "flip":
        raw[index] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del raw[index:]
    else:
        raw[index:index] = data.draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)
