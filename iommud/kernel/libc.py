"""The C library, loaded once, and the one translation of OS errors into KernelError.

``libc`` is the process's C library through ctypes with the prototypes the kernel layer
uses (ioctl, mmap/munmap, inotify). ``map_oserror(op)`` is the boundary: an OSError
raised inside it leaves as ``KernelError(op, errno)``; ``check(op, ret)`` does the same
for a ctypes call that returned -1 and left its errno behind (``use_errno=True`` keeps
a private copy per thread, so worker threads cannot clobber each other's errno).

Nothing here knows what the calls are for; no other module loads libc.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any, Final

from iommud.errors import KernelError

libc: Final = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
libc.ioctl.restype = ctypes.c_int
libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.munmap.restype = ctypes.c_int
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.madvise.restype = ctypes.c_int
libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
libc.mincore.restype = ctypes.c_int
libc.inotify_init1.argtypes = (ctypes.c_int,)
libc.inotify_init1.restype = ctypes.c_int
libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
libc.inotify_add_watch.restype = ctypes.c_int
libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
libc.inotify_rm_watch.restype = ctypes.c_int

MAP_FAILED: Final = ctypes.c_void_p(-1).value


class map_oserror:  # lower case: used like the function it replaced
    """Re-raise an OSError from the block as KernelError(op, errno, **details).

    A class, not a @contextlib.contextmanager, which made a generator per use: 0.8 us
    against 0.25 on the host, paid by every map request (its fstat in
    iommud.kernel.memory.inspect_file)."""

    __slots__ = ("details", "op")

    def __init__(self, op: str, **details: Any) -> None:
        self.op = op
        self.details = details

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        if isinstance(exc, OSError):
            raise KernelError.from_oserror(self.op, exc, **self.details) from exc


def check(op: str, ret: int) -> int:
    """Return ``ret`` unless it is negative; then raise KernelError with the call's errno."""
    if ret < 0:
        raise KernelError(op, ctypes.get_errno() or errno.EIO)
    return ret
