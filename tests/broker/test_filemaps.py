"""The record of which extents of a daemon mapping the daemon faulted in (issue 10)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from iommud.broker.filemaps import Faulted

_extent = st.tuples(st.integers(0, 64), st.integers(1, 16)).map(lambda t: (t[0], t[0] + t[1]))


@given(adds=st.lists(_extent, max_size=12), ask=_extent)
def test_faulted_extents_match_a_set_of_pages(
    adds: list[tuple[int, int]], ask: tuple[int, int]
) -> None:
    """Whatever the order of the adds, ``covers`` answers what a plain set of pages would,
    and the extents stay sorted, disjoint and merged (none touches the next)."""
    f = Faulted()
    pages: set[int] = set()
    for start, end in adds:
        f.add(start, end)
        pages.update(range(start, end))
    assert f.covers(*ask) == (set(range(*ask)) <= pages)
    extents = f.extents()
    assert sorted(p for s, e in extents for p in range(s, e)) == sorted(pages)
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(extents))
