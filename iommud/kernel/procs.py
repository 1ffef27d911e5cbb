"""Processes holding a file the daemon handed out, and the few things done to them.

A delegated claim hands a VMM dups of the daemon's own /dev/iommu and VFIO cdev files;
fds can be passed on (SCM_RIGHTS, fork, pidfd_getfd), so on revocation the daemon must
find every process holding one of those files, wherever it went, and kill it.

Matching without kcmp: the lab kernel has no CONFIG_KCMP (kcmp(KCMP_FILE) would compare
the open file descriptions exactly). A ``FileKey`` is what /proc shows of a file without
touching it: ``mnt_id`` + ``ino`` from /proc/P/task/T/fdinfo/N (fs/proc/fd.c
seq_show, no getattr, so a dead NFS server cannot hang the scan) and ``dev`` + ``ino``
as /proc/P/maps prints a mapping's file (a BAR mmap keeps the file, and the binding,
after the fd is closed). For a VFIO cdev this names the NODE, not the open file, which
is sound here: /dev/vfio/devices/vfioN is root-only and only the daemon opens it, so
every open of it elsewhere came from us; and while the daemon holds its file no second
open can bind (drivers/vfio/vfio_main.c vfio_df_open: one open device). It cannot tell
two /dev/iommu files apart (one node): callers narrow iommufd holders themselves. A
``Matcher`` is the one place a kcmp(KCMP_FILE) check would go later.

Race-free order (pid reuse): ``pidfd_open`` FIRST, then read the process's tables, then
check the pidfd has not turned readable (exited): if it has not, the pid named that very
process throughout (a pid is not reused before its process is reaped). The returned
``Holder`` keeps that pidfd for ``kill`` (pidfd_send_signal) and for waiting (it turns
readable once the process exited, after exit_files closed its fds: kernel/exit.c).

Reading other uids' fd tables and fdinfo needs PTRACE_MODE_READ (CAP_SYS_PTRACE),
killing them CAP_KILL, lowering their RLIMIT_MEMLOCK CAP_SYS_RESOURCE
(systemd/iommud.service says why). A process whose tables cannot be read is reported
(``Scan.unreadable``), never silently taken as clean.

No policy here (who to kill, when: iommud.broker.revocation); runs on the work pool.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from iommud.errors import KernelError
from iommud.fds import OwnedFd
from iommud.kernel.interface import FileKey, Scan

PROC: Final = Path("/proc")
_GONE: Final = (errno.ENOENT, errno.ESRCH)


@dataclass(eq=False)
class Holder:
    """A live process found holding some of the keys (``ProcessHolder``); owns its
    pidfd (``close``)."""

    pid: int
    uid: int
    ppid: int
    comm: str
    keys: frozenset[FileKey]
    owned: OwnedFd
    vm_pin: int | None = None

    def pidfd(self) -> int:
        return self.owned.fileno()

    def is_alive(self) -> bool:
        if self.owned.closed:
            return False
        ready, _, _ = select.select([self.owned.fileno()], [], [], 0)
        return not ready

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.owned.fileno(), signal.SIGKILL)
        except ProcessLookupError:
            return
        except OSError as exc:
            raise KernelError.from_oserror("pidfd_send_signal", exc, pid=self.pid) from exc

    def clamp_memlock(self) -> None:
        # prlimit takes a pid, not a pidfd: alive now means the pid is still this
        # process (not reaped, so not reused); a lower limit is no privilege anyway.
        if not self.is_alive():
            return
        try:
            resource.prlimit(self.pid, resource.RLIMIT_MEMLOCK, (0, 0))
        except ProcessLookupError:
            return
        except OSError as exc:
            raise KernelError.from_oserror("prlimit", exc, pid=self.pid) from exc

    def close(self) -> None:
        self.owned.close()


class Matcher(Protocol):
    """Which of ``wanted`` does process ``pid`` hold? (stat/fdinfo today; kcmp later)."""

    def held(self, pid_dir: Path, wanted: frozenset[FileKey]) -> set[FileKey]: ...


class FdinfoMatcher:
    """Match fd tables (every thread's: a thread may unshare(CLONE_FILES)) by fdinfo
    ``mnt_id``/``ino`` and memory maps by ``dev``/``ino``."""

    def held(self, pid_dir: Path, wanted: frozenset[FileKey]) -> set[FileKey]:
        by_fd = {(k.mnt_id, k.ino): k for k in wanted}
        by_map = {(k.dev, k.ino): k for k in wanted}
        found: set[FileKey] = set()
        for task in _listdir(pid_dir / "task"):
            tdir = pid_dir / "task" / task
            for name in _listdir(tdir / "fd"):
                try:
                    link = os.readlink(tdir / "fd" / name)
                except OSError as exc:
                    if exc.errno in _GONE:
                        continue  # closed meanwhile
                    raise
                if not link.startswith("/"):
                    continue  # socket:[..], pipe:[..], anon_inode:..: never our files
                try:
                    info = _fdinfo(tdir / "fdinfo" / name)
                except OSError as exc:
                    if exc.errno in _GONE:
                        continue
                    raise
                key = by_fd.get((info.get("mnt_id", -1), info.get("ino", -1)))
                if key is not None:
                    found.add(key)
            if len(found) == len(wanted):
                return found
        try:
            maps = (pid_dir / "maps").read_text()
        except OSError as exc:
            if exc.errno in _GONE:
                return found
            raise
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or parts[4] == "0":
                continue
            major, _, minor = parts[3].partition(":")
            try:
                dev = os.makedev(int(major, 16), int(minor, 16))
                ino = int(parts[4])
            except ValueError:
                continue
            key = by_map.get((dev, ino))
            if key is not None:
                found.add(key)
        return found


class ProcessTable:
    """The real scan over ``proc`` (the kernel layer's ``Processes``)."""

    def __init__(self, proc: Path = PROC, matcher: Matcher | None = None) -> None:
        self._proc = proc
        self._matcher = matcher or FdinfoMatcher()

    def file_key(self, fd: int) -> FileKey:
        try:
            st = os.fstat(fd)
            info = _fdinfo(self._proc / "self" / "fdinfo" / str(fd))
        except OSError as exc:
            raise KernelError.from_oserror("file_key", exc, fd=fd) from exc
        return FileKey(info.get("mnt_id", -1), st.st_dev, st.st_ino)

    def scan(
        self, wanted: frozenset[FileKey], *, exclude: Iterable[int] = (), vm_pin: bool = False
    ) -> Scan:
        """Every live process (but ``exclude`` and the daemon) holding any of ``wanted``."""
        out = Scan()
        if not wanted:
            return out
        skip = {os.getpid(), *exclude}
        try:
            for pid in _pids(self._proc):
                if pid in skip:
                    continue
                holder = self._check(pid, wanted, out, vm_pin=vm_pin)
                if holder is not None:
                    out.holders.append(holder)
        except BaseException:
            out.close()
            raise
        return out

    def _check(
        self, pid: int, wanted: frozenset[FileKey], out: Scan, *, vm_pin: bool
    ) -> Holder | None:
        try:
            pidfd = OwnedFd(os.pidfd_open(pid))
        except OSError:
            return None  # gone (ESRCH), or a thread id (EINVAL): not a process
        try:
            pid_dir = self._proc / str(pid)
            try:
                keys = self._matcher.held(pid_dir, wanted)
                if not keys:
                    pidfd.close()
                    return None
                status = _status(pid_dir)
                comm = (pid_dir / "comm").read_text().strip()
            except OSError as exc:
                pidfd.close()
                if exc.errno in (errno.EACCES, errno.EPERM):
                    out.unreadable.append(pid)
                return None
            holder = Holder(
                pid=pid,
                uid=_first_int(status.get("Uid", "0")),
                ppid=_first_int(status.get("PPid", "0")),
                comm=comm[:64],
                keys=frozenset(keys),
                owned=pidfd,
                vm_pin=_kib(status.get("VmPin")) if vm_pin else None,
            )
        except BaseException:
            pidfd.close()
            raise
        if not holder.is_alive():  # exited during the check: pid P may be another now
            holder.close()
            return None
        return holder

    def parents(self) -> dict[int, int]:
        """pid -> ppid of every process (for "the peer and its descendants")."""
        out: dict[int, int] = {}
        for pid in _pids(self._proc):
            try:
                stat = (self._proc / str(pid) / "stat").read_text()
            except OSError:
                continue
            # comm may hold spaces and parentheses: fields follow the LAST ')'
            rest = stat[stat.rfind(")") + 2 :].split()
            if len(rest) > 1 and rest[1].isdigit():
                out[pid] = int(rest[1])
        return out


def _pids(proc: Path) -> Iterator[int]:
    for name in _listdir(proc):
        if name.isdigit():
            yield int(name)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as exc:
        if exc.errno in _GONE:
            return []
        raise


def _fdinfo(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("mnt_id", "ino"):
            out[key] = int(value.strip())
    return out


def _status(pid_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (pid_dir / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _first_int(value: str) -> int:
    head = value.split()[:1]
    return int(head[0]) if head and head[0].isdigit() else 0


def _kib(value: str | None) -> int | None:
    if value is None:
        return None
    head = value.split()[:1]
    return int(head[0]) * 1024 if head and head[0].isdigit() else None
