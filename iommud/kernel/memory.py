"""Client memory as the daemon sees it: what a passed fd is, and the daemon's own mmap of it.

``inspect_file(fd)`` answers fstat and F_GET_SEALS (is it a regular file, how large,
which seals: include/uapi/linux/fcntl.h, mm/memfd.c memfd_fcntl). A file that cannot
carry seals (not shmem/hugetlbfs: F_GET_SEALS fails EINVAL) reports no seals.
``DaemonMap`` is a MAP_SHARED mapping of a file range in the daemon's address space,
the source address of IOMMU_IOAS_MAP / VFIO_IOMMU_MAP_DMA on kernels without
IOMMU_IOAS_MAP_FILE (6.12); it lives until ``close()``.

No policy: which seals a map needs, and what to tell the client, is the broker's call.
Errors leave as KernelError (op ``fstat`` or ``mmap``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

from iommud.errors import KernelError
from iommud.kernel.libc import MAP_FAILED, libc, map_oserror


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the kernel says about a passed fd."""

    is_regular: bool
    size: int
    seals: int  # F_SEAL_* bits; 0 for a file that cannot be sealed

    def has_seals(self, seals: int) -> bool:
        return self.seals & seals == seals


def inspect_file(fd: int) -> FileInfo:
    """fstat(2) and F_GET_SEALS of ``fd``; KernelError("fstat") if it cannot be inspected."""
    with map_oserror("fstat"):
        st = os.fstat(fd)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a shmem/memfd file: cannot be sealed
    return FileInfo(is_regular=stat.S_ISREG(st.st_mode), size=st.st_size, seals=seals)


class DaemonMap:
    """The daemon's own MAP_SHARED mapping of a client file range (mmap fallback path)."""

    __slots__ = ("addr", "length")

    def __init__(self, fd: int, offset: int, length: int, *, write: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        addr = libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
        if addr is None or addr == MAP_FAILED:
            raise KernelError("mmap", ctypes.get_errno() or errno.EIO)
        self.addr: int | None = addr
        self.length = length

    def close(self) -> None:
        addr, self.addr = self.addr, None
        if addr is not None:
            libc.munmap(addr, self.length)
