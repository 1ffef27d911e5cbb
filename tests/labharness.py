"""Shared pytest fixtures for the lab-guest tests that drive the real daemon.

Loaded from tests/conftest.py. ``kmsg`` reads the guest kernel log; ``running_daemon``
is the lifecycle both the e2e (issue 4) and live (issue 5) suites use for their
module-scoped daemon; a failing test whose node carries a ``daemon`` gets the daemon's
log tail in its report. Test code only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from kmsg import Kmsg

from tests.e2e.support import Daemon

D = TypeVar("D", bound=Daemon)


@contextmanager
def running_daemon(factory: Callable[[Path], D], prefix: str) -> Iterator[D]:
    """The real iommud as root in a fresh work dir, stopped and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the daemon tests run as root inside the lab guest")
    # Short path (sun_path is 108 bytes) and searchable by uid 1000 for the socket.
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    workdir.chmod(0o755)
    d = factory(workdir)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def kmsg() -> Iterator[Kmsg]:
    k = Kmsg()
    yield k
    k.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing daemon test carries the daemon's log tail in its report."""
    report = yield
    d = getattr(item, "daemon", None)
    if report.failed and isinstance(d, Daemon) and not d._log.closed:
        report.sections.append(("iommud log (tail)", d.log_tail(120)))
    return report
