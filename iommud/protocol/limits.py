"""Protocol limits and version (protocol/PROTOCOL.md, "Limits" and "Versioning").

Pure constants plus the frozen ``Limits`` model a server announces in
``hello_reply``. No I/O; imports nothing from the daemon.
"""

from __future__ import annotations

from typing import Annotated, Final

from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Strict

PROTOCOL_VERSION: Final = 1
"""The version a client speaks unless it asks for another (``hello.version``)."""

LATEST_VERSION: Final = 2
"""The newest version: v1 plus delegated claims (PROTOCOL.md, "Version 2")."""

SUPPORTED_VERSIONS: Final = frozenset({PROTOCOL_VERSION, LATEST_VERSION})

MAX_DATAGRAM: Final = 65536
"""Largest datagram (bytes of JSON) either side may send."""

MAX_FDS: Final = 16
"""Most fds that may travel with one datagram (SCM_RIGHTS)."""

MAX_INFLIGHT: Final = 32
"""Most requests a client may have sent and not yet had answered."""

MAX_RANGES: Final = 64
"""Most ranges in one ``ioas_map`` request."""

MAX_NAME: Final = 256
"""Longest short identifier: driver, client and server names, versions (characters)."""

MAX_TEXT: Final = 4096
"""Longest free text: reasons, error messages, device paths (characters)."""

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1


class Limits(BaseModel):
    """The limits a server enforces, announced in ``hello_reply.limits``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_datagram: Annotated[int, Strict(), Ge(1), Le(U32_MAX)] = MAX_DATAGRAM
    max_fds: Annotated[int, Strict(), Ge(0), Le(U32_MAX)] = MAX_FDS
    max_inflight: Annotated[int, Strict(), Ge(1), Le(U32_MAX)] = MAX_INFLIGHT
    max_ranges: Annotated[int, Strict(), Ge(1), Le(U32_MAX)] = MAX_RANGES


DEFAULT_LIMITS: Final = Limits()
