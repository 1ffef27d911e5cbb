"""The host as iommud sees it: a frozen sysfs snapshot and pure decisions over it.

- :mod:`iommud.host.snapshot` reads sysfs (from a root path passed in) into frozen
  PciDevice / IommuGroup / HostSnapshot values; it never writes.
- :mod:`iommud.host.viability` decides group viability and the claim path (iommufd or
  legacy VFIO) without any I/O; the DMA-safe driver list is data
  (``dma_safe_drivers.toml``).

Nothing here writes sysfs, opens /dev nodes or keeps state: the broker owns the
current snapshot and acts on the decisions.
"""

from iommud.host.snapshot import (
    DEFAULT_DEV_ROOT,
    DEFAULT_SYS_ROOT,
    HostSnapshot,
    IommuGroup,
    OtherMember,
    PciDevice,
    group_of,
    read_device,
    read_group,
    read_snapshot,
)
from iommud.host.viability import (
    DEFAULT_DMA_SAFE_DRIVERS,
    BackendRequest,
    ClaimIntent,
    ClaimPath,
    ExistingClaim,
    Offender,
    PathDecision,
    Viability,
    group_viability,
    select_path,
    whole_group_path,
)

__all__ = [
    "DEFAULT_DEV_ROOT",
    "DEFAULT_DMA_SAFE_DRIVERS",
    "DEFAULT_SYS_ROOT",
    "BackendRequest",
    "ClaimIntent",
    "ClaimPath",
    "ExistingClaim",
    "HostSnapshot",
    "IommuGroup",
    "Offender",
    "OtherMember",
    "PathDecision",
    "PciDevice",
    "Viability",
    "group_of",
    "group_viability",
    "read_device",
    "read_group",
    "read_snapshot",
    "select_path",
    "whole_group_path",
]
