"""A bounded load test of the daemon process: thousands of connections and requests.

Starts the real daemon process over the lab-shaped fake host (tests/server/fake_daemon.py:
real server and Broker, fake kernel, uvloop) and, for ``--seconds`` (default 20), runs
at once:

- ``--clients`` (default 600) closed-loop ping connections from the C load generator
  (bench/pingload.c): hundreds of thousands of requests;
- a churn of short connections (connect, hello, ping, close), ``--churn`` (default
  3,000) in all from 4 threads, plus 200 connections that never say hello and are cut off by the
  hello deadline (set to 2 s here);
- one good client (iommud.client.Client) pinging every 5 ms, whose round trips give
  the p50/p99/max "during load";
- every 0.25 s the daemon's RSS (VmRSS) and open fds (/proc/PID/fd).

Prints the peaks and the good client's percentiles, and the daemon's baseline before the
load. Unix socket only; a few minutes at most. A measurement, not a test: it asserts
only that the daemon answered everything and is still up.

Run: ``.venv/bin/python bench/load.py [--seconds 20] [--clients 600] [--churn 3000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "lab")]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=600)
    parser.add_argument("--churn", type=int, default=3000)
    args = parser.parse_args()

    from iommud.client import Client

    work = Path(tempfile.mkdtemp(prefix="iommud-load-", dir="/tmp"))
    path = str(work / "d.sock")
    # One uid runs everything here: the per-uid limit is lifted to the total; fewer
    # held fds per connection so this machine's RLIMIT_NOFILE admits them all.
    limits = {"max_per_uid": 1500, "max_total": 1500, "max_held_fds": 16, "hello_timeout": 2.0}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "lab")))}
    log = (work / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tests.server.fake_daemon", str(work), path, json.dumps(limits)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    load = work / "pingload"
    subprocess.run(
        [os.environ.get("CC", "cc"), "-O2", "-o", str(load), str(ROOT / "bench" / "pingload.c")],
        check=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)
        time.sleep(0.5)
        base_rss, base_fds = rss_kib(daemon.pid), nfds(daemon.pid)
        stop = threading.Event()
        samples: list[tuple[int, int]] = []
        latencies: list[float] = []
        churned = [0, 0]  # served, refused or cut

        def sampler() -> None:
            while not stop.is_set():
                samples.append((rss_kib(daemon.pid), nfds(daemon.pid)))
                time.sleep(0.25)

        def good_client() -> None:
            with Client(path, "good", timeout=60) as client:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    client.ping()
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.005)

        def churn(share: int, with_silent: bool) -> None:
            silent = []
            for _ in range(200 if with_silent else 0):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(path)
                silent.append(s)  # never says hello: the daemon cuts it off
            hello = b'{"op":"hello","fds":0,"id":0,"version":1,"client":"churn"}'
            for i in range(share):
                if stop.is_set():
                    break
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                    s.settimeout(60)
                    s.connect(path)
                    s.send(hello)
                    reply = json.loads(s.recv(65536))
                    if reply["op"] != "hello_reply":
                        churned[1] += 1
                        continue
                    s.send(b'{"op":"ping","fds":0,"id":%d}' % (i + 1))
                    s.recv(65536)
                    churned[0] += 1  # (racy += across threads: a count to print)
            for s in silent:
                churned[1] += s.recv(65536) == b""  # EOF from the hello deadline
                s.close()

        churners = [
            threading.Thread(target=churn, args=(args.churn // 4, i == 0)) for i in range(4)
        ]
        threads = [threading.Thread(target=sampler), threading.Thread(target=good_client)]
        threads += churners
        for t in threads:
            t.start()
        gen = subprocess.run(
            [str(load), path, str(args.clients), "1", str(args.seconds)],
            capture_output=True,
            text=True,
            check=True,
        )
        stop.set()
        for t in threads:
            t.join(120)
        result = dict(kv.split("=") for kv in gen.stdout.split("\n")[-2].split())
        assert daemon.poll() is None, "the daemon died under load"
        peak_rss = max(r for r, _ in samples)
        peak_fds = max(f for _, f in samples)
        lat = sorted(latencies)
        print(f"daemon baseline: RSS {base_rss / 1024:.1f} MiB, {base_fds} fds")
        requests = int(result["requests"])
        p50, p99 = float(result["p50_us"]) / 1000, float(result["p99_us"]) / 1000
        print(
            f"load: {args.clients} ping connections for {args.seconds:.0f} s ({requests} "
            f"requests, {requests / args.seconds:.0f}/s, generator p50 {p50:.1f} ms p99 "
            f"{p99:.1f} ms), {churned[0]} short connections, 200 silent ones "
            f"({churned[1]} cut off or refused)"
        )
        print(f"daemon during load: peak RSS {peak_rss / 1024:.1f} MiB, peak fds {peak_fds}")
        print(
            f"good client ({len(lat)} pings): p50 {statistics.median(lat) * 1000:.2f} ms, "
            f"p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms, max {lat[-1] * 1000:.2f} ms"
        )
        time.sleep(3)
        print(f"daemon after: RSS {rss_kib(daemon.pid) / 1024:.1f} MiB, {nfds(daemon.pid)} fds")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
