"""Exceptions of the protocol layer.

``ProtocolError``: the peer broke the protocol (bad datagram, wrong state, limit
reached). It carries an ErrorCode, a message, the request id when one could be read,
and details, and turns into the ``ErrorReply`` to send back.

``LocalProtocolError``: *this* side misused the protocol objects (replied to an id
that is not in flight, sent an event before hello). That is a bug in the caller, not
something to report to the peer.

No I/O; imports only iommud.protocol modules.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import JsonValue

from iommud.protocol.errors import ErrorCode
from iommud.protocol.messages import ErrorReply


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: int | None = None,
        details: Mapping[str, JsonValue] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details: dict[str, JsonValue] = dict(details or {})

    def to_reply(self) -> ErrorReply:
        """The ``error`` message that reports this to the peer."""
        return ErrorReply(
            id=self.request_id, code=self.code, message=self.message, details=self.details
        )

    def __repr__(self) -> str:
        return (
            f"ProtocolError({self.code!s}, {self.message!r}, "
            f"request_id={self.request_id!r}, details={self.details!r})"
        )


class LocalProtocolError(Exception):
    """This side tried something the protocol does not allow (a bug in the caller)."""
