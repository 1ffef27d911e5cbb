"""Per-event work of the host watcher does not grow with the host.

10,000 synthetic bind/unbind events are fed to ``HostWatcher.handle`` over fake trees of
100 and of 10,000 devices (4 devices per group in both). Work is counted as filesystem
operations made while handling an event (opens, readlinks, directory listings, existence
checks), which is deterministic, unlike time on a shared machine. A full rescan of the
large tree costs tens of thousands of operations; one event must cost the same few dozen
on both trees. (Timings are in bench/events_scale.py, not asserted here.)
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iommud.broker.hostview import HostChange
from iommud.watch import HostAction, HostEvent, HostWatcher
from tests.fakesys import large_host
from tests.udev.views import view_of, wire

EVENTS = 10_000
GROUP_SIZE = 4


class FsOps:
    """Counts calls of the os functions iommud.host.snapshot reads sysfs with."""

    NAMES = ("open", "readlink", "listdir", "scandir", "stat", "lstat")
    PATH_NAMES = ("exists", "lexists", "isdir", "islink")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.count = 0
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        for name in self.PATH_NAMES:
            monkeypatch.setattr(os.path, name, self._wrap(getattr(os.path, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.count += 1
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="iommud-scale-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _ops_per_event(root: Path, n_devices: int, ops: FsOps) -> tuple[list[int], int]:
    fs = large_host(root, n_devices, n_devices // GROUP_SIZE)

    async def sink(change: HostChange) -> None:
        wire([change])  # the viability verdicts subscribers get: part of the work

    view = view_of(fs)
    watcher = HostWatcher(view, sink)
    ops.count, ops.active = 0, True
    await watcher.rescan("startup")
    ops.active = False
    rescan_ops = ops.count

    rng = random.Random(7)
    bdfs = sorted(view.snapshot.devices)
    per_event: list[int] = []
    for seq in range(EVENTS):
        bdf = rng.choice(bdfs)
        if view.snapshot.devices[bdf].driver is not None:
            fs.unbind(bdf)
            event = HostEvent(HostAction.UNBIND, bdf, None, seq)
        else:
            fs.bind(bdf, "e1000")
            event = HostEvent(HostAction.BIND, bdf, "e1000", seq)
        ops.count, ops.active = 0, True
        await watcher.handle(event)
        ops.active = False
        per_event.append(ops.count)
    return per_event, rescan_ops


async def test_event_work_is_independent_of_host_size(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 events on 100 and on 10,000 devices: the same filesystem work per event."""
    ops = FsOps(monkeypatch)
    small, small_rescan = await _ops_per_event(shm_dir / "small", 100, ops)
    large, large_rescan = await _ops_per_event(shm_dir / "large", 10_000, ops)
    print(
        f"fs ops per event: 100 devices mean {statistics.fmean(small):.1f} max {max(small)}; "
        f"10,000 devices mean {statistics.fmean(large):.1f} max {max(large)}; "
        f"full rescan {small_rescan} vs {large_rescan}"
    )
    # The counter sees real work: a rescan of the large tree is ~100x the small one.
    assert large_rescan > 50 * small_rescan
    # One event touches one group: same bound on both trees, and far below a rescan.
    assert max(large) <= max(small)
    assert statistics.fmean(large) <= 1.1 * statistics.fmean(small)
    assert max(large) * 100 < large_rescan
