"""ioctl numbers and argument structs of iommufd and VFIO, as ctypes definitions.

Transcribed from Linux 6.12's include/uapi/linux/iommufd.h and
include/uapi/linux/vfio.h (plus IOMMU_IOAS_MAP_FILE, added in 6.13). Every struct
begins with its own size (``size`` or ``argsz``) which the caller must set; the
ioctl numbers carry no size or direction bits (``_IO(';', nr)``).
tests/kernel/test_uapi.py compiles the real headers and checks every size, offset
and number here against them.

Pure data: this module performs no I/O and holds no policy.
"""

from __future__ import annotations

import ctypes
from typing import Self

# include/uapi/asm-generic/ioctl.h: _IO(type, nr) has no direction and no size bits.
_IOC_TYPESHIFT = 8


def _io(type_: int, nr: int) -> int:
    return (type_ << _IOC_TYPESHIFT) | nr


# --- include/uapi/linux/iommufd.h -------------------------------------------------

IOMMUFD_TYPE = ord(";")

IOMMU_DESTROY = _io(IOMMUFD_TYPE, 0x80)
IOMMU_IOAS_ALLOC = _io(IOMMUFD_TYPE, 0x81)
IOMMU_IOAS_ALLOW_IOVAS = _io(IOMMUFD_TYPE, 0x82)
IOMMU_IOAS_COPY = _io(IOMMUFD_TYPE, 0x83)
IOMMU_IOAS_IOVA_RANGES = _io(IOMMUFD_TYPE, 0x84)
IOMMU_IOAS_MAP = _io(IOMMUFD_TYPE, 0x85)
IOMMU_IOAS_UNMAP = _io(IOMMUFD_TYPE, 0x86)
IOMMU_OPTION = _io(IOMMUFD_TYPE, 0x87)
IOMMU_VFIO_IOAS = _io(IOMMUFD_TYPE, 0x88)
IOMMU_HWPT_ALLOC = _io(IOMMUFD_TYPE, 0x89)
IOMMU_GET_HW_INFO = _io(IOMMUFD_TYPE, 0x8A)
# Linux >= 6.13 only (IOMMUFD_CMD_IOAS_MAP_FILE); 6.12 answers ENOTTY. Probe, never assume.
IOMMU_IOAS_MAP_FILE = _io(IOMMUFD_TYPE, 0x8F)

IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1

IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2

U64_MAX = (1 << 64) - 1


class _Struct(ctypes.Structure):
    """Native layout, which on x86-64 matches the kernel's (__aligned_u64 is 8-aligned).

    Class names are the kernel's own (lowercase), so a reader can grep the headers.
    """

    @classmethod
    def new(cls, **fields: int) -> Self:
        """An instance with its leading size/argsz field set to sizeof(cls)."""
        obj = cls(**fields)
        first = cls._fields_[0][0]
        setattr(obj, first, ctypes.sizeof(cls))
        return obj


class iommu_destroy(_Struct):
    _fields_ = (("size", ctypes.c_uint32), ("id", ctypes.c_uint32))


class iommu_ioas_alloc(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("out_ioas_id", ctypes.c_uint32),
    )


class iommu_iova_range(_Struct):
    _fields_ = (("start", ctypes.c_uint64), ("last", ctypes.c_uint64))


