"""iommud: a privileged broker for Linux IOMMU (iommufd) and VFIO devices.

The daemon owns /dev/iommu, /dev/vfio/devices/vfioN and the legacy group/container
fds and hands devices and IOAS mappings to unprivileged VMM clients over a JSON
protocol on a Unix socket (see protocol/PROTOCOL.md).

Public faces: :mod:`iommud.client` (the client library for VMMs), :mod:`iommud.protocol`
(the wire protocol, sans-I/O), :mod:`iommud.errors` (the one exception hierarchy, shared
by daemon and client). The daemon itself is ``python -m iommud`` (:mod:`iommud.app`);
``iommuctl`` is :mod:`iommud.cli`. README.md's layout table maps the rest.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
