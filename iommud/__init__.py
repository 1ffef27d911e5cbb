"""iommud: a privileged broker for Linux IOMMU (iommufd) and VFIO devices.

The daemon owns /dev/iommu, /dev/vfio/devices/vfioN and the legacy group/container
fds and hands devices and IOAS mappings to unprivileged VMM clients over a JSON
protocol on a Unix socket (see protocol/PROTOCOL.md).
"""

__version__ = "0.1.0"
