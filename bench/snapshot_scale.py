"""How long reading a large host's sysfs takes, and refreshing one group of it.

Builds a fake sysfs tree (tests/fakesys.py, large_host) of N devices in M groups, then
times read_snapshot over the whole tree, read_group of one group, and with_group
(including its amortised compaction, over many successive updates). Prints numbers; it
asserts nothing about time. Run from the repo root:

    .venv/bin/python bench/snapshot_scale.py [--devices 10000] [--groups 5000] [--dir /dev/shm]

The tree goes on tmpfs (/dev/shm) by default: on a disk, building it dominates (about a
millisecond per file), and the real /sys is in memory too.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iommud.host.snapshot import read_group, read_snapshot
from tests.fakesys import large_host


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=5_000)
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    ap.add_argument("--repeat", type=int, default=5, help="read_snapshot repetitions")
    ap.add_argument("--updates", type=int, default=2_000, help="successive with_group calls")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="iommud-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        fs = large_host(root, args.devices, args.groups)
        build = time.perf_counter() - t0
        print(f"tree: {args.devices} devices in {args.groups} groups under {root}")
        print(f"build fake tree         {_ms(build)}")

        full = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            snap = read_snapshot(fs.sys_root, fs.dev_root)
            full.append(time.perf_counter() - t0)
        assert len(snap.devices) == args.devices
        assert len(snap.groups) == args.groups
        print(
            f"read_snapshot           {_ms(min(full))} min, {_ms(statistics.median(full))} median"
            f"  ({min(full) / args.devices * 1e6:.1f} us/device)"
        )

        gid = 1234 % args.groups
        bdf = next(b for b in snap.groups[gid].devices)
        fs.unbind(bdf)
        fs.bind(bdf, "vfio-pci")
        rg = []
        for _ in range(50):
            t0 = time.perf_counter()
            group, devices = read_group(fs.sys_root, gid)
            rg.append(time.perf_counter() - t0)
        print(
            f"read_group (1 group)    {_ms(min(rg))} min, {_ms(statistics.median(rg))} median"
            f"  ({len(group.devices)} devices)"
        )

        t0 = time.perf_counter()
        updated = snap.with_group(group, devices)
        first = time.perf_counter() - t0
        assert updated.devices[bdf].driver == "vfio-pci"
        print(f"with_group (first)      {_ms(first)}")

        # Successive updates over distinct groups: includes overlay folding.
        groups = [snap.groups[g % args.groups] for g in range(args.updates)]
        devs = [{b: updated.devices[b] for b in g.devices} for g in groups]
        cur = updated
        per = []
        for g, d in zip(groups, devs, strict=True):
            t0 = time.perf_counter()
            cur = cur.with_group(g, d)
            per.append(time.perf_counter() - t0)
        print(
            f"with_group x{args.updates:<5}       {_ms(sum(per) / len(per))} mean, "
            f"{_ms(statistics.median(per))} median, {_ms(max(per))} max (a fold)"
        )
        t0 = time.perf_counter()
        _ = dict(snap.devices)
        print(f"(baseline: dict copy of all devices {_ms(time.perf_counter() - t0)})")
        assert cur == updated
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
