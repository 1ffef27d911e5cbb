"""The listening socket: bound at a path from the config, or inherited from systemd.

``bind_listener`` creates the parent directory, removes a stale socket left by a dead
daemon (and refuses to steal one a live daemon still answers on, or a path that is not a
socket) and binds a socket whose mode was set on its fd first (never chmod by path).
``inherited_listeners`` implements systemd's socket activation protocol (sd_listen_fds(3):
LISTEN_PID, LISTEN_FDS, fds from 3). Neither accepts connections or speaks the protocol.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import MutableMapping

import structlog

from iommud.errors import ConfigError

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("socket path exists and is not a socket", path=path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError as exc:
        # Nobody listens (ECONNREFUSED) or the type differs (EPROTOTYPE): stale, remove.
        if exc.errno not in (errno.ECONNREFUSED, errno.EPROTOTYPE, errno.ENOENT):
            raise ConfigError("cannot probe existing socket", path=path, errno=exc.errno) from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("socket.stale_removed", path=path)
    else:
        raise ConfigError("another daemon is listening on this socket", path=path)
    finally:
        probe.close()


def bind_listener(path: str, *, mode: int = 0o660, group: int | None = None) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path`` with ``mode`` (and ``group`` if given)."""
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "cannot create the socket's directory", path=parent, errno=getattr(exc, "errno", None)
        ) from exc
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # The mode is set on the socket, never on the path (someone who can write the
        # parent directory could swap the file between bind and a chmod): bind() creates
        # the file with the socket inode's mode less the umask (net/unix/af_unix.c,
        # unix_bind_bsd), so fchmod first and bind under a umask that keeps it exact.
        os.fchmod(sock.fileno(), mode)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group, follow_symlinks=False)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError("cannot listen on socket", path=path, errno=exc.errno) from exc
    return sock


def inherited_listeners(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation, or ``[]`` if none were.

    The variables are removed from the environment so child processes do not think the
    fds are theirs. Each fd must be an AF_UNIX SOCK_SEQPACKET socket that listens.
    """
    env = os.environ if environ is None else environ
    listen_pid = env.pop("LISTEN_PID", None)
    listen_fds = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if listen_pid is None or listen_fds is None:
        return []
    try:
        if int(listen_pid) != (os.getpid() if pid is None else pid):
            return []
        count = int(listen_fds)
    except ValueError as exc:
        raise ConfigError("bad LISTEN_PID/LISTEN_FDS", listen_pid=listen_pid) from exc
    socks: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            socks.append(sock)
            _check_inherited(sock, fd)
            sock.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _check_inherited(sock: socket.socket, fd: int) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise ConfigError(
            "inherited fd is not an AF_UNIX SOCK_SEQPACKET socket",
            fd=fd,
            family=int(sock.family),
            type=int(sock.type),
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ConfigError("inherited socket is not listening", fd=fd)
