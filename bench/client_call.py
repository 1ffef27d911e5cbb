"""The client library's cost per call, against a floor, old against new, in one run.

One daemon (the real ``iommud.server.Server`` over the fake kernel, as in bench/ping.py)
serves every client below, one at a time, each with one ping in flight:

- ``raw``: the floor of a blocking Python client: ``send`` the ping's bytes, ``recv``
  the reply. No encoding, no validation, no fd handling.
- ``sync``: ``iommud.client.Client.ping()``.
- ``raw-aio``: the floor of an asyncio client: ``loop.sock_sendall`` + ``loop.sock_recv``.
- ``aio``: ``await iommud.client.AsyncClient.ping()``.
- ``C``: bench/pingload.c with one client, the rate a client that costs ~nothing gets.

``--baseline DIR`` (a checkout of the older code, e.g. ``git worktree add --detach DIR
REV``) adds ``sync`` and ``aio`` run from DIR's ``iommud/``, against the same daemon.
Each client is a long-lived worker process (imports and connection set up once); every
round runs each of them for ``--seconds``, in an order rotated each round, so drift on
a shared machine hits all of them. Per run: calls per second (wall), the client's CPU
per call (its utime+stime over the run) and the daemon's. The table gives the median
over ``--rounds`` and the range [min-max]; then client CPU per call above the floor's.

Run: ``.venv/bin/python bench/client_call.py [--rounds 5] [--seconds 2] [--baseline DIR]
[--loop asyncio|uvloop]``. A measurement, not a test: it asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
HELLO = b'{"op":"hello","fds":0,"id":0,"version":1,"client":"raw"}'
BATCH = 200  # calls between two looks at the clock


# --------------------------------------------------------------------- the workers


def _ping(call_id: int) -> bytes:
    return b'{"op":"ping","fds":0,"id":%d}' % call_id


def _run_raw(path: str, seconds: float) -> tuple[int, float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(HELLO)
    sock.recv(65536)
    state = {"id": 0}

    def run(seconds: float) -> tuple[int, float]:
        calls, call_id = 0, state["id"]
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(BATCH):
                call_id += 1
                sock.send(_ping(call_id))
                sock.recv(65536)
            calls += BATCH
            now = time.perf_counter()
            if now >= end:
                state["id"] = call_id
                return calls, now - start

    return _serve_worker(run, seconds)


def _run_sync(path: str, seconds: float) -> tuple[int, float]:
    from iommud.client import Client

    client = Client(path, "bench")

    def run(seconds: float) -> tuple[int, float]:
        calls = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(BATCH):
                client.ping()
            calls += BATCH
            now = time.perf_counter()
            if now >= end:
                return calls, now - start

    return _serve_worker(run, seconds)


def _run_async(kind: str, path: str, seconds: float, loop_name: str) -> tuple[int, float]:
    if loop_name == "uvloop":
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        ping = runner.run(_async_pinger(kind, path))

        async def timed(seconds: float) -> tuple[int, float]:
            calls = 0
            start = time.perf_counter()
            end = start + seconds
            while True:
                for _ in range(BATCH):
                    await ping()
                calls += BATCH
                now = time.perf_counter()
                if now >= end:
                    return calls, now - start

        return _serve_worker(lambda s: runner.run(timed(s)), seconds)


async def _async_pinger(kind: str, path: str) -> Any:
    if kind == "aio":
        from iommud.client import AsyncClient

        client = await AsyncClient.connect(path, "bench")
        return client.ping
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    await loop.sock_sendall(sock, HELLO)
    await loop.sock_recv(sock, 65536)
    state = {"id": 0}

    async def ping() -> None:
        state["id"] += 1
        await loop.sock_sendall(sock, _ping(state["id"]))
        await loop.sock_recv(sock, 65536)

    return ping


def _serve_worker(run: Any, seconds: float) -> tuple[int, float]:
    """Answer the driver: one timed run per line on stdin, one JSON line out each."""
    run(0.3)  # warm up: caches, the daemon's connection, the allocator
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        cpu0 = time.process_time()
        calls, wall = run(seconds)
        cpu = time.process_time() - cpu0
        print(json.dumps({"calls": calls, "wall": wall, "cpu": cpu}), flush=True)
    return 0, 0.0


def worker(kind: str, root: str, path: str, seconds: float, loop_name: str) -> None:
    sys.path.insert(0, root)
    if kind in ("sync", "aio"):
        import iommud

        origin = Path(iommud.__file__).resolve()
        if not origin.is_relative_to(Path(root).resolve()):
            raise RuntimeError(f"imported {origin}, not the iommud of {root}")
    if kind == "raw":
        _run_raw(path, seconds)
    elif kind == "sync":
        _run_sync(path, seconds)
    else:
        _run_async(kind, path, seconds, loop_name)


# --------------------------------------------------------------------- the driver


class Worker:
    """One client process, kept across rounds."""

    def __init__(self, label: str, kind: str, root: Path, path: str, args: argparse.Namespace):
        self.label = label
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                kind,
                str(root),
                path,
                "--seconds",
                str(args.seconds),
                "--loop",
                args.loop,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker {label} did not start")

    def run(self) -> dict[str, float]:
        self.stdin.write("go\n")
        self.stdin.flush()
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died")
        result: dict[str, float] = json.loads(line)
        return result

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(10)


class CLoad:
    """bench/pingload.c with one client (a new process per run: it is time-based)."""

    label = "C"

    def __init__(self, exe: Path, path: str, seconds: float) -> None:
        self.exe, self.path, self.seconds = exe, path, seconds

    def run(self) -> dict[str, float]:
        from bench.ping import run_pingload

        fields, cpu = run_pingload(self.exe, self.path, 1, 0.3, self.seconds, None)
        return {"calls": float(fields["requests"]), "wall": self.seconds, "cpu": cpu}

    def close(self) -> None:
        pass


def _spread(values: list[float], fmt: str) -> str:
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} [{low}-{high}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--baseline", metavar="DIR", help="a checkout of the older code")
    parser.add_argument(
        "--worker", nargs=3, metavar=("KIND", "ROOT", "PATH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        kind, root, path = args.worker
        worker(kind, root, path, args.seconds, args.loop)
        return

    sys.path[:0] = [str(ROOT), str(ROOT / "lab")]
    from bench.ping import _build_load, _cpu_seconds, start_server

    workdir = Path(tempfile.mkdtemp(prefix="iommud-call-", dir="/tmp"))
    path = str(workdir / "daemon.sock")
    daemon = start_server("daemon", path)
    runners: list[Worker | CLoad] = []
    try:
        runners.append(CLoad(_build_load(workdir), path, args.seconds))
        plan = [("raw", "raw", ROOT), ("sync", "sync", ROOT)]
        if args.baseline:
            plan.append(("sync (old)", "sync", Path(args.baseline)))
        plan += [("raw-aio", "raw-aio", ROOT), ("aio", "aio", ROOT)]
        if args.baseline:
            plan.append(("aio (old)", "aio", Path(args.baseline)))
        for label, kind, root in plan:
            runners.append(Worker(label, kind, root, path, args))
        results: dict[str, list[dict[str, float]]] = {r.label: [] for r in runners}
        for round_no in range(args.rounds):
            shift = round_no % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                cpu0 = _cpu_seconds(daemon.pid)
                r = runner.run()
                r["daemon_cpu"] = _cpu_seconds(daemon.pid) - cpu0
                results[runner.label].append(r)
        _report(results, args)
    finally:
        for runner in runners:
            runner.close()
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"{args.rounds} rounds of {args.seconds:g} s per client, one ping in flight, "
        f"asyncio clients on {args.loop}; median [min-max] over the rounds"
    )
    print(f"{'client':>11} {'calls/s':>20} {'client CPU us/call':>22} {'daemon CPU us/call':>22}")
    per_call: dict[str, list[float]] = {}
    for label, runs in results.items():
        rate = [r["calls"] / r["wall"] for r in runs]
        cpu = [r["cpu"] / r["calls"] * 1e6 for r in runs]
        daemon = [r["daemon_cpu"] / r["calls"] * 1e6 for r in runs]
        per_call[label] = cpu
        print(
            f"{label:>11} {_spread(rate, '.0f'):>20} {_spread(cpu, '.1f'):>22} "
            f"{_spread(daemon, '.1f'):>22}"
        )
    print("client CPU per call above its floor (median of the per-round differences):")
    floors = (("sync", "raw"), ("sync (old)", "raw"), ("aio", "raw-aio"), ("aio (old)", "raw-aio"))
    for label, floor in floors:
        if label in per_call:
            diffs = [c - f for c, f in zip(per_call[label], per_call[floor], strict=True)]
            print(f"  {label:>11} - {floor:<8} {_spread(diffs, '.1f')} us")
    for new, old in (("sync", "sync (old)"), ("aio", "aio (old)")):
        if old in per_call:
            ratios = [o / n for n, o in zip(per_call[new], per_call[old], strict=True)]
            print(f"  {old} / {new} client CPU per call: {_spread(ratios, '.2f')} (per round)")


if __name__ == "__main__":
    main()
