"""A uid-1000 VMM launcher for the lab: a delegated claim over the socket, then QEMU 10.

Run (by tests/lab/test_delegated_vm.py) as uid 1000 with no capabilities and the memlock
limit QEMU needs already raised: ``python delegated_vmm.py SOCKET BDF QEMU_BIN DATA_DIR...``.
It speaks protocol v2 with the daemon (hello version 2, ``claim`` in mode ``delegated``),
receives a fresh /dev/iommu fd and the device's unbound cdev fd, and starts QEMU 10 as its
own child with those fds inherited (``-object iommufd,fd=N -device vfio-pci,fd=M``); it
then closes its own copies (QEMU has them). It prints one JSON line
``{"claim": ..., "qemu_pid": ..., "qmp": ..., "claim_s": ...}`` and then obeys stdin, one
word a line: ``release`` (sends ``release`` for the lease, prints the reply as JSON),
``quit`` (exits; the daemon sees the session end). QEMU is left to the test (it quits it
over QMP). Test code; runs inside the lab guest.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vmm  # lab/ is on the path (tests.e2e.support.client_command)

from iommud.fds import FdSet
from iommud.protocol import messages as m
from iommud.protocol.connection import ClientConnection
from iommud.protocol.limits import LATEST_VERSION, MAX_DATAGRAM, MAX_FDS
from iommud.protocol.v2 import AnyServerMessage, ClaimMode, ClaimReplyV2, ClaimV2
from iommud.transport import recv_datagram_nowait, send_datagram_blocking


def call(
    sock: socket.socket, conn: ClientConnection, request: m.Request
) -> tuple[AnyServerMessage, FdSet]:
    data, _ = conn.send(request)
    send_datagram_blocking(sock, data, [])
    while True:
        dgram = recv_datagram_nowait(sock, MAX_DATAGRAM, MAX_FDS)
        if dgram is None:
            raise SystemExit("the daemon closed the connection")
        msg = conn.receive(dgram.data, len(dgram.fds))
        if isinstance(msg, m.Event):
            dgram.fds.close()
            continue
        return msg, dgram.fds


def main() -> None:
    path, bdf, binary, *data_dirs = sys.argv[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(120.0)
    sock.connect(path)
    conn = ClientConnection()
    hello, _ = call(sock, conn, conn.hello("lab-delegated-vmm", version=LATEST_VERSION))
    assert isinstance(hello, m.HelloReply), hello
    t0 = time.monotonic()
    reply, fds = call(sock, conn, conn.build(ClaimV2, devices=(bdf,), mode=ClaimMode.DELEGATED))
    claim_s = time.monotonic() - t0
    if not isinstance(reply, ClaimReplyV2):
        print(json.dumps({"error": reply.model_dump(mode="json")}), flush=True)
        raise SystemExit(1)
    assert reply.iommufd_fd_index is not None
    iommufd = fds[reply.iommufd_fd_index].fileno()
    device = fds[reply.devices[0].fd_index].fileno()
    rundir = Path(tempfile.mkdtemp(prefix="dvmm-", dir="/tmp"))
    qmp = rundir / "qmp.sock"
    paths = vmm.QemuPaths(binary=Path(binary), data_dirs=tuple(Path(d) for d in data_dirs))
    argv = vmm.command_line(paths, qmp, vmm.vfio_args(iommufd, device))
    with open(rundir / "qemu.log", "wb") as log:
        qemu = subprocess.Popen(
            argv, pass_fds=(iommufd, device), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    fds.close()  # QEMU holds its copies; the daemon holds its own
    out = {
        "claim": reply.model_dump(mode="json"),
        "qemu_pid": qemu.pid,
        "qmp": str(qmp),
        "device_fd": device,  # QEMU inherited it under this number
        "log": str(rundir / "qemu.log"),
        "claim_s": claim_s,
    }
    print(json.dumps(out), flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word == "release":
            t0 = time.monotonic()
            answer, extra = call(sock, conn, conn.build(m.Release, lease_id=reply.lease_id))
            extra.close()
            print(
                json.dumps({"reply": answer.model_dump(mode="json"), "s": time.monotonic() - t0}),
                flush=True,
            )
        elif word == "quit":
            break
    sock.close()


if __name__ == "__main__":
    main()
