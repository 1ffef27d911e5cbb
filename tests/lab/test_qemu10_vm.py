"""A real, unmodified, unprivileged VMM in the lab guest: QEMU 10 with pre-opened fds.

The ground under delegated claims, shown without any daemon: root (the test) opens
/dev/iommu with per-process memlock accounting and the edu cdev of 0000:00:10.0, and
QEMU 10 (lab/fetch-qemu) runs nested under TCG as uid 1000 with no capabilities, given
those fds by number (or through QMP getfd). QEMU binds the device, maps its own guest RAM
(pinned against its own RLIMIT_MEMLOCK), and an edu DMA programmed from the test through
a dup of the device fd lands in QEMU's guest RAM, read back with QMP ``xp`` at the
guest-physical address (QEMU maps guest RAM 1:1, IOVA = GPA). A detach through the dup
blocks DMA at once (DMAR fault) while QEMU keeps running.

The nested VM has no OS and starts paused (-S): devices are realized and RAM is mapped
all the same; SeaBIOS runs briefly only so that query-pci can list the devices behind
the root ports (lab/vmm.py). Timings go to the test output (``qemu10.*`` lines, shown
with pytest -s or for a failing test).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vmm
from edu import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, Edu
from kmsg import Kmsg

from iommud.kernel import uapi
from iommud.kernel.linux import LinuxIommuFd, LinuxKernel, LinuxVfioDevice, get_region_info
from iommud.kernel.sysfs_bind import SysfsBinder

pytestmark = pytest.mark.vm

EDU0 = "0000:00:10.0"
EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8
PCI = Path("/sys/bus/pci/devices")
LENGTH = 2048  # edu's largest safe transfer (lab/edu.py)
GPA_SRC = 0x100000  # plain RAM of the paused nested guest, below edu's 28-bit reach
GPA_DST = 0x200000
GPA_BLOCKED = 0x300000
RAM_KIB = vmm.RAM_MIB * 1024


def _report(name: str, **values: object) -> None:
    """One grep-able line in the batch log."""
    fields = " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"qemu10.{name} {fields}", flush=True)


@pytest.fixture
def edu0_cdev() -> Iterator[str]:
    """0000:00:10.0 on vfio-pci for the test; its cdev name; driver restored afterwards."""
    binder = SysfsBinder("/sys")
    driver = binder.current_driver(EDU0)
    binder.set_driver_override(EDU0, "vfio-pci")
    binder.unbind(EDU0)
    binder.drivers_probe(EDU0)
    try:
        assert binder.current_driver(EDU0) == "vfio-pci"
        (cdev,) = os.listdir(PCI / EDU0 / "vfio-dev")
        yield cdev
    finally:
        binder.set_driver_override(EDU0, None)
        binder.unbind(EDU0)  # blocks while any fd of the device is open: close them first
        if driver is not None:
            binder.drivers_probe(EDU0)


class Delegated:
    """What a delegated claim would hand out: a fresh iommufd and an unbound cdev fd.

    The test keeps a dup of the device file (as the daemon would) to drive the edu device
    and to force a detach; everything is closed on exit, so the driver can be restored.
    """

    def __init__(self, cdev: str) -> None:
        kernel = LinuxKernel("/dev", "/sys")
        self.iommufd: LinuxIommuFd = kernel.open_iommufd()
        self.device: LinuxVfioDevice = kernel.open_cdev(cdev)
        self.dup = LinuxVfioDevice(os.dup(self.device.fileno()), cdev)
        # Before any object exists (EBUSY after, iommufd/ioas.c): pin against the
        # VMM's own RLIMIT_MEMLOCK rather than its user's.
        assert self.iommufd.option_rlimit_mode(per_process=True) is True

    def close(self) -> None:
        for owner in (self.dup, self.device, self.iommufd):
            owner.close()


@pytest.fixture
def delegated(edu0_cdev: str) -> Iterator[Delegated]:
    fds = Delegated(edu0_cdev)
    try:
        yield fds
    finally:
        fds.close()


def _enable_device(fd: int) -> Edu:
    """PCI_COMMAND |= MEMORY | MASTER through the config region, then an Edu on ``fd``.

    QEMU resets the device when it realizes it (both bits off afterwards); with MEMORY off
    VFIO refuses BAR access (EIO, vfio_pci_rdwr.c), so this comes before Edu() reads its id.
    """
    config = get_region_info(fd, uapi.VFIO_PCI_CONFIG_REGION_INDEX)
    (cmd,) = struct.unpack("<H", os.pread(fd, 2, config.offset + PCI_COMMAND))
    cmd |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    os.pwrite(fd, struct.pack("<H", cmd), config.offset + PCI_COMMAND)
    return Edu(fd)


def _dma_into_guest(vm: vmm.Vmm, edu: Edu) -> float:
    """Pattern at GPA_SRC -> device -> GPA_DST, read back with xp; returns the DMA seconds."""
    pattern = os.urandom(LENGTH)
    vmm.write_process_memory(vm.pid, vm.qmp.gpa2hva(GPA_SRC), pattern)
    assert vm.qmp.xp(GPA_DST, LENGTH) == bytes(LENGTH)
    t0 = time.monotonic()
    edu.dma_from_ram(GPA_SRC, LENGTH)
    edu.dma_to_ram(GPA_DST, LENGTH)
    elapsed = time.monotonic() - t0
    assert vm.qmp.xp(GPA_DST, LENGTH) == pattern
    return elapsed


def _vfio_device(vm: vmm.Vmm, qdev_id: str) -> dict[str, Any]:
    (dev,) = (d for d in vm.qmp.pci_devices() if d["qdev_id"] == qdev_id)
    return dev


def test_unprivileged_qemu10_answers_qmp() -> None:
    """QEMU 10 runs nested as uid 1000 with no capabilities and answers query-version."""
    with vmm.Vmm() as vm:
        version = vm.qmp("query-version")["qemu"]
        assert (version["major"], version["minor"], version["micro"]) == vmm.QEMU_VERSION
        status = vmm.proc_status(vm.pid)
        assert status["Uid"].split() == [str(vmm.VMM_UID)] * 4
        assert status["Gid"].split() == [str(vmm.VMM_GID)] * 4
        assert status["Groups"] == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, caps
        assert status["NoNewPrivs"] == "1"
        _report("start", spawn_to_qmp_s=vm.timings.marks["qmp_ready"])
        assert vm.close() == 0


def test_delegated_fds_realize_edu_and_dma_lands_in_guest_ram(delegated: Delegated) -> None:
    """The proof without a daemon: fresh iommufd + unbound cdev -> QEMU binds, pins its
    RAM, edu DMA lands in its guest RAM; a detach through the dup then faults."""
    ifd, dfd = delegated.iommufd.fileno(), delegated.device.fileno()
    vm = vmm.Vmm(vmm.vfio_args(ifd, dfd), pass_fds=(ifd, dfd))
    print("qemu10.argv", " ".join(vm.argv), flush=True)
    with vm:
        assert vm.qmp.is_realized("dev0")
        realized = vm.timings.mark("device_realized")
        pinned = vmm.vm_pin_kib(vm.pid)
        assert pinned >= RAM_KIB  # all guest RAM, charged to QEMU itself (VmPin)
        firmware_s = vm.run_firmware()
        dev = _vfio_device(vm, "dev0")
        assert (dev["id"]["vendor"], dev["id"]["device"]) == (EDU_VENDOR, EDU_DEVICE)

        edu = _enable_device(delegated.dup.fileno())
        dma_s = _dma_into_guest(vm, edu)

        with Kmsg() as kmsg:
            t0 = time.monotonic()
            delegated.dup.detach_ioas()
            detach_s = time.monotonic() - t0
            line = kmsg.expect_fault(
                lambda: edu.dma_to_ram(GPA_BLOCKED, LENGTH),
                lambda m: "DMAR" in m and "[00:10.0]" in m,
            )
        assert f"fault addr {GPA_BLOCKED:#x}" in line
        assert vm.qmp.xp(GPA_BLOCKED, LENGTH) == bytes(LENGTH)
        # QEMU neither noticed nor died: the detach is invisible to it.
        assert vm.qmp("query-status")["status"] == "paused"
        _report(
            "delegated",
            spawn_to_qmp_s=vm.timings.marks["qmp_ready"],
            spawn_to_device_realized_s=realized,
            firmware_to_listed_s=firmware_s,
            vm_pin_kib=pinned,
            dma_round_trip_s=dma_s,
            detach_s=detach_s,
        )
        assert vm.close() == 0
    # QEMU's complaints at exit about the device it no longer had attached, if any.
    print("qemu10.delegated.stderr", repr(vm.stderr_text()), flush=True)


def test_hotplug_through_qmp_getfd(delegated: Delegated) -> None:
    """getfd + object-add iommufd + getfd + device_add vfio-pci into a running QEMU."""
    with vmm.Vmm() as vm:
        assert vmm.vm_pin_kib(vm.pid) == 0
        vm.run_firmware()  # query-pci lists what is behind rp1 only once its bus has a number
        t0 = time.monotonic()
        vm.qmp.execute("getfd", {"fdname": "iommufd0"}, fds=[delegated.iommufd.fileno()])
        vm.qmp("object-add", **{"qom-type": "iommufd", "id": "i0", "fd": "iommufd0"})
        vm.qmp.execute("getfd", {"fdname": "edu0"}, fds=[delegated.device.fileno()])
        vm.qmp("device_add", driver="vfio-pci", id="hot0", iommufd="i0", fd="edu0", bus="rp1")
        hotplug_s = time.monotonic() - t0
        assert vm.qmp.is_realized("hot0")
        dev = _vfio_device(vm, "hot0")
        assert (dev["id"]["vendor"], dev["id"]["device"]) == (EDU_VENDOR, EDU_DEVICE)
        pinned = vmm.vm_pin_kib(vm.pid)
        assert pinned >= RAM_KIB

        edu = _enable_device(delegated.dup.fileno())
        dma_s = _dma_into_guest(vm, edu)
        _report("hotplug", hotplug_s=hotplug_s, vm_pin_kib=pinned, dma_round_trip_s=dma_s)
        assert vm.close() == 0
