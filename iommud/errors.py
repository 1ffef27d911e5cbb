"""The one exception hierarchy of iommud, rooted at IommudError: daemon and client alike.

Each subclass carries a protocol ErrorCode and structured ``details`` that go into the
error reply verbatim. The daemon raises these and replies with their code; the client
library turns an error reply back into the same class (:func:`from_reply`), so a VMM
catches ``NotFoundError`` whether it runs in-process against the broker or over the
socket. The code-to-class table is derived once, here, from the classes themselves.

Why here and not in ``iommud.protocol``: the protocol core carries the codes (data on
the wire, ``iommud.protocol.errors``) and its own ``ProtocolError`` for framing and
state violations, and must stay free of ``os`` and of daemon notions (``KernelError``
renders an errno, ``SnapshotError`` names a sysfs path). Why not in the daemon: the client
imports it. So it lives at the package root and imports nothing but the protocol's
codes; it must not import the broker, the server or anything that does I/O.

Modules translate foreign exceptions (OSError, pydantic, pyudev) into these at their
boundary with ``raise ... from exc``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from iommud.protocol.errors import ErrorCode

__all__ = [
    "BadRequestError",
    "BusyError",
    "ConfigError",
    "GroupSplitError",
    "InvalidRangeError",
    "InvalidStateError",
    "IommudError",
    "KernelError",
    "LimitReachedError",
    "NotDelegableError",
    "NotFoundError",
    "NotViableError",
    "OverlapError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RevokedError",
    "SnapshotError",
    "UnknownOpError",
    "UnsupportedVersionError",
    "class_for",
    "from_reply",
]

_BY_CODE: dict[ErrorCode, type[IommudError]] = {}


class IommudError(Exception):
    """Base of every error the daemon reports to a client or an admin.

    A subclass that sets its own ``code`` becomes the class a client builds for error
    replies with that code; a daemon-side refinement that shares a code with another
    class (``ConfigError``, ``SnapshotError``) says ``canonical=False``. Two canonical
    classes for one code fail at import.
    """

    code: ClassVar[ErrorCode] = ErrorCode.BAD_REQUEST

    def __init_subclass__(cls, *, canonical: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if canonical and "code" in cls.__dict__:
            known = _BY_CODE.setdefault(cls.code, cls)
            if known is not cls:
                raise TypeError(f"{cls.__name__} and {known.__name__} both claim {cls.code}")

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, **{self.details!r})"

    @classmethod
    def _from_reply(cls, message: str, details: dict[str, Any]) -> IommudError:
        return cls(message, **details)


def class_for(code: ErrorCode) -> type[IommudError]:
    """The class a client raises for an error reply carrying ``code``."""
    return _BY_CODE[code]


def from_reply(code: ErrorCode, message: str, details: Mapping[str, Any]) -> IommudError:
    """The exception for an error reply: ``class_for(code)`` with its message and details."""
    return class_for(code)._from_reply(message, dict(details))


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


class NotDelegableError(IommudError):
    """A delegated claim (protocol v2) of a group that cannot be delegated (``reason``)."""

    code = ErrorCode.NOT_DELEGABLE


class ConfigError(IommudError, canonical=False):
    """A configuration file is invalid; ``details`` name the key and the problem."""

    code = ErrorCode.BAD_REQUEST


class SnapshotError(IommudError, canonical=False):
    """sysfs did not look as expected; ``details["path"]`` names the file."""

    code = ErrorCode.KERNEL_ERROR


class KernelError(IommudError):
    """An ioctl, open or sysfs write failed. Carries the errno and the operation name."""

    code = ErrorCode.KERNEL_ERROR

    def __init__(self, op: str, err: int, message: str | None = None, **details: Any) -> None:
        name = _errno.errorcode.get(err, str(err))
        super().__init__(
            message or f"{op} failed: {name} ({os.strerror(err)})",
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

    @classmethod
    def _from_reply(cls, message: str, details: dict[str, Any]) -> KernelError:
        # The reply's details hold what __init__ derived: take op and errno back out.
        op = str(details.pop("op", "?"))
        err = details.pop("errno", _errno.EIO)
        details.pop("errno_name", None)
        return cls(op, err if isinstance(err, int) else _errno.EIO, message, **details)
