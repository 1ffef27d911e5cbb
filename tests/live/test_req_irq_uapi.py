"""VFIO_DEVICE_SET_IRQS for the REQ irq (host test): the struct the daemon passes.

``vfio_irq_set`` itself is checked against the 6.12 header with every other struct
(tests/kernel/test_kernel_uapi.py compiles vfio.h); here: the one-eventfd variant is
that struct followed by an __s32 at its end, and the wrapper maps errors to KernelError.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from iommud.errors import KernelError
from iommud.kernel import uapi
from iommud.kernel.linux import LinuxVfioDevice


def test_eventfd_variant_is_vfio_irq_set_plus_one_s32() -> None:
    base, ext = uapi.vfio_irq_set, uapi.vfio_irq_set_eventfd
    assert ctypes.sizeof(base) == 20
    for name, *_ in base._fields_:
        assert getattr(ext, name).offset == getattr(base, name).offset
    assert ext.eventfd.offset == ctypes.sizeof(base)
    assert ctypes.sizeof(ext) == 24
    cmd = ext.new(index=uapi.VFIO_PCI_REQ_IRQ_INDEX, count=1, eventfd=7)
    assert (cmd.argsz, cmd.index, cmd.eventfd) == (24, 4, 7)
    assert (ord(";") << 8) | 110 == uapi.VFIO_DEVICE_SET_IRQS
    assert uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER == 0x24


def test_set_irq_eventfd_on_a_non_vfio_fd_is_a_kernel_error() -> None:
    dev = LinuxVfioDevice(os.memfd_create("not-vfio", os.MFD_CLOEXEC), "vfio0")
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(KernelError) as info:
            dev.set_irq_eventfd(uapi.VFIO_PCI_REQ_IRQ_INDEX, efd)
        assert (info.value.op, info.value.errno) == ("VFIO_DEVICE_SET_IRQS", errno.ENOTTY)
    finally:
        dev.close()
        os.close(efd)
