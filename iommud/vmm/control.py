"""The control socket of a running ``iommuctl vm``: hotplug requests from ``vm-attach``.

``iommuctl vm --control PATH`` listens on a SOCK_SEQPACKET unix socket (mode 0600) and
answers one JSON datagram with one JSON datagram:

    {"op": "attach", "devices": ["0000:00:10.0"], "buses": ["rp1"], "ids": [null],
     "hold": []}
    {"ok": true, "lease_id": 3, "group_id": 10, "devices": [{"bdf": ..., "id": ...}],
     "claim_s": 0.02, "hotplug_s": 0.6}
    {"ok": false, "code": "busy", "message": "...", "details": {...}}

Only the launcher's own uid may connect (SO_PEERCRED; anyone else gets ``permission_denied``
and the connection closes): it spends that user's devices. Bounds: ``MAX_CONTROL_CLIENTS``
connections at once (more are closed at accept), ``MAX_CONTROL_DATAGRAM`` bytes a
request, ``MAX_ATTACH_DEVICES`` devices an attach; fds sent to it are closed unread.
``code`` is a daemon error code (the claim's) or one of ``bad_request``, ``qmp_error``,
``no_qmp``. This module parses and answers; the launcher does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from iommud.transport import peer_credentials, recv_datagram, send_datagram
from iommud.vmm.template import normalize_bdf

MAX_CONTROL_CLIENTS: Final = 4
MAX_CONTROL_DATAGRAM: Final = 16384
MAX_ATTACH_DEVICES: Final = 15  # a delegated claim with a fresh iommufd holds at most 15


class ControlError(Exception):
    """A refused control request: ``code`` and ``details`` go into the error reply."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True, slots=True)
class AttachRequest:
    """Hot-add ``devices`` (normalized BDFs); ``buses``/``ids`` per device, None = none;
    ``held``: claimed with them (their group's other devices), given to no one."""

    devices: tuple[str, ...]
    buses: tuple[str | None, ...]
    ids: tuple[str | None, ...]
    held: tuple[str, ...] = ()


def _optional_strings(raw: Any, n: int, what: str) -> tuple[str | None, ...]:
    if raw is None:
        return (None,) * n
    if not isinstance(raw, list) or len(raw) > n:
        raise ControlError("bad_request", f"{what} must be a list of at most {n} entries")
    if not all(x is None or isinstance(x, str) for x in raw):
        raise ControlError("bad_request", f"{what} entries must be strings or null")
    return tuple(raw) + (None,) * (n - len(raw))


def parse_request(data: bytes) -> AttachRequest:
    """One control datagram -> an ``AttachRequest``, or ``ControlError(bad_request)``."""
    try:
        req = json.loads(data)
    except ValueError as exc:
        raise ControlError("bad_request", f"not JSON: {exc}") from None
    if not isinstance(req, dict) or req.get("op") != "attach":
        raise ControlError("bad_request", 'expected {"op": "attach", ...}')
    unknown = set(req) - {"op", "devices", "buses", "ids", "hold"}
    if unknown:
        raise ControlError("bad_request", f"unknown keys {sorted(unknown)}")
    devices = _bdf_list(req.get("devices"), [])
    held = _bdf_list(req.get("hold") or [], devices) if req.get("hold") else []
    if not devices or len(devices) + len(held) > MAX_ATTACH_DEVICES:
        raise ControlError("bad_request", f"devices: 1 to {MAX_ATTACH_DEVICES} BDFs (with hold)")
    n = len(devices)
    return AttachRequest(
        tuple(devices),
        _optional_strings(req.get("buses"), n, "buses"),
        _optional_strings(req.get("ids"), n, "ids"),
        tuple(held),
    )


def _bdf_list(raw: Any, taken: list[str]) -> list[str]:
    if not isinstance(raw, list) or len(raw) > MAX_ATTACH_DEVICES:
        raise ControlError("bad_request", f"a list of at most {MAX_ATTACH_DEVICES} BDFs")
    out: list[str] = []
    for text in raw:
        bdf = normalize_bdf(text) if isinstance(text, str) else None
        if bdf is None or bdf in out or bdf in taken:
            raise ControlError("bad_request", f"bad or repeated device {text!r}")
        out.append(bdf)
    return out


Handler = Callable[[AttachRequest], Awaitable[dict[str, Any]]]


class ControlServer:
    """Listens on ``path`` and runs ``handler`` per request (one connection = one task)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._clients: set[asyncio.Task[None]] = set()
        old = os.umask(0o177)  # the socket file is 0600 from birth
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                self._sock.bind(path)
            except BaseException:
                self._sock.close()
                raise
        finally:
            os.umask(old)
        self._sock.listen(MAX_CONTROL_CLIENTS)
        self._sock.setblocking(False)
        self._task: asyncio.Task[None] = asyncio.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            if len(self._clients) >= MAX_CONTROL_CLIENTS:
                conn.close()
                continue
            task = asyncio.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            if peer_credentials(conn).uid != os.getuid():
                reply = _error(ControlError("permission_denied", "not the launcher's user"))
                await send_datagram(conn, reply, [])
                return
            while True:
                dgram = await recv_datagram(conn, MAX_CONTROL_DATAGRAM, 4)
                if dgram is None:
                    return
                dgram.fds.close()  # nothing here takes fds
                data = dgram.data if dgram.is_clean else b""  # oversized: bad_request
                try:
                    answer = {"ok": True, **await self._handler(parse_request(data))}
                    out = json.dumps(answer).encode()
                except ControlError as exc:
                    out = _error(exc)
                await send_datagram(conn, out, [])

    async def aclose(self) -> None:
        self._task.cancel()
        for task in list(self._clients):
            task.cancel()
        for task in (self._task, *self._clients):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a directory entry: no I/O worth a thread


def _error(exc: ControlError) -> bytes:
    return json.dumps(
        {"ok": False, "code": exc.code, "message": exc.message, "details": exc.details}
    ).encode()


async def request(path: str, req: dict[str, Any]) -> dict[str, Any]:
    """Send one request to a launcher's control socket; its JSON answer (an object)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with sock:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        await send_datagram(sock, json.dumps(req).encode(), [])
        dgram = await recv_datagram(sock, 1 << 20, 0)
    if dgram is None:
        raise ConnectionResetError(f"the launcher at {path} closed the connection")
    dgram.fds.close()
    answer = json.loads(dgram.data)
    if not isinstance(answer, dict):
        raise TypeError("the launcher answered something that is not an object")
    return answer
