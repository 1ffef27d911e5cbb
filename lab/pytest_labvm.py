"""pytest plugin: run the tests marked `vm` inside the lab guest, all in one guest boot.

On the host, every collected item marked `vm` is replaced by a stand-in with the same node
id. When the first stand-in runs, the plugin boots the lab guest once (lab/labvm.py) and
runs pytest inside it on exactly those node ids; the guest side of this plugin writes one
JSON line per test phase into the shared dir. Each stand-in then reports its guest outcome
on the host: pass, fail (with the guest's failure text and captured output), skip or xfail.
No host fixture of a vm test ever runs on the host.

Without QEMU, vng or the kernel image the vm tests are skipped with the reason, unless
CI=true or IOMMUD_REQUIRE_LAB=1: then they fail. A guest crash or timeout fails every vm
test that has no result yet, with QEMU's messages and the console tail. The full guest
output of the last batch is kept in .lab/vm-batch.log under the rootdir.

The batch is not bounded by a fixed time for its tests, which a loaded host would break:
a watchdog stops it only when no test phase has reported for --lab-stall seconds (by
default the longest per-test timeout in the batch plus a margin; each test's own timeout
applies in the guest). --lab-timeout is a backstop for the whole batch.

Inside the guest (IOMMUD_LAB_GUEST=1) vm tests run normally; the `lab_qmp` fixture gives
them the QEMU monitor. This module must not do anything else to the host.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import labvm
import pytest
from qmp_guest import GuestQmp

ENV_REPORT = "IOMMUD_LAB_REPORT"
ENV_TIMEOUT = "IOMMUD_LAB_TIMEOUT"
ENV_STALL = "IOMMUD_LAB_STALL"
#: A backstop only: the stall watchdog is what stops a hung batch.
DEFAULT_BATCH_TIMEOUT = 7200.0
#: Added to the longest per-test timeout for the default --lab-stall: the guest's pytest
#: needs time beyond a test's own timeout to collect, report, and run session fixtures.
STALL_MARGIN = 300.0
#: --lab-stall when some vm test has no per-test timeout at all.
STALL_WITHOUT_TEST_TIMEOUT = 1800.0


def in_guest() -> bool:
    return os.environ.get(labvm.ENV_GUEST) == "1"


def lab_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("IOMMUD_REQUIRE_LAB") == "1"


# --------------------------------------------------------------------------- hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lab", "iommud lab guest (tests marked vm)")
    group.addoption(
        "--lab-timeout",
        type=float,
        default=float(os.environ.get(ENV_TIMEOUT, DEFAULT_BATCH_TIMEOUT)),
        help=f"seconds for the whole vm batch, boot included: a backstop (${ENV_TIMEOUT})",
    )
    group.addoption(
        "--lab-stall",
        type=float,
        default=float(os.environ[ENV_STALL]) if os.environ.get(ENV_STALL) else None,
        help=(
            "stop the vm batch when no test phase has reported for this many seconds "
            f"(${ENV_STALL}; default: the longest per-test timeout + {STALL_MARGIN:.0f})"
        ),
    )
    group.addoption(
        "--lab-live",
        action="store_true",
        help="show the guest's pytest output live while the vm batch runs",
    )


def pytest_configure(config: pytest.Config) -> None:
    if in_guest():
        report = os.environ.get(ENV_REPORT)
        if report:
            config.pluginmanager.register(GuestReporter(Path(report)), "labvm-guest-reporter")
    else:
        config.pluginmanager.register(HostBatch(config), "labvm-host-batch")


@pytest.fixture
def lab_qmp() -> GuestQmp:
    """The QEMU monitor of the lab guest this test runs in (vm tests only)."""
    if not in_guest():
        pytest.skip("lab_qmp only works inside the lab guest (mark the test vm)")
    return GuestQmp()


# --------------------------------------------------------------------------- guest side


class GuestReporter:
    """Inside the guest: append one JSON line per test phase (and failed collection)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def _write(self, record: dict[str, Any]) -> None:
        with self._path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record: dict[str, Any] = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": report.duration,
        }
        if hasattr(report, "wasxfail"):
            record["wasxfail"] = report.wasxfail
        if report.skipped and isinstance(report.longrepr, tuple):
            path, lineno, reason = report.longrepr
            record["reason"] = str(reason).removeprefix("Skipped: ")
            record["location"] = [str(path), lineno]
        elif report.failed:
            text = report.longreprtext
            for title, content in report.sections:
                text += f"\n{'-' * 10} {title} (in the guest) {'-' * 10}\n{content}"
            record["text"] = text
        self._write(record)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write(
                {
                    "nodeid": report.nodeid,
                    "when": "collect",
                    "outcome": "failed",
                    "text": report.longreprtext,
                }
            )


