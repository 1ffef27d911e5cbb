"""Issue 11's connection-side attacks against the real daemon process (fake_daemon.py).

Each test starts the daemon (real server, real Broker, fake kernel and sysfs, uvloop)
as a child process and attacks it over its socket the way the audit did: a pipelining
client that never reads (H1), 1,200 idle connections from one uid (H3), connections
that never say hello or go idle, fd exhaustion, unencodable input (L1), and peers that
leave with read-only work queued (M1). Nothing here times the daemon: every wait is on
a condition (a reply, EOF, a log line) with a generous guard for a loaded machine.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommud.protocol.limits import MAX_DATAGRAM, MAX_INFLIGHT
from iommud.server.handler import ConnectionLimits

REPO = Path(__file__).resolve().parents[2]
GUARD = 60.0  # seconds: a hang guard, never an expected duration
NOBODY = 65534

Message = dict[str, Any]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    path: str
    log: Path

    def events(self, name: str) -> list[Message]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    def wait_for(self, name: str, count: int = 1) -> list[Message]:
        deadline = time.monotonic() + GUARD
        while len(found := self.events(name)) < count:
            assert self.proc.poll() is None, f"daemon exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {count}x {name} in the daemon's log"
            time.sleep(0.05)
        return found

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextmanager
def fake_daemon(
    tmp_path: Path, sockdir: str, *, devices: int = 0, nofile: int | None = None, **limits: Any
) -> Iterator[Daemon]:
    os.chmod(sockdir, 0o755)  # tests connect as another uid too
    path = os.path.join(sockdir, "d")
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "lab")))}

    def lower_nofile() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    args = [sys.executable, "-m", "tests.server.fake_daemon", str(tmp_path), path]
    args += [json.dumps(limits), *([str(devices)] if devices else [])]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=out, stderr=out, preexec_fn=lower_nofile
        )
    daemon = Daemon(proc, path, log)
    try:
        daemon.wait_for("daemon.ready")
        yield daemon
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert rc == 0, daemon.log.read_text()[-3000:]


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(GUARD)
    sock.connect(path)
    return sock


def recv(sock: socket.socket) -> Message | None:
    data = sock.recv(MAX_DATAGRAM)
    return json.loads(data) if data else None


def call(sock: socket.socket, msg: Message) -> Message:
    sock.send(json.dumps(msg).encode())
    reply = recv(sock)
    assert reply is not None, "the daemon closed the connection"
    return reply


def hello(sock: socket.socket) -> None:
    reply = call(sock, {"op": "hello", "fds": 0, "id": 0, "version": 1, "client": "t"})
    assert reply["op"] == "hello_reply"


def ping(sock: socket.socket, request_id: int = 1) -> Message:
    return call(sock, {"op": "ping", "fds": 0, "id": request_id})


_NOBODY_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(60)
s.connect(sys.argv[1])
for msg in ({"op": "hello", "fds": 0, "id": 0, "version": 1, "client": "nobody"},
            {"op": "ping", "fds": 0, "id": 1}):
    s.send(json.dumps(msg).encode())
    print(s.recv(65536).decode(), flush=True)
"""


def ping_as_nobody(path: str) -> list[Message]:
    """hello + ping from another uid (system python: the venv may be unreadable to it)."""
    out = subprocess.run(
        ["/usr/bin/python3", "-c", _NOBODY_CLIENT, path],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        timeout=GUARD,
        check=True,
        text=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="connects as uid 65534 too")


# --------------------------------------------------------------------------- H1


def test_pipelining_client_that_never_reads_is_refused_and_bounded(
    tmp_path: Path, sockdir: str
) -> None:
    """H1: pings pipelined without reading: the daemon stops at max_inflight unsent
    replies, refuses the next 8 with limit_reached, closes, and holds at most its budget."""
    with fake_daemon(tmp_path, sockdir) as d, connect(d.path) as sock:
        hello(sock)
        rss_before = d.rss_kib()
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + GUARD
        while not d.events("connection.too_many_errors"):
            assert time.monotonic() < deadline, "the daemon never refused a request"
            try:
                sock.send(json.dumps({"op": "ping", "fds": 0, "id": sent + 1}).encode())
            except BlockingIOError:
                select.select([], [sock], [], 0.1)  # the daemon reads on, or has stopped
                continue
            sent += 1
        rss_during = d.rss_kib()
        sock.setblocking(True)
        sock.settimeout(GUARD)
        replies: list[Message] = []
        resets = 0
        while True:
            try:
                msg = recv(sock)
            except ConnectionResetError:
                # The daemon closed with our unread pings in its queue: the kernel sets
                # ECONNRESET on us (net/unix/af_unix.c, unix_release_sock), reported once
                # ahead of what is still queued (net/core/datagram.c checks sk_err first).
                resets += 1
                assert resets == 1
                continue
            if msg is None:
                break
            replies.append(msg)
        closed = d.wait_for("connection.closed")[-1]
    answered = sorted(r["id"] for r in replies if r["op"] == "ping_reply")
    errors = [r for r in replies if r["op"] == "error"]
    assert answered == list(range(1, len(answered) + 1))
    assert len(answered) < sent  # the rest was never read
    refusal = {
        "code": "limit_reached",
        "message": "too many requests in flight",
        "details": {"max_inflight": MAX_INFLIGHT},
    }
    assert [(e["id"], {k: e[k] for k in refusal}) for e in errors] == [
        (len(answered) + 1 + i, refusal) for i in range(8)
    ]
    assert closed["reason"] == "too_many_errors"
    # The stated budget: unsent output of one connection stays under
    # max_unsent_bytes + max_inflight replies of at most one datagram each.
    budget = ConnectionLimits().max_unsent_bytes + MAX_INFLIGHT * MAX_DATAGRAM
    assert closed["peak_unsent"] <= budget
    assert rss_during - rss_before < 16 * 1024, (rss_before, rss_during)


