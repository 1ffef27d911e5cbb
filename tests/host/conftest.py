"""Fixtures for the host-side tests: fake sysfs trees and their snapshots."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommud.host.snapshot import HostSnapshot, read_snapshot
from tests.fakesys import FakeSys, lab_topology


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on tmpfs (/dev/shm) when there is one, else tmp_path.

    Fake sysfs trees are thousands of tiny files and links; on this project's disk each
    create costs about a millisecond, on tmpfs a few microseconds.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="iommud-fakesys-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lab(fast_tmp: Path) -> FakeSys:
    """The QEMU lab guest's tree (see tests.fakesys.lab_topology for the drawing)."""
    return lab_topology(fast_tmp)


@pytest.fixture
def lab_snap(lab: FakeSys) -> HostSnapshot:
    return read_snapshot(lab.sys_root, lab.dev_root)