# --------------------------------------------------------------------------- host side


def _test_timeout(item: pytest.Item) -> float | None:
    """The pytest-timeout bound the test will have in the guest: its `timeout` marker, else
    --timeout, else $PYTEST_TIMEOUT, else the ini value; None when it has none (0 or unset)."""
    value: Any = None
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    if value is None:
        value = item.config.getoption("timeout", None)
    if value is None:
        value = os.environ.get("PYTEST_TIMEOUT")
    if value is None:
        try:
            value = item.config.getini("timeout")
        except ValueError:  # pytest-timeout not installed
            value = None
    try:
        seconds = float(value) if value not in (None, "") else 0.0
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


_GUEST_ONLY_MARKS = frozenset({"skip", "skipif", "xfail", "usefixtures", "parametrize", "timeout"})
#: Beyond --lab-timeout for a stand-in's pytest-timeout: labvm.execute ends the batch at
#: --lab-timeout itself (and reports which tests got no result); this margin only lets it.
BATCH_TIMEOUT_MARGIN = 120.0


class GuestFailureError(Exception):
    """A vm test failed in the guest, or the guest could not run it; str() is the report."""


class GuestItem(pytest.Item):
    """Host stand-in for a vm test: reports the outcome the test had in the guest."""

    def __init__(self, *, batch: HostBatch, original: pytest.Item, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._batch = batch
        self._location = original.location
        #: Where the guest said the test skipped (path, 1-based line), for the skip report.
        self.skip_location: tuple[str, int] | None = None
        # Keep the markers (for reports and plugins) except those pytest would evaluate on
        # the host: skip/skipif/xfail conditions are the guest's business.
        self.own_markers = [m for m in original.iter_markers() if m.name not in _GUEST_ONLY_MARKS]

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, self._location[1], self._location[2]

    def runtest(self) -> None:
        self._batch.report_outcome(self)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str:
        if isinstance(excinfo.value, GuestFailureError):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))


