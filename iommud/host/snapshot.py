"""A frozen snapshot of the host's PCI devices and IOMMU groups, read from sysfs.

Everything is read from a ``sys_root`` and a ``dev_root`` passed in (defaults /sys and
/dev); nothing else in the daemon names those paths. This module only *reads*: it never
writes sysfs, opens /dev nodes or decides anything (viability and policy are pure
functions over the snapshot, in :mod:`iommud.host.viability` and :mod:`iommud.policy`).

sysfs facts relied on (Documentation/ABI/testing/sysfs-bus-pci,
Documentation/ABI/testing/sysfs-kernel-iommu_groups, drivers/vfio/vfio_main.c):

- ``kernel/iommu_groups/N/devices/<name>`` are links to the member devices, and
  ``kernel/iommu_groups/N/type`` holds the default domain type;
- ``bus/pci/devices/<bdf>`` links to the device directory, which holds ``vendor``,
  ``device`` and ``class`` as hex text, ``driver`` (a link, absent when driver-less),
  ``driver_override`` (``(null)`` when unset), ``iommu_group`` (a link) and, when bound
  to vfio-pci with the cdev interface, ``vfio-dev/vfioN``.

Hot unplug races: a device or group whose directory disappears while it is being read
is *skipped* by :func:`read_snapshot` and :func:`read_group` (the udev layer will see the
``remove`` uevent and refresh); :func:`read_device` raises NotFoundError for it. A file
missing or garbled in a directory that still exists is a SnapshotError naming the path.

Costs: :func:`read_snapshot` is O(host); :func:`read_group` reads one group directory
and its members only; :meth:`HostSnapshot.with_group` is O(group size) plus an
amortised O(sqrt(host)) for keeping its copy-on-write maps compact (see
:class:`_OverlayMap`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

from iommud.errors import NotFoundError, SnapshotError
from iommud.pci import BDF_RE

__all__ = [
    "DEFAULT_DEV_ROOT",
    "DEFAULT_SYS_ROOT",
    "PCI_CLASS_BRIDGE_PCI",
    "HostSnapshot",
    "IommuGroup",
    "OtherMember",
    "PciDevice",
    "group_of",
    "read_device",
    "read_group",
    "read_snapshot",
]

DEFAULT_SYS_ROOT: Final = Path("/sys")
DEFAULT_DEV_ROOT: Final = Path("/dev")

# include/linux/pci_ids.h: PCI_CLASS_BRIDGE_PCI 0x0604 (class code bits 23..8).
PCI_CLASS_BRIDGE_PCI: Final = 0x0604


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One PCI function as sysfs showed it at read time.

    A plain frozen dataclass rather than a pydantic model: snapshots of 10,000 devices
    are rebuilt on every rescan and never cross the wire as such (the protocol layer
    has its own DeviceEntry model).
    """

    bdf: str
    vendor: int
    device: int
    class_code: int
    driver: str | None
    driver_override: str | None
    group_id: int | None
    vfio_cdev: str | None = None

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI bridge (class 0x0604xx): never DMA-capable, never claimable."""
        return (self.class_code >> 8) == PCI_CLASS_BRIDGE_PCI

    @property
    def vendor_device(self) -> str:
        """``"1234:11e8"``: the form used by config selectors and lspci -n."""
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclass(frozen=True, slots=True)
class OtherMember:
    """A non-PCI member of an IOMMU group (platform, ACPI...), kept for viability."""

    name: str
    driver: str | None


@dataclass(frozen=True, slots=True)
class IommuGroup:
    """An IOMMU group: the kernel's unit of isolation (and of VFIO ownership)."""

    group_id: int
    devices: tuple[str, ...]  # sorted PCI BDFs
    type: str | None = None  # default domain type ("DMA", "identity", ...), if exposed
    other_members: tuple[OtherMember, ...] = ()


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Tombstone:
    __slots__ = ()


_GONE: Final = _Tombstone()


