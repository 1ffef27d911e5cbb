"""The kernel contract (tests/kernel/contract.py) against Linux in the lab guest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from iommud.kernel.linux import LinuxKernel
from tests.kernel.contract import KernelContract, Rig, drivers_restored

pytestmark = pytest.mark.vm


@pytest.fixture
def rig() -> Iterator[Rig]:
    kernel = LinuxKernel("/dev", "/sys")
    with drivers_restored(kernel.binder, Path("/sys")) as drivers:
        yield Rig(kernel, drivers)


class TestLinuxKernel(KernelContract):
    pass
