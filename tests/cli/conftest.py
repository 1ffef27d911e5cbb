"""Fixtures for iommuctl tests: a short socket dir and a running daemon (support.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.support import Daemon
from tests.serving import FdSnapshot


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="iommuctl-t")
    os.chmod(path, 0o755)  # an unprivileged iommuctl must reach the (0666) socket
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(sockdir: Path) -> Iterator[Daemon]:
    """A running daemon; after it stops, no fd of this process may have leaked."""
    before = FdSnapshot.take()
    d = Daemon(sockdir)
    d.start()
    try:
        yield d
    finally:
        d.stop()
    before.assert_unchanged()
