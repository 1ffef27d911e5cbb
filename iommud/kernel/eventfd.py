"""eventfd(2) for the kernel to signal the daemon (vfio-pci's REQ irq).

``open_eventfd()`` gives a non-blocking, close-on-exec eventfd owned by the caller;
``drain_eventfd(fd)`` reads its counter and says whether it had been signalled.
Registering it with a device is VfioDevice.set_irq_eventfd; watching it is the
caller's loop. No policy. Errors leave as KernelError (op ``eventfd``).
"""

from __future__ import annotations

import os

from iommud.fds import OwnedFd
from iommud.kernel.libc import map_oserror


def open_eventfd() -> OwnedFd:
    """A new eventfd (EFD_CLOEXEC | EFD_NONBLOCK) with the duty to close it."""
    with map_oserror("eventfd"):
        return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def drain_eventfd(fd: int) -> bool:
    """Read and reset the counter; False when it had not been signalled (EAGAIN)."""
    with map_oserror("eventfd_read"):
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
    return True
