"""Guest side of the lab's QMP channel: issue QEMU monitor commands from inside the guest.

    from qmp_guest import qmp, wait_event
    qmp("device_add", driver="edu", bus="br1", addr="0x4", id="edu9")
    qmp("device_del", id="hotedu"); wait_event("DEVICE_DELETED", device="hotedu")

Requests are files in the directory named by $IOMMUD_LAB_QMP_DIR, which the lab runner
shares with the host, where lab/qmp_agent.py relays them to QEMU. Only usable inside a guest
booted by lab/labvm.py; it performs no other I/O.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

ENV_QMP_DIR = "IOMMUD_LAB_QMP_DIR"
POLL_SECONDS = 0.02

_pending_events: list[dict[str, Any]] = []


class QmpError(Exception):
    """QEMU (or the host agent) answered with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


def qmp_dir() -> Path:
    value = os.environ.get(ENV_QMP_DIR)
    if not value:
        raise RuntimeError(f"${ENV_QMP_DIR} is not set: not inside a lab guest")
    return Path(value)


def _request(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    directory = qmp_dir()
    rid = uuid.uuid4().hex
    tmp = directory / f"req-{rid}.tmp"
    tmp.write_text(json.dumps(request))
    os.rename(tmp, directory / f"req-{rid}.json")
    reply_path = directory / f"rep-{rid}.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = reply_path.read_text()
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no QMP reply from the host within {timeout}s") from None
            time.sleep(POLL_SECONDS)
            continue
        reply_path.unlink()
        reply: dict[str, Any] = json.loads(raw)
        return reply


def qmp(command: str, *, timeout: float = 60.0, **arguments: Any) -> Any:
    """Run one QMP command; return its "return" value (a JSON value), or raise QmpError."""
    reply = _request({"execute": command, "arguments": arguments}, timeout)
    if "error" in reply:
        raise QmpError(command, reply["error"])
    return reply.get("return")


def events() -> list[dict[str, Any]]:
    """QMP events QEMU sent since the last call (each once)."""
    reply = _request({"agent": "events"}, 60.0)
    if "error" in reply:
        raise QmpError("events", reply["error"])
    got: list[dict[str, Any]] = reply["return"]
    out = [*_pending_events, *got]
    _pending_events.clear()
    return out


def wait_event(name: str, *, timeout: float = 60.0, **data: Any) -> dict[str, Any]:
    """Wait for the QMP event `name` whose data contains `data`; other events stay queued."""
    deadline = time.monotonic() + timeout
    while True:
        seen = events()
        for i, event in enumerate(seen):
            ev_data = event.get("data", {})
            if event.get("event") == name and all(ev_data.get(k) == v for k, v in data.items()):
                _pending_events.extend(seen[:i] + seen[i + 1 :])
                return event
        _pending_events.extend(seen)
        if time.monotonic() > deadline:
            raise TimeoutError(f"QMP event {name} {data} not seen within {timeout}s")
        time.sleep(0.1)


class GuestQmp:
    """The `lab_qmp` fixture's value: `lab_qmp("query-pci")`, `.events()`, `.wait_event()`."""

    def __call__(self, command: str, *, timeout: float = 60.0, **arguments: Any) -> Any:
        return qmp(command, timeout=timeout, **arguments)

    def events(self) -> list[dict[str, Any]]:
        return events()

    def wait_event(self, name: str, *, timeout: float = 60.0, **data: Any) -> dict[str, Any]:
        return wait_event(name, timeout=timeout, **data)
