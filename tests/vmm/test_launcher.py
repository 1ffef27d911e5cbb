"""``iommuctl vm`` on the host: the launcher, the real server on the fake kernel, a fake VMM.

What runs for real: the server and broker (tests/serving.py, lab topology, the test
process is uid 0 and may delegate), the v2 client, the launcher's claims, the spawn with
``pass_fds``, its private QMP monitor and its control socket; the VMM is
tests/vmm/fake_vmm.py (argv, inherited fds and QMP as QEMU shows them). The same
launcher runs the real QEMU 10 in the lab (tests/lab/test_vm_launcher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from topology import EDU0, EDU1, EDU2, NIC

from iommud.broker import Broker
from iommud.broker.state import LeaseState
from iommud.errors import NotDelegableError
from iommud.vmm import control
from iommud.vmm.launcher import QMP_CHARDEV
from tests.vmm.support import (
    IOMMUFD_OBJECT,
    Launch,
    fake_argv,
    fake_log,
    qmp_commands,
    vfio,
)


def _leases(broker: Broker) -> dict[int, tuple[int, LeaseState, int | None]]:
    """Every lease the daemon holds: id -> (group, state, delegated iommufd id)."""
    out = {}
    for session in broker.state.sessions.values():
        for lease in session.leases.values():
            ifd = lease.delegated.iommufd_id if lease.delegated is not None else None
            out[lease.lease_id] = (lease.group_id, lease.state, ifd)
    return out


def _copies_here(pid: int, fd: int) -> list[int]:
    """This process's fds that are the same file as fd ``fd`` of process ``pid``."""
    theirs = os.stat(f"/proc/{pid}/fd/{fd}")
    ours = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd
            st = os.stat(f"/proc/self/fd/{name}")
            if (st.st_dev, st.st_ino) == (theirs.st_dev, theirs.st_ino):
                ours.append(int(name))
    return ours


def _driver(broker: Broker, bdf: str) -> str | None:
    """The fake sysfs's driver of ``bdf``."""
    sys_root: Path = broker.state.kernel.sys_root  # type: ignore[attr-defined]
    link = sys_root / "bus" / "pci" / "devices" / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll the daemon's state (it changes on its own tasks); a hang guard, no bound."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110 - the daemon's state has no event to wait on
            await asyncio.sleep(0.01)


async def test_placeholders_become_the_fds_and_nothing_else_leaks(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path
) -> None:
    """The VMM's argv carries the claimed fds' numbers; it inherits exactly those fds,
    the QMP monitor's listening socket and stdio; SIGTERM ends it and the lease."""
    path, broker = served
    argv = fake_argv(*IOMMUFD_OBJECT, *vfio("00:10.0"))
    vm = await launch(path, (EDU0,), argv)
    started = await vm.record("vm.started")
    assert started["realized"] == {"dev0": True}
    assert [lease["devices"] for lease in started["leases"]] == [[{"bdf": EDU0, "id": "dev0"}]]
    (lease_id,) = _leases(broker)
    assert _leases(broker)[lease_id][1] is LeaseState.ACTIVE

    (spawn, *_) = fake_log(vmm_log)
    vmm_argv = spawn["argv"]
    obj = vmm_argv[vmm_argv.index("-object") + 1]
    dev = vmm_argv[vmm_argv.index("-device") + 1]
    assert obj.startswith("iommufd,id=i0,fd=")
    assert dev.startswith("vfio-pci,id=dev0,iommufd=i0,bus=rp0,fd=")
    iommufd, device = int(obj.rsplit("=", 1)[1]), int(dev.rsplit("=", 1)[1])
    chardev = vmm_argv[vmm_argv.index("-chardev") + 1]
    assert chardev.startswith(f"socket,id={QMP_CHARDEV},fd=")
    qmp_fd = int(chardev.split("fd=")[1].split(",")[0])
    assert vmm_argv[vmm_argv.index("-mon") + 1] == f"chardev={QMP_CHARDEV},mode=control"
    fds = {int(k): v for k, v in spawn["fds"].items()}
    assert set(fds) == {0, 1, 2, iommufd, device, qmp_fd}
    assert fds[iommufd].startswith("/memfd:fake-iommufd")  # the fake kernel's /dev/iommu
    assert fds[device].startswith("/memfd:fake-device")
    assert fds[qmp_fd].startswith("socket:")
    # The launcher kept no copy: in this process (the daemon runs here too) each file is
    # open once, as the daemon's own duplicate.
    for fd in (iommufd, device):
        assert len(_copies_here(started["pid"], fd)) == 1
    assert spawn["ppid"] == os.getpid()

    assert await vm.terminate() == 128 + signal.SIGTERM  # the fake dies of SIGTERM
    assert [r["event"] for r in vm.records][-2:] == ["vm.exited", "vm.released"]
    assert vm.records[-2]["why"] == "signal"
    assert not _leases(broker)
    # No fd leaked: the served fixture checks it once the daemon's session is gone.


