"""Fds that arrive with a reply are closed on every path of both clients.

A scripted stand-in daemon (a thread on a real SEQPACKET socket, real memfds over
SCM_RIGHTS) answers hello and then each request as the test says. ``OwnedFd.__del__``
is switched off (``strict_fds``) so that an fd the client forgets stays open and the
/proc/self/fd count sees it, instead of the garbage collector tidying up.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iommud.client import AsyncClient, Client, ClientClosedError
from iommud.fds import OwnedFd
from iommud.protocol import messages as m
from iommud.protocol.codec import encode
from iommud.protocol.limits import DEFAULT_LIMITS
from iommud.transport import rights
from tests.serving import FdSnapshot

EDU = "0000:00:10.0"
HANG_UP = (b"", -1)
Answer = Callable[[dict[str, Any]], tuple[bytes, int] | None]


class ScriptedDaemon:
    """Accepts one client, answers its hello, then each request with ``answer(request)``:
    the datagram and how many fresh memfds to attach (None: no answer; HANG_UP: close)."""

    def __init__(self, path: str, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        self.sent = threading.Semaphore(0)  # released once per answer, after its fds closed
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while data := conn.recv(65536):
                request = json.loads(data)
                if request["op"] == "hello":
                    reply = m.HelloReply(
                        id=request["id"],
                        version=1,
                        server="scripted",
                        capabilities=(),
                        limits=DEFAULT_LIMITS,
                    )
                    conn.send(encode(reply)[0])
                    continue
                answer = self.answer(request)
                if answer is None:
                    continue
                if answer == HANG_UP:
                    return
                out, nfds = answer
                memfds = [os.memfd_create("reply", os.MFD_CLOEXEC) for _ in range(nfds)]
                try:
                    conn.sendmsg([out], rights(memfds))
                finally:
                    for fd in memfds:
                        os.close(fd)
                self.sent.release()

    def answered(self) -> None:
        """Wait until an answer left and the daemon closed its copies of the memfds."""
        assert self.sent.acquire(timeout=30)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


@pytest.fixture
def strict_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaked OwnedFd stays open (no closing by the garbage collector)."""
    monkeypatch.setattr(OwnedFd, "__del__", lambda self: None)


@pytest.fixture
def scripted() -> Iterator[Callable[[Answer], ScriptedDaemon]]:
    """Starts ScriptedDaemons on sockets in a short temp dir."""
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="iommud-t")
    daemons: list[ScriptedDaemon] = []

    def start(answer: Answer) -> ScriptedDaemon:
        daemon = ScriptedDaemon(str(Path(sockdir) / f"s{len(daemons)}.sock"), answer)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()
    shutil.rmtree(sockdir, ignore_errors=True)


def ping_reply_with_fds(request: dict[str, Any]) -> tuple[bytes, int]:
    """A ping_reply that says fds 0 and comes with two: the daemon broke the protocol."""
    return encode(m.PingReply(id=request["id"]))[0], 2


def claim_reply(request: dict[str, Any]) -> tuple[bytes, int]:
    reply = m.ClaimReply(
        id=request["id"],
        lease_id=1,
        group_id=4,
        backend=m.BackendKind.IOMMUFD,
        ioas_id=1,
        devices=(m.ClaimedDevice(bdf=EDU, fd_index=0, devid=1),),
    )
    return encode(reply)[0], 1


@pytest.mark.usefixtures("strict_fds")
def test_sync_client_closes_fds_of_a_reply_that_breaks_the_protocol(
    scripted: Callable[[Answer], ScriptedDaemon],
) -> None:
    """Checked while the error (and so every frame that saw the fds) is still alive."""
    daemon = scripted(ping_reply_with_fds)
    with Client(daemon.path, "t") as client:
        before = FdSnapshot.take()
        with pytest.raises(ClientClosedError, match="daemon broke the protocol") as info:
            client.ping()
        daemon.answered()
        assert info.value.__traceback__ is not None  # the frames that held the fds live on
        assert_none_opened(before)  # (the connection itself is closed now)


