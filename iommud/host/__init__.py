"""The host as iommud sees it: a frozen sysfs snapshot and pure decisions over it.

- :mod:`iommud.host.snapshot` reads sysfs (from a root path passed in) into frozen
  PciDevice / IommuGroup / HostSnapshot values; it never writes.
- :mod:`iommud.host.viability` decides group viability and the claim path (iommufd or
  legacy VFIO) without any I/O; the DMA-safe driver list is data
  (``dma_safe_drivers.toml``).
"""
