"""client_script.py plus what a client that ignores a revoke would try (lab guest, uid 1000).

    python tests/e2e/revoke_client.py SOCKET

Extra commands: ``keep_dup`` (keep a private dup of a claimed device fd, so the client
library's closing of the lease's fds on lease_revoked does not end the device),
``attach`` (VFIO_DEVICE_ATTACH_IOMMUFD_PT on that dup), ``attach_any`` (the same with
every pt_id 1..max: a client need not know the daemon's object ids to find its IOASes;
answers the ids the kernel accepted), ``dma_kept`` (edu device -> ``iova`` through the dup; did
anything land in the buffer?) and ``close_kept``. Test code; never runs as root.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from edu import Edu

from iommud.errors import KernelError
from iommud.kernel import uapi
from iommud.kernel.linux import ioctl
from tests.e2e.client_script import PATTERN_LEN, Puppet, main


class RevokeDodger(Puppet):
    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path)
        self.kept: dict[str, int] = {}

    def keep_dup(self, c: dict[str, Any]) -> dict[str, Any]:
        self.kept[c["bdf"]] = os.dup(self.devices[c["bdf"]].fd.fileno())
        return {}

    def attach_any(self, c: dict[str, Any]) -> dict[str, Any]:
        fd = self.kept[c["bdf"]]
        accepted, errnos = [], {}
        for pt_id in range(1, c.get("max", 32) + 1):
            cmd = uapi.vfio_device_attach_iommufd_pt.new(flags=0, pt_id=pt_id)
            try:
                ioctl(fd, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd)
            except KernelError as exc:
                errnos[pt_id] = exc.errno
            else:
                accepted.append(pt_id)
        return {"accepted": accepted, "errnos": errnos}

    def attach(self, c: dict[str, Any]) -> dict[str, Any]:
        cmd = uapi.vfio_device_attach_iommufd_pt.new(flags=0, pt_id=c["pt_id"])
        try:
            ioctl(
                self.kept[c["bdf"]],
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                cmd,
            )
        except KernelError as exc:
            return {"attached": False, "errno": exc.errno}
        return {"attached": True}

    def dma_kept(self, c: dict[str, Any]) -> dict[str, Any]:
        buf = self.buffers[c["buf"]]
        edu = Edu(self.kept[c["bdf"]])
        edu.enable_bus_master()
        off = c["offset"]
        buf.mm[off : off + PATTERN_LEN] = bytes(PATTERN_LEN)
        edu.dma_to_ram(c["iova"], PATTERN_LEN)
        after = buf.mm[off : off + PATTERN_LEN]
        return {"untouched": after == bytes(PATTERN_LEN), "nonzero": sum(1 for b in after if b)}

    def close_kept(self, c: dict[str, Any]) -> dict[str, Any]:
        os.close(self.kept.pop(c["bdf"]))
        return {}

    def close(self) -> None:
        for fd in self.kept.values():
            os.close(fd)
        super().close()


if __name__ == "__main__":
    sys.exit(main(RevokeDodger))
