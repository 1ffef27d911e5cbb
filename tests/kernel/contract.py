"""The kernel contract: one set of cases for the fake kernel and for the real one.

``KernelContract`` holds what the broker relies on from the kernel layer (open, bind,
attach, detach; IOAS alloc/map/unmap with the kernel's errnos; destroy while in use;
legacy container ownership; is_device_bound; the REQ-irq eventfd; IOVA ranges; memfd
inspection and the daemon's mmap). test_contract_fake.py runs it on the host against
tests/fakekernel.py over the fake lab tree; test_contract_vm.py runs it in the lab
guest against iommud.kernel.linux. Both give a ``rig`` fixture. When the two disagree
the fake is wrong: correct it, never the case.

Errnos are compared, not op names: the fake names its ops after the interface methods
(``ioas_map``), the real layer after the ioctls (``IOMMU_IOAS_MAP``).

The lab topology (tests/fakesys.py lab_topology, lab/labvm.py): 0000:00:10.0 edu alone
in its group; one group with the bridge 0000:00:11.0, edus 0000:01:01.0/01:02.0 and an
e1000 at 0000:01:03.0 bound to e1000.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TypeVar

import pytest

from iommud.errors import KernelError
from iommud.kernel.interface import DriverBinder, GroupStatus, IovaRange, Kernel, MapFlag
from iommud.kernel.libc import libc
from iommud.kernel.memory import DaemonMap, inspect_file
from iommud.kernel.uapi import U64_MAX, VFIO_PCI_REQ_IRQ_INDEX

EDU0 = "0000:00:10.0"
EDU1 = "0000:01:01.0"
NIC = "0000:01:03.0"

MiB = 1 << 20
IOVA = 0x100000
RW = MapFlag.READABLE | MapFlag.WRITEABLE
MSI_WINDOW = 0xFEE00000  # x86 interrupt range, reserved by the IOMMU driver


def expect(err: int, call: Callable[[], object]) -> KernelError:
    """Run ``call`` and require a KernelError with errno ``err`` (compared by name)."""
    with pytest.raises(KernelError) as ei:
        call()
    got = errno.errorcode.get(ei.value.errno, str(ei.value.errno))
    assert got == errno.errorcode[err], ei.value
    return ei.value


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class _Saved:
    driver: str | None
    override: str | None


@dataclass
class DriverState:
    """Rebinds devices for a test through a DriverBinder and puts every one back."""

    binder: DriverBinder
    sys_root: Path
    saved: dict[str, _Saved] = field(default_factory=dict)

    def _pci(self, bdf: str) -> Path:
        return self.sys_root / "bus" / "pci" / "devices" / bdf

    def group_of(self, bdf: str) -> int:
        return int(os.path.basename(os.readlink(self._pci(bdf) / "iommu_group")))

    def _save(self, bdf: str) -> None:
        if bdf not in self.saved:
            raw = (self._pci(bdf) / "driver_override").read_text().strip()
            override = None if raw in ("", "(null)") else raw
            self.saved[bdf] = _Saved(self.binder.current_driver(bdf), override)

    def to_vfio(self, bdf: str) -> str:
        """Bind ``bdf`` to vfio-pci (override, unbind, probe); return its cdev name."""
        self._save(bdf)
        self.binder.set_driver_override(bdf, "vfio-pci")
        self.binder.unbind(bdf)
        self.binder.drivers_probe(bdf)
        assert self.binder.current_driver(bdf) == "vfio-pci"
        (cdev,) = os.listdir(self._pci(bdf) / "vfio-dev")
        return cdev

    def unbind(self, bdf: str) -> None:
        self._save(bdf)
        self.binder.unbind(bdf)
        assert self.binder.current_driver(bdf) is None

    def restore(self) -> None:
        # Unbinding vfio-pci blocks while the device is open: a test that leaked a VFIO fd
        # would hang the whole batch, so close such leaks here and fail loudly instead.
        leaked = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(("/dev/vfio/", "anon_inode:[vfio")):
                leaked.append(target)
                os.close(int(fd))
        for bdf, saved in reversed(self.saved.items()):
            self.binder.set_driver_override(bdf, saved.override)
            self.binder.unbind(bdf)
            if saved.driver is not None:
                self.binder.drivers_probe(bdf)
        for bdf, saved in self.saved.items():
            assert self.binder.current_driver(bdf) == saved.driver, bdf
        assert not leaked, f"test leaked VFIO fds: {leaked}"


@dataclass
class Rig:
    """What a contract case gets: a kernel and a way to rebind the lab's devices."""

    kernel: Kernel
    drivers: DriverState


