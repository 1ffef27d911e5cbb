"""One page of a list reply (``list_devices``, ``list_groups``) that fits in a datagram.

``fill_page`` takes the whole list in the daemon's stable order (any sequence: a lazy
one that builds entry ``i`` only when indexed makes a page cost O(page), not O(list);
``fill_page`` indexes only the entries it measures), the request's ``offset`` and
``limit``, and a function that builds the reply from a page of entries;
it returns the reply with as many entries as fit under ``PAGE_BUDGET`` (PROTOCOL.md,
"Paging"). Sizes are measured by encoding: the reply's envelope (everything but the
entries) once, each entry with the same JSON serializer the codec uses; a JSON list adds
one comma between entries, so the page's size is known exactly without encoding it twice.

Pure: no I/O, no state, no clocks; it must not read sysfs or know about sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from pydantic import BaseModel

from iommud.errors import LimitReachedError
from iommud.protocol.limits import MAX_DATAGRAM
from iommud.protocol.messages import ReplyBase

E = TypeVar("E", bound=BaseModel)
R = TypeVar("R", bound=ReplyBase)

SAFETY_MARGIN: Final = 1024
"""Bytes kept free below MAX_DATAGRAM. The size is computed exactly (a test checks it
against the encoder), so this only guards against a serializer that one day writes a
nested model differently from a top-level one."""

PAGE_BUDGET: Final = MAX_DATAGRAM - SAFETY_MARGIN

_NULL: Final = len(b"null")


def encoded_size(model: BaseModel) -> int:
    """Bytes of ``model`` as the codec writes it (compact JSON, schema key order)."""
    return len(model.__pydantic_serializer__.to_json(model))


def fill_page(
    entries: Sequence[E],
    offset: int,
    limit: int | None,
    build: Callable[[tuple[E, ...], int, int | None], R],
    *,
    budget: int = PAGE_BUDGET,
) -> R:
    """The reply for the page at ``offset``: ``build(page, total, next_offset)``.

    ``next_offset`` is ``offset + len(page)`` while entries remain, else None; an
    ``offset`` past the end gives an empty last page. Raises ``LimitReachedError``
    when even one entry does not fit (a group of thousands of devices).
    """
    total = len(entries)
    start = min(offset, total)
    # The envelope with next_offset null; a number in its place has at most as many
    # digits as total (next_offset < total), so this is an upper bound.
    used = encoded_size(build((), total, None)) - _NULL + max(_NULL, len(str(total)))
    page: list[E] = []
    for i in range(start, total):
        if limit is not None and len(page) >= limit:
            break
        entry = entries[i]
        size = encoded_size(entry) + (1 if page else 0)  # the comma before it
        if used + size > budget:
            if not page:
                raise LimitReachedError(
                    "one list entry does not fit in a datagram",
                    size=used + size,
                    max_datagram=MAX_DATAGRAM,
                )
            break
        used += size
        page.append(entry)
    end = start + len(page)
    return build(tuple(page), total, end if end < total else None)