class _OverlayMap(Mapping[_K, _V], Generic[_K, _V]):
    """An immutable mapping: a shared base dict plus a small private overlay.

    ``replace`` returns a new map sharing the (never mutated) base and copying only the
    overlay, so one update costs O(changes + overlay size). When the overlay outgrows
    ``max(64, sqrt(len(base)))`` entries it is folded into a fresh base (an O(host)
    copy), which keeps lookups at two dict probes and makes the amortised cost of an
    update O(changes + sqrt(host)). Iteration order is not meaningful.
    """

    __slots__ = ("_base", "_len", "_overlay")

    def __init__(
        self, base: dict[_K, _V], overlay: dict[_K, _V | _Tombstone] | None = None
    ) -> None:
        self._base = base
        self._overlay: dict[_K, _V | _Tombstone] = overlay or {}
        n = len(base)
        for k, v in self._overlay.items():
            in_base = k in base
            if isinstance(v, _Tombstone):
                n -= in_base
            else:
                n += not in_base
        self._len = n

    def __getitem__(self, key: _K) -> _V:
        if key in self._overlay:
            v = self._overlay[key]
            if isinstance(v, _Tombstone):
                raise KeyError(key)
            return v
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        if key in self._overlay:
            return not isinstance(self._overlay[key], _Tombstone)
        return key in self._base

    def __iter__(self) -> Iterator[_K]:
        overlay = self._overlay
        for k in self._base:
            if k not in overlay:
                yield k
        for k, v in overlay.items():
            if not isinstance(v, _Tombstone):
                yield k

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"_OverlayMap({dict(self)!r})"

    def replace(self, updates: Mapping[_K, _V], removals: Iterable[_K]) -> _OverlayMap[_K, _V]:
        overlay: dict[_K, _V | _Tombstone] = dict(self._overlay)
        for k in removals:
            overlay[k] = _GONE
        overlay.update(updates)
        if len(overlay) > max(64, math.isqrt(len(self._base))):
            base = {k: v for k, v in self._base.items() if k not in overlay}
            base.update({k: v for k, v in overlay.items() if not isinstance(v, _Tombstone)})
            return _OverlayMap(base)
        return _OverlayMap(self._base, overlay)


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """Devices by BDF and groups by id, plus which VFIO front doors exist."""

    devices: Mapping[str, PciDevice]
    groups: Mapping[int, IommuGroup]
    has_iommufd: bool  # dev_root/iommu exists
    has_legacy_container: bool  # dev_root/vfio/vfio exists

    def group_devices(self, group_id: int) -> tuple[PciDevice, ...]:
        """The PCI devices of one group, in BDF order (those present in ``devices``)."""
        group = self.groups[group_id]
        return tuple(self.devices[b] for b in group.devices if b in self.devices)

    def with_group(self, group: IommuGroup, devices: Mapping[str, PciDevice]) -> HostSnapshot:
        """A new snapshot with one group (as re-read by :func:`read_group`) replaced.

        Devices that were in the old group and are not in ``devices`` are removed; a
        device that moved here from another group is dropped from that group's member
        list. Costs O(group size) plus the amortised compaction of :class:`_OverlayMap`.
        """
        for bdf, dev in devices.items():
            if dev.group_id != group.group_id:
                raise ValueError(f"{bdf} has group_id {dev.group_id}, not {group.group_id}")
        return self._replace_group(group.group_id, group, devices)

    def without_group(self, group_id: int) -> HostSnapshot:
        """A new snapshot without one group and its devices (the group vanished)."""
        return self._replace_group(group_id, None, {})

    def _replace_group(
        self, group_id: int, group: IommuGroup | None, devices: Mapping[str, PciDevice]
    ) -> HostSnapshot:
        old = self.groups.get(group_id)
        old_members = set(old.devices) if old is not None else set()
        removed = old_members - devices.keys()
        group_updates: dict[int, IommuGroup] = {}
        group_removals: list[int] = []
        for bdf in devices:
            prev = self.devices.get(bdf)
            if prev is None or prev.group_id is None or prev.group_id == group_id:
                continue
            pg = group_updates.get(prev.group_id) or self.groups.get(prev.group_id)
            if pg is None:
                continue
            rest = tuple(b for b in pg.devices if b != bdf)
            if rest or pg.other_members:
                group_updates[pg.group_id] = IommuGroup(
                    pg.group_id, rest, pg.type, pg.other_members
                )
            else:
                group_removals.append(pg.group_id)
        if group is None:
            group_removals.append(group_id)
        else:
            group_updates[group_id] = group
        return HostSnapshot(
            devices=_replace(self.devices, devices, removed),
            groups=_replace(self.groups, group_updates, group_removals),
            has_iommufd=self.has_iommufd,
            has_legacy_container=self.has_legacy_container,
        )


def _replace(
    m: Mapping[_K, _V], updates: Mapping[_K, _V], removals: Iterable[_K]
) -> Mapping[_K, _V]:
    if not isinstance(m, _OverlayMap):
        m = _OverlayMap(dict(m))
    return m.replace(updates, removals)


# --------------------------------------------------------------------------- reading


class _Vanished(Exception):
    """The directory being read disappeared (hot unplug): the caller skips it."""


# Paths are plain strings from here on: pathlib's joins cost more than the syscalls on
# a 10,000-device host (bench/snapshot_scale.py).


