"""Live viability in the lab guest: the real daemon's uevent watcher, bind guard,
revocation and hot-unplug, seen through ``iommuctl monitor --json`` and uid-1000 clients.

Guest topology (lab/README.md): the bridge group holds 00:11.0 (bridge), 01:01.0 and
01:02.0 (edu) and 01:03.0 (e1000, bound at boot); 00:10.0 (edu) and 02:00.0 (hotedu,
behind root port rp1) are alone in their groups. Every test leaves the guest as it
booted (conftest ``restored``). Latencies are printed into the lab's batch log.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kmsg import Kmsg
from topology import EDU0, EDU1, HOTEDU, NIC

from iommud.broker.core import DEVICE_REQUESTED
from tests.e2e.support import USER, driver_of, wait_until
from tests.live.support import (
    PCI,
    LiveClient,
    LiveDaemon,
    Monitor,
    group_of,
    override_of,
    percentile,
    sysfs_write,
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("restored")]

MiB = 1 << 20
IOVA = 0x100000
ROUNDS = 12
Spawn = Callable[..., LiveClient]


def _is(event: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev["event"] == event and all(ev.get(k) == v for k, v in fields.items())


def _strip(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in ("ts", "seq", "op", "fds")}


def _report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\nLIVE {text}", flush=True)


def _ms(samples: list[float]) -> str:
    return (
        f"n={len(samples)} p50 {percentile(samples, 0.5) * 1e3:.1f} ms, "
        f"p99 {percentile(samples, 0.99) * 1e3:.1f} ms"
    )


def _map_and_dma(c: LiveClient, bdf: str, ioas_id: int, buf: str) -> None:
    c.ok("memfd", name=buf, size=MiB)
    rng = {"buf": buf, "offset": 0, "length": MiB, "iova": IOVA}
    c.ok("map", ioas_id=ioas_id, ranges=[rng])
    rt = c.ok("dma_round_trip", bdf=bdf, buf=buf, src=0, dst=0x1000)
    assert rt["exact"], rt


def test_monitor_shows_unbind_bind_and_viability_with_latency(
    daemon: LiveDaemon, monitor: Monitor, capsys: pytest.CaptureFixture[str]
) -> None:
    """e1000 unbound and rebound 12 times: monitor shows each driver event and the
    bridge group's viability flipping; latency from the sysfs write to the line."""
    status = json.loads(daemon.iommuctl("status", "--json").stdout)
    assert status["event_source"] in ("udev", "kernel")
    gid = group_of(NIC)
    to_event: list[float] = []
    to_viability: list[float] = []
    for _ in range(ROUNDS):
        mark = monitor.mark()
        t0 = time.perf_counter()
        assert sysfs_write(PCI / "drivers" / "e1000" / "unbind", NIC) is None
        t1, ev = monitor.wait_for(_is("driver_unbound", bdf=NIC), mark)
        t2, via = monitor.wait_for(_is("viability_changed", group_id=gid), mark)
        assert _strip(ev) == {"event": "driver_unbound", "bdf": NIC, "driver": "e1000",
                              "group_id": gid}  # fmt: skip
        assert (via["is_viable"], via["offenders"]) == (True, [])
        to_event.append(t1 - t0)
        to_viability.append(t2 - t0)

        mark = monitor.mark()
        t0 = time.perf_counter()
        assert sysfs_write(PCI / "drivers" / "e1000" / "bind", NIC) is None
        t1, ev = monitor.wait_for(_is("driver_bound", bdf=NIC), mark)
        t2, via = monitor.wait_for(_is("viability_changed", group_id=gid), mark)
        assert _strip(ev) == {"event": "driver_bound", "bdf": NIC, "driver": "e1000",
                              "group_id": gid}  # fmt: skip
        assert (via["is_viable"], via["offenders"]) == (False, [{"bdf": NIC, "driver": "e1000"}])
        to_event.append(t1 - t0)
        to_viability.append(t2 - t0)
    src = status["event_source"]
    _report(capsys, f"monitor latency ({src} source) sysfs write -> bind/unbind line: "
                    f"{_ms(to_event)}")  # fmt: skip
    _report(capsys, f"monitor latency ({src} source) sysfs write -> viability line: "
                    f"{_ms(to_viability)}")  # fmt: skip


