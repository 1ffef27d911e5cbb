"""A minimal driver for QEMU's "edu" teaching device, given a VFIO device fd.

The fd may come from anywhere (a cdev bound to an iommufd, a legacy group, or a
client that received it over SCM_RIGHTS): this module only uses
VFIO_DEVICE_GET_REGION_INFO and pread/pwrite at region offsets, so it works in any
process that holds the fd. Register map from QEMU's docs/specs/edu.rst and
hw/misc/edu.c; the pitfalls from shared/lab-notes.md are enforced here:

- DMA is dropped until Bus Master Enable is set (PCI_COMMAND |= 0x6 via config space);
- the device masks DMA addresses to 28 bits: IOVAs must stay below 256 MiB;
- QEMU 7.2 aborts on a full 4096-byte transfer (off-by-one): at most 2048 bytes;
- the internal buffer (at device address 0x40000) is not readable through BAR0, so a
  round trip is RAM -> device -> RAM.

Lab code only: it must not be imported by the daemon. Errors are EduError (device
misbehaving or arguments out of range) and KernelError (a VFIO ioctl failed); a
failed pread/pwrite raises OSError.
"""

from __future__ import annotations

import os
import struct
import time

from iommud.kernel.interface import RegionInfo
from iommud.kernel.linux import get_region_info
from iommud.kernel.uapi import VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX

EDU_ID = 0x010000ED  # register 0x00: version 1.0, device 0x00ed

REG_ID = 0x00
REG_LIVENESS = 0x04  # reads back the bitwise inverse of what was written
REG_STATUS = 0x20
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

DMA_CMD_START = 0x1  # set to start; reads 1 while the transfer is in flight
DMA_CMD_TO_RAM = 0x2  # direction: 1 = device buffer -> RAM, 0 = RAM -> device buffer

DEVICE_BUFFER = 0x40000  # device-side address of the 4096-byte internal buffer
DEVICE_BUFFER_SIZE = 4096
MAX_TRANSFER = 2048  # QEMU 7.2 aborts the whole VM on a 4096-byte transfer
IOVA_LIMIT = 1 << 28  # the device masks DMA addresses to 28 bits

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4


class EduError(Exception):
    """The edu device did not behave, or a request was outside what it can do."""


class Edu:
    """Drive an edu device through a VFIO device fd (not owned: the caller closes it)."""

    def __init__(self, fd: int, *, timeout: float = 5.0, poll_interval: float = 0.005) -> None:
        self.fd = fd
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.bar0: RegionInfo = get_region_info(fd, VFIO_PCI_BAR0_REGION_INDEX)
        self.config: RegionInfo = get_region_info(fd, VFIO_PCI_CONFIG_REGION_INDEX)
        if self.bar0.size < REG_DMA_CMD + 8:
            raise EduError(f"BAR0 is {self.bar0.size} bytes: not an edu device")
        device_id = self.read32(REG_ID)
        if device_id != EDU_ID:
            raise EduError(f"id register reads {device_id:#010x}, expected {EDU_ID:#010x}")

    # --- register access ----------------------------------------------------------

    def read32(self, reg: int) -> int:
        return int(struct.unpack("<I", self._pread(self.bar0, reg, 4))[0])

    def write32(self, reg: int, value: int) -> None:
        self._pwrite(self.bar0, reg, struct.pack("<I", value))

    def read64(self, reg: int) -> int:
        return int(struct.unpack("<Q", self._pread(self.bar0, reg, 8))[0])

    def write64(self, reg: int, value: int) -> None:
        self._pwrite(self.bar0, reg, struct.pack("<Q", value))

    def is_alive(self, probe: int = 0x5A5AA5A5) -> bool:
        """The liveness register returns the inverse of what was written."""
        self.write32(REG_LIVENESS, probe)
        return self.read32(REG_LIVENESS) == (~probe & 0xFFFFFFFF)

    # --- config space ---------------------------------------------------------------

    def command_register(self) -> int:
        return int(struct.unpack("<H", self._pread(self.config, PCI_COMMAND, 2))[0])

    def enable_bus_master(self) -> None:
        """PCI_COMMAND |= MEMORY | MASTER: without it the device drops every DMA."""
        cmd = self.command_register()
        want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if want != cmd:
            self._pwrite(self.config, PCI_COMMAND, struct.pack("<H", want))
        if self.command_register() & PCI_COMMAND_MASTER == 0:
            raise EduError("Bus Master Enable did not stick")

    # --- DMA ------------------------------------------------------------------------

    def dma_from_ram(self, iova: int, length: int, *, device_offset: int = 0) -> None:
        """Copy ``length`` bytes at ``iova`` (RAM) into the device buffer."""
        self._dma(
            src=iova,
            dst=DEVICE_BUFFER + device_offset,
            length=length,
            cmd=0,
            iova=iova,
            device_offset=device_offset,
        )

    def dma_to_ram(self, iova: int, length: int, *, device_offset: int = 0) -> None:
        """Copy ``length`` bytes of the device buffer to ``iova`` (RAM)."""
        self._dma(
            src=DEVICE_BUFFER + device_offset,
            dst=iova,
            length=length,
            cmd=DMA_CMD_TO_RAM,
            iova=iova,
            device_offset=device_offset,
        )

    def _dma(
        self, *, src: int, dst: int, length: int, cmd: int, iova: int, device_offset: int
    ) -> None:
        if not 0 < length <= MAX_TRANSFER:
            raise EduError(f"transfer of {length} bytes: edu takes 1..{MAX_TRANSFER}")
        if iova < 0 or iova + length > IOVA_LIMIT:
            raise EduError(f"IOVA {iova:#x}+{length:#x} beyond the device's 28-bit reach")
        if device_offset < 0 or device_offset + length > DEVICE_BUFFER_SIZE:
            raise EduError(f"device buffer range {device_offset:#x}+{length:#x} out of bounds")
        self.wait_idle()
        self.write64(REG_DMA_SRC, src)
        self.write64(REG_DMA_DST, dst)
        self.write64(REG_DMA_COUNT, length)
        self.write64(REG_DMA_CMD, cmd | DMA_CMD_START)
        self.wait_idle()

    def wait_idle(self) -> None:
        """Poll bit 0 of the DMA command register until it clears (about 100 ms)."""
        deadline = time.monotonic() + self.timeout
        while self.read64(REG_DMA_CMD) & DMA_CMD_START:
            if time.monotonic() > deadline:
                raise EduError(f"DMA still busy after {self.timeout} s")
            time.sleep(self.poll_interval)

    # --- plumbing -------------------------------------------------------------------

    def _pread(self, region: RegionInfo, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, region.offset + offset)
        if len(data) != size:
            raise EduError(f"short read at region {region.index} offset {offset:#x}")
        return data

    def _pwrite(self, region: RegionInfo, offset: int, data: bytes) -> None:
        if os.pwrite(self.fd, data, region.offset + offset) != len(data):
            raise EduError(f"short write at region {region.index} offset {offset:#x}")