def test_large_replies_unread_pause_reading_instead_of_growing(
    tmp_path: Path, sockdir: str
) -> None:
    """H1: 150 list pages (~60 KB each) asked for without reading: the daemon stops
    reading once max_unsent_bytes wait, refuses nothing, and answers all as we drain."""
    budget = 64 * 1024
    with (
        fake_daemon(tmp_path, sockdir, devices=2000, max_unsent_bytes=budget) as d,
        connect(d.path) as sock,
    ):
        hello(sock)
        first = call(sock, {"op": "list_devices", "fds": 0, "id": 1, "offset": 1})
        assert len(json.dumps(first)) > 32 * 1024  # a big page, or this proves nothing
        requests = [
            json.dumps({"op": "list_devices", "fds": 0, "id": i, "offset": 1}).encode()
            for i in range(2, 152)
        ]

        def send_what_fits() -> None:
            sock.setblocking(False)
            try:
                while requests:
                    sock.send(requests[0])
                    requests.pop(0)
            except BlockingIOError:
                pass  # the daemon has stopped reading us: its socket buffer is full
            sock.settimeout(GUARD)

        send_what_fits()
        d.wait_for("connection.backpressure")
        replies: list[Message] = []
        while len(replies) < 150:
            reply = recv(sock)
            assert reply is not None
            replies.append(reply)
            send_what_fits()
        assert sorted(r["id"] for r in replies if r["op"] == "list_devices_reply") == list(
            range(2, 152)
        )
        sock.close()
        closed = d.wait_for("connection.closed")[-1]
    assert closed["errors"] == 0
    assert closed["peak_unsent"] <= budget + MAX_INFLIGHT * MAX_DATAGRAM


# --------------------------------------------------------------------------- H3


@needs_root
def test_idle_connections_of_one_uid_do_not_lock_out_another(tmp_path: Path, sockdir: str) -> None:
    """H3: 1,200 connections from root that never send a byte: 64 are served, the rest
    refused with limit_reached at once, and uid 65534 still gets in and is answered."""
    per_uid = ConnectionLimits().max_per_uid
    with fake_daemon(tmp_path, sockdir, hello_timeout=600.0) as d:
        fds_before = d.fds()
        socks = [connect(d.path) for _ in range(1200)]
        try:
            replies = ping_as_nobody(d.path)
            assert [r["op"] for r in replies] == ["hello_reply", "ping_reply"]
            # The nobody client was accepted after every one of ours (accept is FIFO),
            # so each refusal is in its socket by now; the served ones have nothing.
            refused = served = 0
            for s in socks:
                s.setblocking(False)
                try:
                    msg = recv(s)
                except BlockingIOError:
                    served += 1
                    continue
                assert msg == {
                    "op": "error",
                    "fds": 0,
                    "id": None,
                    "code": "limit_reached",
                    "message": "too many connections for this uid",
                    "details": {"max_connections_per_uid": per_uid},
                }
                refused += 1
            assert (served, refused) == (per_uid, 1200 - per_uid)
            # socket + pidfd per served connection, and nothing for the refused ones
            assert d.fds() - fds_before <= 2 * per_uid + 8
        finally:
            for s in socks:
                s.close()


def test_hello_deadline_and_idle_policy(tmp_path: Path, sockdir: str) -> None:
    """H3: no hello in time, or idle holding nothing: closed; subscribed or holding an
    IOAS: kept however long it is quiet."""
    with fake_daemon(tmp_path, sockdir, hello_timeout=0.5, idle_timeout=1.0) as d:
        silent = connect(d.path)
        idle = connect(d.path)
        hello(idle)
        ping(idle)
        subscriber = connect(d.path)
        hello(subscriber)
        assert call(subscriber, {"op": "subscribe", "fds": 0, "id": 1})["op"] == "subscribe_reply"
        holder = connect(d.path)
        hello(holder)
        assert call(holder, {"op": "ioas_create", "fds": 0, "id": 1})["op"] == "ioas_create_reply"
        assert recv(silent) is None  # EOF
        assert recv(idle) is None
        reasons = sorted(e["reason"] for e in d.wait_for("connection.closed", 2))
        assert reasons == ["hello_timeout", "idle_timeout"]
        # Quiet for longer than idle_timeout since their last request, and still served:
        d.wait_for("connection.idle_timeout")
        time.sleep(1.5)  # not a race: the policy may only ever keep these two
        assert ping(subscriber, 2)["op"] == "ping_reply"
        assert ping(holder, 2)["op"] == "ping_reply"
        assert len(d.events("connection.closed")) == 2
        for s in (silent, idle, subscriber, holder):
            s.close()


