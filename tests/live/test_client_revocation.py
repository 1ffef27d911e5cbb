"""The client library on lease_revoked (host test, no VM): the claim's device fds close
as soon as the client reads the event, in the async and the blocking client alike.

The real Broker on the fake kernel and the lab tree (group 3: the lone edu
0000:00:10.0) behind the real server on a real AF_UNIX socket; the broker revokes the
group as ``iommuctl revoke`` or a violation would.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.client import AsyncClient, Client
from iommud.protocol import messages as m
from tests.broker.support import EDU
from tests.serving import served_broker


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, Broker]]:
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="iommud-r")
    try:
        async with served_broker(tmp_path, sockdir) as pair:
            yield pair
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


async def test_async_client_closes_a_revoked_claims_fds(served: tuple[str, Broker]) -> None:
    path, broker = served
    async with await AsyncClient.connect(path, "vmm") as client:
        result = await client.claim([EDU])
        assert client.lease(result.lease_id) is result
        fd = result.devices[0].fd
        assert not fd.closed
        await broker.revoke_group(result.group_id, "test says so")
        async with asyncio.timeout(5):
            ev = await anext(client.events())
        assert isinstance(ev, m.LeaseRevoked)
        assert (ev.lease_id, ev.reason) == (result.lease_id, "test says so")
        assert fd.closed
        assert result.revoked == "test says so"
        assert client.lease(result.lease_id) is None
        await client.release(result.lease_id)


async def test_blocking_client_closes_on_reading_the_event(served: tuple[str, Broker]) -> None:
    """The blocking client reads events only inside calls: the fd closes on that read."""
    path, broker = served

    def claim() -> tuple[Client, int, int]:
        c = Client(path, "vmm-sync")
        r = c.claim([EDU])
        return c, r.lease_id, r.group_id

    client, lease_id, gid = await asyncio.to_thread(claim)
    try:
        result = client.lease(lease_id)
        assert result is not None
        fd = result.devices[0].fd
        await broker.revoke_group(gid, "again")
        assert not fd.closed  # not read yet
        ev = await asyncio.to_thread(client.next_event, 5.0)
        assert isinstance(ev, m.LeaseRevoked)
        assert fd.closed
        assert result.revoked == "again"
        await asyncio.to_thread(client.release, lease_id)
    finally:
        client.close()


async def test_release_forgets_the_claim_and_leaves_fds_to_the_caller(
    served: tuple[str, Broker],
) -> None:
    path, _ = served
    async with await AsyncClient.connect(path, "vmm") as client:
        result = await client.claim([EDU])
        await client.release(result.lease_id)
        assert client.lease(result.lease_id) is None
        assert not result.devices[0].fd.closed  # still the caller's to close
        result.close()