class HostBatch:
    """On the host: swap vm items for stand-ins, run them all in one guest boot, report."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._nodeids: list[str] = []
        self._done = False
        self._unavailable: str | None = None
        self._crash: str | None = None  # why the batch produced no result for some tests
        self._phases: dict[str, list[dict[str, Any]]] = {}
        self._summary: str | None = None
        #: The longest per-test timeout of the batch's tests (None: one has none).
        self._longest_test_timeout: float | None = 0.0

    @pytest.hookimpl(trylast=True)  # after -m / -k deselection
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # The first stand-in to run boots the guest and runs the whole batch: its
        # per-test timeout (pytest-timeout) must cover the batch, not one test. A vm
        # test's own timeout applies in the guest (where each test runs as usual).
        batch_timeout = self._config.getoption("--lab-timeout") + BATCH_TIMEOUT_MARGIN
        for i, item in enumerate(items):
            if item.get_closest_marker("vm") is None or item.parent is None:
                continue
            stand_in = GuestItem.from_parent(item.parent, name=item.name, batch=self, original=item)
            own = _test_timeout(item)
            if own is None or self._longest_test_timeout is None:
                self._longest_test_timeout = None
            else:
                self._longest_test_timeout = max(self._longest_test_timeout, own)
            stand_in.add_marker(pytest.mark.timeout(batch_timeout))
            items[i] = stand_in
            self._nodeids.append(item.nodeid)

    def stall_timeout(self) -> float:
        """--lab-stall, or the longest per-test timeout in the batch plus STALL_MARGIN."""
        given: float | None = self._config.getoption("--lab-stall")
        if given is not None:
            return given
        if self._longest_test_timeout is None:
            return STALL_WITHOUT_TEST_TIMEOUT
        return self._longest_test_timeout + STALL_MARGIN

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self._summary is not None:
            terminalreporter.write_sep("-", "lab vm batch")
            terminalreporter.write_line(self._summary)

    # -- running

    def _say(self, line: str) -> None:
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, file=sys.stderr)

    def _run_batch(self) -> None:
        self._done = True
        try:
            kernel = labvm.check_available()
        except labvm.LabUnavailableError as exc:
            self._unavailable = str(exc)
            self._summary = f"lab unavailable: {exc}"
            return
        rootdir = self._config.rootpath
        timeout: float = self._config.getoption("--lab-timeout")
        stall = self.stall_timeout()
        live: bool = self._config.getoption("--lab-live")
        self._say("")
        self._say(
            f"lab: booting the guest for {len(self._nodeids)} vm test(s) (stopped if no test "
            f"reports for {stall:.0f}s, or after {timeout:.0f}s in all)"
        )
        log_path = rootdir / ".lab" / "vm-batch.log"
        with labvm.prepared(cwd=rootdir, kernel=kernel) as run:
            report = run.workdir / "report.jsonl"
            run.extra_env[ENV_REPORT] = str(report)
            argv = [
                "python", "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(rootdir),
                "-o", "console_output_style=classic", "-q", "--durations=10",
                *self._nodeids,
            ]  # fmt: skip
            result = labvm.execute(
                run,
                argv,
                timeout=timeout,
                stall_timeout=stall,
                progress_file=report,
                on_output=(lambda line: self._say(line.rstrip("\n"))) if live else None,
            )
            lines = report.read_text().splitlines() if report.exists() else []
        for line in lines:
            record = json.loads(line)
            self._phases.setdefault(record["nodeid"], []).append(record)

        log_path.parent.mkdir(exist_ok=True)
        log_path.write_text(
            f"$ {' '.join(result.argv)}\n\n=== guest output ===\n{result.output}\n"
            f"=== console (vng stderr) ===\n{result.console}"
        )
        boot = f"{result.boot_seconds:.1f}s" if result.boot_seconds is not None else "never"
        batch = (
            f"{result.total_seconds - result.boot_seconds:.1f}s"
            if result.boot_seconds is not None
            else "-"
        )
        self._summary = (
            f"lab: {len(self._nodeids)} vm test(s) in one guest boot: boot {boot}, "
            f"batch {batch}, total {result.total_seconds:.1f}s; guest pytest status "
            f"{result.status}; full log {log_path}"
        )
        if result.failed_boots:
            self._summary += (
                f"\nlab: {len(result.failed_boots)} boot(s) died early and were retried"
            )
        for line in result.kernel_problems:
            self._summary += f"\nlab: guest kernel said: {line}"
        self._say(self._summary)
        if result.timed_out or result.status is None or result.qemu_problems:
            self._crash = result.describe_failure() + f"\n(full log: {log_path})"
        else:
            self._crash = (
                f"the guest's pytest (status {result.status}) reported no result for this "
                f"test; its output ends:\n{result.output[-3000:]}\n(full log: {log_path})"
            )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        # pytest would point a skip at the line in this plugin that raised it.
        if (
            isinstance(item, GuestItem)
            and item.skip_location
            and report.skipped
            and isinstance(report.longrepr, tuple)
        ):
            report.longrepr = (*item.skip_location, report.longrepr[2])
        return report

    def report_outcome(self, item: GuestItem) -> None:
        nodeid = item.nodeid
        if not self._done:
            self._run_batch()
        if self._unavailable is not None:
            if lab_required():
                raise GuestFailureError(
                    f"the lab is required here (CI=true or IOMMUD_REQUIRE_LAB=1) but "
                    f"unavailable: {self._unavailable}"
                )
            pytest.skip(f"lab unavailable: {self._unavailable}")
        phases = {r["when"]: r for r in self._phases.get(nodeid, [])}
        for when in ("setup", "call", "teardown"):
            record = phases.get(when)
            if record is None:
                if when == "call" and phases.get("setup", {}).get("outcome") == "skipped":
                    break
                raise GuestFailureError(f"[lab guest] no {when} result: {self._crash}")
            if record["outcome"] == "failed":
                raise GuestFailureError(f"[lab guest, {when}]\n{record.get('text', '')}")
        for record in phases.values():
            if "wasxfail" in record and record["outcome"] == "skipped":
                pytest.xfail(f"(in the guest) {record['wasxfail']}")
            if record["outcome"] == "skipped":
                location = record.get("location")
                if location:
                    item.skip_location = (str(location[0]), int(location[1]))
                pytest.skip(f"(in the guest) {record.get('reason', '')}")
