"""The rebind journal: what the daemon changed in sysfs, so it can be undone after a crash.

Before the broker writes a device's driver_override or moves it to vfio-pci, it records
the device's original driver and override here (write-ahead). The file is replaced
atomically (write a temp file, fsync it, rename over the old one, fsync the directory), so
after a crash it holds either the old or the new state, never a torn one. At start the
broker replays whatever is left: every entry is a device a previous run did not restore.

This module only reads and writes the journal file; it never touches sysfs and decides
nothing. Its methods block on disk I/O: callers run them off the event loop.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import structlog

from iommud.errors import KernelError

log = structlog.get_logger(__name__)

JOURNAL_NAME: Final = "rebind-journal.json"
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One device the daemon changed: how to put it back."""

    bdf: str
    group_id: int
    original_driver: str | None  # the driver bound before the daemon touched it
    original_override: str | None  # driver_override before the daemon pinned it
    rebound: bool  # True when the daemon moved the device to vfio-pci


class Journal:
    """The on-disk journal under ``state_dir``; an in-memory copy mirrors the file."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir
        self._path = state_dir / JOURNAL_NAME
        self._entries: dict[str, JournalEntry] = {}
        self._lock = threading.Lock()  # writers run in worker threads

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> list[JournalEntry]:
        """Read the file (missing means empty). A corrupt file is kept aside, not trusted."""
        with self._lock:
            try:
                raw = self._path.read_text(encoding="utf-8")
            except FileNotFoundError:
                self._entries = {}
                return []
            except OSError as exc:
                raise KernelError.from_oserror("journal.read", exc, path=str(self._path)) from exc
            try:
                data = json.loads(raw)
                _check_version(data)
                entries = {
                    e["bdf"]: JournalEntry(
                        bdf=str(e["bdf"]),
                        group_id=int(e["group_id"]),
                        original_driver=e["original_driver"],
                        original_override=e["original_override"],
                        rebound=bool(e["rebound"]),
                    )
                    for e in data["entries"]
                }
            except (ValueError, KeyError, TypeError) as exc:
                aside = self._path.with_suffix(".corrupt")
                os.replace(self._path, aside)
                log.exception(
                    "journal.corrupt", path=str(self._path), moved_to=str(aside), error=str(exc)
                )
                self._entries = {}
                return []
            self._entries = entries
            return list(entries.values())

    def record(self, entries: list[JournalEntry]) -> None:
        """Add or replace entries and make it durable before returning."""
        with self._lock:
            new = dict(self._entries)
            new.update({e.bdf: e for e in entries})
            self._write(new)
            self._entries = new

    def drop(self, bdfs: list[str]) -> None:
        """Forget entries (the devices were restored) and make it durable."""
        with self._lock:
            new = {b: e for b, e in self._entries.items() if b not in bdfs}
            if new != self._entries:
                self._write(new)
            self._entries = new

    def _write(self, entries: dict[str, JournalEntry]) -> None:
        body = json.dumps(
            {"version": _VERSION, "entries": [asdict(e) for e in entries.values()]},
            indent=1,
            sort_keys=True,
        )
        tmp = self._path.with_suffix(".tmp")
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, body.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise KernelError.from_oserror("journal.write", exc, path=str(self._path)) from exc


def _check_version(data: dict[str, object]) -> None:
    if data.get("version") != _VERSION:
        raise ValueError(f"unknown journal version {data.get('version')!r}")