@pytest.mark.usefixtures("strict_fds")
def test_sync_client_claim_fds_are_owned_by_the_result(
    scripted: Callable[[Answer], ScriptedDaemon],
) -> None:
    daemon = scripted(claim_reply)
    with Client(daemon.path, "t") as client:
        before = FdSnapshot.take()
        result = client.claim([EDU])
        daemon.answered()
        before.assert_unchanged(opened=1)
        result.close()
        before.assert_unchanged()


@pytest.mark.usefixtures("strict_fds")
async def test_async_client_closes_fds_of_a_reply_that_breaks_the_protocol(
    scripted: Callable[[Answer], ScriptedDaemon],
) -> None:
    daemon = scripted(ping_reply_with_fds)
    async with await AsyncClient.connect(daemon.path, "t") as client:
        before = FdSnapshot.take()
        with pytest.raises(ClientClosedError, match="daemon broke the protocol"):
            await client.ping()
        daemon.answered()
        before.assert_unchanged()
        with pytest.raises(ClientClosedError):
            await client.ping()


@pytest.mark.usefixtures("strict_fds")
async def test_async_client_closes_fds_of_a_reply_to_a_cancelled_call(
    scripted: Callable[[Answer], ScriptedDaemon],
) -> None:
    """The claim is cancelled before its reply comes: the reader closes the reply's fds."""
    release = threading.Event()

    def late_claim(request: dict[str, Any]) -> tuple[bytes, int]:
        if request["op"] == "claim":
            release.wait(30)
            return claim_reply(request)
        return encode(m.PingReply(id=request["id"]))[0], 0

    daemon = scripted(late_claim)
    async with await AsyncClient.connect(daemon.path, "t") as client:
        before = FdSnapshot.take()
        task = asyncio.create_task(client.claim([EDU]))
        await asyncio.sleep(0)  # the claim is sent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await client.ping()  # answered after the claim's reply: that one was read
        daemon.answered()
        daemon.answered()
        before.assert_unchanged()


@pytest.mark.usefixtures("strict_fds")
async def test_async_client_closes_fds_of_a_reply_that_came_as_the_call_was_cancelled(
    scripted: Callable[[Answer], ScriptedDaemon],
) -> None:
    """The reply is handed to the call, and the call is cancelled before it resumes."""
    daemon = scripted(claim_reply)
    loop = asyncio.get_running_loop()
    async with await AsyncClient.connect(daemon.path, "t") as client:
        before = FdSnapshot.take()
        task = asyncio.create_task(client.claim([EDU]))
        await asyncio.sleep(0)  # the claim is sent
        # Block the loop until the reply is queued, then let one loop iteration run the
        # reader (it hands the reply to the call) before the cancel, which is queued
        # from inside that iteration and so runs in the next, ahead of the call's resume.
        assert select.select([client_fd(client)], [], [], 30)[0]
        loop.call_soon(lambda: loop.call_soon(task.cancel))
        with pytest.raises(asyncio.CancelledError):
            await task
        daemon.answered()
        before.assert_unchanged()


async def test_async_client_stops_reading_when_the_daemon_goes(
    scripted: Callable[[Answer], ScriptedDaemon],
) -> None:
    """A waiting call fails with the reason and the loop no longer watches the socket."""
    daemon = scripted(lambda _request: HANG_UP)
    async with await AsyncClient.connect(daemon.path, "t") as client:
        with pytest.raises(ClientClosedError, match="daemon closed the connection"):
            await client.ping()
        assert asyncio.get_running_loop().remove_reader(client_fd(client)) is False


def assert_none_opened(before: FdSnapshot) -> None:
    now = FdSnapshot.take()
    assert now.fds.keys() <= before.fds.keys(), f"fd leak: {before.changes(now)}"


def client_fd(client: AsyncClient) -> int:
    return client._sock.fileno()
