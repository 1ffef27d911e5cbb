"""iommuctl against the real daemon (server + broker over the fake kernel) in a thread.

See tests/cli/support.py for the tree. In-process runs for the request/reply commands;
real subprocesses where signals and live streaming matter (monitor, claim --hold).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
import topology

from iommud.watch import HostAction, HostEvent
from tests.cli.support import Daemon, ctl, spawn

E1000_BDF = topology.NIC


def read_line(proc: subprocess.Popen[str], stream: str = "stdout") -> str:
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    line = pipe.readline()
    assert line, f"iommuctl ended early: rc={proc.wait(5)} err={proc.stderr and proc.stderr.read()}"
    return line.rstrip("\n")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=10)
    return proc.returncode, out, err


def wait_subscribed(proc: subprocess.Popen[str]) -> None:
    assert read_line(proc, "stderr").startswith("iommuctl: monitoring ")


# ---------------------------------------------------------------------- no daemon


def test_no_socket_is_one_line_exit_2(tmp_path: Any) -> None:
    path = f"{tmp_path}/none.sock"
    r = ctl("--socket", path, "status")
    assert (r.code, r.out, r.err) == (
        2,
        "",
        f"iommuctl: daemon not running (no socket at {path})\n",
    )


def test_connection_refused_is_exit_2(sockdir: Any) -> None:
    """A stale socket file with nobody listening: ECONNREFUSED."""
    path = f"{sockdir}/stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()
    r = ctl("--socket", path, "ls")
    assert (r.code, r.err) == (2, f"iommuctl: daemon not running (connection refused at {path})\n")


# ---------------------------------------------------------------------- requests


def test_ls_table_and_json(daemon: Daemon) -> None:
    r = ctl("--socket", daemon.socket, "ls")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == [
        "BDF",
        "ID",
        "DRIVER",
        "GROUP",
        "VIABLE",
        "OFFENDERS",
        "PATH",
        "OWNER",
    ]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows["0000:00:10.0"] == [
        "0000:00:10.0",
        "1234:11e8",
        "-",
        "3",
        "yes",
        "-",
        "iommufd",
        "-",
    ]
    assert rows["0000:00:11.0"][:8] == [
        "0000:00:11.0", "1b36:0001", "-", "(bridge)", "4", "no", "0000:01:03.0=e1000", "-"
    ]  # fmt: skip
    assert rows[E1000_BDF] == [E1000_BDF, "8086:100e", "e1000"]  # group columns shown once

    j = ctl("--socket", daemon.socket, "ls", "--json")
    data = json.loads(j.out)
    assert len(data["devices"]) == 9
    g4 = next(g for g in data["groups"] if g["group_id"] == 4)
    assert g4["is_viable"] is False
    assert g4["offenders"] == [{"bdf": E1000_BDF, "driver": "e1000"}]


def test_status_names_the_event_source(daemon: Daemon) -> None:
    r = ctl("--socket", daemon.socket, "status")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "daemon        iommud 0.1.0"
    assert lines[1:3] == ["event source  kernel", "clients       1"]
    assert lines[4] == "leases        0"
    data = settled_status(daemon)
    assert (data["event_source"], data["clients"], data["leases"]) == ("kernel", 1, [])


def test_typed_error_is_code_message_details_exit_1(daemon: Daemon) -> None:
    r = ctl("--socket", daemon.socket, "release", "99")
    assert r.code == 1
    assert r.out == ""
    first, *details = r.err.splitlines()
    assert first.startswith("iommuctl: not_found: ")
    assert "  lease_id: 99" in details


def test_claim_not_viable_group(daemon: Daemon) -> None:
    """The bridge group has e1000 bound and the config may not rebind it: not_viable."""
    r = ctl("--socket", daemon.socket, "claim", "0000:01:01.0")
    assert r.code == 1
    assert r.err.startswith("iommuctl: not_viable: ")


def test_claim_without_hold_ends_with_the_connection(daemon: Daemon) -> None:
    r = ctl("--socket", daemon.socket, "claim", "0000:00:10.0", "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert (info["group_id"], info["devices"], info["backend"]) == (3, ["0000:00:10.0"], "iommufd")
    assert settled_status(daemon)["leases"] == []


def settled_status(daemon: Daemon) -> dict[str, Any]:
    """``status --json`` once the daemon has torn down the connections that just closed
    (it hears a client's EOF asynchronously, so a status asked right after another
    iommuctl exits may still count that client and its lease: seen under load). Settled:
    only the asking client, no lease. 30 s is a hang guard; the caller asserts."""
    deadline = time.monotonic() + 30
    while True:
        status: dict[str, Any] = json.loads(ctl("--socket", daemon.socket, "status", "--json").out)
        if (status["clients"] == 1 and not status["leases"]) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def ctl_as(uid: int, *argv: str) -> tuple[int, str]:
    """iommuctl in a forked child that dropped to ``uid`` (no exec: the venv's python may
    not be executable by that uid). Returns (exit code, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            res = ctl(*argv)
            os.write(w, res.err.encode())
            code = res.code
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to uid 1000")
def test_revoke_needs_root(daemon: Daemon) -> None:
    """The daemon enforces it: a uid-1000 iommuctl gets permission_denied, exit 1."""
    code, err = ctl_as(1000, "--socket", daemon.socket, "revoke", "3")
    assert code == 1
    assert err.splitlines()[0] == "iommuctl: permission_denied: revoke is for root only"
    assert "  uid: 1000" in err.splitlines()


# ---------------------------------------------------------------------- streaming


def test_claim_hold_keeps_the_lease_until_sigterm(daemon: Daemon) -> None:
    proc = spawn("--socket", daemon.socket, "claim", "0000:00:10.0", "--hold")
    try:
        line = read_line(proc)
        assert line.startswith("lease ")
        assert " group 3 backend iommufd " in line
        lease_id = int(line.split()[1])
        status = json.loads(ctl("--socket", daemon.socket, "status", "--json").out)
        assert [le["lease_id"] for le in status["leases"]] == [lease_id]
        proc.send_signal(signal.SIGTERM)
        assert finish(proc)[0] == 0
    finally:
        proc.kill()
    assert settled_status(daemon)["leases"] == []


def test_revoke_ends_a_held_lease(daemon: Daemon) -> None:
    proc = spawn("--socket", daemon.socket, "claim", "0000:00:10.0", "--hold")
    try:
        lease_id = int(read_line(proc).split()[1])
        r = ctl("--socket", daemon.socket, "revoke", "3", "--reason", "maintenance")
        assert (r.code, r.out) == (0, f"group 3: revoked lease(s) {lease_id}\n")
        code, _, err = finish(proc)
        assert (code, err) == (1, f"iommuctl: lease {lease_id} revoked: maintenance\n")
    finally:
        proc.kill()
    r = ctl("--socket", daemon.socket, "revoke", "3")
    assert r.out == "group 3: no lease to revoke\n"


def test_monitor_json_streams_bind_unbind_and_viability(daemon: Daemon) -> None:
    proc = spawn("--socket", daemon.socket, "monitor", "--json")
    try:
        wait_subscribed(proc)
        daemon.fs.unbind(E1000_BDF)
        daemon.uevent(HostEvent(HostAction.UNBIND, E1000_BDF, None, 1))
        daemon.fs.bind(E1000_BDF, "e1000")
        daemon.uevent(HostEvent(HostAction.BIND, E1000_BDF, "e1000", 2))
        got = [json.loads(read_line(proc)) for _ in range(4)]
        proc.send_signal(signal.SIGINT)
        code, rest, _ = finish(proc)
    finally:
        proc.kill()
    assert code == 0
    assert rest == ""
    strip = [{k: v for k, v in e.items() if k not in ("ts", "seq", "op", "fds")} for e in got]
    assert strip == [
        {"event": "driver_unbound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {"event": "viability_changed", "group_id": 4, "is_viable": True, "offenders": []},
        {"event": "driver_bound", "bdf": E1000_BDF, "driver": "e1000", "group_id": 4},
        {
            "event": "viability_changed",
            "group_id": 4,
            "is_viable": False,
            "offenders": [{"bdf": E1000_BDF, "driver": "e1000"}],
        },
    ]
    assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)


def test_monitor_text_and_daemon_going_away(daemon: Daemon) -> None:
    proc = spawn("--socket", daemon.socket, "monitor", "--event", "driver_unbound")
    try:
        wait_subscribed(proc)
        daemon.fs.unbind(E1000_BDF)
        daemon.uevent(HostEvent(HostAction.UNBIND, E1000_BDF, None, 1))
        line = read_line(proc)
        daemon.stop()
        code, rest, err = finish(proc)
    finally:
        proc.kill()
    ts, name, tail = line.split(" ", 2)
    assert len(ts) == len("2026-11-24T21:50:01.123")
    assert (name, tail) == ("driver_unbound", f"{E1000_BDF} e1000 group 4")
    assert rest == ""  # the viability_changed event was filtered out
    assert (code, err) == (2, "iommuctl: the daemon closed the connection\n")


def test_socket_from_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMMUD_SOCKET", daemon.socket)
    assert ctl("status").code == 0
    assert os.environ["IOMMUD_SOCKET"] == daemon.socket
