"""The iommud client library: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both connect to the daemon's socket, say hello, and offer the same methods (claim,
ioas_create, ioas_map with memfds, ioas_unmap, release, subscribe and events, status,
list_devices and list_groups (every page; ``*_page`` for one), ping, revoke). Errors
come back as ``IommudError`` subclasses with the server's code and details; fds come
back as ``OwnedFd`` objects.
"""

from iommud.client.aio import AsyncClient
from iommud.client.calls import (
    ClaimedDeviceFd,
    ClaimResult,
    ClientClosedError,
    MapSpec,
    PagingError,
    error_from_reply,
)
from iommud.client.sync import Client

__all__ = [
    "AsyncClient",
    "ClaimResult",
    "ClaimedDeviceFd",
    "Client",
    "ClientClosedError",
    "MapSpec",
    "PagingError",
    "error_from_reply",
]