class iommu_ioas_iova_ranges(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("num_iovas", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("allowed_iovas", ctypes.c_uint64),  # user pointer to iommu_iova_range[]
        ("out_iova_alignment", ctypes.c_uint64),
    )


class iommu_ioas_allow_iovas(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("num_iovas", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("allowed_iovas", ctypes.c_uint64),
    )


class iommu_ioas_map(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("user_va", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
    )


class iommu_ioas_map_file(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("start", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
    )


class iommu_ioas_copy(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dst_ioas_id", ctypes.c_uint32),
        ("src_ioas_id", ctypes.c_uint32),
        ("length", ctypes.c_uint64),
        ("dst_iova", ctypes.c_uint64),
        ("src_iova", ctypes.c_uint64),
    )


class iommu_ioas_unmap(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    )


class iommu_option(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("option_id", ctypes.c_uint32),
        ("op", ctypes.c_uint16),
        ("__reserved", ctypes.c_uint16),
        ("object_id", ctypes.c_uint32),
        ("val64", ctypes.c_uint64),
    )


class iommu_hw_info(_Struct):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dev_id", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("data_uptr", ctypes.c_uint64),
        ("out_data_type", ctypes.c_uint32),
        ("out_max_pasid_log2", ctypes.c_uint8),
        ("__reserved", ctypes.c_uint8 * 3),
        ("out_capabilities", ctypes.c_uint64),
    )


# --- include/uapi/linux/vfio.h ----------------------------------------------------

VFIO_TYPE = ord(";")
VFIO_BASE = 100
VFIO_API_VERSION = 0

VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_UNMAP_ALL = 9  # extension: VFIO_DMA_UNMAP_FLAG_ALL is supported

VFIO_GET_API_VERSION = _io(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _io(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _io(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _io(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _io(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _io(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _io(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _io(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _io(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _io(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_FEATURE = _io(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _io(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(VFIO_TYPE, VFIO_BASE + 20)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

# enum in vfio.h: VFIO_PCI_BAR0_REGION_INDEX .. VFIO_PCI_CONFIG_REGION_INDEX
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7

# enum in vfio.h: VFIO_PCI_INTX_IRQ_INDEX .. VFIO_PCI_REQ_IRQ_INDEX. The REQ irq is how
# vfio-pci asks the user to release a device that is being removed
# (drivers/vfio/pci/vfio_pci_core.c vfio_pci_core_request).
VFIO_PCI_REQ_IRQ_INDEX = 4

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1


class vfio_group_status(_Struct):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class vfio_device_info(_Struct):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class vfio_region_info(_Struct):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    )


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class vfio_iommu_type1_dma_unmap(_Struct):
    # The kernel struct ends in a flexible ``__u8 data[]`` (dirty bitmap), unused here.
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class vfio_irq_set(_Struct):
    # The kernel struct ends in a flexible ``__u8 data[]``: for DATA_EVENTFD, ``count``
    # __s32 eventfds follow (-1 removes a trigger). argsz covers the data too.
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class vfio_irq_set_eventfd(_Struct):
    """``vfio_irq_set`` followed by one __s32 eventfd (not a kernel name: see above)."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("eventfd", ctypes.c_int32),
    )


class vfio_device_bind_iommufd(_Struct):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iommufd", ctypes.c_int32),
        ("out_devid", ctypes.c_uint32),
    )


class vfio_device_attach_iommufd_pt(_Struct):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pt_id", ctypes.c_uint32),
    )


class vfio_device_detach_iommufd_pt(_Struct):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


#: Every struct above, by its kernel name (used by the header cross-check test).
STRUCTS: dict[str, type[_Struct]] = {
    cls.__name__: cls
    for cls in (
        iommu_destroy,
        iommu_ioas_alloc,
        iommu_iova_range,
        iommu_ioas_iova_ranges,
        iommu_ioas_allow_iovas,
        iommu_ioas_map,
        iommu_ioas_map_file,
        iommu_ioas_copy,
        iommu_ioas_unmap,
        iommu_option,
        iommu_hw_info,
        vfio_group_status,
        vfio_device_info,
        vfio_region_info,
        vfio_iommu_type1_dma_map,
        vfio_iommu_type1_dma_unmap,
        vfio_irq_set,
        vfio_device_bind_iommufd,
        vfio_device_attach_iommufd_pt,
        vfio_device_detach_iommufd_pt,
    )
}

#: Every ioctl number above, by its kernel name (cross-checked against the headers).
IOCTLS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith(("IOMMU_", "VFIO_"))
    and isinstance(value, int)
    and value >> _IOC_TYPESHIFT == IOMMUFD_TYPE
}
