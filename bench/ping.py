"""The request path at the floor: iommud's ping against a minimal JSON echo server.

Two servers, each in its own process on uvloop, on an AF_UNIX SOCK_SEQPACKET socket:

- ``daemon``: the real ``iommud.server.Server`` in front of a started ``Broker`` over the
  fake kernel and the lab-shaped fake sysfs (tests/fakesys.py): a ping goes through the
  whole request path (transport, codec, connection state, broker route, reply, send).
- ``echo``: the floor of any Python broker: per datagram ``json.loads``, build the reply
  dict, ``json.dumps``, send. No validation, no limits.

A load generator in C (bench/pingload.c, built here with the system's cc) drives N
closed-loop clients, one ping in flight each, so the load itself costs little. For 1,
10 and 100 clients the two servers run back to back (interleaved, so drift on a shared
machine hits both), and the table gives requests per server CPU-second (utime+stime of
the server process over the measured window), p50 and p99 round trips, and the ratio
daemon/echo. Issue 10's goal: >= 0.5. Last, the blocking client library's (iommud.client
``Client``) CPU per ping against the daemon, with one client.

Run: ``.venv/bin/python bench/ping.py [--seconds 3] [--clients 1,10,100] [--rounds 1]``.
This is a measurement, not a test: it asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "lab")]  # tests.fakesys and lab/topology.py

TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------- the servers


async def _serve_echo(path: str) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(4096)
    listener.setblocking(False)

    async def client(conn: socket.socket) -> None:
        with conn:
            while data := await loop.sock_recv(conn, 65536):
                msg = json.loads(data)
                reply = {"op": msg["op"] + "_reply", "fds": 0, "id": msg["id"]}
                await loop.sock_sendall(conn, json.dumps(reply, separators=(",", ":")).encode())

    tasks = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        task = asyncio.create_task(client(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _serve_daemon(path: str, tmp: Path) -> None:
    import structlog

    from iommud.broker import Broker
    from iommud.server import Server, ServerInfo
    from iommud.server.listen import bind_listener
    from tests.broker.support import make_config
    from tests.fakekernel import FakeKernel
    from tests.fakesys import lab_topology

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # no log I/O
    fs = lab_topology(tmp / "host")
    broker = Broker(make_config(tmp, fs), FakeKernel(fs))
    await broker.start()
    try:
        from iommud.server.handler import ConnectionLimits
    except ImportError:  # --baseline: a daemon from before connection limits
        info = ServerInfo(capabilities=("iommufd",))
    else:
        # One uid runs every client here: lift the per-uid connection limit (default 64).
        info = ServerInfo(capabilities=("iommufd",), connections=ConnectionLimits(max_per_uid=1024))
    server = Server(broker, [bind_listener(path)], info=info)
    await server.serve()


def serve(kind: str, path: str) -> None:
    import uvloop

    if kind == "baseline":  # the daemon of another checkout's iommud/ (--baseline)
        sys.path.insert(0, os.environ["IOMMUD_BENCH_BASELINE"])
        kind = "daemon"

    tmp = Path(tempfile.mkdtemp(prefix="iommud-bench-"))
    try:
        coro = _serve_echo(path) if kind == "echo" else _serve_daemon(path, tmp)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------- the driver


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _build_load(workdir: Path) -> Path:
    exe = workdir / "pingload"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-o", str(exe), str(ROOT / "bench" / "pingload.c")], check=True)
    return exe


def start_server(kind: str, path: str) -> subprocess.Popen[bytes]:
    """This script as a ``kind`` server on ``path``, once it listens."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            _, err = server.communicate()
            raise RuntimeError(f"{kind} server did not start: {err.decode()[-2000:]}")
        time.sleep(0.02)
    return server


def run_pingload(
    exe: Path, path: str, clients: int, warmup: float, seconds: float, cpu_of: int | None
) -> tuple[dict[str, str], float]:
    """Run bench/pingload.c against ``path``: its result fields, and the CPU seconds
    process ``cpu_of`` (None: the generator itself) spent while it measured."""
    gen = subprocess.Popen(
        [str(exe), path, str(clients), str(warmup), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert gen.stdout is not None
    pid = gen.pid if cpu_of is None else cpu_of
    cpu0 = cpu1 = 0.0
    result = ""
    for line in gen.stdout:
        if line.startswith("measuring"):
            cpu0 = _cpu_seconds(pid)
        elif line.startswith("done"):
            cpu1 = _cpu_seconds(pid)
        else:
            result = line
    if gen.wait() != 0:
        raise RuntimeError(f"pingload failed against {path}")
    return dict(kv.split("=") for kv in result.split()), cpu1 - cpu0


def run_one(kind: str, load: Path, workdir: Path, clients: int, seconds: float) -> dict[str, float]:
    path = str(workdir / f"{kind}.sock")
    server = start_server(kind, path)
    try:
        fields, cpu = run_pingload(load, path, clients, 0.5, seconds, server.pid)
        cpu = max(cpu, 1.0 / TICKS)
        requests = float(fields["requests"])
        return {
            "requests": requests,
            "per_s": requests / seconds,
            "per_cpu_s": requests / cpu,
            "cpu": cpu,
            "p50_us": float(fields["p50_us"]),
            "p99_us": float(fields["p99_us"]),
            "errors": float(fields["errors"]),
        }
    finally:
        server.terminate()
        server.wait(10)
        with_path = Path(path)
        if with_path.exists():
            with_path.unlink()


def client_cost(workdir: Path, pings: int) -> str:
    """The blocking client library's CPU per ping against the daemon (one client)."""
    from iommud.client import Client

    server = start_server("daemon", str(workdir / "client.sock"))
    try:
        with Client(str(workdir / "client.sock"), "bench") as client:
            for _ in range(pings // 10):
                client.ping()  # warm up
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(pings):
                client.ping()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return (
            f"blocking client (iommud.client.Client.ping, 1 client): "
            f"{cpu / pings * 1e6:.1f} us client CPU per ping, {pings / wall:.0f} pings/s"
        )
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,10,100")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--client-pings", type=int, default=10000)
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the daemon of the iommud/ package under DIR (e.g. an older commit's "
        "`git archive REV iommud | tar -x -C DIR`) as a third row, for before/after",
    )
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        os.environ["IOMMUD_BENCH_BASELINE"] = os.path.abspath(args.baseline)
    if args.serve:
        serve(*args.serve)
        return
    workdir = Path(tempfile.mkdtemp(prefix="iommud-ping-", dir="/tmp"))
    try:
        load = _build_load(workdir)
        print(
            f"{'clients':>7} {'server':>8} {'req/CPU-s':>10} {'req/s':>8} {'p50 us':>8} "
            f"{'p99 us':>8}  ratio (daemon/echo per CPU-s)"
        )
        for clients in (int(c) for c in args.clients.split(",")):
            for _ in range(args.rounds):
                kinds = ("echo", "daemon", *(("baseline",) if args.baseline else ()))
                rows = {k: run_one(k, load, workdir, clients, args.seconds) for k in kinds}
                for kind, r in rows.items():
                    ratio = ""
                    if kind in ("daemon", "baseline"):
                        ratio = f"  {r['per_cpu_s'] / rows['echo']['per_cpu_s']:.2f}"
                    print(
                        f"{clients:>7} {kind:>8} {r['per_cpu_s']:>10.0f} {r['per_s']:>8.0f} "
                        f"{r['p50_us']:>8.0f} {r['p99_us']:>8.0f}{ratio}"
                        + (f"  ERRORS {r['errors']:.0f}" if r["errors"] else "")
                    )
        print(client_cost(workdir, args.client_pings))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
