"""The kernel contract (tests/kernel/contract.py) against the fake kernel on the host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakekernel import FakeKernel
from tests.fakesys import lab_topology
from tests.kernel.contract import KernelContract, Rig, drivers_restored


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    kernel = FakeKernel(lab_topology(tmp_path / "host"), can_reset=False)  # edu: no reset
    with drivers_restored(kernel.binder, kernel.sys_root) as drivers:
        yield Rig(kernel, drivers)


class TestFakeKernel(KernelContract):
    pass
