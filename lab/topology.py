"""The lab guest's fixed PCI topology: the QEMU options that build it and its devices by role.

One place for what the lab looks like, so the runner (labvm), the lab scripts, the benches,
the guest tests and the fake-sysfs copy of the lab on the host (tests/fakesys.py,
``lab_topology``) cannot disagree::

    0000:00:10.0  EDU0    edu on the root complex, alone in its IOMMU group (the 1:1 case)
    0000:00:11.0  BRIDGE  conventional PCI bridge: it and all behind it form one group
      0000:01:01.0  EDU1    edu behind the bridge
      0000:01:02.0  EDU2    edu behind the bridge
      0000:01:03.0  NIC     e1000, bound to e1000 at boot: the group is not viable until
                            the e1000 driver lets go
    0000:00:12.0  ROOT_PORT  PCIe root port (pcieport), hot-plug capable
      0000:02:00.0  HOTEDU   edu behind it, alone in its group, hot-unpluggable

Group NUMBERS follow probe order and are not part of the topology: look a group up
through /sys/bus/pci/devices/<bdf>/iommu_group (lab/README.md has the measured map).
NEVER_TOUCH lists what the guest itself runs on (its 9p root, its consoles, the chipset):
a test that unbinds one of them kills the guest.

Data only: no I/O, importable on the host, in the guest and by the daemon-free scripts.
"""

from __future__ import annotations

from typing import Final

# ----------------------------------------------------------------------- devices by role

EDU0: Final = "0000:00:10.0"
BRIDGE: Final = "0000:00:11.0"
EDU1: Final = "0000:01:01.0"
EDU2: Final = "0000:01:02.0"
NIC: Final = "0000:01:03.0"
ROOT_PORT: Final = "0000:00:12.0"
HOTEDU: Final = "0000:02:00.0"

#: The edus behind the bridge, in slot order.
BRIDGE_EDUS: Final = (EDU1, EDU2)
#: Everything in the bridge's IOMMU group (the legacy-container case).
BRIDGE_GROUP: Final = frozenset({BRIDGE, EDU1, EDU2, NIC})
#: The slot behind the bridge that is free for a hot-added device (it joins BRIDGE_GROUP).
BRIDGE_FREE_SLOT: Final = "0000:01:04.0"

#: The host bridge, virtio (9p root fs, shared dir, consoles) and the ICH9 LPC/SATA/SMBus.
NEVER_TOUCH: Final = frozenset(
    {
        "0000:00:00.0",
        "0000:00:01.0",
        "0000:00:02.0",
        *(f"0000:00:{slot:02x}.0" for slot in range(4, 10)),
        "0000:00:1f.0",
        "0000:00:1f.2",
        "0000:00:1f.3",
    }
)

#: PCI vendor:device ids as sysfs shows them and [access]/[manage] match them.
EDU_ID: Final = (0x1234, 0x11E8)  # QEMU's edu teaching device
E1000_ID: Final = (0x8086, 0x100E)
EDU_VENDOR_DEVICE: Final = "1234:11e8"
E1000_VENDOR_DEVICE: Final = "8086:100e"

#: QEMU device ids (for QMP device_add/device_del and query-pci) and the bridge's bus name.
QEMU_IDS: Final = {
    EDU0: "edu0",
    BRIDGE: "br1",
    EDU1: "edu1",
    EDU2: "edu2",
    NIC: "nic0",
    ROOT_PORT: "rp1",
    HOTEDU: "hotedu",
}
BRIDGE_BUS: Final = QEMU_IDS[BRIDGE]

# ----------------------------------------------------------------------- QEMU options

#: The options that build the above. q35 + intel-iommu with interrupt remapping (needs the
#: split irqchip); vng itself passes `-machine q35`, and QEMU merges a later -machine option
#: into the earlier one.
QEMU_OPTIONS: Final[tuple[str, ...]] = (
    "-machine",
    "q35,kernel-irqchip=split",
    "-device",
    "intel-iommu,intremap=on,id=iommu0",
    # 00:10.0: an edu directly on the root complex, alone in its group.
    "-device",
    "edu,addr=0x10,id=edu0",
    # 00:11.0: a conventional PCI bridge; everything behind it shares one group.
    "-device",
    "pci-bridge,id=br1,chassis_nr=1,bus=pcie.0,addr=0x11",
    "-device",
    "edu,bus=br1,addr=0x1,id=edu1",
    "-device",
    "edu,bus=br1,addr=0x2,id=edu2",
    "-device",
    "e1000,bus=br1,addr=0x3,netdev=n0,id=nic0",
    "-netdev",
    "user,id=n0",
    # 00:12.0: a PCIe root port with a hot-unpluggable edu behind it (02:00.0).
    "-device",
    "pcie-root-port,id=rp1,chassis=2,slot=1,bus=pcie.0,addr=0x12",
    "-device",
    "edu,bus=rp1,id=hotedu",
)
