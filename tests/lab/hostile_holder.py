"""A hostile delegated client for the lab: it binds, maps its own memory, and ignores revokes.

Run (by tests/lab/test_delegated_revoke_vm.py) as uid 1000 with no capabilities:
``python hostile_holder.py SOCKET BDF``. It speaks protocol v2, claims BDF in delegated
mode and does what a VMM does with the fresh /dev/iommu and unbound cdev it receives:
VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC, VFIO_DEVICE_ATTACH_IOMMUFD_PT and
IOMMU_IOAS_MAP of an anonymous buffer of its own (pinned: VmPin). It drives the edu
device itself through its own device fd (so no other process ever holds a copy) and
never reads the daemon's events (a lease_revoked goes unanswered).

Prints one JSON line (pid, lease, devid, ioas) and then answers JSON lines on stdin:
``{"do": "dma"}`` (pattern in buf[0:N], RAM -> device -> buf[DST:DST+N]; did it land?),
``{"do": "reattach"}`` (what a hostile client tries after a revoke: attach its device
again, map its buffer again, and a fresh IOAS attached and mapped; every errno is
reported), ``{"do": "quit"}``. Test code; runs inside the lab guest, never as root.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
from typing import Any

from edu import Edu

from iommud.errors import KernelError
from iommud.kernel.interface import MapFlag
from iommud.kernel.linux import LinuxIommuFd, LinuxVfioDevice
from iommud.protocol.connection import ClientConnection
from iommud.protocol.limits import LATEST_VERSION
from iommud.protocol.messages import HelloReply
from iommud.protocol.v2 import ClaimMode, ClaimReplyV2, ClaimV2
from tests.lab.delegated_vmm import call

BUF_LEN = 1 << 21
IOVA = 0x100000  # below the edu's 28-bit DMA reach
N = 2048
DST = 0x1000
RW = MapFlag.READABLE | MapFlag.WRITEABLE


class Hostile:
    def __init__(self, path: str, bdf: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(120.0)
        self.sock.connect(path)
        conn = ClientConnection()
        hello, _ = call(self.sock, conn, conn.hello("lab-hostile", version=LATEST_VERSION))
        assert isinstance(hello, HelloReply), hello
        reply, fds = call(
            self.sock, conn, conn.build(ClaimV2, devices=(bdf,), mode=ClaimMode.DELEGATED)
        )
        if not isinstance(reply, ClaimReplyV2):
            print(json.dumps({"error": reply.model_dump(mode="json")}), flush=True)
            raise SystemExit(1)
        assert reply.iommufd_fd_index is not None
        self.reply = reply
        # keep the fds for good (steal them from the set): never closed on a revoke
        self.ictx = LinuxIommuFd(fds[reply.iommufd_fd_index].steal())
        self.dev = LinuxVfioDevice(fds[reply.devices[0].fd_index].steal(), "vfio")
        fds.close()
        self.devid = self.dev.bind_iommufd(self.ictx)
        self.ioas = self.ictx.ioas_alloc()
        self.dev.attach_ioas(self.ioas)
        self.buf = mmap.mmap(-1, BUF_LEN)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.ictx.ioas_map(self.ioas, self.addr, BUF_LEN, IOVA, RW)
        self.edu = Edu(self.dev.fileno())
        self.edu.enable_bus_master()

    def dma(self) -> dict[str, Any]:
        pattern = os.urandom(N)
        self.buf[0:N] = pattern
        self.buf[DST : DST + N] = bytes(N)
        self.edu.dma_from_ram(IOVA, N)
        self.edu.dma_to_ram(IOVA + DST, N)
        landed = self.buf[DST : DST + N]
        return {"landed": landed == pattern, "untouched": landed == bytes(N)}

    def reattach(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["attach"] = _try(lambda: self.dev.attach_ioas(self.ioas))
        out["map"] = _try(lambda: self.ictx.ioas_map(self.ioas, self.addr, BUF_LEN, IOVA, RW))
        fresh: list[int] = []
        out["fresh_alloc"] = _try(lambda: fresh.append(self.ictx.ioas_alloc()))
        if fresh:
            out["fresh_attach"] = _try(lambda: self.dev.attach_ioas(fresh[0]))
            out["fresh_map"] = _try(
                lambda: self.ictx.ioas_map(fresh[0], self.addr, BUF_LEN, IOVA, RW)
            )
        return out


def _try(fn: Any) -> int:
    """0 when ``fn`` worked, else the errno of its KernelError."""
    try:
        fn()
    except KernelError as exc:
        return exc.errno
    return 0


def main() -> None:
    path, bdf = sys.argv[1:3]
    h = Hostile(path, bdf)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "lease_id": h.reply.lease_id,
                "group_id": h.reply.group_id,
                "devid": h.devid,
                "ioas": h.ioas,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["do"] == "dma":
            answer = h.dma()
        elif cmd["do"] == "reattach":
            answer = h.reattach()
        else:
            break
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
