"""A fake VMM for the launcher's host tests: enough of QEMU's argv and QMP, no VM.

Run by ``iommuctl vm`` in place of qemu-system-x86_64. At start it writes one JSON line
to $FAKE_VMM_LOG: its argv and every fd it inherited (number -> readlink target), so a
test sees exactly what leaked in. It takes the launcher's monitor from
``-chardev socket,id=...,fd=N,server=on`` (accepting on the inherited listening fd) and
answers QMP like QEMU: the greeting, ``qmp_capabilities``, ``qom-get realized`` for the
ids of its ``-device`` options and hot-added devices, ``getfd`` (the fd in SCM_RIGHTS is
kept under its name), ``closefd``, ``object-add`` and ``device_add`` (which consume a
named fd, as monitor_fd_param does, or fail like QEMU with an unknown name), ``device_del``
and ``quit``. Every command is logged as a JSON line ``{"qmp": name, "args": ..., "t": ...}``
(``t`` = time.time() when it arrived). Behaviour from the environment:

- FAKE_VMM_EXIT=N: exit N at once, before QMP (a VMM that fails to start);
- FAKE_VMM_UNPLUG=complete: ``device_del`` emits DEVICE_DELETED (a guest that answers);
  ``never`` (default): accepted, never completes (an OS-less VM, like the lab's);
- FAKE_VMM_TERM=ignore: SIGTERM is ignored (the launcher must SIGKILL);
- FAKE_VMM_DEVICE_ADD=fail: ``device_add`` answers an error after taking its fd.
Test code only.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
import time
from typing import Any

LOG = os.environ["FAKE_VMM_LOG"]


def log(record: dict[str, Any]) -> None:
    with open(LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def inherited_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue  # the listdir's own fd
    return out


def options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in (name, "-" + name)]


def keyval(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in text.split(",")[1:] if "=" in p)


class Monitor:
    def __init__(self, sock: socket.socket, argv: list[str]) -> None:
        self.sock = sock
        self.buf = b""
        self.named: dict[str, int] = {}
        self.devices = {keyval(d).get("id") for d in options(argv, "-device")}
        # a cold-plugged device's inherited fd, closed when the device is deleted, as
        # QEMU does (hw/vfio/iommufd.c iommufd_cdev_detach: close(vbasedev->fd)); the
        # daemon refuses a release while anyone still holds the device file
        self.device_fds = {
            kv["id"]: int(kv["fd"])
            for kv in map(keyval, options(argv, "-device"))
            if "id" in kv and kv.get("fd", "").isdigit()
        }
        self.unplug = os.environ.get("FAKE_VMM_UNPLUG", "never")

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")

    def read(self) -> tuple[dict[str, Any] | None, list[int]]:
        fds: list[int] = []
        while b"\n" not in self.buf:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[: len(raw) - len(raw) % a.itemsize])
                    fds.extend(a)
            if not data:
                return None, fds
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line), fds

    def take(self, name: str) -> bool:
        fd = self.named.pop(name, None)
        if fd is None:
            return False
        os.close(fd)
        return True

    def serve(self) -> None:
        self.send({"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": []}})
        while True:
            msg, fds = self.read()
            if msg is None:
                return
            cmd, args = msg["execute"], msg.get("arguments", {})
            log({"qmp": cmd, "args": args, "fds": len(fds), "t": time.time()})
            reply: dict[str, Any] = {"return": {}}
            if cmd == "qom-get":
                qdev = args["path"].rsplit("/", 1)[-1]
                if qdev in self.devices:
                    reply = {"return": True}
                else:
                    reply = {"error": {"class": "DeviceNotFound", "desc": f"no {qdev}"}}
            elif cmd == "getfd":
                self.named[args["fdname"]] = fds.pop()
            elif cmd == "closefd":
                if not self.take(args["fdname"]):
                    reply = {"error": {"class": "GenericError", "desc": "File descriptor named "
                                       f"'{args['fdname']}' not found"}}  # fmt: skip
            elif cmd == "object-add":
                if not self.take(args["fd"]):
                    reply = {"error": {"class": "GenericError", "desc": "bad fd"}}
            elif cmd == "device_add":
                if not self.take(args["fd"]):
                    reply = {"error": {"class": "GenericError", "desc": "bad fd"}}
                elif os.environ.get("FAKE_VMM_DEVICE_ADD") == "fail":
                    reply = {"error": {"class": "GenericError", "desc": "vfio: bind failed"}}
                else:
                    self.devices.add(args["id"])
            elif cmd == "device_del" and args["id"] not in self.devices:
                reply = {"error": {"class": "DeviceNotFound", "desc": "no such device"}}
            for fd in fds:
                os.close(fd)
            self.send(reply)
            if cmd == "device_del" and "error" not in reply and self.unplug == "complete":
                self.devices.discard(args["id"])
                if args["id"] in self.device_fds:
                    os.close(self.device_fds.pop(args["id"]))
                self.send({"event": "DEVICE_DELETED", "data": {"device": args["id"]}})
            if cmd == "quit":
                sys.exit(0)


def main() -> None:
    argv = sys.argv
    log({"argv": argv, "fds": inherited_fds(), "pid": os.getpid(), "ppid": os.getppid()})
    if "FAKE_VMM_EXIT" in os.environ:
        sys.exit(int(os.environ["FAKE_VMM_EXIT"]))
    if os.environ.get("FAKE_VMM_TERM") == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    chardevs = [keyval(c) for c in options(argv, "-chardev")]
    monitor = next((c for c in chardevs if "fd" in c), None)
    if monitor is None:
        signal.pause()  # no monitor: wait to be signalled
        return
    listener = socket.socket(fileno=int(monitor["fd"]))
    conn, _ = listener.accept()
    listener.close()
    Monitor(conn, argv).serve()
    signal.pause()  # the launcher closed QMP: stay until signalled, like QEMU


if __name__ == "__main__":
    main()
