"""inotify(7): one owned inotify fd, its watches and its raw records.

``Inotify`` wraps inotify_init1 (non-blocking, close-on-exec), inotify_add_watch,
inotify_rm_watch and read(2) of the event records (include/uapi/linux/inotify.h,
struct inotify_event: wd, mask, cookie, len, then len bytes of name). ``parse_events`` turns
a read buffer into ``InotifyEvent``s. Registering the fd with a loop is the caller's.

No policy: which files to watch and what an event means belong to the caller. Errors
leave as KernelError with the call's name as op.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

from iommud.kernel.libc import check, libc, map_oserror

IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_READ_SIZE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    wd: int
    mask: int


def parse_events(data: bytes) -> list[InotifyEvent]:
    """The records in one read(2) buffer (names are skipped: watches are on files)."""
    out: list[InotifyEvent] = []
    pos = 0
    while pos + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
        pos += _EVENT.size + length
        out.append(InotifyEvent(wd, mask))
    return out


class Inotify:
    """One inotify fd. ``close()`` is idempotent."""

    def __init__(self) -> None:
        self._fd = check("inotify_init1", int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)))

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def add_watch(self, path: str, mask: int) -> int:
        return check(
            "inotify_add_watch", int(libc.inotify_add_watch(self._fd, path.encode(), mask))
        )

    def rm_watch(self, wd: int) -> None:
        check("inotify_rm_watch", int(libc.inotify_rm_watch(self._fd, wd)))

    def read(self) -> bytes:
        """What is queued (b"" when nothing is)."""
        with map_oserror("inotify_read"):
            try:
                return os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return b""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
