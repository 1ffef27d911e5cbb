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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import vmm
from kmsg import Kmsg
from topology import EDU0, EDU1, EDU2, NIC

from iommud.kernel.linux import LinuxIommuFd, LinuxKernel, LinuxVfioDevice
from iommud.kernel.sysfs_bind import SysfsBinder
from tests.lab.nested import (
    EDU_DEVICE,
    EDU_VENDOR,
    GPA_BLOCKED,
    GPA_SRC,
    LENGTH,
    RAM_KIB,
    dma_into_guest,
    enable_device,
    pci_device,
    report,
)

pytestmark = pytest.mark.vm

PCI = Path("/sys/bus/pci/devices")


class Bindings:
    """Rebinds devices for a test (vfio-pci, or no driver) and puts each one back."""

    def __init__(self) -> None:
        self.binder = SysfsBinder("/sys")
        self.saved: dict[str, str | None] = {}

    def to_vfio(self, bdf: str) -> str:
        """``bdf`` on vfio-pci; its cdev name (vfioN)."""
        self.saved.setdefault(bdf, self.binder.current_driver(bdf))
        self.binder.set_driver_override(bdf, "vfio-pci")
        self.binder.unbind(bdf)
        self.binder.drivers_probe(bdf)
        assert self.binder.current_driver(bdf) == "vfio-pci"
        (cdev,) = os.listdir(PCI / bdf / "vfio-dev")
        return cdev

    def unbind(self, bdf: str) -> None:
        """``bdf`` without a driver (nothing probes it again until restore)."""
        self.saved.setdefault(bdf, self.binder.current_driver(bdf))
        self.binder.unbind(bdf)
        assert self.binder.current_driver(bdf) is None

    def restore(self) -> None:
        # Unbinding vfio-pci blocks while any fd of the device is open: close them first.
        for bdf, driver in reversed(self.saved.items()):
            self.binder.set_driver_override(bdf, None)
            self.binder.unbind(bdf)
            if driver is not None:
                self.binder.drivers_probe(bdf)
        for bdf, driver in self.saved.items():
            assert self.binder.current_driver(bdf) == driver, bdf


@pytest.fixture
def bindings() -> Iterator[Bindings]:
    state = Bindings()
    try:
        yield state
    finally:
        state.restore()


class Delegated:
    """What a delegated claim would hand out: a fresh iommufd and unbound cdev fds.

    The test keeps a dup of each device file (as the daemon would) to drive the edu device
    and to force a detach; everything is closed on exit, so the drivers can be restored.
    """

    def __init__(self, *cdevs: str) -> None:
        kernel = LinuxKernel("/dev", "/sys")
        self.iommufd: LinuxIommuFd = kernel.open_iommufd()
        self.devices: list[LinuxVfioDevice] = []
        self.dups: list[LinuxVfioDevice] = []
        try:
            # Before any object exists (EBUSY after, iommufd/ioas.c): pin against the
            # VMM's own RLIMIT_MEMLOCK rather than its user's.
            assert self.iommufd.option_rlimit_mode(per_process=True) is True
            for cdev in cdevs:
                self.devices.append(kernel.open_cdev(cdev))
                self.dups.append(LinuxVfioDevice(os.dup(self.devices[-1].fileno()), cdev))
        except BaseException:
            self.close()
            raise

    @property
    def device(self) -> LinuxVfioDevice:
        return self.devices[0]

    @property
    def dup(self) -> LinuxVfioDevice:
        return self.dups[0]

    def fds(self) -> tuple[int, ...]:
        return (self.iommufd.fileno(), *(d.fileno() for d in self.devices))

    def close(self) -> None:
        for owner in (*self.dups, *self.devices, self.iommufd):
            owner.close()


@pytest.fixture
def delegated(bindings: Bindings) -> Iterator[Delegated]:
    """A fresh iommufd and the cdev of 0000:00:10.0 (alone in its group)."""
    fds = Delegated(bindings.to_vfio(EDU0))
    try:
        yield fds
    finally:
        fds.close()


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
        report("qemu10", "start", spawn_to_qmp_s=vm.timings.marks["qmp_ready"])
        assert vm.close() == 0


