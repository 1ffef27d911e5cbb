"""The server and client library in front of the real Broker on the fake kernel.

The lab topology (tests/fakesys.py) as a fake sysfs tree; group 3 holds the lone edu
device 0000:00:10.0. The test process is the client, so SO_PEERCRED gives the broker
this process's uid and pid.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from iommud.client import AsyncClient, MapSpec
from iommud.errors import BadRequestError, BusyError, InvalidRangeError
from tests.broker.support import EDU, PAGE, memfd
from tests.serving import served_broker


@pytest.fixture
async def served(tmp_path: Path, sockdir: str) -> AsyncIterator[tuple[str, Broker]]:
    """A started Broker behind the real server; checks the fd count after shutdown."""
    async with served_broker(tmp_path, sockdir, sysfs_timeout=1.0) as pair:
        yield pair


async def test_claim_map_unmap_release(served: tuple[str, Broker]) -> None:
    path, _ = served
    ram = memfd(4 * PAGE, data=b"guest")
    try:
        async with await AsyncClient.connect(path, "vmm") as client:
            with await client.claim([EDU]) as lease:
                assert [d.bdf for d in lease.devices] == [EDU]
                assert not lease.devices[0].fd.closed
                status = await client.status()
                assert [(x.uid, x.pid) for x in status.leases] == [(os.getuid(), os.getpid())]
                mapped = await client.ioas_map(lease.ioas_id, [MapSpec(ram, 0, 2 * PAGE)])
                assert [x.length for x in mapped] == [2 * PAGE]
                with pytest.raises(InvalidRangeError):
                    await client.ioas_map(lease.ioas_id, [MapSpec(ram, 1, PAGE)])
                assert await client.ioas_unmap(lease.ioas_id, mapped[0].iova, 2 * PAGE) == 2 * PAGE
                await client.release(lease.lease_id)
    finally:
        os.close(ram)


async def test_second_client_gets_busy_until_first_disconnects(served: tuple[str, Broker]) -> None:
    """Busy names the holder; closing the holder's connection releases the group."""
    path, _ = served
    first = await AsyncClient.connect(path, "first")
    (await first.claim([EDU])).close()  # the device fd is ours to drop; the lease stays
    async with await AsyncClient.connect(path, "second") as second:
        with pytest.raises(BusyError) as info:
            await second.claim([EDU])
        assert info.value.details["pid"] == os.getpid()
        await first.aclose()
        for _ in range(100):
            try:
                lease = await second.claim([EDU])
            except BusyError:
                await asyncio.sleep(0.02)
            else:
                with lease:
                    assert lease.devices[0].bdf == EDU
                break
        else:
            pytest.fail("the group was never released after the holder disconnected")


async def test_unsealed_fd_is_bad_request_that_never_closes_the_connection(
    served: tuple[str, Broker],
) -> None:
    """An ioas_map fd that is not a sealed memfd is the broker's bad_request (reason
    not_sealed), not invalid_range; more than 8 of them leave the connection open."""
    path, _ = served
    ram = memfd(PAGE, seal=False)
    try:
        async with await AsyncClient.connect(path, "vmm") as client:
            with await client.claim([EDU]) as lease:
                for _ in range(10):
                    with pytest.raises(BadRequestError) as info:
                        await client.ioas_map(lease.ioas_id, [MapSpec(ram, 0, PAGE)])
                    assert info.value.details == {
                        "range": 0,
                        "fd_index": 0,
                        "reason": "not_sealed",
                        "seals": 0,
                        "required": "F_SEAL_SHRINK",
                    }
                await client.ping()
                await client.release(lease.lease_id)
    finally:
        os.close(ram)


async def test_over_the_socket_a_bad_map_is_refused_and_the_client_goes_on(
    served: tuple[str, Broker],
) -> None:
    """End to end: the refused map never reaches the daemon; the lease and the
    connection are fine, and a good map of the same memfd works after it."""
    ram = memfd(4 * PAGE)
    try:
        async with await AsyncClient.connect(served[0], "vmm") as client:
            with await client.claim([EDU]) as lease:
                with pytest.raises(BadRequestError, match=r"ranges\.0\.offset"):
                    await client.ioas_map(lease.ioas_id, [MapSpec(ram, -PAGE, PAGE)])
                bad = MapSpec(str(ram), 0, PAGE)  # type: ignore[arg-type]
                with pytest.raises(BadRequestError, match="range 0: fd must be"):
                    await client.ioas_map(lease.ioas_id, [bad])
                mapped = await client.ioas_map(lease.ioas_id, [MapSpec(ram, 0, PAGE)])
                assert [x.length for x in mapped] == [PAGE]
                await client.ping()
    finally:
        os.close(ram)
