"""bench/brokered_map.py's raw client: the daemon's share of a brokered map, without the
client library.

Run as the unprivileged user by brokered_map.py (``raw_client.py SOCKET ROUNDS``): it
claims the edu, then maps one sealed memfd as that bench's library client does, but
each timed request is what a lean C or Rust VMM would do: the datagram is encoded once
(iommud's own encoder, so it is canonical) and each map is one ``sendmsg`` with the
memfd, one ``recv`` and a check of the reply's op. Prints one JSON line: the round trip
of every ping and every map, by size (the first map of each size is the cold one).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from topology import EDU0

from iommud.protocol import messages as m
from iommud.protocol.codec import encode
from iommud.protocol.limits import MAX_DATAGRAM, MAX_FDS
from iommud.transport import recv_datagram_nowait, rights, send_datagram_blocking

SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20)
IOVA = 0x100000
PAGE = 4096
ANCHOR = 0x40000000


class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.ids = 0

    def call(self, request: m.RequestBase, fds: tuple[int, ...] = ()) -> dict[str, Any]:
        """Send ``request`` (with ``fds``), read its reply; close any fds it carries."""
        data, _ = encode(request)
        return self.send(data, fds)

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> dict[str, Any]:
        send_datagram_blocking(self.sock, data, list(fds))
        dgram = recv_datagram_nowait(self.sock, MAX_DATAGRAM, MAX_FDS)  # blocking socket
        if dgram is None:
            raise RuntimeError("the daemon closed the connection")
        dgram.fds.close()  # a claim's device fds: not needed here
        reply: dict[str, Any] = json.loads(dgram.data)
        if reply["op"] == "error":
            raise RuntimeError(f"{json.loads(data)['op']}: {reply}")
        return reply

    def next_id(self) -> int:
        self.ids += 1
        return self.ids


def timed_raw(sock: socket.socket, data: bytes, fds: tuple[int, ...], op: bytes) -> float:
    """One request of pre-encoded bytes: sendmsg, recv, check the reply's op."""
    anc = rights(list(fds))
    t0 = time.perf_counter()
    sock.sendmsg([data], anc)
    reply = sock.recv(1 << 16)
    took = time.perf_counter() - t0
    if not reply.startswith(b'{"op":"' + op + b'"'):
        raise RuntimeError(f"unexpected reply {reply[:200]!r}")
    return took


def main() -> int:
    path, rounds = sys.argv[1], int(sys.argv[2])
    c = Raw(path)
    c.call(m.Hello(id=c.next_id(), version=1, client="bench-raw"))
    claim = c.call(m.Claim(id=c.next_id(), devices=(EDU0,)))
    ioas_id = claim["ioas_id"]
    fd = os.memfd_create("bench-raw", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, max(SIZES) + PAGE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    anchor = m.MapRange(fd_index=0, offset=max(SIZES), length=PAGE, iova=ANCHOR)
    c.call(m.IoasMap(id=c.next_id(), ioas_id=ioas_id, ranges=(anchor,)), (fd,))
    # one id for every timed request: it is free again once its reply is read
    rid = c.next_id()
    ping, _ = encode(m.Ping(id=rid))
    out: dict[str, list[float]] = {"ping": [timed_raw(c.sock, ping, (), b"ping_reply")]}
    out["ping"] += [timed_raw(c.sock, ping, (), b"ping_reply") for _ in range(rounds)]
    for size in SIZES:
        rng = m.MapRange(fd_index=0, offset=0, length=size, iova=IOVA)
        map_req, _ = encode(m.IoasMap(id=rid, ioas_id=ioas_id, ranges=(rng,)))
        unmap_req, _ = encode(m.IoasUnmap(id=rid, ioas_id=ioas_id, iova=IOVA, length=size))
        times = out[str(size)] = []
        for _ in range(rounds + 1):  # the first is the cold one
            times.append(timed_raw(c.sock, map_req, (fd,), b"ioas_map_reply"))
            timed_raw(c.sock, unmap_req, (), b"ioas_unmap_reply")
    c.call(m.Release(id=c.next_id(), lease_id=claim["lease_id"]))
    os.close(fd)
    c.sock.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