async def test_two_groups_one_claim_each_on_one_iommufd(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path
) -> None:
    """EDU0 and the bridge group's two edus: two claims (one per group) sharing one
    iommufd, one {iommufd} fd for the VMM; the e1000 is rebound away and given back."""
    path, broker = served
    argv = fake_argv(
        *IOMMUFD_OBJECT, *vfio(EDU0), *vfio(EDU1, None, "rp1"), *vfio(EDU2, "dev2", "rp2")
    )
    vm = await launch(path, (EDU0, EDU1, EDU2), argv, held=(NIC,))
    started = await vm.record("vm.started")
    leases = _leases(broker)
    assert len(leases) == 2
    assert len({ifd for _, _, ifd in leases.values()}) == 1  # one iommufd for the VM
    assert started["realized"] == {"dev0": True, "iommuctl-0000-01-01.0": True, "dev2": True}
    (spawn, *_) = fake_log(vmm_log)
    assert sum(v.startswith("/memfd:fake-iommufd") for v in spawn["fds"].values()) == 1
    assert sum(v.startswith("/memfd:fake-device") for v in spawn["fds"].values()) == 3
    assert f"vfio-pci,iommufd=i0,bus=rp1,fd={{{EDU1}}}" not in spawn["argv"]
    assert _driver(broker, NIC) == "vfio-pci"
    assert await vm.terminate() == 128 + signal.SIGTERM
    assert not _leases(broker)
    await _until(lambda: _driver(broker, NIC) == "e1000")


async def test_vmm_exit_releases_and_is_the_exit_status(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMM that exits 3 before QMP: vm.failed, status 3, the lease released."""
    path, broker = served
    monkeypatch.setenv("FAKE_VMM_EXIT", "3")
    vm = await launch(path, (EDU0,), fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0)))
    assert await vm.finish() == 3
    assert (await vm.record("vm.failed"))["exit_status"] == 3
    assert await vm.record("vm.released")
    assert not _leases(broker)


async def test_a_killed_vmm_ends_the_lease(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path
) -> None:
    """SIGKILL of the running VMM: the launcher exits 137 and releases."""
    path, broker = served
    vm = await launch(path, (EDU0,), fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0)))
    os.kill((await vm.record("vm.started"))["pid"], signal.SIGKILL)
    assert await vm.finish() == 128 + signal.SIGKILL
    assert (await vm.record("vm.exited"))["why"] == "vmm_exited"
    assert not _leases(broker)


async def test_a_vmm_ignoring_sigterm_is_killed_after_the_grace(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping the launcher: SIGTERM to the VMM, SIGKILL once --grace has passed."""
    path, broker = served
    monkeypatch.setenv("FAKE_VMM_TERM", "ignore")
    argv = fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0))
    vm = await launch(path, (EDU0,), argv, stop_timeout=0.2)
    await vm.record("vm.started")
    assert await vm.terminate() == 128 + signal.SIGKILL
    assert not _leases(broker)


