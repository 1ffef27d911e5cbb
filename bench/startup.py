"""Daemon start-up on a large host (issue 10): time to READY and full-tree reads.

Runs the REAL daemon process (iommud.app.main: uvloop, the real server, broker and host
watcher on a real netlink monitor; only the kernel's IOMMU objects faked) over one fake
sysfs tree of N devices (tests/fakesys.large_host, default 10,000 in 5,000 groups, on
/dev/shm) from two checkouts, interleaved round by round (ABBA order), and prints per
side, from the moment the process is spawned:

- READY: when the daemon's READY=1 arrives on a NOTIFY_SOCKET the bench listens on (the
  daemon sends it once it serves);
- ping: when the first ping, sent on READY, is answered;
- settled: when the daemon's start-up work is over, by its own log's timestamps: the
  watcher's start-up rescan (``host.rescanned`` reason startup, a task after READY in the
  old order) or its catch-up (``udev.caught_up``, before READY in the new one);
- cpu: the daemon's CPU seconds (utime + stime) once settled;
- reads: full-tree reads over the daemon's life (``host.read_all`` + ``host.rescanned``
  log events; the bench lists nothing, so all are start-up's).

    .venv/bin/python bench/startup.py --before /work/wt/startup-base [--after .] [--rounds 5]

Both daemons run on this interpreter with PYTHONPATH set to their checkout, and this
checkout's fake kernel (the same instrument for both). It asserts nothing about time
(the machine is shared); the numbers are medians over the rounds.
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
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "lab"))  # tests.fakesys imports lab/topology.py

from iommud.client import Client  # noqa: E402

LAUNCHER = """\
import importlib.util, sys
from pathlib import Path
from iommud.app import main
from iommud.broker import Broker
from tests.fakesys import FakeSys
spec = importlib.util.spec_from_file_location("bench_fakekernel", {fake!r})
fk = sys.modules["bench_fakekernel"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fk)
fs = FakeSys(Path(sys.argv[1]))  # built by the bench
sys.exit(main(sys.argv[2:], broker_factory=lambda c: Broker(c, fk.FakeKernel(fs))))
"""


@dataclass(frozen=True)
class StartUp:
    ready: float
    ping: float
    settled: float
    cpu: float
    reads: int
    source: str


def _events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _settled(events: list[dict[str, object]]) -> dict[str, object] | None:
    for e in events:
        if e["event"] == "udev.caught_up" or (
            e["event"] == "host.rescanned" and e.get("reason") == "startup"
        ):
            return e
    return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_once(repo: Path, tree: Path, work: Path) -> StartUp:
    work.mkdir(parents=True)
    conf = work / "iommud.toml"
    conf.write_text(
        f'[daemon]\nsys_root = "{tree}/sys"\ndev_root = "{tree}/dev"\nstate_dir = "{work}/state"\n'
    )
    launcher = work / "launch.py"
    launcher.write_text(LAUNCHER.format(fake=str(HERE / "tests" / "fakekernel.py")))
    notify_path = str(work / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(notify_path)
    notify.settimeout(120)
    sock = str(work / "s")
    env = {
        **os.environ,
        "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'lab'}",
        "NOTIFY_SOCKET": notify_path,
    }
    args = [sys.executable, str(launcher), str(tree), "--config", str(conf), "--socket", sock]
    log_path = work / "daemon.log"
    with log_path.open("w") as log:
        wall0, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(args, cwd=repo, env=env, stdout=log, stderr=log)
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            ready = time.perf_counter() - t0
            with Client(sock, "bench") as c:
                c.ping()
            ping = time.perf_counter() - t0
            deadline = time.monotonic() + 120
            while (marker := _settled(_events(log_path))) is None:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(log_path.read_text())
                time.sleep(0.005)
            cpu = _cpu_seconds(proc.pid)
            stamp = datetime.fromisoformat(str(marker["timestamp"])).timestamp()
            settled = max(stamp - wall0, ready)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            notify.close()
    events = _events(log_path)
    reads = sum(e["event"] in ("host.read_all", "host.rescanned") for e in events)
    source = next((str(e["source"]) for e in events if e["event"] == "udev.source_started"), "-")
    return StartUp(ready, ping, settled, cpu, reads, source)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    ap.add_argument("--after", type=Path, default=HERE, help="checkout of the new code")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="iommud-bench-", dir="/dev/shm"))
    try:
        from tests.fakesys import large_host

        tree = work / "host"
        large_host(tree, args.devices, args.devices // 2)
        sides = {"before": args.before.resolve(), "after": args.after.resolve()}
        runs: dict[str, list[StartUp]] = {name: [] for name in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                runs[name].append(start_once(sides[name], tree, work / f"{name}{r}"))
        print(
            f"{args.devices} devices in {args.devices // 2} groups, {args.rounds} rounds "
            "interleaved; seconds from spawn, median (min)"
        )
        print(f"{'':8}{'READY':>16}{'first ping':>16}{'settled':>16}{'cpu s':>16}  reads")
        for name, rs in runs.items():

            def col(xs: list[float]) -> str:
                return f"{statistics.median(xs):8.3f} ({min(xs):5.3f})"

            print(
                f"{name:8}{col([r.ready for r in rs])}{col([r.ping for r in rs])}"
                f"{col([r.settled for r in rs])}{col([r.cpu for r in rs])}"
                f"  {sorted({r.reads for r in rs})} ({rs[0].source} source)  {sides[name]}"
            )
        b, a = runs["before"], runs["after"]
        for label, key in (("READY", "ready"), ("settled", "settled"), ("cpu", "cpu")):
            mb = statistics.median(getattr(r, key) for r in b)
            ma = statistics.median(getattr(r, key) for r in a)
            print(f"RATIO after/before {label:8} {ma / mb:6.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