def test_bind_on_the_owned_bridge_group_is_refused_and_reported(
    daemon: LiveDaemon, monitor: Monitor, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    """A uid-1000 client owns the bridge group (e1000 moved to vfio-pci by the daemon):
    writing the NIC to drivers/e1000/bind fails (pinned override: ENODEV) with no
    uevent, the guard reports it as bind_refused, and the client's DMA keeps working."""
    gid = group_of(NIC)
    c = spawn()
    claim = c.ok("claim", devices=[EDU1])
    assert (claim["backend"], claim["group_id"]) == ("legacy", gid)
    assert driver_of(NIC) == "vfio-pci"
    assert override_of(NIC) == "vfio-pci"
    _map_and_dma(c, EDU1, claim["ioas_id"], "live-bind")

    mark = monitor.mark()
    t0 = time.perf_counter()
    assert sysfs_write(PCI / "drivers" / "e1000" / "bind", NIC) == errno.ENODEV
    t1, ev = monitor.wait_for(_is("bind_refused", bdf=NIC), mark)
    assert _strip(ev) == {
        "event": "bind_refused",
        "bdf": NIC,
        "driver": "e1000",
        "group_id": gid,
        "reason": f"a write to {PCI / 'drivers' / 'e1000' / 'bind'} was refused: "
        f"driver_override of {NIC} is pinned to vfio-pci while IOMMU group {gid} is owned",
    }
    _report(capsys, f"refused bind -> bind_refused line: {(t1 - t0) * 1e3:.1f} ms")
    assert [r["bdf"] for r in daemon.log_events("guard.bind_refused")][-1:] == [NIC]

    # drivers_probe of a device already on vfio-pci is accepted and changes nothing.
    probe = sysfs_write(PCI / "drivers_probe", NIC)
    _report(capsys, f"drivers_probe of the owned NIC -> {errno.errorcode.get(probe or 0, 'ok')}")
    assert driver_of(NIC) == "vfio-pci"
    rt = c.ok("dma_round_trip", bdf=EDU1, buf="live-bind", src=0x2000, dst=0x3000)
    assert rt["exact"], rt
    time.sleep(0.3)
    assert not [e for e in monitor.events(mark) if e["event"] == "lease_revoked"]
    c.ok("forget_device", bdf=EDU1)
    c.ok("release", lease_id=claim["lease_id"])
    assert wait_until(lambda: driver_of(NIC) == "e1000", 10.0) is not None


def _echo(path: Path, value: str) -> int | None:
    """Write like a shell's ``echo value > path``: open(2) with O_TRUNC, then write."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        return exc.errno
    return None


@pytest.mark.parametrize("writer", [sysfs_write, _echo], ids=["write", "echo"])
def test_bind_after_root_clears_the_override_and_unbinds_is_reported(
    daemon: LiveDaemon,
    monitor: Monitor,
    spawn: Spawn,
    writer: Callable[[Path, str], int | None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """F2: root clears the owned NIC's driver_override and unbinds vfio-pci, then tries
    e1000: the kernel refuses, bind_refused names the NIC every time, whether the write
    came as a plain write or as a shell's O_TRUNC open, and the override is re-pinned."""
    gid = group_of(NIC)
    unattributed = len(daemon.log_events("guard.bind_attempt_unattributed"))
    c = spawn()
    claim = c.ok("claim", devices=[EDU1])
    assert (claim["backend"], driver_of(NIC)) == ("legacy", "vfio-pci")
    t_refused: list[float] = []
    for attempt in range(3):
        mark = monitor.mark()
        assert writer(PCI / "devices" / NIC / "driver_override", "\n") is None
        if driver_of(NIC) == "vfio-pci":
            assert writer(PCI / "drivers" / "vfio-pci" / "unbind", NIC) is None
        t0 = time.perf_counter()
        refused = writer(PCI / "drivers" / "e1000" / "bind", NIC)
        assert refused in (errno.ENODEV, errno.EBUSY), (attempt, refused)
        t1, ev = monitor.wait_for(_is("bind_refused", bdf=NIC), mark)
        assert (ev["driver"], ev["group_id"]) == ("e1000", gid)
        t_refused.append(t1 - t0)
        assert wait_until(lambda: override_of(NIC) == "vfio-pci", 10.0) is not None
    assert driver_of(NIC) != "e1000"
    assert len(daemon.log_events("guard.bind_attempt_unattributed")) == unattributed
    assert not [e for e in monitor.events(0) if e["event"] == "lease_revoked"]
    _report(capsys, f"cleared override + unbind, refused bind ({writer.__name__}) -> "
                    f"bind_refused: {_ms(t_refused)}")  # fmt: skip
    c.ok("forget_device", bdf=EDU1)  # e1000's probe waits until the group is no one's
    c.ok("release", lease_id=claim["lease_id"])
    assert wait_until(lambda: driver_of(NIC) == "e1000", 10.0) is not None


def test_hot_added_device_in_the_owned_group_is_pinned_at_once(
    daemon: LiveDaemon,
    monitor: Monitor,
    spawn: Spawn,
    lab_qmp: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """QMP device_add of an edu into br1 while the bridge group is owned: monitor shows
    device_added, its driver_override is vfio-pci, the group stays viable and owned."""
    gid = group_of(NIC)
    new = "0000:01:05.0"
    c = spawn()
    claim = c.ok("claim", devices=[EDU1])
    _map_and_dma(c, EDU1, claim["ioas_id"], "live-hotadd")
    mark = monitor.mark()
    t0 = time.perf_counter()
    lab_qmp("device_add", driver="edu", bus="br1", addr="0x5", id="liveedu")
    try:
        t1, ev = monitor.wait_for(_is("device_added", bdf=new), mark, timeout=20)
        assert ev["group_id"] == gid
        pinned = wait_until(lambda: override_of(new) == "vfio-pci", 5.0, 0.005)
        assert pinned is not None, override_of(new)
        t_pin = time.perf_counter() - t0
        _report(capsys, f"device_add -> device_added line {(t1 - t0) * 1e3:.1f} ms, "
                        f"override pinned after {t_pin * 1e3:.1f} ms")  # fmt: skip
        assert (group_of(new), driver_of(new)) == (gid, None)
        ls = json.loads(daemon.iommuctl("ls", "--json").stdout)
        (group,) = [g for g in ls["groups"] if g["group_id"] == gid]
        assert new in group["devices"]
        assert (group["is_viable"], group["owner"]["uid"]) == (True, USER)
        (lease,) = daemon.status()["leases"]
        assert lease["lease_id"] == claim["lease_id"]
        rt = c.ok("dma_round_trip", bdf=EDU1, buf="live-hotadd", src=0x2000, dst=0x3000)
        assert rt["exact"], rt
        assert not [e for e in monitor.events(mark) if e["event"] == "lease_revoked"]
    finally:
        lab_qmp("device_del", id="liveedu")
        lab_qmp.wait_event("DEVICE_DELETED", device="liveedu", timeout=30)
    monitor.wait_for(_is("device_removed", bdf=new), mark, timeout=20)
    c.ok("forget_device", bdf=EDU1)
    c.ok("release", lease_id=claim["lease_id"])


def test_revoke_blocks_dma_tells_the_client_and_the_daemon_serves_on(
    daemon: LiveDaemon, monitor: Monitor, spawn: Spawn, kmsg: Kmsg
) -> None:
    """iommuctl revoke (root) takes the violation path: the client's next DMA faults
    (DMAR), it gets lease_revoked with the reason and its device fds are closed by the
    client library; another client is served meanwhile; after release it claims again."""
    gid = group_of(EDU0)
    c = spawn()
    claim = c.ok("claim", devices=[EDU0])
    _map_and_dma(c, EDU0, claim["ioas_id"], "live-revoke")
    mark = monitor.mark()
    res = daemon.iommuctl("revoke", str(gid), "--reason", "live test: admin revoke", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"group_id": gid, "revoked_leases": [claim["lease_id"]]}

    def blocked_write() -> None:
        blocked = c.ok("dma_to_ram", bdf=EDU0, buf="live-revoke", iova=IOVA + 0x2000, offset=0x2000)
        assert (blocked["untouched"], blocked["nonzero"]) == (True, 0)

    fault = kmsg.expect_fault(blocked_write, lambda line: "DMAR" in line and "[00:10.0]" in line)
    print(f"fault: {fault}")

    got = c.ok("wait_event", event="lease_revoked", timeout=10)
    want = {"lease_id": claim["lease_id"], "group_id": gid, "reason": "live test: admin revoke"}
    assert {k: got["event"][k] for k in want} == want
    assert (got["fds_closed"], got["revoked"]) == (True, "live test: admin revoke")
    monitor.wait_for(_is("lease_revoked", lease_id=claim["lease_id"]), mark)

    other = spawn()
    other.ok("ping")
    assert c.error("claim", devices=[EDU0])[0] == "revoked"
    c.ok("forget_device", bdf=EDU0)
    c.ok("release", lease_id=claim["lease_id"])
    again = c.ok("claim", devices=[EDU0])
    _map_and_dma(c, EDU0, again["ioas_id"], "live-revoke-2")
    c.ok("forget_device", bdf=EDU0)
    c.ok("release", lease_id=again["lease_id"])


def test_hot_unplug_of_a_claimed_edu_ends_the_lease(
    daemon: LiveDaemon,
    monitor: Monitor,
    spawn: Spawn,
    lab_qmp: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """QMP device_del of the claimed hotedu: vfio-pci asks for it back (REQ irq), the
    daemon revokes and closes its fds, the client is told and its library closes its
    fd, the device goes (DEVICE_DELETED), the lease ends; hotedu is added back."""
    c = spawn()
    claim = c.ok("claim", devices=[HOTEDU])
    assert claim["backend"] == "iommufd"
    gid = claim["group_id"]
    _map_and_dma(c, HOTEDU, claim["ioas_id"], "live-unplug")
    mark = monitor.mark()
    t0 = time.perf_counter()
    lab_qmp("device_del", id="hotedu")
    got = c.ok("wait_event", event="lease_revoked", timeout=30)
    t_told = time.perf_counter() - t0
    assert got["event"]["reason"] == DEVICE_REQUESTED
    assert (got["event"]["lease_id"], got["event"]["group_id"]) == (claim["lease_id"], gid)
    assert got["fds_closed"] is True
    lab_qmp.wait_event("DEVICE_DELETED", device="hotedu", timeout=30)
    t_gone = time.perf_counter() - t0
    monitor.wait_for(_is("device_removed", bdf=HOTEDU), mark, timeout=20)
    assert not (PCI / "devices" / HOTEDU).exists()
    assert wait_until(lambda: daemon.status()["leases"] == [], 10.0) is not None
    assert [r["bdf"] for r in daemon.log_events("device.removal_requested")][-1:] == [HOTEDU]
    journal = daemon.dir / "state" / "rebind-journal.json"
    assert not journal.exists() or HOTEDU not in journal.read_text()
    assert c.error("release", lease_id=claim["lease_id"]) == (
        "not_found",
        {"lease_id": claim["lease_id"]},
    )
    _report(capsys, f"device_del -> client told {t_told * 1e3:.0f} ms, "
                    f"DEVICE_DELETED {t_gone * 1e3:.0f} ms")  # fmt: skip

    lab_qmp("device_add", driver="edu", bus="rp1", id="hotedu")
    assert wait_until(lambda: (PCI / "devices" / HOTEDU).exists(), 10.0, 0.05) is not None
    assert (driver_of(HOTEDU), override_of(HOTEDU)) == (None, "(null)")
    c.ok("forget_device", bdf=HOTEDU)
