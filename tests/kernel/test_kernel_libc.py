"""iommud.kernel.libc.map_oserror: the one translation of OSError into KernelError."""

from __future__ import annotations

import errno
import os

import pytest

from iommud.errors import KernelError
from iommud.kernel.libc import map_oserror


def test_an_oserror_leaves_as_kernelerror_with_op_errno_and_details() -> None:
    with pytest.raises(KernelError) as err, map_oserror("fstat", path="/nowhere"):
        os.fstat(-1)
    assert err.value.op == "fstat"
    assert err.value.errno == errno.EBADF
    assert err.value.details["path"] == "/nowhere"
    assert isinstance(err.value.__cause__, OSError)


def test_other_exceptions_and_success_pass_through_unchanged() -> None:
    with map_oserror("x"):
        value = 41 + 1
    assert value == 42
    with pytest.raises(ValueError, match="not an OS error"), map_oserror("x"):
        raise ValueError("not an OS error")


def test_one_guard_serves_again_after_a_failure() -> None:
    guard = map_oserror("close")
    for _ in range(2):
        with pytest.raises(KernelError), guard:
            os.close(-1)
