"""The daemon's socket side: listening sockets, connection handlers, the server.

Only glue between sockets, ``iommud.protocol`` and the broker lives here; no policy
and no state beyond the connections. Datagram I/O (SCM_RIGHTS, peer credentials) is
``iommud.transport``, shared with the client library.
"""

from iommud.server.handler import BrokerAPI, ConnectionHandler, ServerInfo
from iommud.server.listen import bind_listener, inherited_listeners
from iommud.server.server import Server

__all__ = [
    "BrokerAPI",
    "ConnectionHandler",
    "Server",
    "ServerInfo",
    "bind_listener",
    "inherited_listeners",
]
