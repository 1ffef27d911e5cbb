"""The daemon's socket side: transport, listening sockets, connection handlers, server.

Only glue between sockets, ``iommud.protocol`` and the broker lives here; no policy.
"""

from iommud.server.handler import BrokerAPI, ConnectionHandler, ServerInfo
from iommud.server.server import Server

__all__ = ["BrokerAPI", "ConnectionHandler", "Server", "ServerInfo"]
