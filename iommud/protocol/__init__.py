"""The iommud wire protocol, sans-I/O: the Python side of protocol/PROTOCOL.md.

- :mod:`~iommud.protocol.messages` names every datagram as a frozen pydantic model
  (requests, replies, ``error``; the events are in :mod:`~iommud.protocol.events`, the
  shared field types and nested objects in :mod:`~iommud.protocol.fields`);
- :mod:`~iommud.protocol.codec` turns bytes and an fd count into a message and back;
- :mod:`~iommud.protocol.connection` holds the per-connection rules (hello first,
  in-flight ids, subscriptions) for the server and the client side;
- :mod:`~iommud.protocol.limits`, :mod:`~iommud.protocol.errors` (the wire's error
  codes) and :mod:`~iommud.protocol.exceptions` (``ProtocolError``).

Nothing here does I/O or imports the rest of the daemon (asyncio, sockets, os, udev,
logging); ``tests/protocol/test_protocol_purity.py`` enforces it. The generator of
``protocol/schema.json`` and the golden vectors lives outside the package, in
``protocol/generate.py``.
"""

from iommud.protocol.codec import decode_request, decode_server, encode
from iommud.protocol.connection import ClientConnection, ServerConnection
from iommud.protocol.errors import ErrorCode
from iommud.protocol.exceptions import LocalProtocolError, ProtocolError
from iommud.protocol.limits import (
    DEFAULT_LIMITS,
    MAX_DATAGRAM,
    MAX_FDS,
    MAX_INFLIGHT,
    MAX_RANGES,
    PROTOCOL_VERSION,
    Limits,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DATAGRAM",
    "MAX_FDS",
    "MAX_INFLIGHT",
    "MAX_RANGES",
    "PROTOCOL_VERSION",
    "ClientConnection",
    "ErrorCode",
    "Limits",
    "LocalProtocolError",
    "ProtocolError",
    "ServerConnection",
    "decode_request",
    "decode_server",
    "encode",
]