def test_fd_reserve_bounds_connections(tmp_path: Path, sockdir: str) -> None:
    """H3: with RLIMIT_NOFILE 300 and 100 fds kept back, (300-100) // (2+64) = 3
    connections are served; the 4th is refused, and the served ones still claim."""
    with fake_daemon(tmp_path, sockdir, nofile=300, fd_reserve=100) as d:
        served = [connect(d.path) for _ in range(3)]
        for s in served:
            hello(s)
        extra = connect(d.path)
        assert recv(extra) == {
            "op": "error",
            "fds": 0,
            "id": None,
            "code": "limit_reached",
            "message": "too many connections",
            "details": {"max_connections": 3},
        }
        assert recv(extra) is None
        claim = {"op": "claim", "fds": 0, "id": 1, "devices": ["0000:00:10.0"]}
        reply = call(served[0], claim)
        assert reply["op"] == "claim_reply", reply
        for s in (*served, extra):
            s.close()


# --------------------------------------------------------------------------- L1


def test_unencodable_inputs_get_error_replies(tmp_path: Path, sockdir: str) -> None:
    """L1: an unknown op with a lone surrogate and an unknown key of 65 KB are answered
    (escaped, cut); the log carries neither in full and no local variables."""
    with fake_daemon(tmp_path, sockdir) as d:
        sock = connect(d.path)
        hello(sock)
        sock.send(b'{"op":"\\ud800tele","fds":0,"id":5}')
        assert recv(sock) == {
            "op": "error",
            "fds": 0,
            "id": 5,
            "code": "unknown_op",
            "message": "unknown op",
            "details": {"op": "\\ud800tele"},
        }
        key = "k" * 65000
        sock.send(json.dumps({"op": "ping", "fds": 0, "id": 6, key: 1}).encode())
        reply = recv(sock)
        assert reply is not None
        assert reply["code"] == "bad_request"
        assert reply["details"]["errors"] == [
            {"loc": "k" * 256, "type": "extra_forbidden", "msg": "Extra inputs are not permitted"}
        ]
        assert ping(sock, 7)["op"] == "ping_reply"  # the connection survived both
        sock.close()
        d.wait_for("connection.closed")
    text = d.log.read_text()
    assert "k" * 2000 not in text
    assert '"locals"' not in text


# --------------------------------------------------------------------------- M1


def test_peers_that_leave_cost_no_further_work(tmp_path: Path, sockdir: str) -> None:
    """M1: 40 peers each ask for a first list page of a 2,000-device host and leave:
    their requests are cancelled, they share host reads instead of queueing 40, and a
    good client is answered afterwards."""
    with fake_daemon(tmp_path, sockdir, devices=2000) as d:
        reads_before = len(d.events("host.read_all"))
        for i in range(40):
            s = connect(d.path)
            hello(s)
            s.send(json.dumps({"op": "list_devices", "fds": 0, "id": i + 1}).encode())
            s.close()
        closed = d.wait_for("connection.closed", 40)
        good = connect(d.path)
        hello(good)
        reply = call(good, {"op": "claim", "fds": 0, "id": 1, "devices": ["0000:7f:00.0"]})
        assert reply["code"] == "not_found"
        reads = len(d.events("host.read_all")) - reads_before
        good.close()
    cancelled = sum(e["cancelled"] for e in closed)
    assert cancelled > 0
    assert reads <= 40 // 4, f"{reads} full host reads for 40 listings of peers that left"


# --------------------------------------------------------------------------- docs


def test_connection_limits_have_one_set_of_defaults_everywhere() -> None:
    """The config model, the server's defaults, the example config and PROTOCOL.md's
    table name the same values."""
    from iommud.config import ConnectionsConfig, load_config

    defaults = ConnectionLimits()
    assert ConnectionLimits(**ConnectionsConfig().model_dump()) == defaults
    example = load_config(REPO / "examples" / "iommud.toml").connections
    assert ConnectionLimits(**example.model_dump()) == defaults
    spec = (REPO / "protocol" / "PROTOCOL.md").read_text()
    for key in ConnectionsConfig.model_fields:
        assert f"| `{key}` |" in spec, key


def test_code_under_the_server_does_not_ask_for_its_task() -> None:
    """Requests run their first step inline in the connection's read loop (handler.py,
    ``_resume``), where asyncio.current_task() is the connection's task, not the
    request's: the broker and the kernel layer must not depend on it (asyncio.timeout
    does, at entry). A timeout there belongs in a task of its own."""
    offenders = [
        str(path.relative_to(REPO))
        for sub in ("broker", "kernel", "host", "watch")
        for path in (REPO / "iommud" / sub).rglob("*.py")
        if any(s in path.read_text() for s in ("asyncio.timeout(", "current_task("))
    ]
    assert offenders == []
