"""Syslog priority prefixes (sd-daemon(3)) when stderr is the journal.

The stream is a real file; ``$JOURNAL_STREAM`` names its device and inode
the way systemd names the stream socket it connects to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from echod import cli, logs

LEVELS = [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)]


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as f:
        yield f
    # The tests point echod's logging at f; later tests' in-process servers
    # must not log to it once it is closed (handler threads would die).
    logs.configure("info", "json", sys.stderr)


def _journal_stream(f: TextIO) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def _emit(f: TextIO, fmt: str) -> list[str]:
    logs.configure("debug", fmt, stream=f)
    log = logs.get_logger()
    for level, _ in LEVELS:
        getattr(log, level)("probe", level_name=level)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    f.flush()
    f.seek(0)
    return f.read().splitlines()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_prefix_per_level_when_stderr_is_the_journal(
    stream: TextIO, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(stream))
    lines = _emit(stream, fmt)
    assert len(lines) == len(LEVELS) + 1  # one line each, the traceback included
    for line, (level, priority) in zip(lines, LEVELS, strict=False):
        assert line.startswith(f"<{priority}>"), line
        assert level in line
    assert lines[-1].startswith("<3>"), lines[-1]  # log.exception is an error
    if fmt == "json":
        rest = json.loads(lines[1][len("<6>") :])  # the line after the prefix is plain JSON
        assert rest["event"] == "probe" and rest["level"] == "info"


@pytest.mark.parametrize(
    "value",
    [None, "", "garbage", "1:2", "x:y"],
)
def test_no_prefix_unless_the_stream_is_the_journal(
    stream: TextIO, value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", value)
    for line in _emit(stream, "json"):
        assert line.startswith("{"), line


def test_other_stream_than_the_journal_gets_no_prefix(
    stream: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log file (detached mode) while the journal is some other stream."""
    with open(tmp_path / "journal", "w", encoding="utf-8") as journal:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(journal))
        for line in _emit(stream, "json"):
            assert line.startswith("{"), line
        assert logs.journal_prefix(logs.ERROR_PRIORITY, journal) == "<3>"
        assert logs.journal_prefix(logs.ERROR_PRIORITY, stream) == ""


def test_the_clis_error_sentence_is_an_error_in_the_journal(
    stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad flags under systemd: the one sentence is found by journalctl -p err."""
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(stream))
    assert cli.main(["--no-such-flag"]) == 2
    monkeypatch.delenv("JOURNAL_STREAM")
    assert cli.main(["--no-such-flag"]) == 2
    stream.seek(0)
    first, second = stream.read().splitlines()
    assert first.startswith("<3>echod: ") and "--no-such-flag" in first
    assert second.startswith("echod: ")
