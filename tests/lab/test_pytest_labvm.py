"""The vm-test plugin end to end on the host: a pytester session whose "guest" is a fake vng.

The fake vng runs the runner's guest script on the host, so the inner pytest really runs
in a subprocess with IOMMUD_LAB_GUEST=1 and reports through the shared dir; only QEMU is
missing. The real guest runs tests/lab/test_lab_vm.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
markers =
    vm: runs in the lab guest
"""

CONFTEST = """
import os
import pytest

pytest_plugins = ["pytest_labvm"]

@pytest.fixture(autouse=True)
def where(request):
    # Records where every test's fixtures ran: "guest" or "host".
    with open(os.environ["WHERE_LOG"], "a") as f:
        place = "guest" if os.environ.get("IOMMUD_LAB_GUEST") == "1" else "host"
        f.write(f"{request.node.name} {place}\\n")

@pytest.fixture
def broken():
    raise RuntimeError("fixture exploded in the guest")
"""

TESTS = """
import os
import pytest

@pytest.mark.vm
def test_pass():
    assert os.environ["IOMMUD_LAB_GUEST"] == "1"

@pytest.mark.vm
def test_fail():
    print("guest stdout line")
    assert 1 + 1 == 3

@pytest.mark.vm
def test_skip():
    pytest.skip("no edu here")

@pytest.mark.vm
@pytest.mark.xfail(reason="known kernel bug")
def test_xfail():
    raise OSError(22, "EINVAL")

@pytest.mark.vm
def test_fixture_error(broken):
    pass

@pytest.mark.vm
@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n in (1, 2)

def test_on_host():
    assert "IOMMUD_LAB_GUEST" not in os.environ
"""


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mix=TESTS)
    where = tmp_path / "where.log"
    monkeypatch.setenv("WHERE_LOG", str(where))
    return where


def test_outcomes_come_from_the_guest(
    pytester: pytest.Pytester, fake_vng: Path, project: Path
) -> None:
    """pass/fail/skip/xfail/fixture error of each vm test are those the guest saw."""
    result = pytester.runpytest_inprocess("-rA")
    result.assert_outcomes(passed=4, failed=2, skipped=1, xfailed=1)
    out = result.stdout.str()
    assert "PASSED test_mix.py::test_pass" in out
    assert "PASSED test_mix.py::test_param[1]" in out
    assert "SKIPPED [1] test_mix.py:15: (in the guest) no edu here" in out
    assert "XFAIL test_mix.py::test_xfail - (in the guest) known kernel bug" in out
    result.stdout.fnmatch_lines(
        [
            "*[[]lab guest, call[]]*",
            "*assert (1 + 1) == 3*",
            "*Captured stdout call (in the guest)*",
            "guest stdout line",
        ]
    )
    result.stdout.fnmatch_lines(["*[[]lab guest, setup[]]*", "*fixture exploded in the guest*"])
    result.stdout.fnmatch_lines(["lab: 7 vm test(s) in one guest boot: boot *, batch *"])
    assert len(fake_vng.read_text().splitlines()) == 1  # one boot for the whole batch
    # Fixtures of vm tests ran only in the guest; the plain test only on the host.
    places = sorted(project.read_text().splitlines())
    assert places == sorted(
        [f"{name} guest" for name in ("test_pass", "test_fail", "test_skip", "test_xfail")]
        + ["test_fixture_error guest"]
        + ["test_param[1] guest", "test_param[2] guest", "test_on_host host"]
    )


def test_deselected_vm_tests_do_not_boot(
    pytester: pytest.Pytester, fake_vng: Path, project: Path
) -> None:
    result = pytester.runpytest_inprocess("-m", "not vm")
    result.assert_outcomes(passed=1, deselected=7)
    assert not fake_vng.exists()


def test_only_selected_vm_tests_go_to_the_guest(
    pytester: pytest.Pytester, fake_vng: Path, project: Path
) -> None:
    result = pytester.runpytest_inprocess("-k", "param")
    result.assert_outcomes(passed=2, deselected=6)
    (call,) = fake_vng.read_text().splitlines()
    assert "test_pass" not in call


def test_unavailable_lab_skips(
    pytester: pytest.Pytester, fake_vng: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOMMUD_LAB_KERNEL", "/nonexistent/bzImage")
    result = pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=7)
    result.stdout.fnmatch_lines(
        ["*lab unavailable: guest kernel not built (/nonexistent/bzImage): run lab/build-kernel"]
    )
    assert not project.read_text().count("guest")