@pytest.mark.parametrize("unplug", ["never", "complete"])
async def test_revocation_sends_device_del(
    served: tuple[str, Broker],
    launch: Launch,
    vmm_log: Path,
    monkeypatch: pytest.MonkeyPatch,
    unplug: str,
) -> None:
    """lease_revoked -> QMP device_del of the lease's device at once. A VMM that never
    finishes the unplug keeps the (revoked) lease held; DEVICE_DELETED releases it."""
    path, broker = served
    monkeypatch.setenv("FAKE_VMM_UNPLUG", unplug)
    vm = await launch(path, (EDU0,), fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0)))
    await vm.record("vm.started")
    ((lease_id, (group, _, _)),) = _leases(broker).items()
    assert await broker.revoke_group(group, "maintenance") == [lease_id]
    revoked = await vm.record("vm.revoked")
    assert (revoked["lease_id"], revoked["reason"]) == (lease_id, "maintenance")
    assert [(d["id"], d["result"]) for d in revoked["device_del"]] == [("dev0", "accepted")]
    (device_del,) = qmp_commands(vmm_log, "device_del")
    assert device_del["args"] == {"id": "dev0"}
    assert device_del["t"] >= revoked["received_at"]
    if unplug == "complete":
        assert (await vm.record("vm.device_deleted"))["id"] == "dev0"
        assert (await vm.record("vm.released"))["lease_id"] == lease_id
        await _until(lambda: not _leases(broker))
    else:
        assert _leases(broker)[lease_id][1] is LeaseState.REVOKED
        assert not [r for r in vm.records if r["event"] == "vm.released"]
    assert await vm.terminate() == 128 + signal.SIGTERM
    assert not _leases(broker)


async def test_hotplug_into_a_vm_without_devices(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path, ctl: str
) -> None:
    """vm-attach: the first device brings the iommufd (getfd + object-add), the next
    group joins it (getfd + device_add only); both leases share one iommufd."""
    path, broker = served
    vm = await launch(path, (), fake_argv(), control=ctl)
    assert (await vm.record("vm.started"))["leases"] == []
    assert oct(os.stat(ctl).st_mode & 0o777) == "0o600"

    first = await control.request(ctl, {"op": "attach", "devices": [EDU0], "buses": ["rp1"]})
    assert first["ok"], first
    ((lease,),) = [first["leases"]]
    assert lease["devices"] == [{"bdf": EDU0, "id": "iommuctl-0000-00-10.0"}]
    assert [r["qmp"] for r in qmp_commands(vmm_log)][-4:] == [
        "getfd",
        "object-add",
        "getfd",
        "device_add",
    ]
    getfd, obj, getfd2, add = qmp_commands(vmm_log)[-4:]
    assert getfd["fds"] == getfd2["fds"] == 1
    assert obj["args"] == {
        "qom-type": "iommufd",
        "id": "iommuctl-iommufd0",
        "fd": getfd["args"]["fdname"],
    }
    assert add["args"] == {
        "driver": "vfio-pci",
        "id": "iommuctl-0000-00-10.0",
        "iommufd": "iommuctl-iommufd0",
        "fd": getfd2["args"]["fdname"],
        "bus": "rp1",
    }

    second = await control.request(
        ctl, {"op": "attach", "devices": [EDU1, EDU2], "ids": ["e1", "e2"], "hold": [NIC]}
    )
    assert second["ok"], second
    assert [r["qmp"] for r in qmp_commands(vmm_log)][-4:] == ["getfd", "device_add"] * 2
    assert [r["args"]["iommufd"] for r in qmp_commands(vmm_log, "device_add")] == [
        "iommuctl-iommufd0"
    ] * 3
    assert len({ifd for _, _, ifd in _leases(broker).values()}) == 1
    assert len(_leases(broker)) == 2

    again = await control.request(ctl, {"op": "attach", "devices": [EDU0]})
    assert (again["ok"], again["code"]) == (False, "busy")
    bad = await control.request(ctl, {"op": "attach", "devices": ["nonsense"]})
    assert (bad["ok"], bad["code"]) == (False, "bad_request")
    attached = await vm.record("vm.attached")
    assert attached["hotplug_s"] >= attached["claim_s"] >= 0
    assert await vm.terminate() == 128 + signal.SIGTERM
    assert not os.path.exists(ctl)  # noqa: ASYNC240
    assert not _leases(broker)


