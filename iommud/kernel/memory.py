"""Client memory as the daemon sees it: what a passed fd is, and the daemon's own mmap of it.

``inspect_file(fd)`` answers fstat and F_GET_SEALS (is it a regular file, how large,
which inode, which seals: include/uapi/linux/fcntl.h, mm/memfd.c memfd_fcntl). A file
that cannot carry seals (not shmem/hugetlbfs: F_GET_SEALS fails EINVAL) reports no seals.
Two fds of one open file, or of one memfd sent twice, report the same ``inode`` (st_dev,
st_ino): the broker keys its reuse of a daemon mapping on it.

``DaemonMap`` is a MAP_SHARED mapping of a file range in the daemon's address space,
the source address of IOMMU_IOAS_MAP / VFIO_IOMMU_MAP_DMA on kernels without
IOMMU_IOAS_MAP_FILE (6.12); it lives until ``close()``. It is one VMA however many
IOAS ranges the broker maps from it (mm/mmap.c: one mmap call, one vm_area_struct), and
it stays valid only while the file cannot shrink under it (the broker requires
F_SEAL_SHRINK; a shrunk shmem file would SIGBUS the daemon on access). ``populate``
faults a range of it in with one madvise(MADV_POPULATE_READ/WRITE) call (Linux 5.14,
mm/madvise.c madvise_populate) instead of one page fault at a time inside the pin.
``is_resident`` asks mincore(2) whether every page of a range is in memory (mm/mincore.c:
a present PTE counts at once, an unmapped page counts when the file's page cache holds
it; a hole the client punched or a page swapped out does not): a pin of such a range
allocates, zeroes and reads nothing.

``max_map_count()`` reads vm.max_map_count (how many VMAs this process may have).

No policy: which seals a map needs, and what to tell the client, is the broker's call.
Errors leave as KernelError (op ``fstat``, ``mmap`` or ``madvise``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
from pathlib import Path
from typing import Final, NamedTuple

from iommud.errors import KernelError
from iommud.kernel.libc import MAP_FAILED, libc, map_oserror

# include/uapi/asm-generic/mman-common.h (Linux 5.14)
MADV_POPULATE_READ: Final = 22
_RESIDENT: Final = bytes(range(1, 256, 2))  # mincore(2) vector bytes with bit 0 set
MADV_POPULATE_WRITE: Final = 23


class FileInfo(NamedTuple):
    """What the kernel says about a passed fd (a tuple: made on every map request)."""

    is_regular: bool
    size: int
    seals: int  # F_SEAL_* bits; 0 for a file that cannot be sealed
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino): the same for every fd of the file

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
    return FileInfo(stat.S_ISREG(st.st_mode), st.st_size, seals, (st.st_dev, st.st_ino))


class DaemonMap:
    """The daemon's own MAP_SHARED mapping of a client file range (mmap fallback path)."""

    __slots__ = ("addr", "length", "write")

    def __init__(self, fd: int, offset: int, length: int, *, write: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        addr = libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
        if addr is None or addr == MAP_FAILED:
            raise KernelError("mmap", ctypes.get_errno() or errno.EIO)
        self.addr: int | None = addr
        self.length = length
        self.write = write

    def populate(self, offset: int, length: int) -> None:
        """Fault ``[offset, offset+length)`` of the mapping in, in one call (writable
        pages for a writable mapping, as the pin will want them). KernelError("madvise")
        if the kernel cannot (ENOMEM, EFAULT past the file's end, EINVAL before 5.14)."""
        addr = self.addr
        if addr is None:
            raise KernelError("madvise", errno.EBADF, "the daemon mapping is closed")
        if offset < 0 or offset + length > self.length:
            raise KernelError("madvise", errno.EINVAL, "range outside the daemon mapping")
        advice = MADV_POPULATE_WRITE if self.write else MADV_POPULATE_READ
        if libc.madvise(addr + offset, length, advice) < 0:
            raise KernelError("madvise", ctypes.get_errno() or errno.EIO)

    def is_resident(self, offset: int, length: int) -> bool:
        """Whether every page of ``[offset, offset+length)`` is in memory now (mincore).

        False when the kernel cannot say (a closed mapping, a range outside it, any
        mincore error): the caller then treats the range as not resident, the safe side.
        """
        addr = self.addr
        if addr is None or offset < 0 or length <= 0 or offset + length > self.length:
            return False
        pages = -(-length // mmap.PAGESIZE)
        vec = bytearray(pages)
        buf = (ctypes.c_ubyte * pages).from_buffer(vec)
        if libc.mincore(addr + offset, length, buf) < 0:
            return False
        # bit 0 of each byte is "resident" (the others are reserved): delete the bytes
        # that have it; any left over is a page that is not resident
        return not vec.translate(None, _RESIDENT)

    def close(self) -> None:
        addr, self.addr = self.addr, None
        if addr is not None:
            libc.munmap(addr, self.length)


def max_map_count(proc_root: Path = Path("/proc")) -> int | None:
    """vm.max_map_count (mm/mmap.c sysctl_max_map_count), or None if it cannot be read."""
    try:
        return int((proc_root / "sys/vm/max_map_count").read_text().strip())
    except (OSError, ValueError):
        return None
