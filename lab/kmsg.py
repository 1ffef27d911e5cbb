"""The lab guest's kernel log (/dev/kmsg), for lab tests and the demo.

``Kmsg`` reads the records written after it was opened. ``expect_fault`` is how a test
waits for an IOMMU fault message: intel-iommu prints DMAR faults under a rate limit
(drivers/iommu/intel/dmar.c, dmar_fault(): ``__ratelimit(&rs)`` with the default 10
messages per 5 s, include/linux/ratelimit_types.h) and, when limited, clears the fault
WITHOUT printing it. So a fault right after a burst of others (another test's) is dropped,
not delayed; the only way to see it is to cause it again once the window has passed.
Test support only: runs inside the guest as root.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

RATELIMIT_WINDOW = 5.0  # seconds: DEFAULT_RATELIMIT_INTERVAL


class Kmsg:
    """Kernel log records written after it was opened."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.seen: list[str] = []

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 5.0) -> str:
        """The first new record whose message matches ``pred``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                record = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no matching kernel log line in {self.seen}") from None
                time.sleep(0.05)
                continue
            except BrokenPipeError:  # EPIPE: records were overwritten; keep reading
                continue
            message = record.split(";", 1)[-1].strip()
            self.seen.append(message)
            if pred(message):
                return message

    def expect_fault(
        self, trigger: Callable[[], object], pred: Callable[[str], bool], attempts: int = 3
    ) -> str:
        """Run ``trigger`` (a DMA that must fault) until the kernel logs a matching line.

        Each attempt waits a little longer than one rate-limit window, so a fault dropped
        by the limiter is caused again once printing is allowed. ``trigger`` must be safe
        to repeat (a blocked DMA is).
        """
        for attempt in range(1, attempts + 1):
            trigger()
            try:
                return self.wait_for(pred, timeout=RATELIMIT_WINDOW + 1.0)
            except AssertionError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