def _read_bytes(path: str) -> bytes:
    """One read of a sysfs attribute (attributes are at most a page)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 8192)
    finally:
        os.close(fd)


def _bad(path: str, problem: str, **details: object) -> SnapshotError:
    """The one way this module reports sysfs that does not look as expected."""
    return SnapshotError(f"sysfs {path}: {problem}", path=path, problem=problem, **details)


@contextlib.contextmanager
def _sysfs(
    path: str, owner_dir: str | None = None, *, missing_ok: bool = False, einval: str = ""
) -> Iterator[None]:
    """Translate an OSError from reading ``path`` (httpcore's ``map_exceptions``, for sysfs).

    ``owner_dir`` gone (ENOENT), or ENODEV from a device being torn down -> _Vanished:
    the caller skips it (hot unplug, module docstring). ENOENT otherwise -> swallowed when
    ``missing_ok`` (the caller keeps its default), else SnapshotError "missing". Any other
    errno -> SnapshotError with the errno and its text (or ``einval`` for EINVAL, where the
    call gives EINVAL a meaning, as readlink does).
    """
    try:
        yield
    except OSError as exc:
        if owner_dir is not None and (
            exc.errno == errno.ENODEV
            or (exc.errno == errno.ENOENT and not os.path.exists(owner_dir))
        ):
            raise _Vanished(owner_dir) from exc
        if exc.errno == errno.ENOENT:
            if missing_ok:
                return
            raise _bad(path, "missing") from exc
        if exc.errno == errno.EINVAL and einval:
            raise _bad(path, einval) from exc
        raise _bad(path, exc.strerror or "unreadable", errno=exc.errno) from exc


def _read_text(path: str, owner_dir: str) -> str:
    """Read a small sysfs attribute; missing because ``owner_dir`` vanished -> _Vanished."""
    data = b""
    with _sysfs(path, owner_dir):
        data = _read_bytes(path)
    return data.decode("ascii", "replace")


def _read_hex(path: str, owner_dir: str, bits: int) -> int:
    text = _read_text(path, owner_dir).strip()
    try:
        value = int(text, 16) if text[:2].lower() == "0x" else -1
    except ValueError:
        value = -1
    if value < 0:
        raise _bad(path, "not a hex number", value=text[:40])
    if value >= 1 << bits:
        raise _bad(path, f"wider than {bits} bits", value=text[:40])
    return value


def _link_name(path: str, owner_dir: str, *, optional: bool) -> str | None:
    """The last component of a symlink's target; None when absent and ``optional``."""
    target = None
    with _sysfs(path, owner_dir, missing_ok=optional, einval="not a symlink"):
        target = os.readlink(path)
    if target is None:
        return None
    name = os.path.basename(target.rstrip("/"))
    if not name:
        raise _bad(path, "empty target")
    return name


def _parse_group_id(name: str, path: str) -> int:
    if not name.isdigit():
        raise _bad(path, "not a group number")
    return int(name)


def _listdir(path: str, owner_dir: str | None = None, *, missing_ok: bool = False) -> list[str]:
    names: list[str] = []
    with _sysfs(path, owner_dir, missing_ok=missing_ok):
        names = os.listdir(path)
    return names


def _check_bdf(bdf: str) -> None:
    if not BDF_RE.match(bdf):
        raise NotFoundError(f"not a PCI address: {bdf!r}", bdf=bdf)


_UNKNOWN_GROUP: Final = -1


def _read_pci_device(dev_dir: str, bdf: str, group_id: int | None = _UNKNOWN_GROUP) -> PciDevice:
    """Read one device directory. Raises _Vanished if it disappears meanwhile."""
    vendor = _read_hex(f"{dev_dir}/vendor", dev_dir, 16)
    device = _read_hex(f"{dev_dir}/device", dev_dir, 16)
    class_code = _read_hex(f"{dev_dir}/class", dev_dir, 24)
    driver = _link_name(f"{dev_dir}/driver", dev_dir, optional=True)
    override_text = _read_text(f"{dev_dir}/driver_override", dev_dir).strip()
    # drivers/pci/pci-sysfs.c driver_override_show prints "(null)" when unset.
    override = None if override_text in ("", "(null)") else override_text
    if group_id == _UNKNOWN_GROUP:
        name = _link_name(f"{dev_dir}/iommu_group", dev_dir, optional=True)
        group_id = None if name is None else _parse_group_id(name, f"{dev_dir}/iommu_group")
    cdevs = sorted(
        n for n in _listdir(f"{dev_dir}/vfio-dev", missing_ok=True) if n.startswith("vfio")
    )
    return PciDevice(
        bdf=bdf,
        vendor=vendor,
        device=device,
        class_code=class_code,
        driver=driver,
        driver_override=override,
        group_id=group_id,
        vfio_cdev=cdevs[0] if cdevs else None,
    )


def read_device(sys_root: Path, bdf: str) -> PciDevice:
    """Read one PCI device by BDF. NotFoundError when it does not exist (or vanished)."""
    _check_bdf(bdf)
    dev_dir = f"{sys_root}/bus/pci/devices/{bdf}"
    try:
        return _read_pci_device(dev_dir, bdf)
    except _Vanished:
        raise NotFoundError(f"no PCI device {bdf}", bdf=bdf) from None


def group_of(sys_root: Path, bdf: str) -> int | None:
    """The IOMMU group id of one device (None when it has none). Reads one link."""
    _check_bdf(bdf)
    dev_dir = f"{sys_root}/bus/pci/devices/{bdf}"
    try:
        name = _link_name(f"{dev_dir}/iommu_group", dev_dir, optional=True)
    except _Vanished:
        raise NotFoundError(f"no PCI device {bdf}", bdf=bdf) from None
    if name is None and not os.path.exists(dev_dir):
        raise NotFoundError(f"no PCI device {bdf}", bdf=bdf)
    return None if name is None else _parse_group_id(name, f"{dev_dir}/iommu_group")


def _read_group_dir(
    sys_root: Path, group_id: int
) -> tuple[IommuGroup, dict[str, PciDevice]] | None:
    """Read one group and its PCI members; None when the group directory is gone."""
    gdir = f"{sys_root}/kernel/iommu_groups/{group_id}"
    gtype: str | None = None  # kernels before 5.11 do not expose the type
    try:
        names = _listdir(f"{gdir}/devices", gdir)
        with _sysfs(f"{gdir}/type", gdir, missing_ok=True):
            gtype = _read_bytes(f"{gdir}/type").decode("ascii", "replace").strip() or None
    except _Vanished:
        return None
    devices: dict[str, PciDevice] = {}
    others: list[OtherMember] = []
    pci_dir = f"{sys_root}/bus/pci/devices"
    for name in names:
        member_dir = f"{gdir}/devices/{name}"
        try:
            if BDF_RE.match(name):
                # Read through bus/pci/devices/BDF: the path admins know, in errors too.
                devices[name] = _read_pci_device(f"{pci_dir}/{name}", name, group_id)
            else:
                # Non-PCI member: only its driver matters (for viability).
                drv = _link_name(f"{member_dir}/driver", member_dir, optional=True)
                others.append(OtherMember(name, drv))
        except _Vanished:
            continue  # hot-unplugged while we read it: skip (module docstring)
    group = IommuGroup(
        group_id=group_id,
        devices=tuple(sorted(devices)),
        type=gtype,
        other_members=tuple(sorted(others, key=lambda m: m.name)),
    )
    return group, devices


def read_group(sys_root: Path, group_id: int) -> tuple[IommuGroup, dict[str, PciDevice]]:
    """Re-read ONE group and its member devices; cost independent of host size.

    NotFoundError when the group does not exist. Pair with
    :meth:`HostSnapshot.with_group` to refresh a snapshot after a uevent.
    """
    result = _read_group_dir(sys_root, group_id)
    if result is None:
        raise NotFoundError(f"no IOMMU group {group_id}", group_id=group_id)
    return result


def read_snapshot(
    sys_root: Path = DEFAULT_SYS_ROOT, dev_root: Path = DEFAULT_DEV_ROOT
) -> HostSnapshot:
    """Read every IOMMU group and every PCI device (O(host)).

    Devices not in any group (no IOMMU, or IOMMU disabled) are included with
    ``group_id=None``. Entries that vanish while being read are skipped.
    """
    groups: dict[int, IommuGroup] = {}
    devices: dict[str, PciDevice] = {}
    groups_dir = f"{sys_root}/kernel/iommu_groups"
    for name in _listdir(groups_dir, missing_ok=True):
        gid = _parse_group_id(name, f"{groups_dir}/{name}")
        result = _read_group_dir(sys_root, gid)
        if result is None:
            continue
        groups[gid] = result[0]
        devices.update(result[1])
    pci_dir = f"{sys_root}/bus/pci/devices"
    for bdf in _listdir(pci_dir, missing_ok=True):
        if bdf in devices:
            continue
        if not BDF_RE.match(bdf):
            raise _bad(f"{pci_dir}/{bdf}", "not a PCI address")
        try:
            dev = _read_pci_device(f"{pci_dir}/{bdf}", bdf, group_id=None)
        except _Vanished:
            continue
        devices[bdf] = dev
    # Read-only maps over dicts nobody else holds: with_group can share them unchanged.
    return HostSnapshot(
        devices=_OverlayMap(devices),
        groups=_OverlayMap(groups),
        has_iommufd=os.path.exists(dev_root / "iommu"),
        has_legacy_container=os.path.exists(dev_root / "vfio" / "vfio"),
    )
