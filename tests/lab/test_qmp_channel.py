"""The QMP channel on the host: qmp_guest -> request files -> QmpAgent -> a fake QMP server.

The fake server speaks QMP on a real unix socket (greeting, qmp_capabilities, replies,
asynchronous events), so the agent's framing and the guest API run for real; only QEMU
is missing. The real thing is exercised by the vm smoke test in the guest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qmp_guest
from qmp_agent import QmpAgent
from qmp_guest import GuestQmp, QmpError


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeQemu:
    """A QMP server on a unix socket: knows device_del (emits DEVICE_DELETED) and query-status."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[dict[str, Any]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(0.05)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
                break
            except TimeoutError:
                if self._closing.is_set():
                    return
        conn.settimeout(None)
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            f.flush()
            for line in f:
                msg = json.loads(line)
                self.received.append(msg)
                for reply in self._answer(msg):
                    f.write(json.dumps(reply).encode() + b"\r\n")
                f.flush()

    def _answer(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        cmd = msg["execute"]
        args = msg.get("arguments", {})
        if cmd == "qmp_capabilities":
            return [{"return": {}}]
        if cmd == "query-status":
            return [{"return": {"status": "running", "running": True}}]
        if cmd == "device_del" and args.get("id") in ("hotedu", "edu9"):
            # QEMU emits the event after the reply, and events may interleave.
            return [
                {"event": "NOISE", "data": {}},
                {"return": {}},
                {"event": "DEVICE_DELETED", "data": {"device": args["id"], "path": "/x"}},
            ]
        if cmd == "device_del":
            return [
                {"error": {"class": "DeviceNotFound", "desc": f"Device '{args['id']}' not found"}}
            ]
        return [
            {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
        ]

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)  # ends once the agent has hung up
        self._server.close()


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeQemu, QmpAgent, Path]]:
    """A short temp dir (unix socket paths are limited to 108 bytes) with qmp.sock and qmp/."""
    base = Path(tempfile.mkdtemp(prefix="qmpt-"))
    (base / "qmp").mkdir()
    qemu = FakeQemu(base / "qmp.sock")
    agent = QmpAgent(base / "qmp.sock", base / "qmp")
    agent.start()
    monkeypatch.setenv("IOMMUD_LAB_QMP_DIR", str(base / "qmp"))
    monkeypatch.setattr(qmp_guest, "_pending_events", [])
    try:
        yield qemu, agent, base
    finally:
        agent.stop()
        qemu.close()
        shutil.rmtree(base)


def test_command_round_trip(channel: tuple[FakeQemu, QmpAgent, Path]) -> None:
    qemu, agent, base = channel
    assert qmp_guest.qmp("query-status") == {"status": "running", "running": True}
    assert qemu.received == [{"execute": "qmp_capabilities"}, {"execute": "query-status"}]
    assert os.listdir(base / "qmp") == []  # request and reply files are consumed
    assert agent.served == 1


def test_error_reply_raises_with_qemu_class_and_desc(
    channel: tuple[FakeQemu, QmpAgent, Path],
) -> None:
    with pytest.raises(QmpError) as err:
        qmp_guest.qmp("device_del", id="nope")
    assert (err.value.command, err.value.error_class, err.value.desc) == (
        "device_del",
        "DeviceNotFound",
        "Device 'nope' not found",
    )


def test_events_are_queued_and_wait_event_keeps_the_others(
    channel: tuple[FakeQemu, QmpAgent, Path],
) -> None:
    """Events that arrive around a reply are kept; wait_event takes only its match."""
    lab_qmp = GuestQmp()
    assert lab_qmp("device_del", id="edu9") == {}
    assert lab_qmp("device_del", id="hotedu") == {}
    event = lab_qmp.wait_event("DEVICE_DELETED", device="hotedu", timeout=5)
    assert event["data"] == {"device": "hotedu", "path": "/x"}
    rest = lab_qmp.events()
    assert [(e["event"], e["data"].get("device")) for e in rest] == [
        ("NOISE", None),
        ("DEVICE_DELETED", "edu9"),
        ("NOISE", None),
    ]
    assert lab_qmp.events() == []


def test_garbage_request_gets_agent_error(channel: tuple[FakeQemu, QmpAgent, Path]) -> None:
    _, _, base = channel
    (base / "qmp" / "req-x.tmp").write_text("{not json")
    os.rename(base / "qmp" / "req-x.tmp", base / "qmp" / "req-x.json")
    reply = _wait_reply(base / "qmp" / "rep-x.json")
    assert reply == {"error": {"class": "AgentError", "desc": "request is not JSON: '{not json'"}}


def test_missing_qemu_gives_agent_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no QMP socket the guest gets an AgentError (after the agent's connect timeout)."""
    import qmp_agent

    monkeypatch.setattr(qmp_agent, "CONNECT_SECONDS", 0.3)
    base = Path(tempfile.mkdtemp(prefix="qmpt-"))
    (base / "qmp").mkdir()
    before = fd_count()
    agent = QmpAgent(base / "absent.sock", base / "qmp")
    agent.start()
    monkeypatch.setenv("IOMMUD_LAB_QMP_DIR", str(base / "qmp"))
    try:
        with pytest.raises(QmpError) as err:
            qmp_guest.qmp("query-status", timeout=10)
    finally:
        agent.stop()
        shutil.rmtree(base)
    assert err.value.error_class == "AgentError"
    assert err.value.desc.startswith(f"cannot connect to {base}/absent.sock:")
    assert fd_count() == before


def test_agent_releases_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """After stop() the agent's QMP connection is closed: no fd left behind."""
    base = Path(tempfile.mkdtemp(prefix="qmpt-"))
    (base / "qmp").mkdir()
    before = fd_count()
    qemu = FakeQemu(base / "qmp.sock")
    agent = QmpAgent(base / "qmp.sock", base / "qmp")
    agent.start()
    monkeypatch.setenv("IOMMUD_LAB_QMP_DIR", str(base / "qmp"))
    try:
        qmp_guest.qmp("query-status")
        assert fd_count() == before + 3  # listener, and both ends of the QMP connection
    finally:
        agent.stop()
        qemu.close()
        shutil.rmtree(base)
    assert fd_count() == before


def test_guest_api_outside_a_guest_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMMUD_LAB_QMP_DIR", raising=False)
    with pytest.raises(RuntimeError, match=r"IOMMUD_LAB_QMP_DIR is not set"):
        qmp_guest.qmp("query-status")


def _wait_reply(path: Path) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 5
    while not path.exists():
        assert time.monotonic() < deadline, "no reply"
        time.sleep(0.02)
    reply: dict[str, Any] = json.loads(path.read_text())
    return reply
