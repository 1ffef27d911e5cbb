"""Host side of the lab's QMP channel: a thread that runs QEMU monitor commands for the guest.

A test inside the guest cannot reach QEMU's monitor socket, but it can write files into the
per-run directory that the host shares with it. The guest (lab/qmp_guest.py) writes
`req-<id>.json` ({"execute": ..., "arguments": {...}} or {"agent": "events"}) into the QMP
dir; this agent picks it up, forwards it over QMP to QEMU's unix socket and writes the QMP
reply to `rep-<id>.json` (temp file + rename, so the guest never reads half a reply).
Asynchronous QMP events (DEVICE_DELETED ...) are queued; {"agent": "events"} drains them.

This module only relays: it has no policy about which commands are allowed (the guest is
our own test code) and it never touches files outside the QMP dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

POLL_SECONDS = 0.02
CONNECT_SECONDS = 30.0
COMMAND_SECONDS = 60.0


class QmpClientError(Exception):
    """The QMP connection failed (QEMU gone, socket missing, garbage on the wire)."""


class QmpClient:
    """A minimal synchronous QMP client (one command at a time, events queued)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpClientError(f"cannot connect to {self._path}: {exc}") from exc
                time.sleep(0.1)
        self._sock = sock
        self._buf = b""
        greeting = self._read_message(COMMAND_SECONDS)
        if "QMP" not in greeting:
            raise QmpClientError(f"unexpected QMP greeting: {greeting}")
        self._command({"execute": "qmp_capabilities"})
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_message(self, timeout: float) -> dict[str, Any]:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpClientError("timed out waiting for QEMU's reply")
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                continue
            chunk = self._sock.recv(65536)
            if not chunk:
                self.close()
                raise QmpClientError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QmpClientError(f"garbage from QMP: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise QmpClientError(f"non-object from QMP: {line[:200]!r}")
        return msg

    def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self._read_message(COMMAND_SECONDS)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command; return QEMU's reply ({"return": ...} or {"error": ...})."""
        self._connect()
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        return self._command(request)

    def drain_events(self) -> list[dict[str, Any]]:
        """Read whatever events QEMU has sent without blocking; return and forget the queue."""
        sock = self._connect()
        while True:
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready and b"\n" not in self._buf:
                break
            msg = self._read_message(1.0)
            if "event" in msg:
                self.events.append(msg)
        events, self.events = self.events, []
        return events


class QmpAgent:
    """Serves the guest's QMP request files until stopped (a daemon thread)."""

    def __init__(self, socket_path: Path, request_dir: Path) -> None:
        self._client = QmpClient(socket_path)
        self._dir = request_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="qmp-agent", daemon=True)
        self.served = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def _serve(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                names = sorted(n for n in os.listdir(self._dir) if n.startswith("req-"))
            except FileNotFoundError:
                return
            for name in names:
                if not name.endswith(".json"):
                    continue  # a request still being written (the guest renames when done)
                self._handle(name)

    def handle_request(self, request: object) -> dict[str, Any]:
        """One request object in, one reply object out (never raises)."""
        if not isinstance(request, dict):
            return _agent_error("request is not a JSON object")
        try:
            if request.get("agent") == "events":
                return {"return": self._client.drain_events()}
            command = request.get("execute")
            arguments = request.get("arguments") or {}
            if not isinstance(command, str) or not isinstance(arguments, dict):
                return _agent_error(f"bad request: {request!r}")
            return self._client.execute(command, arguments)
        except (QmpClientError, OSError) as exc:
            self._client.close()
            return _agent_error(str(exc))

    def _handle(self, name: str) -> None:
        req_path = self._dir / name
        rep_id = name[len("req-") : -len(".json")]
        try:
            raw = req_path.read_text()
            req_path.unlink()
        except OSError:
            return
        try:
            request: object = json.loads(raw)
        except ValueError:
            reply = _agent_error(f"request is not JSON: {raw[:200]!r}")
        else:
            reply = self.handle_request(request)
        tmp = self._dir / f"rep-{rep_id}.tmp"
        tmp.write_text(json.dumps(reply))
        with contextlib.suppress(OSError):
            os.replace(tmp, self._dir / f"rep-{rep_id}.json")
        self.served += 1


def _agent_error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "AgentError", "desc": desc}}
