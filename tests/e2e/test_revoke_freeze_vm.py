"""A revoke really blocks DMA on the iommufd path, even for a client that keeps a copy
of its device fd and re-attaches it itself (lab guest, real daemon, uid-1000 client).

The client's dup of the device fd stays bound to the session's iommufd until every
copy is closed, so after a revoke it can VFIO_DEVICE_ATTACH_IOMMUFD_PT the device to any
IOAS of that iommufd. The daemon therefore unmaps every IOAS there and refuses maps
until the lease is released and the device is unbound (iommud.broker.freeze): the
re-attached device's DMA does not land and the kernel logs a DMAR fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kmsg import Kmsg
from topology import EDU0

from iommud.client import Client
from tests.e2e.support import ClientProc, Daemon

pytestmark = pytest.mark.vm

MiB = 1 << 20
IOVA = 0x100000
SCRIPT = Path(__file__).resolve().parent / "revoke_client.py"
FROZEN = (
    "lease {lease} (IOMMU group {group}) was revoked: this session's iommufd takes no "
    "maps until that lease is released and every copy of its device fds is closed"
)


@pytest.fixture
def dodger(daemon: Daemon) -> Iterator[ClientProc]:
    c = ClientProc(daemon.socket, script=SCRIPT)
    yield c
    c.close()


def _map(c: ClientProc, ioas_id: int, buf: str) -> dict[str, Any]:
    return c.do(
        "map", ioas_id=ioas_id, ranges=[{"buf": buf, "offset": 0, "length": MiB, "iova": IOVA}]
    )


def test_reattached_revoked_device_gets_no_dma_until_it_is_gone(
    daemon: Daemon, dodger: ClientProc, kmsg: Kmsg
) -> None:
    """Revoke with two IOASes: after re-attaching its kept device fd to each of them the
    client's DMA faults; maps stay refused after release while the dup is open, and
    work again once it is closed."""
    c = dodger
    claim = c.ok("claim", devices=[EDU0])
    lease, group, a_id = claim["lease_id"], claim["group_id"], claim["ioas_id"]
    b_id = c.ok("ioas_create")["ioas_id"]
    for buf, ioas_id in (("frz-a", a_id), ("frz-b", b_id)):
        c.ok("memfd", name=buf, size=MiB)
        assert _map(c, ioas_id, buf)["ok"]
    rt = c.ok("dma_round_trip", bdf=EDU0, buf="frz-a", src=0, dst=0x1000)
    assert rt["exact"], rt
    c.ok("keep_dup", bdf=EDU0)

    with Client(daemon.socket, "e2e-admin") as admin:
        assert admin.revoke(group, "freeze test") == (lease,)

    # The kept device is still bound: the kernel lets it attach to the IOASes...
    attached = c.ok("attach_any", bdf=EDU0, max=32)
    assert attached["accepted"], attached
    # ...but wherever it sits, both IOASes were emptied: no DMA lands in A's or B's
    # buffer (before the freeze, B still mapped frz-b at IOVA).
    tried = []
    for pt_id in attached["accepted"]:
        if not c.ok("attach", bdf=EDU0, pt_id=pt_id)["attached"]:
            continue  # an auto-created HWPT that went away when the device moved on
        tried.append(pt_id)
        for buf in ("frz-a", "frz-b"):
            got = c.ok("dma_kept", bdf=EDU0, buf=buf, iova=IOVA + 0x2000, offset=0x2000)
            assert got == {"ok": True, "untouched": True, "nonzero": 0}, (pt_id, buf, got)
    assert tried, attached

    def blocked_write() -> None:
        got = c.ok("dma_kept", bdf=EDU0, buf="frz-b", iova=IOVA + 0x2000, offset=0x2000)
        assert got == {"ok": True, "untouched": True, "nonzero": 0}, got

    line = kmsg.expect_fault(
        blocked_write, lambda m: "DMAR" in m and f"fault addr {IOVA + 0x2000:#x}" in m
    )
    print(f"fault after re-attach: {line} (pt_ids accepted: {attached['accepted']})")
    frozen_msg = FROZEN.format(lease=lease, group=group)
    for ioas_id in (a_id, b_id):
        refused = _map(c, ioas_id, "frz-b")
        assert (refused["code"], refused["message"]) == ("revoked", frozen_msg), refused
        assert refused["details"] == {
            "lease_id": lease,
            "group_id": group,
            "reason": "freeze test",
            "waiting_for": "release",
            "devices": [EDU0],
            "ioas_id": ioas_id,
        }

    c.ok("release", lease_id=lease)
    still = _map(c, b_id, "frz-b")
    assert still["code"] == "revoked", still
    assert still["details"]["waiting_for"] == "device_fds_closed"
    c.ok("close_kept", bdf=EDU0)
    assert _map(c, b_id, "frz-b")["ok"]  # thawed: every copy of the device fd is gone
    assert c.ok("unmap", ioas_id=b_id, iova=IOVA, length=MiB)["unmapped"] == MiB
