"""The rebind journal: what the daemon changed in sysfs, so it can be undone after a crash.

Before the broker writes a device's driver_override or moves it to vfio-pci, it records
the device's original driver and override here (write-ahead). The file is replaced
atomically (write a temp file, fsync it, rename over the old one, fsync the directory), so
after a crash it holds either the old or the new state, never a torn one. At start the
broker replays whatever is left: every entry is a device a previous run did not restore.

Nothing in the state directory is trusted blindly: the directory must be a real directory
owned by the daemon's user and writable by no one else, every file is opened relative to
it with O_NOFOLLOW (a planted symlink is never followed, for reading or writing), and the
temp file is a fresh name created with O_EXCL. A journal that cannot be used (not a
regular file, not UTF-8, not JSON, not the expected shape, nested too deeply) never stops
the daemon: :meth:`Journal.load` moves it aside as ``rebind-journal.json.bad-<time>``
(or, when even that fails, leaves it) and reports one :class:`JournalProblem`; the caller
says so loudly and starts without replay.

This module only reads and writes the journal file; it never touches sysfs and decides
nothing. Its methods block on disk I/O: callers run them off the event loop.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import structlog

from iommud.errors import KernelError

log = structlog.get_logger(__name__)

JOURNAL_NAME: Final = "rebind-journal.json"
_VERSION: Final = 1
# A journal names a few devices per claimed group (a few hundred bytes each); anything
# near this size is not one the daemon wrote.
MAX_JOURNAL_BYTES: Final = 4 << 20


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One device the daemon changed: how to put it back."""

    bdf: str
    group_id: int
    original_driver: str | None  # the driver bound before the daemon touched it
    original_override: str | None  # driver_override before the daemon pinned it
    rebound: bool  # True when the daemon moved the device to vfio-pci


@dataclass(frozen=True, slots=True)
class JournalProblem:
    """Why a journal could not be replayed, and where the bad file went."""

    path: str
    problem: str  # what is wrong with it, e.g. "not a JSON object (a list)"
    moved_to: str | None  # where it was moved aside; None when it could not be
    not_moved: str | None = None  # why it could not be moved aside

    @property
    def message(self) -> str:
        """One line for a log or an operator."""
        if self.moved_to is not None:
            where = f"moved aside to {self.moved_to}"
        elif self.not_moved is not None:
            where = f"NOT moved aside ({self.not_moved})"
        else:
            where = "left in place"
        return f"rebind journal {self.path} unusable: {self.problem}; {where}; no replay"


