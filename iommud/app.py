"""The daemon process: command line, config, logging, event loop, signals, sd_notify.

``main()`` parses ``iommud [--config FILE] [--check-config FILE] [--socket PATH]``,
configures logging (JSON on stdout unless it is a TTY), picks uvloop (the one place
that does; plain asyncio is the fallback), takes the listening socket from systemd
(socket activation) or binds it, and starts in an order that reads the host once and
loses no uevent: open the host watcher (PCI uevents, iommud.watch.HostFollower: from
now on uevents are buffered), start the broker (its one full read of sysfs), apply the
uevents buffered meanwhile, then serve, READY=1, and follow uevents in an owned task
cancelled at shutdown. It serves until SIGTERM/SIGINT. On a signal it tells
systemd STOPPING=1, stops accepting, lets in-flight requests finish within a bounded
grace, closes the broker and exits 0. It never daemonizes (no fork, no pidfile).

It owns process-level concerns only: what a request does is the broker's business,
how a connection is served is ``iommud.server``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from iommud import logs
from iommud.broker import Broker
from iommud.config import Config, load_config
from iommud.errors import ConfigError, KernelError
from iommud.kernel.linux import LinuxKernel
from iommud.sdnotify import Notifier
from iommud.server import BrokerAPI, Server, ServerInfo
from iommud.server.handler import ConnectionLimits
from iommud.server.listen import bind_listener, inherited_listeners
from iommud.watch import BrokerHooks, HostFollower

log = structlog.get_logger(__name__)

DEFAULT_CONFIG = Path("/etc/iommud/iommud.toml")
SHUTDOWN_GRACE = 5.0


class DaemonBroker(BrokerAPI, BrokerHooks, Protocol):
    """The broker as the process sees it: the server's API, the host watcher's hooks
    (iommud.watch.BrokerHooks) and a lifecycle."""

    async def start(self) -> None: ...
    def begin_stop(self) -> None: ...
    async def aclose(self) -> None: ...


class HostWatch(Protocol):
    """The host watcher in start-up's order (iommud.watch.HostFollower is the real one).

    Entered before the broker's start-up read (uevents are buffered from then on),
    ``catch_up`` after that read and before READY, ``run`` as the daemon's task until
    it stops, exited at shutdown. A ``KernelError`` from any step (no netlink
    permission, a monitor that keeps failing) or any other exception (a bug) is logged
    and the daemon serves on without live events.
    """

    async def __aenter__(self) -> HostWatch: ...
    async def __aexit__(self, *exc_info: object) -> None: ...
    async def catch_up(self) -> int: ...
    async def run(self) -> None: ...


BrokerFactory = Callable[[Config], DaemonBroker]
HostWatchFactory = Callable[[DaemonBroker, Config], HostWatch]


def default_host_watch(broker: DaemonBroker, config: Config) -> HostWatch:
    """Follow PCI uevents (udev source if a udevd runs, else the kernel's) into the broker."""
    return HostFollower(broker)


def default_broker(config: Config) -> Broker:
    """The real broker on the real kernel under the config's dev_root and sys_root."""
    d = config.daemon
    return Broker(config, LinuxKernel(d.dev_root, d.sys_root))


def capabilities(broker: DaemonBroker) -> tuple[str, ...]:
    """What hello_reply announces: the kernel interfaces the host has (after start)."""
    if isinstance(broker, Broker):
        snap = broker.snapshot
        return tuple(
            name
            for name, present in (
                ("iommufd", snap.has_iommufd),
                ("legacy", snap.has_legacy_container),
            )
            if present
        )
    return tuple(getattr(broker, "capabilities", ()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="iommud", description="IOMMU/VFIO broker daemon")
    parser.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--check-config", type=Path, metavar="FILE", help="validate FILE, print the verdict, exit"
    )
    parser.add_argument("--socket", help="listen here instead of the config's daemon.socket")
    parser.add_argument(
        "--socket-mode",
        type=lambda s: int(s, 8),
        default=0o660,
        help="mode of a socket the daemon binds itself, octal (default 0660)",
    )
    parser.add_argument("--log-level", default="info", choices=sorted(logs._LEVELS))
    return parser.parse_args(argv)


def check_config(path: Path) -> int:
    """Print a verdict on ``path``; 0 if valid (warnings allowed), 1 if not.

    Beyond the file itself it checks what the daemon would meet at start (``preflight``),
    so a config it accepts does not then stop the daemon."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        where = f" at {exc.details['key']}" if exc.details.get("key") else ""
        print(f"{path}: INVALID{where}: {exc.message}", file=sys.stderr)
        for key, value in sorted(exc.details.items()):
            if value is not None:
                print(f"  {key}: {value}", file=sys.stderr)
        return 1
    findings = preflight(config)
    for f in findings:
        verdict = "INVALID" if f.fatal else "WARNING"
        print(f"{path}: {verdict} at {f.key}: {f.problem}", file=sys.stderr)
    if any(f.fatal for f in findings):
        return 1
    print(f"{path}: OK")
    return 0


@dataclass(frozen=True, slots=True)
class Finding:
    """Something the daemon would meet at start: ``fatal`` ones stop it or its claims."""

    key: str
    problem: str
    fatal: bool


def preflight(config: Config, socket_path: str | None = None) -> list[Finding]:
    """Check the paths a config names (``socket_path`` overrides its socket) against this
    host, without changing anything."""
    d = config.daemon
    found: list[Finding] = []
    sock = socket_path or str(d.socket)
    if len(os.fsencode(sock)) >= _SUN_PATH_MAX:
        found.append(Finding("daemon.socket", f"{sock} is longer than a socket path may be", True))
    try:
        st = os.lstat(sock)
    except (FileNotFoundError, NotADirectoryError):
        pass  # its directory's check says why
    except OSError as exc:
        found.append(Finding("daemon.socket", f"{sock}: {exc.strerror}", True))
    else:
        if not stat.S_ISSOCK(st.st_mode):
            found.append(Finding("daemon.socket", f"{sock} exists and is not a socket", True))
    if (problem := _dir_problem(Path(sock).parent)) is not None:
        found.append(Finding("daemon.socket", f"its directory {problem}", True))
    if (problem := _dir_problem(d.state_dir)) is not None:
        found.append(Finding("daemon.state_dir", problem, True))
    elif d.state_dir.is_dir():
        st = d.state_dir.stat()
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            found.append(
                Finding(
                    "daemon.state_dir",
                    f"{d.state_dir} is writable by others (mode {stat.S_IMODE(st.st_mode):o}):"
                    " its rebind journal would not be trusted",
                    True,
                )
            )
    pci = d.sys_root / "bus" / "pci" / "devices"
    if not pci.is_dir():
        found.append(
            Finding(
                "daemon.sys_root", f"{pci} does not exist: the daemon would see no devices", False
            )
        )
    return found


_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), with its NUL (include/uapi/linux/un.h)


def _dir_problem(path: Path) -> str | None:
    """Why a directory the daemon needs cannot exist at ``path`` (None when it can)."""
    missing = False
    at = path
    while True:
        try:
            st = os.stat(at)
        except (FileNotFoundError, NotADirectoryError):
            missing, at = True, at.parent
            continue
        except OSError as exc:
            return f"{at}: {exc.strerror}"
        break
    if not stat.S_ISDIR(st.st_mode):
        return (
            f"{at} is not a directory"
            if at == path
            else f"{path} cannot be created: {at} is a file"
        )
    if missing and not os.access(at, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {at} is not writable"
    if not missing and not os.access(at, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def main(argv: Sequence[str] | None = None, *, broker_factory: BrokerFactory | None = None) -> int:
    args = parse_args(argv)
    if args.check_config is not None:
        return check_config(args.check_config)
    logs.configure(level=args.log_level)
    bad_config: ConfigError | None = None
    try:
        config = _load(args.config)
    except ConfigError as exc:
        bad_config = exc
    if bad_config is not None:
        log.error("daemon.bad_config", error=bad_config.message, **bad_config.details)
        return 1
    socket_path = args.socket or str(config.daemon.socket)
    for finding in preflight(config, socket_path):
        # Logged, not fatal here: the step that meets it fails with its own error line.
        (log.error if finding.fatal else log.warning)(
            "daemon.preflight", key=finding.key, problem=finding.problem
        )
    _raise_nofile()
    coro = serve(
        config,
        broker_factory or default_broker,
        socket_path=socket_path,
        socket_mode=args.socket_mode,
    )
    return run(coro)


def _raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (systemd's LimitNOFILE= sets both; a plain
    shell leaves the soft limit at 1024). The server sizes its connection limit on it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("daemon.nofile", soft=resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard=hard)


def _load(path: Path | None) -> Config:
    if path is not None:
        return load_config(path)
    if DEFAULT_CONFIG.exists():
        return load_config(DEFAULT_CONFIG)
    return Config()


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run the daemon's main coroutine on uvloop if it is installed, else on asyncio."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay runnable anyway
        loop_factory, loop_name = None, "asyncio"
    else:
        loop_factory, loop_name = uvloop.new_event_loop, "uvloop"
    log.info("daemon.starting", pid=os.getpid(), loop=loop_name)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


async def serve(
    config: Config,
    broker_factory: BrokerFactory,
    *,
    socket_path: str,
    socket_mode: int = 0o660,
    grace: float = SHUTDOWN_GRACE,
    notifier: Notifier | None = None,
    host_watch: HostWatchFactory | None = default_host_watch,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status.

    Start-up reads the host once: the ``host_watch`` (the uevent watcher) is opened
    before ``broker.start()`` reads the host, catches up on the uevents of that read
    before READY, and runs as a task of the daemon's TaskGroup until the server stops;
    ``None`` runs without one.
    """
    notify = notifier or Notifier()
    loop = asyncio.get_running_loop()
    cannot_listen: ConfigError | None = None
    try:
        listeners, bound_path = _listeners(socket_path, socket_mode)
    except ConfigError as exc:
        cannot_listen = exc
    if cannot_listen is not None:
        log.error("daemon.cannot_listen", error=cannot_listen.message, **cannot_listen.details)
        return 1
    broker = broker_factory(config)
    owned = contextlib.AsyncExitStack()  # the host watch; closed before the broker
    try:
        # Opened before the broker reads the host: a uevent during or after that
        # read is buffered, so the read needs no second one to catch what it missed.
        watch = await _open_host_watch(owned, host_watch, broker, config)
        await broker.start()
        if watch is not None and not await _watch_step(broker, watch.catch_up()):
            watch = None
            await owned.aclose()
        info = ServerInfo(
            capabilities=capabilities(broker),
            connections=ConnectionLimits(**config.connections.model_dump()),
        )
        server = Server(broker, listeners, info=info, grace=grace)

        def on_signal(signum: signal.Signals) -> None:
            log.info("daemon.stopping", signal=signum.name)
            notify.notify("STOPPING=1", "STATUS=draining connections")
            broker.begin_stop()  # sessions now ending are the daemon's doing: kill no VMM
            server.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

        def on_ready() -> None:
            log.info("daemon.ready", socket=bound_path or "inherited", listeners=len(listeners))
            notify.notify("READY=1", "STATUS=serving")

        async with asyncio.TaskGroup() as tg:
            watchdog = tg.create_task(_watchdog(notify))
            watcher = tg.create_task(_follow_host(watch, broker, owned))
            await server.serve(on_ready)
            watchdog.cancel()
            watcher.cancel()
    finally:
        await owned.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        broker.begin_stop()
        await asyncio.shield(broker.aclose())
        for lst in listeners:
            lst.close()
        if bound_path is not None:
            _unlink_own_socket(bound_path)
        notify.close()
    log.info("daemon.stopped")
    return 0


def _listeners(path: str, mode: int) -> tuple[list[socket.socket], str | None]:
    inherited = inherited_listeners()
    if inherited:
        log.info("daemon.socket_activated", count=len(inherited))
        return inherited, None
    return [bind_listener(path, mode=mode)], path


def _unlink_own_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


async def _open_host_watch(
    owned: contextlib.AsyncExitStack,
    factory: HostWatchFactory | None,
    broker: DaemonBroker,
    config: Config,
) -> HostWatch | None:
    """Enter the host watch into ``owned``; None without one or if it cannot open."""
    if factory is None:
        log.info("daemon.no_host_watch")
        return None
    watch = factory(broker, config)
    if not await _watch_step(broker, owned.enter_async_context(watch)):
        return None
    return watch


async def _follow_host(
    watch: HostWatch | None, broker: DaemonBroker, owned: contextlib.AsyncExitStack
) -> None:
    if watch is not None and not await _watch_step(broker, watch.run()):
        await owned.aclose()  # a failed watch keeps no netlink socket open


async def _watch_step(broker: DaemonBroker, step: Awaitable[object]) -> bool:
    """Run one step of the host watch; False if it failed (logged).

    A failed watch leaves the daemon serving without live events (``status`` then shows
    no event source): claims still re-read sysfs, so nothing is decided on a stale view.
    """
    try:
        await step
    except KernelError as exc:
        broker.event_source = None
        log.exception("daemon.host_watch_failed", op=exc.op, errno=exc.errno)
    except Exception:
        # A watcher bug must not take the daemon down either.
        broker.event_source = None
        log.exception("daemon.host_watch_crashed")
    else:
        return True
    return False


async def _watchdog(notify: Notifier) -> None:
    """WATCHDOG=1 at half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends."""
    if notify.watchdog_usec is None:
        return
    interval = notify.watchdog_usec / 2e6
    while True:
        notify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
