"""The rebind journal in bad states: each gives one error line, is moved aside, and the
daemon starts anyway; writes never follow a link planted in the state dir."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import structlog

from iommud.broker import Broker
from iommud.broker.journal import JOURNAL_NAME, Journal, JournalEntry
from iommud.errors import KernelError
from tests.broker.support import E1000, make_config
from tests.fakekernel import FakeKernel
from tests.fakesys import FakeSys
from tests.serving import Logs

STAMP = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ASIDE = f"{JOURNAL_NAME}.bad-20270115T080000Z"


def _clock() -> float:
    return STAMP


async def _start(tmp_path: Path, fs: FakeSys) -> Logs:
    """Start a broker on the state dir as the test left it; the error events it logged."""
    b = Broker(make_config(tmp_path, fs), FakeKernel(fs))
    b.state.journal._clock = _clock
    with structlog.testing.capture_logs() as logs:
        await b.start()
    await b.aclose(grace=1.0)
    return [e for e in logs if e["log_level"] == "error"]


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"[]", "not a JSON object (a list)"),
        (b"null", "not a JSON object (null)"),
        (b'{"version": 1, "entries": [{"bdf": "\xff"}]}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (
            b"{",
            "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (b'{"version": 7, "entries": []}', "unknown version 7"),
        (b'{"version": 1, "entries": {}}', "entries is not a list (an object)"),
        (b'{"version": 1, "entries": [{"bdf": 1}]}', "entries[0] is not a journal entry"),
    ],
)
async def test_bad_journal_is_moved_aside_and_the_daemon_starts(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None, content: bytes, problem: str
) -> None:
    state = _state(tmp_path)
    (state / JOURNAL_NAME).write_bytes(content)
    errors = await _start(tmp_path, fs)
    path = state / JOURNAL_NAME
    assert [e["event"] for e in errors] == ["journal.unusable", "broker.started"]
    assert errors[0]["error"] == (
        f"rebind journal {path} unusable: {problem}; moved aside to {state / ASIDE}; no replay"
    )
    assert errors[1]["journal"] == "UNUSABLE: started without replay"
    assert (state / ASIDE).read_bytes() == content
    assert not path.exists()


async def test_journal_that_is_a_directory_is_moved_aside(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None
) -> None:
    state = _state(tmp_path)
    (state / JOURNAL_NAME).mkdir()
    errors = await _start(tmp_path, fs)
    assert errors[0]["error"] == (
        f"rebind journal {state / JOURNAL_NAME} unusable: not a regular file (a directory); "
        f"moved aside to {state / ASIDE}; no replay"
    )
    assert (state / ASIDE).is_dir()


async def test_journal_that_is_a_symlink_is_not_followed(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None
) -> None:
    state = _state(tmp_path)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"version": 1, "entries": []}))
    (state / JOURNAL_NAME).symlink_to(target)
    errors = await _start(tmp_path, fs)
    assert errors[0]["problem"] == "a symbolic link, not a file"
    assert (state / ASIDE).is_symlink()


async def test_corrupt_journal_in_a_read_only_state_dir_starts_without_replay(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests run as root, who can write anywhere: EROFS comes from rename itself."""
    state = _state(tmp_path)
    (state / JOURNAL_NAME).write_bytes(b"[]")

    def read_only(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "rename", read_only)
    errors = await _start(tmp_path, fs)
    assert [e["event"] for e in errors] == ["journal.unusable", "broker.started"]
    assert errors[0]["error"] == (
        f"rebind journal {state / JOURNAL_NAME} unusable: not a JSON object (a list); "
        "NOT moved aside (Read-only file system); no replay"
    )
    assert (state / JOURNAL_NAME).read_bytes() == b"[]"


@pytest.mark.parametrize("mode", [0o777, 0o770])
async def test_state_dir_writable_by_others_is_not_trusted(
    tmp_path: Path, fs: FakeSys, no_fd_leak: None, mode: int
) -> None:
    """A journal others could have written is neither replayed nor moved: it is left alone."""
    state = _state(tmp_path)
    Journal(state).record([JournalEntry(E1000, 4, "e1000", None, rebound=True)])
    state.chmod(mode)
    errors = await _start(tmp_path, fs)
    assert errors[0]["error"] == (
        f"rebind journal {state / JOURNAL_NAME} unusable: "
        f"state dir is writable by others (mode {mode:o}); left in place; no replay"
    )
    assert (state / JOURNAL_NAME).exists()
    with pytest.raises(KernelError) as info:
        Journal(state).record([])
    assert (info.value.op, info.value.errno) == ("journal.write", errno.EPERM)


async def test_state_dir_that_is_a_file(tmp_path: Path, fs: FakeSys, no_fd_leak: None) -> None:
    (tmp_path / "state").write_text("")
    errors = await _start(tmp_path, fs)
    assert errors[0]["problem"] == "state dir is not a directory"
    with pytest.raises(KernelError):
        Journal(tmp_path / "state").record([])


def test_write_replaces_a_planted_symlink_never_follows_it(tmp_path: Path) -> None:
    state = _state(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (state / JOURNAL_NAME).symlink_to(victim)
    Journal(state).record([JournalEntry(E1000, 4, "e1000", None, rebound=True)])
    assert victim.read_text() == "precious"
    assert not (state / JOURNAL_NAME).is_symlink()
    assert Journal(state).load() == [JournalEntry(E1000, 4, "e1000", None, rebound=True)]
    assert sorted(p.name for p in state.iterdir()) == [JOURNAL_NAME]