class _BadJournalError(Exception):
    """Internal: the journal (or its directory) cannot be used. Never escapes."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class Journal:
    """The on-disk journal under ``state_dir``; an in-memory copy mirrors the file."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._dir = state_dir
        self._path = state_dir / JOURNAL_NAME
        self._entries: dict[str, JournalEntry] = {}
        self._lock = threading.Lock()  # writers run in worker threads
        self._clock = clock
        self.problem: JournalProblem | None = None  # set by load() when it could not replay

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> list[JournalEntry]:
        """Read the file (missing means empty). An unusable one is moved aside, not trusted:
        the result is then empty and :attr:`problem` says why."""
        with self._lock:
            self.problem = None
            self._entries = {}
            try:
                dfd = self._open_dir(create=False)
            except FileNotFoundError:
                return []
            except _BadJournalError as exc:
                self.problem = JournalProblem(str(self._path), exc.problem, None, None)
                return []
            try:
                try:
                    entries = _parse(_read(dfd))
                except FileNotFoundError:
                    return []
                except _BadJournalError as exc:
                    self.problem = self._move_aside(dfd, exc)
                    return []
            finally:
                os.close(dfd)
            self._entries = entries
            return list(entries.values())

    def record(self, entries: list[JournalEntry]) -> None:
        """Add entries and make it durable before returning.

        A device already in the journal is not back on its recorded driver yet (a
        restore is pending or failed): what the journal recorded first stays the truth.
        A later claim sees the device as the daemon left it (no driver, override pinned)
        and must not replace the original with that."""
        with self._lock:
            new = dict(self._entries)
            for e in entries:
                new[e.bdf] = _merge(new[e.bdf], e) if e.bdf in new else e
            self._write(new)
            self._entries = new

    def get(self, bdf: str) -> JournalEntry | None:
        """The recorded entry for a device, if it has one."""
        with self._lock:
            return self._entries.get(bdf)

    def drop(self, bdfs: list[str]) -> None:
        """Forget entries (the devices were restored) and make it durable."""
        with self._lock:
            new = {b: e for b, e in self._entries.items() if b not in bdfs}
            if new != self._entries:
                self._write(new)
            self._entries = new

    def _open_dir(self, *, create: bool) -> int:
        """An fd on the state dir, checked: a directory (not a link), ours, not writable
        by group or others (whoever can write there could plant the journal)."""
        if create:
            try:
                self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            except FileExistsError as exc:  # a file or a dangling link where the dir goes
                raise _BadJournalError("state dir is not a directory") from exc
        try:
            dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError(exc.errno, exc.strerror, str(self._dir)) from exc
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _BadJournalError("state dir is not a directory") from exc
            raise _BadJournalError(f"cannot open state dir: {exc.strerror}") from exc
        st = os.fstat(dfd)
        problem = None
        if st.st_uid != os.geteuid():
            problem = f"state dir is owned by uid {st.st_uid}, not {os.geteuid()}"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"state dir is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
        if problem is not None:
            os.close(dfd)
            raise _BadJournalError(problem)
        return dfd

    def _move_aside(self, dfd: int, bad: _BadJournalError) -> JournalProblem:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        aside = f"{JOURNAL_NAME}.bad-{stamp}"
        try:
            os.rename(JOURNAL_NAME, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except OSError as exc:
            return JournalProblem(str(self._path), bad.problem, None, exc.strerror)
        return JournalProblem(str(self._path), bad.problem, str(self._dir / aside))

    def _write(self, entries: dict[str, JournalEntry]) -> None:
        body = json.dumps(
            {"version": _VERSION, "entries": [asdict(e) for e in entries.values()]},
            indent=1,
            sort_keys=True,
        ).encode()
        # A fresh name each time: O_EXCL never meets a file someone planted there.
        tmp = f".{JOURNAL_NAME}.{secrets.token_hex(8)}.tmp"
        try:
            dfd = self._open_dir(create=True)
        except _BadJournalError as exc:
            raise KernelError(
                "journal.write", errno.EPERM, exc.problem, path=str(self._path)
            ) from None
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # rename() replaces a link planted at the journal's name; never follows it.
                os.rename(tmp, JOURNAL_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
        except OSError as exc:
            raise KernelError.from_oserror("journal.write", exc, path=str(self._path)) from exc
        finally:
            os.close(dfd)


def _merge(old: JournalEntry, new: JournalEntry) -> JournalEntry:
    """``old`` recorded the device's state before the daemon first touched it."""
    if old.rebound or not new.rebound:
        return old
    # Only its override was pinned before; now it is moved too: its driver then was
    # still its original one.
    return JournalEntry(old.bdf, old.group_id, new.original_driver, old.original_override, True)


def _read(dfd: int) -> bytes:
    """The journal's bytes; _BadJournalError unless it is a regular file of sane size."""
    try:
        fd = os.open(
            JOURNAL_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
        )
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _BadJournalError("a symbolic link, not a file") from exc
        raise _BadJournalError(f"cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file"
            raise _BadJournalError(f"not a regular file ({kind})")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_JOURNAL_BYTES:
                raise _BadJournalError(f"larger than {MAX_JOURNAL_BYTES} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise _BadJournalError(f"cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _parse(raw: bytes) -> dict[str, JournalEntry]:
    """Entries by BDF; _BadJournalError naming the first thing wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadJournalError("not UTF-8") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise _BadJournalError("nested too deeply") from None
    except ValueError as exc:
        raise _BadJournalError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _BadJournalError(f"not a JSON object ({_kind(data)})")
    if data.get("version") != _VERSION:
        raise _BadJournalError(f"unknown version {data.get('version')!r}")
    items = data.get("entries")
    if not isinstance(items, list):
        raise _BadJournalError(f"entries is not a list ({_kind(items)})")
    entries: dict[str, JournalEntry] = {}
    for i, e in enumerate(items):
        entry = _entry(e)
        if entry is None:
            raise _BadJournalError(f"entries[{i}] is not a journal entry")
        entries[entry.bdf] = entry
    return entries


def _entry(e: object) -> JournalEntry | None:
    if not isinstance(e, dict):
        return None
    bdf, group, drv, ovr, rebound = (
        e.get(k) for k in ("bdf", "group_id", "original_driver", "original_override", "rebound")
    )
    if not (isinstance(bdf, str) and type(group) is int and isinstance(rebound, bool)):
        return None
    if not all(v is None or isinstance(v, str) for v in (drv, ovr)):
        return None
    return JournalEntry(bdf, group, drv, ovr, rebound=rebound)


def _kind(v: object) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "a number"
    )
