"""The shared fd-leak check (tests/serving.py) catches and names what a test leaves open."""

from __future__ import annotations

import os
import re

import pytest

from tests.serving import FdSnapshot


def test_leak_is_reported_with_number_and_target() -> None:
    before = FdSnapshot.take()
    r, w = os.pipe()
    try:
        with pytest.raises(AssertionError, match=re.escape(f"fd leak: opened {{{r}: 'pipe:")):
            before.assert_unchanged()
        before.assert_unchanged(opened=2)
    finally:
        os.close(r)
        os.close(w)
    before.assert_unchanged()


def test_a_closed_fd_is_reported_too() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    before = FdSnapshot.take()
    os.close(fd)
    with pytest.raises(AssertionError, match=re.escape(f"closed {{{fd}: '/dev/null'}}")):
        before.assert_unchanged()
    with pytest.raises(AssertionError, match="fd count"):
        before.assert_unchanged(opened=1)
