"""Shared by the lab tests that drive an edu device inside a nested, unprivileged QEMU 10.

tests/lab/test_qemu10_vm.py (fds opened by the test), test_delegated_vm.py (fds from the
daemon, a hand-written launcher) and test_vm_launcher.py (``iommuctl vm``) all do the
same few things: enable the edu behind QEMU's back (QEMU's realize reset turned memory
decode and bus mastering off), copy QEMU's own device fd (a new open of the cdev would
be a second, unbound file), push a pattern through the device into guest RAM and read
it back over QMP, and print grep-able timing lines. Test code; runs in the lab guest.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import struct
import time
from pathlib import Path
from typing import Any, Final

import vmm
from edu import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, Edu

from iommud.kernel import uapi
from iommud.kernel.linux import get_region_info
from tests.e2e.support import CONFIG

EDU_VENDOR: Final = 0x1234
EDU_DEVICE: Final = 0x11E8
LENGTH: Final = 2048  # edu's largest safe transfer (lab/edu.py)
GPA_SRC: Final = 0x100000  # plain RAM of the paused nested guest, below edu's 28-bit reach
GPA_DST: Final = 0x200000
GPA_BLOCKED: Final = 0x300000
RAM_KIB: Final = vmm.RAM_MIB * 1024
SYS_PIDFD_GETFD: Final = 438  # x86_64 (arch/x86/entry/syscalls/syscall_64.tbl)

#: tests/e2e's daemon config with the delegate right for uid 1000 on the edus.
DELEGATING: Final = CONFIG.replace('quota = "e2e"\n', 'quota = "e2e"\ndelegate = true\n')


def report(prefix: str, name: str, **values: object) -> None:
    """One grep-able line in the batch log: ``prefix.name k=v ...``."""
    fields = " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"{prefix}.{name} {fields}", flush=True)


def fd_of(pid: int, target: int) -> int:
    """A copy of fd ``target`` of process ``pid`` (pidfd_getfd: the same open file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(fd)
    finally:
        os.close(pidfd)


def enable_device(fd: int) -> Edu:
    """PCI_COMMAND |= MEMORY | MASTER through the config region, then an Edu on ``fd``.

    QEMU resets the device when it realizes it (both bits off afterwards); with MEMORY off
    VFIO refuses BAR access (EIO, vfio_pci_rdwr.c), so this comes before Edu() reads its id.
    """
    config = get_region_info(fd, uapi.VFIO_PCI_CONFIG_REGION_INDEX)
    (cmd,) = struct.unpack("<H", os.pread(fd, 2, config.offset + PCI_COMMAND))
    cmd |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    os.pwrite(fd, struct.pack("<H", cmd), config.offset + PCI_COMMAND)
    return Edu(fd)


def dma_into_guest(
    qmp: vmm.Qmp, pid: int, edu: Edu, src: int = GPA_SRC, dst: int = GPA_DST
) -> float:
    """Pattern at ``src`` -> device -> ``dst`` of QEMU ``pid``'s guest RAM, read back with
    xp (IOVA = guest-physical address); returns the DMA seconds."""
    pattern = os.urandom(LENGTH)
    vmm.write_process_memory(pid, qmp.gpa2hva(src), pattern)
    assert qmp.xp(dst, LENGTH) == bytes(LENGTH)
    t0 = time.monotonic()
    edu.dma_from_ram(src, LENGTH)
    edu.dma_to_ram(dst, LENGTH)
    elapsed = time.monotonic() - t0
    assert qmp.xp(dst, LENGTH) == pattern
    return elapsed


def pci_device(qmp: vmm.Qmp, qdev_id: str) -> dict[str, Any]:
    """The query-pci entry of ``qdev_id`` (after firmware numbered the buses)."""
    (dev,) = (d for d in qmp.pci_devices() if d["qdev_id"] == qdev_id)
    return dev


def is_edu(qmp: vmm.Qmp, qdev_id: str) -> bool:
    ids = pci_device(qmp, qdev_id)["id"]
    return (ids["vendor"], ids["device"]) == (EDU_VENDOR, EDU_DEVICE)


def alive(pid: int) -> bool:
    try:
        status = vmm.proc_status(pid)
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read (ESRCH)
        return False
    return not status["State"].startswith("Z")


def at(record: dict[str, Any]) -> float:
    """A daemon log record's time (ISO 8601, UTC) as a Unix time."""
    return datetime.datetime.fromisoformat(record["timestamp"]).timestamp()


def group_of(bdf: str) -> int:
    """The IOMMU group number of ``bdf`` (numbers follow probe order: never hard-code)."""
    return int(Path(f"/sys/bus/pci/devices/{bdf}/iommu_group").readlink().name)
