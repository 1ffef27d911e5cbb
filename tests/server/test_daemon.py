"""The daemon as a process: socket activation, sd_notify, SIGTERM, units, --check-config."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iommud.client import Client
from iommud.sdnotify import Notifier
from iommud.server.handler import ConnectionLimits
from iommud.server.listen import bind_listener, inherited_listeners

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"


def _notifications(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    sock.settimeout(timeout)
    got: list[str] = []
    while until not in got:
        got.extend(sock.recv(4096).decode().split("\n"))
    return got


def test_socket_activation_notify_and_sigterm(sockdir: str) -> None:
    """systemd-style start: fd 3 + LISTEN_PID/LISTEN_FDS, READY=1, a client served, STOPPING=1."""
    path = os.path.join(sockdir, "s")
    listener = bind_listener(path, mode=0o600)
    listener.setblocking(True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(sockdir, "notify"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "lab"))),
        "NOTIFY_SOCKET": os.path.join(sockdir, "notify"),
        "WATCHDOG_USEC": "100000",
    }
    n = listener.fileno()
    # sh sets LISTEN_PID to its own pid, which exec keeps; the socket is moved to fd 3
    # in the child before exec (dash cannot redirect fds above 9).
    script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    args = ["sh", "-c", script, "sh", sys.executable, "-m", "tests.server.daemon_main"]
    args += ["--socket", os.path.join(sockdir, "unused")]
    proc = subprocess.Popen(
        args,
        env=env,
        pass_fds=[3],
        preexec_fn=lambda: os.dup2(n, 3),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        listener.close()
        assert "READY=1" in _notifications(notify, "READY=1")
        assert "WATCHDOG=1" in _notifications(notify, "WATCHDOG=1")
        with Client(path, "activated") as client:
            assert client.hello.capabilities == ("iommufd", "legacy")
            client.ping()
        assert not os.path.exists(os.path.join(sockdir, "unused"))  # fd 3 was used
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _notifications(notify, "STOPPING=1")
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert proc.returncode == 0
    lines = out.splitlines()
    assert "broker.aclose" in lines
    assert any('"event": "daemon.stopped"' in line for line in lines)  # JSON: not a TTY


def test_daemon_binds_its_own_socket_and_removes_it(sockdir: str) -> None:
    path = os.path.join(sockdir, "own")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "lab")))}
    env.pop("NOTIFY_SOCKET", None)
    args = [sys.executable, "-m", "tests.server.daemon_main", "--socket", path]
    args += ["--socket-mode", "0600"]
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        # The socket file exists between bind() and listen(), and start-up can take
        # seconds on a loaded 2-core machine: wait until the daemon answers.
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "daemon exited early"
            try:
                client = Client(path, "own")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "daemon did not come up in 60 s"
                time.sleep(0.05)
        assert os.stat(path).st_mode & 0o777 == 0o600
        with client:
            client.ping()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(path)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660, 0o666])
def test_socket_mode_is_set_by_fd_never_by_path(
    sockdir: str, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """bind() creates the file with its final mode: no chmod by path that a swap could misdirect."""

    def no_chmod(*_args: object, **_kw: object) -> None:
        raise AssertionError("chmod by path")

    monkeypatch.setattr(os, "chmod", no_chmod)
    before = os.umask(0o022)
    try:
        path = os.path.join(sockdir, "s")
        sock = bind_listener(path, mode=mode)
        assert os.umask(0o022) == 0o022  # the process umask is back
    finally:
        os.umask(before)
    assert os.stat(path).st_mode & 0o777 == mode
    sock.close()
    Path(path).unlink()


def test_stale_socket_is_replaced_live_one_is_not(sockdir: str) -> None:
    from iommud.errors import ConfigError

    path = os.path.join(sockdir, "s")
    first = bind_listener(path)
    with pytest.raises(ConfigError) as info:
        bind_listener(path)
    assert info.value.details == {"path": path}
    assert info.value.message == "another daemon is listening on this socket"
    first.close()  # the file stays behind: stale now
    second = bind_listener(path, mode=0o666)
    assert os.stat(path).st_mode & 0o777 == 0o666
    second.close()
    Path(path).unlink()
    Path(path).write_text("not a socket")
    with pytest.raises(ConfigError) as info:
        bind_listener(path)
    assert info.value.message == "socket path exists and is not a socket"


def test_inherited_listeners_ignore_other_pids() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert inherited_listeners(env) == []
    assert env == {}  # consumed either way, so children do not inherit them


def test_notifier_abstract_and_disabled() -> None:
    assert not Notifier({}).notify("READY=1")
    name = f"iommud-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
        assert notifier.watchdog_usec == 4000000
        assert notifier.notify("READY=1", "STATUS=x")
        assert sock.recv(100) == b"READY=1\nSTATUS=x"
        notifier.close()
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("text", "rc"),
    [("", 0), ('[daemon]\nsocket = "relative"\n', 1), ("[nope]\n", 1)],
)
def test_check_config_verdict(tmp_path: Path, text: str, rc: int) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    args = [sys.executable, "-m", "iommud", "--check-config", str(cfg)]
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == rc
    if rc == 0:
        assert res.stdout == f"{cfg}: OK\n"
    else:
        assert res.stderr.startswith(f"{cfg}: INVALID")


def _paths(tmp: Path, **daemon: str) -> str:
    """A [daemon] table with every path under ``tmp`` (a sys_root with PCI devices)."""
    (tmp / "sys" / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
    keys = {
        "socket": f"{tmp}/run/s.sock",
        "state_dir": f"{tmp}/state",
        "sys_root": f"{tmp}/sys",
        **daemon,
    }
    return "[daemon]\n" + "".join(f'{k} = "{v}"\n' for k, v in keys.items())


@pytest.mark.parametrize(
    ("daemon", "rc", "lines"),
    [
        ({}, 0, []),
        (
            {"state_dir": "{tmp}/afile"},
            1,
            ["INVALID at daemon.state_dir: {tmp}/afile is not a directory"],
        ),
        (
            {"socket": "{tmp}/afile/run/s.sock"},
            1,
            [
                "INVALID at daemon.socket: its directory {tmp}/afile/run cannot be created:"
                " {tmp}/afile is a file"
            ],
        ),
        (
            {"socket": "{tmp}/afile"},
            1,
            ["INVALID at daemon.socket: {tmp}/afile exists and is not a socket"],
        ),
        (
            {"socket": "{tmp}/" + "x" * 120},
            1,
            [
                "INVALID at daemon.socket: {tmp}/"
                + "x" * 120
                + " is longer than a socket path may be"
            ],
        ),
        (
            {"state_dir": "{tmp}/open"},
            1,
            [
                "INVALID at daemon.state_dir: {tmp}/open is writable by others (mode 777):"
                " its rebind journal would not be trusted"
            ],
        ),
        (
            {"sys_root": "{tmp}/nosys"},
            0,
            [
                "WARNING at daemon.sys_root: {tmp}/nosys/bus/pci/devices does not exist:"
                " the daemon would see no devices"
            ],
        ),
        (
            {"state_dir": "{tmp}/a\\u0000b"},
            1,
            [
                "INVALID at daemon.state_dir: {cfg}: daemon.state_dir:"
                " must not contain a NUL character"
            ],
        ),
    ],
)
def test_check_config_catches_what_would_stop_the_daemon(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    daemon: dict[str, str],
    rc: int,
    lines: list[str],
) -> None:
    """Each problem is one line on stderr naming the key; warnings keep the verdict OK."""
    from iommud.app import check_config

    (tmp_path / "afile").write_text("")
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    cfg = tmp_path / "c.toml"
    cfg.write_text(_paths(tmp_path, **{k: v.format(tmp=tmp_path) for k, v in daemon.items()}))
    assert check_config(cfg) == rc
    out, err = capsys.readouterr()
    want = [f"{cfg}: " + line.format(tmp=tmp_path, cfg=cfg) for line in lines]
    assert err.splitlines()[: len(want)] == want
    if rc == 0:
        assert err.splitlines() == want
        assert out == f"{cfg}: OK\n"


def test_check_config_deeply_nested_toml_is_one_line_no_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    args = [sys.executable, "-m", "iommud", "--check-config", str(cfg)]
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == f"{cfg}: INVALID: {cfg}: TOML nested too deeply"
    assert "Traceback" not in res.stderr


def test_daemon_with_an_unusable_socket_dir_says_so_in_one_line(tmp_path: Path) -> None:
    """No traceback: the pre-flight names the problem, then the listener fails cleanly."""
    (tmp_path / "afile").write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(_paths(tmp_path, socket=f"{tmp_path}/afile/run/s.sock", sys_root="/nosys"))
    args = [sys.executable, "-m", "tests.server.daemon_main", "--config", str(cfg)]
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stdout + res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(e["event"], e["level"]) for e in events if e["level"] != "info"] == [
        ("daemon.preflight", "error"),
        ("daemon.preflight", "warning"),
        ("daemon.cannot_listen", "error"),
    ]


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_units_key_settings() -> None:
    sock = _unit("iommud.socket")
    assert sock["Socket"]["ListenSequentialPacket"] == "/run/iommud/iommud.sock"
    assert sock["Socket"]["SocketMode"] == "0660"
    svc = _unit("iommud.service")["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["CapabilityBoundingSet"] == (
        "CAP_IPC_LOCK CAP_DAC_READ_SEARCH CAP_SYS_RESOURCE CAP_SYS_PTRACE CAP_KILL"
    )
    assert svc["RestrictAddressFamilies"] == "AF_UNIX AF_NETLINK"
    assert svc["ProtectSystem"] == "strict"
    lines = (UNITS / "iommud.service").read_text().splitlines()
    filters = [line.split("=", 1)[1] for line in lines if line.startswith("SystemCallFilter=")]
    # CAP_SYS_PTRACE reads /proc; cross-process memory access stays refused
    assert filters == ["@system-service", "~process_vm_readv process_vm_writev"]
    assert "ProtectKernelTunables" not in svc  # it would make the sysfs rebind writes fail
    # The fd budget (iommud.server.server.fd_budget) must admit the default connection
    # limit with the reserve kept back: socket + pidfd + max_held_fds per connection.
    limits = ConnectionLimits()
    per_connection = 2 + limits.max_held_fds
    assert (int(svc["LimitNOFILE"]) - limits.fd_reserve) // per_connection >= limits.max_total


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the units (ExecStart pointed at an existing binary)."""
    service = (UNITS / "iommud.service").read_text()
    (tmp_path / "iommud.service").write_text(service.replace("/usr/bin/iommud", sys.executable))
    shutil.copy(UNITS / "iommud.socket", tmp_path)
    res = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "iommud.socket"),
            str(tmp_path / "iommud.service"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (res.returncode, res.stderr) == (0, "")
