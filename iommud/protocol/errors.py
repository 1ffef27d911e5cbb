"""Error codes of the wire protocol (protocol/PROTOCOL.md, "Errors").

Pure data: the codes a reply may carry. The daemon's exception hierarchy
(iommud.errors) maps onto these; this module must stay free of I/O and of any
import from the rest of the daemon.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error reply carries exactly one of these codes."""

    BAD_REQUEST = "bad_request"  # malformed JSON, schema violation, wrong fd count
    UNSUPPORTED_VERSION = "unsupported_version"  # hello with a version we do not speak
    UNKNOWN_OP = "unknown_op"  # an op name this server does not know
    PERMISSION_DENIED = "permission_denied"  # policy refused the peer (details name the rule)
    NOT_FOUND = "not_found"  # no such device, group, lease, IOAS or mapping
    NOT_VIABLE = "not_viable"  # the group has a device on a DMA-unsafe driver
    BUSY = "busy"  # another client holds the group (details name uid/pid)
    GROUP_SPLIT = "group_split"  # devices of one group would land in different IOASes
    QUOTA_EXCEEDED = "quota_exceeded"  # pinned bytes, IOAS count or mapping count
    INVALID_RANGE = "invalid_range"  # misaligned, outside the file or the allowed IOVAs
    OVERLAP = "overlap"  # IOVA range overlaps an existing mapping
    KERNEL_ERROR = "kernel_error"  # an ioctl or sysfs write failed (details: errno, op)
    REVOKED = "revoked"  # the lease was revoked (viability lost, admin revoke)
    LIMIT_REACHED = "limit_reached"  # protocol limits: in-flight requests, fds, size
    INVALID_STATE = "invalid_state"  # request not valid now (before hello, after release)
    NOT_DELEGABLE = "not_delegable"  # v2: the group cannot be delegated (details.reason)
