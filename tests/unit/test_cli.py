"""The ``echod`` command in-process: help, version, exit codes, one-sentence errors, logging.

The real processes (``python -m echod`` and the ``echod`` console script) are
exercised in tests/process/test_foreground.py; these tests call
:func:`echod.cli.main` directly so the error paths are cheap to cover.
"""

from __future__ import annotations

import io
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echod import __version__, cli, logs


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    """Record logs.configure calls instead of pointing structlog at pytest's capture."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(logs, "configure", lambda *args, **kw: calls.append(args))
    yield calls


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def one_error_line(err: str) -> str:
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("echod: ")
    assert "Traceback" not in err
    return lines[0]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: echod")
    for flag in (
        "--host",
        "--port",
        "--max-line",
        "--foreground",
        "--log-level",
        "--log-format",
        "--version",
    ):
        assert flag in out
    assert "echod ctl COMMAND" in out  # the subcommands are listed


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"echod {__version__}\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bogus"], "echod: unrecognized arguments: --bogus (see 'echod --help')"),
        (
            ["--port", "70000"],
            "echod: argument --port: 70000 is out of range (must be from 0 to 65535) "
            "(see 'echod --help')",
        ),
        (
            ["--port", "abc"],
            "echod: argument --port: 'abc' is not a whole number (see 'echod --help')",
        ),
        (["--log-format", "xml"], None),
        (["--foreground", "extra"], "echod: unrecognized arguments: extra (see 'echod --help')"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str],
    expected: str | None,
    capsys: pytest.CaptureFixture[str],
    configured: list[tuple[Any, ...]],
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    if expected is not None:
        assert line == expected
    assert captured.out == ""
    assert configured == []  # rejected before anything started


def test_port_in_use_exits_1_with_one_line(
    busy_port: int, capsys: pytest.CaptureFixture[str], configured: list[tuple[Any, ...]]
) -> None:
    argv = ["--foreground", "--port", str(busy_port), "--control-socket", "none"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"echod: cannot listen on 127.0.0.1:{busy_port}: the address is already in use"


def test_unbindable_address_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], configured: list[tuple[Any, ...]]
) -> None:
    # 192.0.2.1 (TEST-NET-1) is not on this machine: bind() fails, nothing is sent.
    argv = ["--foreground", "--host", "192.0.2.1", "--port", "0", "--control-socket", "none"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == "echod: cannot listen on 192.0.2.1:0: that address is not on this machine"


def test_log_flags_reach_the_logging_setup(
    busy_port: int, capsys: pytest.CaptureFixture[str], configured: list[tuple[Any, ...]]
) -> None:
    argv = [
        "--foreground",
        "--port",
        str(busy_port),
        "--control-socket",
        "none",
        "--log-level",
        "WARNING",
        "--log-format",
        "console",
    ]
    assert cli.main(argv) == 1
    assert configured == [("warning", "console")]


# -- the logging setup those flags drive --------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def emit(fmt: str, stream: io.StringIO, level: str = "info") -> list[str]:
    logs.configure(level, fmt, stream)
    try:
        log = logs.get_logger()
        log.debug("debug_event", n=1)
        log.info("connection_closed", client=7, peer="127.0.0.1:5555", reason="eof")
        try:
            raise ConnectionError("peer went away\nsecond line")
        except ConnectionError:
            log.error("janitor_error", exc_info=True)
    finally:
        logs.configure("info", "json", sys.stderr)
    return stream.getvalue().splitlines()


def test_json_format_is_one_object_per_line() -> None:
    lines = emit("json", io.StringIO())
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["connection_closed", "janitor_error"]
    assert events[0]["client"] == 7
    assert events[0]["level"] == "info"
    assert "timestamp" in events[0]
    assert events[1]["exception"][0]["exc_type"] == "ConnectionError"


def test_console_format_is_key_value_one_line_per_event() -> None:
    lines = emit("console", io.StringIO())
    assert len(lines) == 2, lines  # the exception did not add traceback lines
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
        assert "\x1b[" not in line  # no colours when not writing to a terminal
    assert "connection_closed" in lines[0]
    assert "client=7" in lines[0]
    assert "reason=eof" in lines[0]
    assert "janitor_error" in lines[1]
    assert "error=ConnectionError" in lines[1]
    assert "Traceback" not in "\n".join(lines)


def test_auto_format_follows_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty_lines = emit("auto", FakeTTY())
    assert "\x1b[" in tty_lines[0]  # colourful on a terminal
    json.loads(emit("auto", io.StringIO())[0])  # JSON otherwise


def test_log_level_filters() -> None:
    def names(level: str) -> list[str]:
        return [json.loads(line)["event"] for line in emit("json", io.StringIO(), level)]

    assert names("debug") == ["debug_event", "connection_closed", "janitor_error"]
    assert names("warning") == ["janitor_error"]


def test_a_bad_allow_file_exits_2_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], configured: list[tuple[Any, ...]]
) -> None:
    bad = tmp_path / "allow"
    bad.write_text("192.0.2.0/24\nnot-an-address\n")
    assert cli.main(["--foreground", "--allow-file", str(bad)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"echod: {bad}, line 2: 'not-an-address' is not an IP address or CIDR network"
    assert configured == []


def test_proxy_protocol_without_trusted_exits_2(
    capsys: pytest.CaptureFixture[str], configured: list[tuple[Any, ...]]
) -> None:
    assert cli.main(["--foreground", "--proxy-protocol", "any"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        "echod: --proxy-protocol needs --proxy-trusted CIDR"
    )
    assert configured == []
