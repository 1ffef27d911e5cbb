"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET per state change.

``Notifier`` sends READY=1, STOPPING=1, STATUS=... and WATCHDOG=1; it is a no-op when
the daemon was not started by systemd (no NOTIFY_SOCKET). It never raises on a send
failure (the daemon must not die because systemd went away), and does nothing else.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """A connection to the service manager's notification socket."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None
        if not path:
            self._address = None
        elif path.startswith("@"):
            self._address = b"\0" + path[1:].encode()  # abstract namespace
        elif path.startswith("/"):
            self._address = path
        else:
            self._address = None  # vsock or unknown schemes: not supported here
        self._sock: socket.socket | None = None
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    def notify(self, *states: str) -> bool:
        """Send ``states`` (e.g. ``"READY=1"``) as one message; ``False`` if not sent."""
        if self._address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(states).encode(), self._address)
        except OSError as exc:
            log.warning("sdnotify.failed", error=str(exc), states=list(states))
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (sd_watchdog_enabled(3))."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID")
    try:
        if wpid and int(wpid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None
