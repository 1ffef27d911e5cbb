"""An unprivileged iommud client that a root test drives line by line (lab guest, uid 1000).

    python tests/e2e/client_script.py SOCKET

It connects to the daemon (hello) and then reads one JSON command per line on stdin and
answers one JSON line on stdout, so the root test can interleave its own checks (kernel
log, sysfs drivers, SIGKILL) between the client's steps. Every answer has ``ok``; a
daemon error answers ``{"ok": false, "code", "message", "details"}`` with the exact code
and details the daemon sent. It keeps its own objects by name: memfds (sealed or not),
claimed device fds (by BDF), and drives the edu device through a claimed fd (lab/edu.py).

Commands (``cmd``): whoami, open (a path: is it refused?), ping, status, claim, release,
ioas_create, ioas_destroy, memfd, map, unmap, dma_round_trip, dma_to_ram, close_device,
fd_count, exit. This is test code: it trusts its input and must never run as root.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import sys
import time
from typing import Any

from edu import Edu

from iommud.client import Client
from iommud.client.calls import ClaimedDeviceFd, MapSpec
from iommud.errors import IommudError

PATTERN_LEN = 2048  # edu: at most 2048 bytes per transfer (QEMU 7.2 off-by-one)


class Buffer:
    """A memfd of ``size`` bytes, mmapped here; sealed against shrink/grow if asked."""

    def __init__(self, name: str, size: int, *, sealed: bool) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if sealed:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mm = mmap.mmap(self.fd, size)
        self.size = size

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class Puppet:
    def __init__(self, socket_path: str) -> None:
        self.client = Client(socket_path, "e2e-client/1")
        self.buffers: dict[str, Buffer] = {}
        self.devices: dict[str, ClaimedDeviceFd] = {}
        self.edus: dict[str, Edu] = {}
        # Where each buffer is mapped (iova of its offset 0), for the DMA commands.
        self.bases: dict[str, int] = {}

    # ------------------------------------------------------------------ commands
    def whoami(self, _c: dict[str, Any]) -> dict[str, Any]:
        return {
            "uid": os.getuid(),
            "gid": os.getgid(),
            "groups": os.getgroups(),
            "pid": os.getpid(),
        }

    def open(self, c: dict[str, Any]) -> dict[str, Any]:
        try:
            fd = os.open(c["path"], os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return {"opened": False, "errno": exc.errno}
        os.close(fd)
        return {"opened": True}

    def ping(self, _c: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.client.ping()
        return {"seconds": time.perf_counter() - t0}

    def status(self, _c: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.client.status().model_dump(mode="json")}

    def list_groups(self, _c: dict[str, Any]) -> dict[str, Any]:
        return {"groups": [g.model_dump(mode="json") for g in self.client.list_groups()]}

    def claim(self, c: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = self.client.claim(c["devices"], c.get("backend", "auto"), c.get("ioas_id"))
        took = time.perf_counter() - t0
        for dev in res.devices:
            self.devices[dev.bdf] = dev
        return {
            "seconds": took,
            "lease_id": res.lease_id,
            "group_id": res.group_id,
            "backend": str(res.backend),
            "ioas_id": res.ioas_id,
            "devices": [{"bdf": d.bdf, "devid": d.devid} for d in res.devices],
        }

    def release(self, c: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.client.release(c["lease_id"])
        return {"seconds": time.perf_counter() - t0}

    def ioas_create(self, _c: dict[str, Any]) -> dict[str, Any]:
        return {"ioas_id": self.client.ioas_create()}

    def ioas_destroy(self, c: dict[str, Any]) -> dict[str, Any]:
        self.client.ioas_destroy(c["ioas_id"])
        return {}

    def memfd(self, c: dict[str, Any]) -> dict[str, Any]:
        buf = Buffer(c["name"], c["size"], sealed=c.get("sealed", True))
        self.buffers[c["name"]] = buf
        return {"seals": fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS)}

    def map(self, c: dict[str, Any]) -> dict[str, Any]:
        """Map ranges of named buffers: [{buf, offset, length, iova}]."""
        specs = [
            MapSpec(self.buffers[r["buf"]].fd, r["offset"], r["length"], r.get("iova"))
            for r in c["ranges"]
        ]
        t0 = time.perf_counter()
        got = self.client.ioas_map(c["ioas_id"], specs)
        took = time.perf_counter() - t0
        for r, g in zip(c["ranges"], got, strict=True):
            self.bases[r["buf"]] = g.iova - r["offset"]
        return {"seconds": took, "mappings": [{"iova": g.iova, "length": g.length} for g in got]}

    def unmap(self, c: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        n = self.client.ioas_unmap(c["ioas_id"], c["iova"], c["length"])
        return {"seconds": time.perf_counter() - t0, "unmapped": n}

    def _edu(self, bdf: str) -> Edu:
        if bdf not in self.edus:
            edu = Edu(self.devices[bdf].fd.fileno())
            edu.enable_bus_master()
            self.edus[bdf] = edu
        return self.edus[bdf]

    def dma_round_trip(self, c: dict[str, Any]) -> dict[str, Any]:
        """RAM -> device -> RAM: random bytes at buffer offset ``src`` come back at ``dst``."""
        buf, edu = self.buffers[c["buf"]], self._edu(c["bdf"])
        base = self.bases[c["buf"]]
        src, dst = c["src"], c["dst"]
        pattern = os.urandom(PATTERN_LEN)
        buf.mm[src : src + PATTERN_LEN] = pattern
        buf.mm[dst : dst + PATTERN_LEN] = bytes(PATTERN_LEN)
        t0 = time.perf_counter()
        edu.dma_from_ram(base + src, PATTERN_LEN)
        edu.dma_to_ram(base + dst, PATTERN_LEN)
        took = time.perf_counter() - t0
        landed = buf.mm[dst : dst + PATTERN_LEN]
        return {
            "seconds": took,
            "bytes": PATTERN_LEN,
            "exact": landed == pattern,
            "matching_bytes": sum(a == b for a, b in zip(landed, pattern, strict=True)),
            "iova_src": base + src,
            "iova_dst": base + dst,
        }

    def dma_to_ram(self, c: dict[str, Any]) -> dict[str, Any]:
        """Device buffer -> ``iova``; report whether anything changed at buffer ``offset``."""
        buf, edu = self.buffers[c["buf"]], self._edu(c["bdf"])
        off = c["offset"]
        buf.mm[off : off + PATTERN_LEN] = bytes(PATTERN_LEN)
        edu.dma_to_ram(c["iova"], PATTERN_LEN)
        after = buf.mm[off : off + PATTERN_LEN]
        return {"untouched": after == bytes(PATTERN_LEN), "nonzero": sum(1 for b in after if b)}

    def close_device(self, c: dict[str, Any]) -> dict[str, Any]:
        self.edus.pop(c["bdf"], None)
        self.devices.pop(c["bdf"]).fd.close()
        return {}

    def fd_count(self, _c: dict[str, Any]) -> dict[str, Any]:
        return {"fds": len(os.listdir("/proc/self/fd"))}

    def close(self) -> None:
        for dev in self.devices.values():
            dev.fd.close()
        for buf in self.buffers.values():
            buf.close()
        self.client.close()


def main(puppet_type: type[Puppet] = Puppet) -> int:
    """Serve one JSON command per stdin line with a ``puppet_type`` (tests/live extends it)."""
    if os.getuid() == 0:
        print(json.dumps({"ok": False, "fatal": "refusing to run as root"}), flush=True)
        return 2
    try:
        puppet = puppet_type(sys.argv[1])
    except (OSError, IommudError) as exc:
        print(json.dumps({"ok": False, "fatal": f"connect: {exc!r}"}), flush=True)
        return 1
    print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            command: dict[str, Any] = json.loads(line)
            name = command["cmd"]
            if name == "exit":
                break
            try:
                answer: dict[str, Any] = {"ok": True, **getattr(puppet, name)(command)}
            except IommudError as exc:
                answer = {
                    "ok": False,
                    "code": str(exc.code),
                    "message": exc.message,
                    "details": exc.details,
                }
            except OSError as exc:  # e.g. a DMA through a device fd that is gone
                answer = {"ok": False, "code": "os_error", "errno": exc.errno, "details": {}}
            print(json.dumps(answer), flush=True)
    finally:
        puppet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
