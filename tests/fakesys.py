"""Fake sysfs and /dev trees, built as real directories for tests and benches.

A :class:`FakeSys` lays out, under one root directory, the parts of sysfs and /dev that
iommud reads, with real files and relative symlinks shaped as the kernel makes them::

    root/
      sys/
        devices/pci0000:00/
          0000:00:10.0/                        a device on the root bus
            vendor device class                "0x1234\\n" "0x11e8\\n" "0x00ff00\\n"
            driver_override                    "(null)\\n" when unset
            driver -> ../../../bus/pci/drivers/vfio-pci        (absent when driver-less)
            iommu_group -> ../../../kernel/iommu_groups/3
            vfio-dev/vfio0/                    only while bound to vfio-pci
          0000:00:11.0/                        a bridge (class 0x060400)...
            0000:01:01.0/                      ...with the devices behind it nested inside
        bus/pci/
          devices/0000:00:10.0 -> ../../../devices/pci0000:00/0000:00:10.0
          drivers/vfio-pci/
            bind unbind new_id                 (empty files, never interpreted)
            0000:00:10.0 -> ../../../../devices/pci0000:00/0000:00:10.0
          drivers_probe
        kernel/iommu_groups/3/
          type                                 "DMA\\n"
          devices/0000:00:10.0 -> ../../../../devices/pci0000:00/0000:00:10.0
      dev/
        iommu                                  (enable_iommufd)
        vfio/vfio                              (enable_legacy_container)
        vfio/3                                 (one per group, as vfio-pci creates them)
        vfio/devices/vfio0                     (one per vfio-dev cdev)

Nothing here interprets writes: tests change the tree through the helper methods
(``bind``, ``unbind``, ``set_driver_override``, ``remove_device``...), which is what
the kernel would do in response. The /dev nodes are plain files, never opened.

Generators: :func:`lab_topology` (the QEMU lab guest of shared/lab-notes.md),
:func:`real_server` (root ports, a PCIe switch, a multi-function NIC with SR-IOV VFs)
and :func:`large_host` (N devices in M groups, for scale tests).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import topology

__all__ = [
    "CLASS_BRIDGE",
    "CLASS_EDU",
    "CLASS_ETHERNET",
    "E1000",
    "EDU",
    "FakeSys",
    "lab_topology",
    "large_host",
    "real_server",
]

EDU = topology.EDU_ID  # QEMU's edu teaching device
E1000 = topology.E1000_ID  # QEMU's e1000 NIC
CLASS_EDU = 0x00FF00
CLASS_ETHERNET = 0x020000
CLASS_BRIDGE = 0x060400
CLASS_NVME = 0x010802
CLASS_ISA_BRIDGE = 0x060100
CLASS_HOST_BRIDGE = 0x060000


@dataclass
class FakeSys:
    """A fake sysfs (``sys_root``) and /dev (``dev_root``) under ``root``."""

    root: Path
    _paths: dict[str, Path] = field(default_factory=dict, repr=False)
    _next_cdev: int = 0

    def __post_init__(self) -> None:
        for d in (
            self.sys_root / "devices",
            self.sys_root / "bus" / "pci" / "devices",
            self.sys_root / "bus" / "pci" / "drivers",
            self.sys_root / "kernel" / "iommu_groups",
            self.dev_root,
        ):
            d.mkdir(parents=True, exist_ok=True)
        (self.sys_root / "bus" / "pci" / "drivers_probe").touch()

    @property
    def sys_root(self) -> Path:
        return self.root / "sys"

    @property
    def dev_root(self) -> Path:
        return self.root / "dev"

    # ------------------------------------------------------------------ devices

    def device_dir(self, bdf: str) -> Path:
        """The real (non-link) directory of a device added with :meth:`add_device`."""
        return self._paths[bdf]

    def add_device(
        self,
        bdf: str,
        vendor: int,
        device: int,
        class_code: int,
        *,
        parent: str | None = None,
        group: int | None = None,
        driver: str | None = None,
    ) -> Path:
        """Add a PCI function; ``parent`` nests it under a bridge, as sysfs does."""
        if bdf in self._paths:
            raise ValueError(f"{bdf} already exists")
        if parent is None:
            domain_bus = bdf[:7]  # "0000:00"
            base = self.sys_root / "devices" / f"pci{domain_bus}"
        else:
            base = self._paths[parent]
        d = base / bdf
        d.mkdir(parents=True)
        self._paths[bdf] = d
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "class").write_text(f"0x{class_code:06x}\n")
        (d / "driver_override").write_text("(null)\n")
        _relink(self.sys_root / "bus" / "pci" / "devices" / bdf, d)
        if group is not None:
            self.set_group(bdf, group)
        if driver is not None:
            self.bind(bdf, driver)
        return d

    def remove_device(self, bdf: str) -> None:
        """Hot unplug: the device, its links and its group membership disappear.

        Devices nested below it (behind a bridge) must be removed first.
        """
        below = [b for b, p in self._paths.items() if self._paths[bdf] in p.parents]
        if below:
            raise ValueError(f"remove {', '.join(below)} before {bdf}")
        self.leave_group(bdf)
        self.unbind(bdf)
        d = self._paths.pop(bdf)
        (self.sys_root / "bus" / "pci" / "devices" / bdf).unlink()
        shutil.rmtree(d)

    def set_group(self, bdf: str, group_id: int) -> None:
        """Put a device in IOMMU group ``group_id`` (creating the group directory).

        A device already in another group leaves it (and an emptied group directory
        disappears, as the kernel frees groups without members).
        """
        d = self._paths[bdf]
        self.leave_group(bdf)
        gdir = self.sys_root / "kernel" / "iommu_groups" / str(group_id)
        if not gdir.exists():
            (gdir / "devices").mkdir(parents=True)
            (gdir / "type").write_text("DMA\n")
        _relink(gdir / "devices" / bdf, d)
        _relink(d / "iommu_group", gdir)

    def leave_group(self, bdf: str) -> None:
        """Take a device out of its group; remove the group directory once empty."""
        link = self._paths[bdf] / "iommu_group"
        if not link.is_symlink():
            return
        gdir = self.sys_root / "kernel" / "iommu_groups" / os.path.basename(os.readlink(link))
        (gdir / "devices" / bdf).unlink()
        link.unlink()
        if not os.listdir(gdir / "devices"):
            shutil.rmtree(gdir)

    def add_other_member(self, group_id: int, name: str, driver: str | None = None) -> None:
        """A non-PCI group member (e.g. a platform device), with an optional driver."""
        d = self.sys_root / "devices" / "platform" / name
        d.mkdir(parents=True)
        gdir = self.sys_root / "kernel" / "iommu_groups" / str(group_id)
        (gdir / "devices").mkdir(parents=True, exist_ok=True)
        _relink(gdir / "devices" / name, d)
        if driver is not None:
            ddir = self.sys_root / "bus" / "platform" / "drivers" / driver
            ddir.mkdir(parents=True, exist_ok=True)
            _relink(d / "driver", ddir)

    # ------------------------------------------------------------------ drivers

    def driver_dir(self, driver: str) -> Path:
        d = self.sys_root / "bus" / "pci" / "drivers" / driver
        if not d.exists():
            d.mkdir(parents=True)
            for name in ("bind", "unbind", "new_id", "remove_id"):
                (d / name).touch()
        return d

    def bind(self, bdf: str, driver: str) -> None:
        """Bind ``driver``; vfio-pci also gets a vfio-dev cdev and its /dev/vfio nodes."""
        d = self._paths[bdf]
        if (d / "driver").is_symlink():
            raise ValueError(f"{bdf} is already bound")
        ddir = self.driver_dir(driver)
        _relink(d / "driver", ddir)
        _relink(ddir / bdf, d)
        if driver == "vfio-pci":
            self.add_vfio_cdev(bdf)

    def unbind(self, bdf: str) -> None:
        """Unbind whatever driver the device has (no-op when driver-less)."""
        d = self._paths[bdf]
        link = d / "driver"
        if not link.is_symlink():
            return
        driver = os.path.basename(os.readlink(link))
        link.unlink()
        (self.sys_root / "bus" / "pci" / "drivers" / driver / bdf).unlink()
        vdir = d / "vfio-dev"
        if vdir.exists():
            for name in os.listdir(vdir):
                (self.dev_root / "vfio" / "devices" / name).unlink(missing_ok=True)
            shutil.rmtree(vdir)

    def set_driver_override(self, bdf: str, driver: str | None) -> None:
        self._paths[bdf].joinpath("driver_override").write_text(f"{driver or '(null)'}\n")

    def add_vfio_cdev(self, bdf: str, index: int | None = None) -> str:
        """Create vfio-dev/vfioN and /dev/vfio/devices/vfioN (and /dev/vfio/GROUP)."""
        if index is None:
            index = self._next_cdev
        self._next_cdev = max(self._next_cdev, index + 1)
        name = f"vfio{index}"
        d = self._paths[bdf]
        (d / "vfio-dev" / name).mkdir(parents=True)
        (self.dev_root / "vfio" / "devices").mkdir(parents=True, exist_ok=True)
        (self.dev_root / "vfio" / "devices" / name).touch()
        group_link = d / "iommu_group"
        if group_link.is_symlink():
            (self.dev_root / "vfio" / os.path.basename(os.readlink(group_link))).touch()
        return name

    # ------------------------------------------------------------------ /dev

    def enable_iommufd(self) -> None:
        (self.dev_root / "iommu").touch()

    def enable_legacy_container(self) -> None:
        (self.dev_root / "vfio").mkdir(exist_ok=True)
        (self.dev_root / "vfio" / "vfio").touch()


def _relink(link: Path, target: Path) -> None:
    """Create ``link`` as a relative symlink to ``target`` (as sysfs links are)."""
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


# ---------------------------------------------------------------------- generators


def lab_topology(root: Path, *, iommufd: bool = True, legacy: bool = True) -> FakeSys:
    """The QEMU lab guest (lab/topology.py; group numbers are this fake's own)::

    group 3:  0000:00:10.0  edu    (alone, driver-less)
    group 4:  0000:00:11.0  pci-bridge (no driver)
              0000:01:01.0  edu    (behind the bridge, driver-less)
              0000:01:02.0  edu    (behind the bridge, driver-less)
              0000:01:03.0  e1000  (behind the bridge, bound to e1000)
    group 5:  0000:00:1f.0  ISA bridge (lpc_ich) + 0000:00:1f.2 SATA (ahci)
    group 6:  0000:00:01.0  virtio (virtio-pci, the 9p root: never touch)
    """
    fs = FakeSys(root)
    if iommufd:
        fs.enable_iommufd()
    if legacy:
        fs.enable_legacy_container()
    fs.add_device("0000:00:00.0", 0x8086, 0x29C0, CLASS_HOST_BRIDGE, group=0)
    fs.add_device("0000:00:01.0", 0x1AF4, 0x1009, 0x000200, group=6, driver="virtio-pci")
    fs.add_device(topology.EDU0, *EDU, CLASS_EDU, group=3)
    fs.add_device(topology.BRIDGE, 0x1B36, 0x0001, CLASS_BRIDGE, group=4)
    for edu in topology.BRIDGE_EDUS:
        fs.add_device(edu, *EDU, CLASS_EDU, parent=topology.BRIDGE, group=4)
    fs.add_device(
        topology.NIC, *E1000, CLASS_ETHERNET, parent=topology.BRIDGE, group=4, driver="e1000"
    )
    fs.add_device("0000:00:1f.0", 0x8086, 0x2918, CLASS_ISA_BRIDGE, group=5, driver="lpc_ich")
    fs.add_device("0000:00:1f.2", 0x8086, 0x2922, 0x010601, group=5, driver="ahci")
    return fs


def real_server(root: Path) -> FakeSys:
    """A small server-shaped host::

    group 0:  0000:00:00.0  host bridge
    group 1:  0000:00:01.0  root port (pcieport)
                0000:01:00.0  NVMe (nvme)                        group 2
    group 3:  0000:00:02.0  root port (pcieport)
                0000:02:00.0  PCIe switch upstream port (pcieport)   group 4
                  0000:03:00.0  downstream port (pcieport)          group 5
                    0000:04:00.0  NIC PF0 (mlx5_core)   \\  one group (6):
                    0000:04:00.1  NIC PF1 (mlx5_core)   /   multi-function, no ACS
                    0000:04:00.2..4  VFs, driver-less, vfio-pci, mlx5_vfio_pci
                                      each in its own group (7, 8, 9)
                  0000:03:01.0  downstream port (pcieport)          group 10
                    0000:05:00.0  GPU (vfio-pci) + 0000:05:00.1 audio (vfio-pci)  group 11
    """
    fs = FakeSys(root)
    fs.enable_iommufd()
    fs.enable_legacy_container()
    fs.add_device("0000:00:00.0", 0x8086, 0x09A2, CLASS_HOST_BRIDGE, group=0)
    fs.add_device("0000:00:01.0", 0x8086, 0x347A, CLASS_BRIDGE, group=1, driver="pcieport")
    fs.add_device(
        "0000:01:00.0", 0x144D, 0xA808, CLASS_NVME, parent="0000:00:01.0", group=2, driver="nvme"
    )
    fs.add_device("0000:00:02.0", 0x8086, 0x347B, CLASS_BRIDGE, group=3, driver="pcieport")
    fs.add_device(
        "0000:02:00.0",
        0x10B5,
        0x8747,
        CLASS_BRIDGE,
        parent="0000:00:02.0",
        group=4,
        driver="pcieport",
    )
    fs.add_device(
        "0000:03:00.0",
        0x10B5,
        0x8747,
        CLASS_BRIDGE,
        parent="0000:02:00.0",
        group=5,
        driver="pcieport",
    )
    for fn in (0, 1):
        fs.add_device(
            f"0000:04:00.{fn}",
            0x15B3,
            0x101D,
            CLASS_ETHERNET,
            parent="0000:03:00.0",
            group=6,
            driver="mlx5_core",
        )
    for fn, (gid, drv) in enumerate(((7, None), (8, "vfio-pci"), (9, "mlx5_vfio_pci")), start=2):
        fs.add_device(
            f"0000:04:00.{fn}",
            0x15B3,
            0x101E,
            CLASS_ETHERNET,
            parent="0000:03:00.0",
            group=gid,
            driver=drv,
        )
    fs.add_device(
        "0000:03:01.0",
        0x10B5,
        0x8747,
        CLASS_BRIDGE,
        parent="0000:02:00.0",
        group=10,
        driver="pcieport",
    )
    fs.add_device(
        "0000:05:00.0",
        0x10DE,
        0x2204,
        0x030000,
        parent="0000:03:01.0",
        group=11,
        driver="vfio-pci",
    )
    fs.add_device(
        "0000:05:00.1",
        0x10DE,
        0x1AEF,
        0x040300,
        parent="0000:03:01.0",
        group=11,
        driver="vfio-pci",
    )
    return fs


def large_host(root: Path, n_devices: int, n_groups: int) -> FakeSys:
    """``n_devices`` edu-like devices spread round-robin over ``n_groups`` groups.

    BDFs are 0000:BB:DD.F on buses 1.. (256 functions per bus); every 7th device is
    bound to vfio-pci (with a cdev), every 11th to e1000, the rest driver-less.
    """
    if n_groups < 1 or n_devices < n_groups:
        raise ValueError("need n_devices >= n_groups >= 1")
    fs = FakeSys(root)
    fs.enable_iommufd()
    fs.enable_legacy_container()
    for i in range(n_devices):
        bus, rest = divmod(i, 256)
        bdf = f"0000:{bus + 1:02x}:{rest >> 3:02x}.{rest & 7}"
        driver = "vfio-pci" if i % 7 == 0 else "e1000" if i % 11 == 0 else None
        fs.add_device(bdf, *EDU, CLASS_EDU, group=i % n_groups, driver=driver)
    return fs