@contextmanager
def drivers_restored(binder: DriverBinder, sys_root: Path) -> Iterator[DriverState]:
    state = DriverState(binder, sys_root)
    try:
        yield state
    finally:
        state.restore()


class SealedMemfd:
    """A memfd sealed against shrink/grow (as a client would pass it), mmapped here."""

    def __init__(self, size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> None:
        self.fd = os.memfd_create("iommud-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        if seals & fcntl.F_SEAL_WRITE:  # no writable mapping of it can exist
            self.mm = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)
            self.address = 0
            return
        self.mm = mmap.mmap(self.fd, size)
        # The temporary ctypes view is dropped at once, so mm can still be closed.
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.mm.close()
        os.close(self.fd)


class KernelContract:
    """The cases; a subclass named Test* with a ``rig`` fixture runs them."""

    # ------------------------------------------------------------------ iommufd
    def test_cdev_bind_attach_detach_destroy(self, rig: Rig) -> None:
        """A cdev refuses everything before the bind; ids of the wrong kind are refused;
        destroy is EBUSY while a device uses the IOAS or for a bound device's id."""
        cdev = rig.drivers.to_vfio(EDU0)
        k = rig.kernel
        before = fd_count()
        with ExitStack() as stack:
            ifd = stack.enter_context(_closing(k.open_iommufd()))
            dev = stack.enter_context(_closing(k.open_cdev(cdev)))
            assert dev.name == cdev
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            stack.callback(os.close, efd)
            expect(errno.EINVAL, lambda: dev.attach_ioas(1))
            expect(errno.EINVAL, lambda: dev.get_region_info(0))
            expect(errno.EINVAL, lambda: dev.set_irq_eventfd(VFIO_PCI_REQ_IRQ_INDEX, efd))
            expect(errno.EINVAL, dev.detach_ioas)

            devid = dev.bind_iommufd(ifd)
            expect(errno.EINVAL, lambda: dev.bind_iommufd(ifd))
            other = stack.enter_context(_closing(k.open_iommufd()))
            expect(errno.EINVAL, lambda: dev.bind_iommufd(other))
            assert dev.get_region_info(0).size == MiB  # edu's BAR0
            # edu has no FLR or PM reset: VFIO_DEVICE_FLAGS_RESET is clear and reset fails.
            assert not dev.get_info().can_reset
            expect(errno.EINVAL, dev.reset)
            ioas = ifd.ioas_alloc()
            expect(errno.ENOENT, lambda: dev.attach_ioas(999))
            expect(errno.EINVAL, lambda: dev.attach_ioas(devid))  # a device, not an IOAS
            dev.attach_ioas(ioas)
            expect(errno.ENOENT, lambda: ifd.destroy(999))
            expect(errno.EBUSY, lambda: ifd.destroy(ioas))
            expect(errno.EBUSY, lambda: ifd.destroy(devid))
            dev.detach_ioas()
            dev.detach_ioas()  # detaching twice is not an error
            ifd.destroy(ioas)
            expect(errno.ENOENT, lambda: ifd.destroy(ioas))
        assert fd_count() == before

    def test_ioas_map_and_unmap_errnos(self, rig: Rig) -> None:
        """EEXIST on overlap; EINVAL for anything misaligned, empty, without access or in
        the MSI window; unmap never splits (ENOENT) and a hole is ENOENT; unmap-all
        counts bytes and is 0 on an empty IOAS."""
        cdev = rig.drivers.to_vfio(EDU0)
        k = rig.kernel
        with ExitStack() as stack:
            ifd = stack.enter_context(_closing(k.open_iommufd()))
            dev = stack.enter_context(_closing(k.open_cdev(cdev)))
            buf = stack.enter_context(SealedMemfd(2 * MiB))
            dev.bind_iommufd(ifd)
            ioas = ifd.ioas_alloc()
            dev.attach_ioas(ioas)
            va = buf.address
            assert ifd.ioas_map(ioas, va, MiB, IOVA, RW) == IOVA
            expect(errno.EEXIST, lambda: ifd.ioas_map(ioas, va, MiB, IOVA, RW))
            expect(errno.EEXIST, lambda: ifd.ioas_map(ioas, va, MiB, IOVA + MiB // 2, RW))
            free = 0x4000000
            for label, call in {
                "unaligned length": lambda: ifd.ioas_map(ioas, va, 100, free, RW),
                "unaligned iova": lambda: ifd.ioas_map(ioas, va, 4096, free + 0x100, RW),
                "unaligned va": lambda: ifd.ioas_map(ioas, va + 1, 4096, free, RW),
                "zero length": lambda: ifd.ioas_map(ioas, va, 0, free, RW),
                "no access flags": lambda: ifd.ioas_map(ioas, va, 4096, free, MapFlag(0)),
                "MSI window": lambda: ifd.ioas_map(ioas, va, 4096, MSI_WINDOW, RW),
            }.items():
                assert expect(errno.EINVAL, call).errno == errno.EINVAL, label
            expect(errno.ENOENT, lambda: ifd.ioas_map(999, va, 4096, None, RW))

            # The kernel's own choice is aligned and clear of what is mapped.
            chosen = ifd.ioas_map(ioas, va + MiB, MiB, None, RW)
            assert chosen % 4096 == 0
            assert chosen + MiB <= IOVA or IOVA + MiB <= chosen

            expect(errno.ENOENT, lambda: ifd.ioas_unmap(ioas, IOVA, 4096))  # would split
            expect(errno.ENOENT, lambda: ifd.ioas_unmap(ioas, free, 4096))  # a hole
            expect(errno.ENOENT, lambda: ifd.ioas_unmap(999, IOVA, MiB))
            assert ifd.ioas_unmap(ioas, IOVA, MiB) == MiB
            assert ifd.ioas_unmap_all(ioas) == MiB
            assert ifd.ioas_unmap_all(ioas) == 0
            dev.detach_ioas()
            ifd.destroy(ioas)

    def test_iova_ranges_follow_the_attached_device(self, rig: Rig) -> None:
        """An empty IOAS allows every IOVA with alignment 1; an attached VT-d device
        brings 4 KiB alignment and the reserved interrupt window."""
        cdev = rig.drivers.to_vfio(EDU0)
        k = rig.kernel
        with _closing(k.open_iommufd()) as ifd, _closing(k.open_cdev(cdev)) as dev:
            dev.bind_iommufd(ifd)
            ioas = ifd.ioas_alloc()
            assert ifd.ioas_iova_ranges(ioas) == ([IovaRange(0, U64_MAX)], 1)
            expect(errno.ENOENT, lambda: ifd.ioas_iova_ranges(999))
            dev.attach_ioas(ioas)
            ranges, alignment = ifd.ioas_iova_ranges(ioas)
            assert alignment == 4096
            assert ranges[0] == IovaRange(0, 0xFEDFFFFF)
            assert ranges[1].start == 0xFEF00000
            assert not any(r.start <= MSI_WINDOW <= r.last for r in ranges)
            dev.detach_ioas()
            ifd.destroy(ioas)

    def test_rlimit_mode_only_on_an_empty_iommufd(self, rig: Rig) -> None:
        with _closing(rig.kernel.open_iommufd()) as ifd:
            assert ifd.option_rlimit_mode() is False
            assert ifd.option_rlimit_mode(True) is True
            assert ifd.option_rlimit_mode(False) is False
            ioas = ifd.ioas_alloc()
            expect(errno.EBUSY, lambda: ifd.option_rlimit_mode(True))
            ifd.destroy(ioas)

    def test_delegated_shape(self, rig: Rig) -> None:
        """What a delegated claim relies on: a dup of the iommufd is the same file; an
        unbound cdev refuses detach (EINVAL); unmap-all of an id that is no IOAS (a
        device, a destroyed or never used id) is ENOENT, so probing ids is safe."""
        cdev = rig.drivers.to_vfio(EDU0)
        k = rig.kernel
        with _closing(k.open_iommufd()) as ifd, _closing(k.open_cdev(cdev)) as dev:
            assert ifd.option_rlimit_mode(True) is True
            copy = ifd.dup_fd()
            try:
                assert os.fstat(copy).st_ino == os.fstat(ifd.fileno()).st_ino
            finally:
                os.close(copy)
            expect(errno.EINVAL, dev.detach_ioas)
            devid = dev.bind_iommufd(ifd)
            ioas = ifd.ioas_alloc()
            dev.attach_ioas(ioas)
            expect(errno.ENOENT, lambda: ifd.ioas_unmap_all(devid))
            expect(errno.ENOENT, lambda: ifd.ioas_unmap_all(999))
            assert ifd.ioas_unmap_all(ioas) == 0
            dev.detach_ioas()
            ifd.destroy(ioas)
            expect(errno.ENOENT, lambda: ifd.ioas_unmap_all(ioas))

    def test_map_file_is_absent_on_6_12(self, rig: Rig) -> None:
        """IOMMU_IOAS_MAP_FILE came with 6.13: the probe says no and the call is ENOTTY."""
        with _closing(rig.kernel.open_iommufd()) as ifd, SealedMemfd(MiB) as buf:
            ioas = ifd.ioas_alloc()
            assert ifd.has_map_file() is False
            expect(errno.ENOTTY, lambda: ifd.ioas_map_file(ioas, buf.fd, 0, MiB, None, RW))
            ifd.destroy(ioas)

    def test_device_stays_bound_while_any_copy_is_open(self, rig: Rig) -> None:
        """is_device_bound: true while the daemon's fd or a client's dup is open, false
        once the last one is closed; an IOAS id is never a bound device."""
        cdev = rig.drivers.to_vfio(EDU0)
        with _closing(rig.kernel.open_iommufd()) as ifd:
            dev = rig.kernel.open_cdev(cdev)
            devid = dev.bind_iommufd(ifd)
            ioas = ifd.ioas_alloc()
            assert ifd.is_device_bound(devid) is True
            assert ifd.is_device_bound(ioas) is False
            copy = dev.dup_fd()
            dev.close()
            assert dev.closed
            expect(errno.EBADF, dev.fileno)
            assert ifd.is_device_bound(devid) is True
            os.close(copy)
            assert ifd.is_device_bound(devid) is False
            ifd.destroy(ioas)

    def test_req_irq_eventfd_can_be_set_and_removed(self, rig: Rig) -> None:
        """The REQ irq (vfio-pci asks for the device back) takes an eventfd; -1 removes it;
        DATA_NONE rings whatever eventfd is registered (how the daemon asks QEMU to let go)."""
        cdev = rig.drivers.to_vfio(EDU0)
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            with (
                _closing(rig.kernel.open_iommufd()) as ifd,
                _closing(rig.kernel.open_cdev(cdev)) as dev,
            ):

                def ring() -> None:
                    dev.trigger_irq(VFIO_PCI_REQ_IRQ_INDEX)

                expect(errno.EINVAL, ring)  # not bound yet
                dev.bind_iommufd(ifd)
                assert dev.get_info().num_irqs > VFIO_PCI_REQ_IRQ_INDEX
                expect(errno.EINVAL, ring)  # no trigger registered
                dev.set_irq_eventfd(VFIO_PCI_REQ_IRQ_INDEX, efd)
                ring()  # DATA_NONE loopback: whoever registered the eventfd hears it
                assert os.eventfd_read(efd) == 1
                dev.set_irq_eventfd(VFIO_PCI_REQ_IRQ_INDEX, -1)
                expect(errno.EINVAL, ring)
                dev.set_irq_eventfd(VFIO_PCI_REQ_IRQ_INDEX, efd)  # left set at close
        finally:
            os.close(efd)

    # ------------------------------------------------------------------ legacy
    def test_non_viable_group_refuses_ownership(self, rig: Rig) -> None:
        """e1000 in the group: SET_CONTAINER is EPERM; the group node opens once (EBUSY);
        a cdev bind is EBUSY while the node is open and EPERM after."""
        cdev = rig.drivers.to_vfio(EDU1)
        k = rig.kernel
        assert k.binder.current_driver(NIC) == "e1000"
        gid = rig.drivers.group_of(EDU1)
        before = fd_count()
        with _closing(k.open_group(gid)) as g, _closing(k.open_container()) as c:
            assert g.group_id == gid
            assert g.get_status() == GroupStatus(is_viable=False, is_container_set=False)
            expect(errno.EBUSY, lambda: k.open_group(gid))
            expect(errno.EPERM, lambda: g.set_container(c))
            expect(errno.EINVAL, lambda: g.get_device(EDU1))
            expect(errno.EINVAL, c.set_iommu_type1v2)  # no group in it
            with _closing(k.open_iommufd()) as ifd, _closing(k.open_cdev(cdev)) as dev:
                expect(errno.EBUSY, lambda: dev.bind_iommufd(ifd))
        with _closing(k.open_iommufd()) as ifd, _closing(k.open_cdev(cdev)) as dev:
            expect(errno.EPERM, lambda: dev.bind_iommufd(ifd))
        assert fd_count() == before

    def test_legacy_container_ownership_and_maps(self, rig: Rig) -> None:
        """The group made viable (e1000 unbound): container, TYPE1v2, MAP_DMA errnos,
        GET_DEVICE_FD only for vfio-pci members, and e1000 cannot probe while owned."""
        rig.drivers.unbind(NIC)
        rig.drivers.to_vfio(EDU1)
        k = rig.kernel
        gid = rig.drivers.group_of(EDU1)
        before = fd_count()
        with ExitStack() as stack:
            g = stack.enter_context(_closing(k.open_group(gid)))
            c = stack.enter_context(_closing(k.open_container()))
            buf = stack.enter_context(SealedMemfd(MiB))
            assert c.get_api_version() == 0
            assert c.check_extension(3)  # VFIO_TYPE1v2_IOMMU
            expect(errno.EINVAL, g.unset_container)
            g.set_container(c)
            assert g.get_status() == GroupStatus(is_viable=True, is_container_set=True)
            expect(errno.EINVAL, lambda: g.set_container(c))
            c.set_iommu_type1v2()
            expect(errno.EINVAL, lambda: k.binder.drivers_probe(NIC))
            assert k.binder.current_driver(NIC) is None

            c.map_dma(buf.address, IOVA, MiB, read=True, write=True)
            expect(errno.EEXIST, lambda: c.map_dma(buf.address, IOVA, MiB, read=True, write=True))
            expect(
                errno.EINVAL, lambda: c.map_dma(buf.address, 0x4000000, 100, read=True, write=True)
            )
            expect(errno.ENODEV, lambda: g.get_device(NIC))
            with _closing(g.get_device(EDU1)) as dev:
                assert dev.name == EDU1
            assert c.unmap_dma(IOVA, MiB) == MiB
            c.map_dma(buf.address, IOVA, MiB, read=True, write=False)
            assert c.unmap_all() == MiB
            assert c.unmap_all() == 0
            g.unset_container()
            assert g.get_status() == GroupStatus(is_viable=True, is_container_set=False)
        assert fd_count() == before

    # ------------------------------------------------------------------ client memory
    def test_memfd_inspection_and_daemon_map(self) -> None:
        """What the broker's seal check and mmap fallback see of a client's fds."""
        with SealedMemfd(2 * 4096) as buf:
            info = inspect_file(buf.fd)
            assert (info.is_regular, info.size) == (True, 2 * 4096)
            assert info.has_seals(fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            m = DaemonMap(buf.fd, 4096, 4096, write=True)
            assert m.addr is not None
            m.populate(0, 4096)  # MADV_POPULATE_WRITE (5.14+)
            ctypes.memmove(m.addr, b"via the daemon", 14)
            assert expect(errno.EINVAL, lambda: m.populate(0, 8192)).op == "madvise"
            m.close()
            m.close()  # idempotent
            assert expect(errno.EBADF, lambda: m.populate(0, 4096)).op == "madvise"
            assert buf.mm[4096 : 4096 + 14] == b"via the daemon"
            # every fd of one file names the same inode (the daemon's mapping reuse key)
            dup = os.dup(buf.fd)
            try:
                assert inspect_file(dup).inode == info.inode != (0, 0)
            finally:
                os.close(dup)
        plain = os.memfd_create("unsealable", os.MFD_CLOEXEC)
        try:
            assert not inspect_file(plain).has_seals(fcntl.F_SEAL_SHRINK)
        finally:
            os.close(plain)
        with SealedMemfd(4096, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE) as ro:
            err = expect(errno.EPERM, lambda: DaemonMap(ro.fd, 0, 4096, write=True))
            assert err.op == "mmap"
            ro_map = DaemonMap(ro.fd, 0, 4096, write=False)
            ro_map.populate(0, 4096)  # MADV_POPULATE_READ of a write-sealed file
            ro_map.close()
        r, w = os.pipe()
        try:
            assert inspect_file(r).is_regular is False
            expect(errno.ENODEV, lambda: DaemonMap(r, 0, 4096, write=False))
        finally:
            os.close(r)
            os.close(w)
        err = expect(errno.EBADF, lambda: inspect_file(r))
        assert err.op == "fstat"

    def test_daemon_map_residency(self) -> None:
        """mincore through the daemon's mapping: untouched pages and punched holes are not
        resident, populated ones are; a closed map or a range outside it answers False."""
        with SealedMemfd(4 * 4096) as buf:
            m = DaemonMap(buf.fd, 0, 4 * 4096, write=True)
            assert not m.is_resident(0, 4096)  # never touched: no page exists yet
            m.populate(0, 2 * 4096)
            assert m.is_resident(0, 2 * 4096)
            assert not m.is_resident(0, 3 * 4096)
            buf.mm[3 * 4096] = 1  # the client's own write makes the page resident too
            assert m.is_resident(3 * 4096, 4096)
            punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            assert libc.fallocate(buf.fd, punch, ctypes.c_long(4096), ctypes.c_long(4096)) == 0
            assert m.is_resident(0, 4096)
            assert not m.is_resident(0, 2 * 4096)
            assert not m.is_resident(3 * 4096, 2 * 4096)  # past the mapping's end
            m.close()
            assert not m.is_resident(0, 4096)


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


@contextmanager
def _closing(obj: C) -> Iterator[C]:
    """The fake's objects are not context managers; close either kind the same way."""
    try:
        yield obj
    finally:
        obj.close()
