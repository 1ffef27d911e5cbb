"""Per-event cost of the host watcher on small and large fake hosts.

Feeds N synthetic bind/unbind uevents (default 10,000) to ``HostWatcher.handle`` over
fake sysfs trees (tests/fakesys.large_host) of 100 and 10,000 devices, with the same
group size (4 devices per group) in both, and prints the per-event cost for each and
their ratio. Per-event work must not grow with the tree: the ratio should be close to 1.
The sysfs mutation that each event reports is done outside the timed region; the timed
region covers reading the device link and the group, updating the snapshot, and the
sink computing the wire events (viability before/after).

Run: ``.venv/bin/python bench/events_scale.py [--events N] [--sizes 100,10000]``.
This is a measurement, not a test: it asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fakesys

from iommud.broker.events import EventHub
from iommud.broker.hostview import HostChange
from iommud.watch import HostAction, HostEvent, HostWatcher
from tests.fakesys import large_host
from tests.udev.views import view_of

GROUP_SIZE = 4


async def run_one(n_devices: int, n_events: int, seed: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="iommud-bench-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        fs = large_host(root, n_devices, max(1, n_devices // GROUP_SIZE))
        build_s = time.perf_counter() - t0
        wire_events = 0

        async def sink(change: HostChange) -> None:
            nonlocal wire_events
            wire_events += len(hub.host_events(change))

        hub = EventHub()
        view = view_of(fs)
        watcher = HostWatcher(view, sink)
        t0 = time.perf_counter()
        await watcher.rescan("startup")
        rescan_s = time.perf_counter() - t0
        wire_events = 0

        rng = random.Random(seed)
        bdfs = sorted(view.snapshot.devices)
        costs: list[int] = []
        for i in range(n_events):
            bdf = rng.choice(bdfs)
            if view.snapshot.devices[bdf].driver is not None:
                fs.unbind(bdf)
                event = HostEvent(HostAction.UNBIND, bdf, None, i)
            else:
                fs.bind(bdf, "e1000")
                event = HostEvent(HostAction.BIND, bdf, "e1000", i)
            t = time.perf_counter_ns()
            await watcher.handle(event)
            costs.append(time.perf_counter_ns() - t)
        costs.sort()
        return {
            "devices": n_devices,
            "build_s": build_s,
            "rescan_s": rescan_s,
            "mean_us": statistics.fmean(costs) / 1000,
            "p50_us": costs[len(costs) // 2] / 1000,
            "p99_us": costs[int(len(costs) * 0.99)] / 1000,
            "wire_events": wire_events,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--sizes", default="100,10000")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [asyncio.run(run_one(n, args.events, args.seed)) for n in sizes]
    print(f"{args.events} synthetic bind/unbind events, {GROUP_SIZE} devices per group")
    print(
        f"{'devices':>8} {'tree build':>11} {'full rescan':>12} "
        f"{'mean/event':>11} {'p50':>9} {'p99':>9} {'wire events':>12}"
    )
    for r in results:
        print(
            f"{r['devices']:>8} {r['build_s']:>10.2f}s {r['rescan_s'] * 1000:>10.1f}ms "
            f"{r['mean_us']:>9.1f}us {r['p50_us']:>7.1f}us {r['p99_us']:>7.1f}us "
            f"{r['wire_events']:>12}"
        )
    base = results[0]
    for r in results[1:]:
        print(
            f"ratio {r['devices']}/{base['devices']} devices: "
            f"mean {r['mean_us'] / base['mean_us']:.2f}x, p50 {r['p50_us'] / base['p50_us']:.2f}x "
            f"(tree is {r['devices'] / base['devices']:.0f}x larger; "
            f"full rescan {r['rescan_s'] / base['rescan_s']:.0f}x slower)"
        )


if __name__ == "__main__":
    main()
