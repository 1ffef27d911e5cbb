"""The daemon's exception hierarchy, rooted at IommudError.

Each subclass carries a protocol ErrorCode and structured ``details`` that go
into the error reply verbatim. Modules translate foreign exceptions (OSError,
pydantic, pyudev) into these at their boundary with ``raise ... from exc``.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, ClassVar

from iommud.protocol.errors import ErrorCode


class IommudError(Exception):
    """Base of every error the daemon reports to a client or an admin."""

    code: ClassVar[ErrorCode] = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, **{self.details!r})"


class BadRequestError(IommudError):
    code = ErrorCode.BAD_REQUEST


class UnsupportedVersionError(IommudError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownOpError(IommudError):
    code = ErrorCode.UNKNOWN_OP


class PermissionDeniedError(IommudError):
    code = ErrorCode.PERMISSION_DENIED


class NotFoundError(IommudError):
    code = ErrorCode.NOT_FOUND


class NotViableError(IommudError):
    code = ErrorCode.NOT_VIABLE


class BusyError(IommudError):
    code = ErrorCode.BUSY


class GroupSplitError(IommudError):
    code = ErrorCode.GROUP_SPLIT


class QuotaExceededError(IommudError):
    code = ErrorCode.QUOTA_EXCEEDED


class InvalidRangeError(IommudError):
    code = ErrorCode.INVALID_RANGE


class OverlapError(IommudError):
    code = ErrorCode.OVERLAP


class RevokedError(IommudError):
    code = ErrorCode.REVOKED


class LimitReachedError(IommudError):
    code = ErrorCode.LIMIT_REACHED


class InvalidStateError(IommudError):
    code = ErrorCode.INVALID_STATE


class ConfigError(IommudError):
    """A configuration file is invalid; ``details`` name the key and the problem."""

    code = ErrorCode.BAD_REQUEST


class SnapshotError(IommudError):
    """sysfs did not look as expected; ``details["path"]`` names the file."""

    code = ErrorCode.KERNEL_ERROR


class KernelError(IommudError):
    """An ioctl, open or sysfs write failed. Carries the errno and the operation name."""

    code = ErrorCode.KERNEL_ERROR

    def __init__(self, op: str, err: int, message: str | None = None, **details: Any) -> None:
        name = _errno.errorcode.get(err, str(err))
        super().__init__(
            message or f"{op} failed: {name} ({_errno_text(err)})",
            op=op,
            errno=err,
            errno_name=name,
            **details,
        )
        self.op = op
        self.errno = err

    @classmethod
    def from_oserror(cls, op: str, exc: OSError, **details: Any) -> KernelError:
        return cls(op, exc.errno or _errno.EIO, **details)


def _errno_text(err: int) -> str:
    import os

    return os.strerror(err)