def test_delegated_fds_realize_edu_and_dma_lands_in_guest_ram(delegated: Delegated) -> None:
    """The proof without a daemon: fresh iommufd + unbound cdev -> QEMU binds, pins its
    RAM, edu DMA lands in its guest RAM; a detach through the dup then faults."""
    ifd, dfd = delegated.iommufd.fileno(), delegated.device.fileno()
    vm = vmm.Vmm(vmm.vfio_args(ifd, dfd), pass_fds=delegated.fds())
    print("qemu10.argv", " ".join(vm.argv), flush=True)
    with vm:
        assert vm.qmp.is_realized("dev0")
        realized = vm.timings.mark("device_realized")
        pinned = vmm.vm_pin_kib(vm.pid)
        assert pinned >= RAM_KIB  # all guest RAM, charged to QEMU itself (VmPin)
        firmware_s = vm.run_firmware(["dev0"])
        dev = pci_device(vm.qmp, "dev0")
        assert (dev["id"]["vendor"], dev["id"]["device"]) == (EDU_VENDOR, EDU_DEVICE)

        edu = enable_device(delegated.dup.fileno())
        dma_s = dma_into_guest(vm.qmp, vm.pid, edu)

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
        report(
            "qemu10",
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
        dev = pci_device(vm.qmp, "hot0")
        assert (dev["id"]["vendor"], dev["id"]["device"]) == (EDU_VENDOR, EDU_DEVICE)
        pinned = vmm.vm_pin_kib(vm.pid)
        assert pinned >= RAM_KIB

        edu = enable_device(delegated.dup.fileno())
        dma_s = dma_into_guest(vm.qmp, vm.pid, edu)
        report("qemu10", "hotplug", hotplug_s=hotplug_s, vm_pin_kib=pinned, dma_round_trip_s=dma_s)
        assert vm.close() == 0


def test_bridge_group_two_edus_share_one_iommufd(bindings: Bindings) -> None:
    """The bridge group in one QEMU: one iommufd, both edu cdevs, one IOAS (RAM pinned
    once), DMA from each device lands; the e1000 is unbound meanwhile and given back."""
    cdevs = [bindings.to_vfio(EDU1), bindings.to_vfio(EDU2)]
    bindings.unbind(NIC)  # the group is viable only once the e1000 lets go
    delegated = Delegated(*cdevs)
    try:
        ifd, d1, d2 = delegated.fds()
        extra = [
            *vmm.vfio_args(ifd, d1, device_id="dev1", bus="rp0"),
            "-device", f"vfio-pci,id=dev2,iommufd=i0,fd={d2},bus=rp1",
        ]  # fmt: skip
        with vmm.Vmm(extra, pass_fds=(ifd, d1, d2)) as vm:
            assert vm.qmp.is_realized("dev1")
            assert vm.qmp.is_realized("dev2")
            realized = vm.timings.mark("devices_realized")
            pinned = vmm.vm_pin_kib(vm.pid)
            # One IOAS shared by both devices: guest RAM is pinned once, not twice.
            assert RAM_KIB <= pinned < 2 * RAM_KIB
            try:
                vm.run_firmware(["dev1", "dev2"], timeout=60)
            except TimeoutError:
                print("qemu10.bridge_group.query_pci", vm.qmp("query-pci"), flush=True)
                print("qemu10.bridge_group.stderr", repr(vm.stderr_text()), flush=True)
                raise
            dma1 = dma_into_guest(vm.qmp, vm.pid, enable_device(delegated.dups[0].fileno()))
            dma2 = dma_into_guest(
                vm.qmp,
                vm.pid,
                enable_device(delegated.dups[1].fileno()),
                GPA_SRC + 0x1000,
                GPA_BLOCKED,
            )
            report(
                "qemu10",
                "bridge_group",
                spawn_to_devices_realized_s=realized,
                vm_pin_kib=pinned,
                dma1_s=dma1,
                dma2_s=dma2,
            )
            assert vm.close() == 0
        print("qemu10.bridge_group.stderr", repr(vm.stderr_text()), flush=True)
    finally:
        delegated.close()