@pytest.mark.parametrize(("var", "value"), [("CI", "true"), ("IOMMUD_REQUIRE_LAB", "1")])
def test_unavailable_lab_fails_when_required(
    pytester: pytest.Pytester,
    fake_vng: Path,
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    var: str,
    value: str,
) -> None:
    monkeypatch.setenv("IOMMUD_LAB_KERNEL", "/nonexistent/bzImage")
    monkeypatch.setenv(var, value)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=7)
    result.stdout.fnmatch_lines(
        ["the lab is required here (CI=true or IOMMUD_REQUIRE_LAB=1) but unavailable: *"]
    )


def test_guest_crash_fails_every_vm_test_with_qemu_output(
    pytester: pytest.Pytester, fake_vng: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VNG", "crash")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=7)
    out = result.stdout.str()
    said = "QEMU said:\n  qemu-system-x86_64: hardware error: EDU: DMA range"
    assert out.count(said) == 7
    assert "lab guest died before the command finished (vng exit code 134" in out


def test_per_test_timeout_applies_in_the_guest_not_to_the_batch(
    pytester: pytest.Pytester, fake_vng: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a per-test timeout shorter than the batch, the stand-in that runs the batch is
    not cut off; a vm test that hangs is failed by the timeout inside the guest."""
    pytester.makeini(INI + "timeout = 4\n")
    pytester.makeconftest('pytest_plugins = ["pytest_labvm"]\n')
    pytester.makepyfile(
        test_slow="""
import time
import pytest

@pytest.mark.vm
def test_a_second():
    time.sleep(1)

@pytest.mark.vm
def test_another_second():
    time.sleep(1)

@pytest.mark.vm
def test_hangs():
    time.sleep(60)
"""
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*[[]lab guest, call[]]*", "*Timeout (>4.0s) from pytest-timeout*"]
    )


SLOW = """
import time
import pytest

@pytest.mark.vm
def test_first():
    time.sleep(1)

@pytest.mark.vm
def test_second():
    time.sleep(1)

@pytest.mark.vm
def test_third():
    time.sleep(1)

@pytest.mark.vm
@pytest.mark.timeout(0)
def test_hangs_without_a_timeout():
    time.sleep(600)

@pytest.mark.vm
def test_after_the_hang():
    pass
"""


def test_a_batch_longer_than_the_stall_window_runs_while_tests_report(
    pytester: pytest.Pytester, fake_vng: Path
) -> None:
    """A loaded host makes the batch long, not stuck: a batch of 3 s with a 2 s stall window
    finishes. A test that hangs with no timeout of its own stops the batch after the window;
    the tests before it keep their results, the rest fail with the reason."""
    pytester.makeini(INI)
    pytester.makeconftest('pytest_plugins = ["pytest_labvm"]\n')
    pytester.makepyfile(test_slow=SLOW)
    started = time.monotonic()
    result = pytester.runpytest_inprocess("-p", "no:randomly", "--lab-stall", "2")
    assert time.monotonic() - started < 120
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "lab: booting the guest for 5 vm test(s) (stopped if no test reports for 2s, *",
            "*[[]lab guest[]] no call result: lab guest stopped: no progress for *",
        ]
    )


@pytest.mark.parametrize(
    ("ini", "tests", "stall"),
    [
        ("timeout = 300\n", "@pytest.mark.vm\ndef test_a(): pass\n", 300 + 300),
        (
            "timeout = 300\n",
            "@pytest.mark.vm\n@pytest.mark.timeout(900)\ndef test_a(): pass\n"
            "@pytest.mark.vm\ndef test_b(): pass\n",
            900 + 300,
        ),
        ("", "@pytest.mark.vm\ndef test_a(): pass\n", 1800),
    ],
    ids=["ini", "longest-marker", "no-timeout"],
)
def test_default_stall_window_follows_the_per_test_timeouts(
    pytester: pytest.Pytester, fake_vng: Path, ini: str, tests: str, stall: int
) -> None:
    pytester.makeini(INI + ini)
    pytester.makeconftest('pytest_plugins = ["pytest_labvm"]\n')
    pytester.makepyfile(test_w="import pytest\n" + tests)
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=tests.count("def test_"))
    result.stdout.fnmatch_lines([f"lab: booting * (stopped if no test reports for {stall}s, *"])
