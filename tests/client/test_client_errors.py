"""Error replies become the daemon's own IommudError classes, one per code."""

from __future__ import annotations

import errno

import pytest

from iommud import errors
from iommud.client import error_from_reply
from iommud.protocol import messages as m
from iommud.protocol.errors import ErrorCode


def test_every_code_has_one_class_with_that_code() -> None:
    """The code-to-class table covers every ErrorCode and agrees with each class's code."""
    for code in ErrorCode:
        assert errors.class_for(code).code is code


def test_daemon_side_refinements_are_not_built_from_replies() -> None:
    """ConfigError and SnapshotError go out under a code whose client class is another."""
    assert errors.class_for(ErrorCode.BAD_REQUEST) is errors.BadRequestError
    assert errors.class_for(ErrorCode.KERNEL_ERROR) is errors.KernelError


def test_a_second_class_for_a_code_is_refused() -> None:
    """Two canonical classes for one code would make the table ambiguous."""
    with pytest.raises(TypeError, match="both claim"):

        class _Twin(errors.IommudError):
            code = ErrorCode.BUSY

    assert errors.class_for(ErrorCode.BUSY) is errors.BusyError


@pytest.mark.parametrize("code", list(ErrorCode))
def test_reply_round_trips_to_the_same_class(code: ErrorCode) -> None:
    """What the server sends for an error (code, message, details) comes back equal."""
    cls = errors.class_for(code)
    if cls is errors.KernelError:
        sent: errors.IommudError = errors.KernelError("ioas_map", errno.ENOMEM, ioas_id=3)
    else:
        sent = cls("it went wrong", bdf="0000:00:03.0")
    reply = m.ErrorReply(id=1, code=sent.code, message=sent.message, details=sent.details)
    got = error_from_reply(reply)
    assert type(got) is cls
    assert (got.message, got.details) == (sent.message, sent.details)
    if isinstance(got, errors.KernelError):
        assert (got.op, got.errno) == ("ioas_map", errno.ENOMEM)
