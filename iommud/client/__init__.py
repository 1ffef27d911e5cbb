"""The iommud client library: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both connect to the daemon's socket, say hello, and offer the same methods (claim,
ioas_create, ioas_map with memfds, ioas_unmap, release, subscribe and events, status,
list_devices and list_groups (every page; ``*_page`` for one), ping, revoke; with
``version=2``, ``claim_delegated``: a /dev/iommu fd and unbound cdevs for a VMM). Errors
come back as the daemon's own ``IommudError`` subclasses (``iommud.errors``), with the
server's code, message and details; fds come back as ``OwnedFd`` objects. An argument
the protocol refuses (a negative offset, a malformed BDF, a MapSpec fd that is not an
open fd) is ``BadRequestError`` too, raised before anything is sent, with the details
the daemon would have replied (``errors``: ``loc``, ``type``, ``msg``). A lost
connection is ``ClientClosedError`` (a ``ConnectionError``: no reply, so no code).
"""

from iommud.client.aio import AsyncClient
from iommud.client.calls import (
    ClaimedDeviceFd,
    ClaimResult,
    ClientClosedError,
    DelegatedClaim,
    MapSpec,
    PagingError,
    error_from_reply,
)
from iommud.client.sync import Client
from iommud.errors import IommudError
from iommud.transport import DEFAULT_SOCKET

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncClient",
    "ClaimResult",
    "ClaimedDeviceFd",
    "Client",
    "ClientClosedError",
    "DelegatedClaim",
    "IommudError",
    "MapSpec",
    "PagingError",
    "error_from_reply",
]
