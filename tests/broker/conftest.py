"""Fixtures for broker tests: the lab topology as a fake sysfs tree, the fake kernel and a
started Broker with an fd-leak check around the test (helpers: support.py).

The tree (tests/fakesys.py, lab_topology)::

    group 3:  0000:00:10.0  edu    (alone, driver-less)
    group 4:  0000:00:11.0  pci-bridge (no driver)
              0000:01:01.0  edu, 0000:01:02.0 edu (driver-less)
              0000:01:03.0  e1000  (bound to e1000)
    group 5:  0000:00:1f.0 lpc_ich + 0000:00:1f.2 ahci
    group 6:  0000:00:01.0  virtio-pci
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iommud.broker import Broker
from tests.broker.support import make_config
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys, lab_topology


@pytest.fixture
def fs(tmp_path: Path) -> FakeSys:
    return lab_topology(tmp_path / "host")


@pytest.fixture
def kernel(fs: FakeSys) -> FakeKernel:
    return FakeKernel(fs, unbind_block_limit=5.0)


@pytest.fixture
async def broker(
    no_fd_leak: None, tmp_path: Path, fs: FakeSys, kernel: FakeKernel
) -> AsyncIterator[Broker]:
    b = Broker(make_config(tmp_path, fs), kernel, sysfs_timeout=1.0, restore_retry_delay=0.01)
    await b.start()
    yield b
    await b.aclose(grace=5.0)
