"""Owned file descriptors.

A received fd is owned from the moment it arrives: it goes into an ``FdSet`` before
anything is parsed, and the set closes every fd that was not explicitly handed on with
``steal()``. Nothing here does policy or I/O beyond close/dup/fstat.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from types import TracebackType


class OwnedFd:
    """One fd and the duty to close it. ``steal()`` hands the duty to the caller."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"invalid fd {fd}")
        self._fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("fd already closed or stolen")
        return self._fd

    def steal(self) -> int:
        """Give up ownership: the caller must close the returned fd."""
        fd = self.fileno()
        self._fd = None
        return fd

    def dup(self) -> OwnedFd:
        return OwnedFd(os.dup(self.fileno()))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"

    def __del__(self) -> None:
        # A leak is a bug; closing here keeps the daemon alive, tests count fds to catch it.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class FdSet:
    """An ordered set of owned fds (as received with one message).

    Closes every fd still owned on ``close()`` or on leaving a ``with`` block, so an
    error anywhere between receipt and hand-off leaks nothing.
    """

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self._fds: list[OwnedFd] = []
        if fds == ():  # most messages carry none: skip the loop's setup
            return
        try:
            for fd in fds:
                self._fds.append(OwnedFd(fd))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._fds)

    def __iter__(self) -> Iterator[OwnedFd]:
        return iter(self._fds)

    def __getitem__(self, index: int) -> OwnedFd:
        return self._fds[index]

    def append(self, fd: OwnedFd) -> None:
        self._fds.append(fd)

    def close(self) -> None:
        if not self._fds:
            return
        errors: list[OSError] = []
        for f in self._fds:
            try:
                f.close()
            except OSError as exc:
                errors.append(exc)
        self._fds.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> FdSet:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