async def test_a_failed_device_add_gives_the_claim_back(
    served: tuple[str, Broker],
    launch: Launch,
    vmm_log: Path,
    ctl: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """device_add refused by the VMM: qmp_error to vm-attach, the lease released."""
    path, broker = served
    monkeypatch.setenv("FAKE_VMM_DEVICE_ADD", "fail")
    argv = fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0))
    vm = await launch(path, (EDU0,), argv, control=ctl)
    await vm.record("vm.started")
    answer = await control.request(ctl, {"op": "attach", "devices": [EDU1, EDU2], "hold": [NIC]})
    assert (answer["ok"], answer["code"]) == (False, "qmp_error")
    assert "vfio: bind failed" in answer["message"]
    assert [r["args"]["iommufd"] for r in qmp_commands(vmm_log, "device_add")] == ["i0"]
    assert not qmp_commands(vmm_log, "object-add")  # the VM had its iommufd already
    assert answer["details"]["lease_id"] not in _leases(broker)
    assert len(_leases(broker)) == 1  # only the launch's lease
    assert await vm.terminate() == 128 + signal.SIGTERM


async def test_a_refused_claim_claims_nothing(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path
) -> None:
    """Half a group (EDU1 without EDU2 and the e1000) after a good claim of EDU0: the
    daemon's not_delegable; EDU0's claim is given back, no VMM started."""
    path, broker = served
    argv = fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0), *vfio(EDU1, "d1"))
    vm = await launch(path, (EDU0, EDU1), argv)
    with pytest.raises(NotDelegableError) as refused:
        await vm.finish()
    assert refused.value.details == {"reason": "legacy_only", "group_id": 4}
    assert not fake_log(vmm_log)
    assert not _leases(broker)


async def test_a_failed_hotplug_into_a_vm_without_iommufd_leaves_nothing(
    served: tuple[str, Broker],
    launch: Launch,
    vmm_log: Path,
    ctl: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two groups at once, the first device_add refused: the iommufd object made for it
    is deleted, both claims are given back, and the next attach starts afresh (a new
    iommufd from the daemon, a new object in the VM)."""
    path, broker = served
    monkeypatch.setenv("FAKE_VMM_DEVICE_ADD", "fail")
    vm = await launch(path, (), fake_argv(), control=ctl)
    await vm.record("vm.started")  # the control socket is up from here on
    req = {"op": "attach", "devices": [EDU0, EDU1, EDU2], "hold": [NIC]}
    answer = await control.request(ctl, req)
    assert (answer["ok"], answer["code"]) == (False, "qmp_error")
    assert [r["args"] for r in qmp_commands(vmm_log, "object-del")] == [{"id": "iommuctl-iommufd0"}]
    await _until(lambda: not _leases(broker))
    answer = await control.request(ctl, {"op": "attach", "devices": [EDU0]})
    assert (answer["ok"], answer["code"]) == (False, "qmp_error")
    assert [r["args"]["id"] for r in qmp_commands(vmm_log, "object-add")] == [
        "iommuctl-iommufd0",
        "iommuctl-iommufd1",
    ]
    assert len(qmp_commands(vmm_log, "device_add")) == 2
    await _until(lambda: not _leases(broker))


async def test_without_qmp_a_revocation_is_only_reported(
    served: tuple[str, Broker], launch: Launch, vmm_log: Path
) -> None:
    """--no-qmp: no monitor fd goes to the VMM, and lease_revoked is reported with the
    fact that the VMM was not asked (the daemon's enforcement has to do the rest)."""
    path, broker = served
    vm = await launch(path, (EDU0,), fake_argv(*IOMMUFD_OBJECT, *vfio(EDU0)), qmp=False)
    started = await vm.record("vm.started")
    assert started["realized"] is None  # reported at spawn: there is no QMP to wait for
    await _until(lambda: bool(fake_log(vmm_log)))
    (spawn, *_) = fake_log(vmm_log)
    assert "-chardev" not in spawn["argv"]
    assert len(spawn["fds"]) == 5  # stdio, the iommufd, the cdev
    ((_, (group, _, _)),) = _leases(broker).items()
    await broker.revoke_group(group, "maintenance")
    revoked = await vm.record("vm.revoked")
    assert [d["result"] for d in revoked["device_del"]] == [
        "no QMP monitor (--no-qmp): the VMM was not asked"
    ]
    assert await vm.terminate() == 128 + signal.SIGTERM
    assert not _leases(broker)
