"""Settings: the OPTIONS table, its parsers and the Settings it builds.

Parsing goes through the real ``echod`` parser (:func:`echod.cli.build_parser`),
whose errors are :class:`UsageError` with one sentence.
"""

from __future__ import annotations

import os
import socket
from dataclasses import fields
from pathlib import Path

import pytest

from echod import config
from echod.cli import build_parser
from echod.config import OPTIONS, Settings, settings_from_namespace
from echod.errors import UsageError


def parse(*argv: str) -> Settings:
    return settings_from_namespace(build_parser().parse_args(list(argv)))


def test_every_option_is_a_setting_with_the_same_default() -> None:
    by_name = {f.name: f for f in fields(Settings)}
    assert {opt.name for opt in OPTIONS} == set(by_name)
    for opt in OPTIONS:
        assert by_name[opt.name].default == opt.default, opt.name


def test_defaults() -> None:
    s = parse()
    assert (s.host, s.port, s.max_line) == ("127.0.0.1", 7878, 1024)
    assert s.foreground is False
    assert (s.log_level, s.log_format) == ("info", "auto")
    assert s.control_socket == config.default_control_socket()
    assert s.family == socket.AF_INET


def test_values() -> None:
    s = parse(
        "--host",
        "::1",
        "--port",
        "0",
        "--max-line",
        "16",
        "--foreground",
        "--log-level",
        "DEBUG",
        "--log-format",
        "json",
        "--shutdown-timeout",
        "2.5",
    )
    assert (s.host, s.port, s.max_line, s.foreground) == ("::1", 0, 16, True)
    assert (s.log_level, s.log_format, s.shutdown_timeout) == ("debug", "json", 2.5)
    assert s.family == socket.AF_INET6


def test_bracketed_ipv6_host() -> None:
    assert parse("--host", "[::1]").host == "::1"


def test_port_bounds() -> None:
    assert parse("--port", "65535").port == 65535
    assert parse("--port", "0").port == 0


def test_control_socket_none_and_path(tmp_path: Path) -> None:
    assert parse("--control-socket", "none").control_socket is None
    assert parse("--control-socket", str(tmp_path / "c.sock")).control_socket == tmp_path / "c.sock"


def test_console_is_negatable() -> None:
    assert parse().console is None
    assert parse("--console").console is True
    assert parse("--no-console").console is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "99999"], "argument --port: 99999 is out of range (must be from 0 to 65535)"),
        (["--port", "-1"], "argument --port: -1 is out of range (must be from 0 to 65535)"),
        (["--port", "http"], "argument --port: 'http' is not a whole number"),
        (["--port", "1.5"], "argument --port: '1.5' is not a whole number"),
        (["--max-line", "0"], "argument --max-line: 0 is out of range"),
        (["--log-level", "loud"], "argument --log-level: 'loud' is not a log level"),
        (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
        (["--host", ""], "argument --host: the host must not be empty"),
        (["--shutdown-timeout", "0"], "argument --shutdown-timeout: must be more than 0 seconds"),
        (["--idle-timeout", "nan"], "argument --idle-timeout: 'nan' is not a number of seconds"),
        (["--idle-timeout", "-1"], "argument --idle-timeout: '-1' is not a number of seconds"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--port"], "argument --port: expected one argument"),
    ],
)
def test_bad_values_are_one_sentence(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(*argv)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert text.endswith("(see 'echod --help')")
    assert info.value.exit_status == 2


def test_zero_timeouts_mean_never() -> None:
    s = parse("--idle-timeout", "0", "--line-timeout", "0")
    assert (s.idle_timeout, s.line_timeout) == (0.0, 0.0)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_runtime_paths_for_a_non_root_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert config.default_control_socket() == tmp_path / "echod" / "control.sock"
    assert config.default_pidfile() == tmp_path / "echod" / "echod.pid"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # ignored: not absolute
    assert config.default_control_socket() == Path("/tmp/echod-1000/control.sock")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert config.default_log_file() == tmp_path / "state" / "echod" / "echod.log"


def test_runtime_paths_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert config.default_control_socket() == Path("/run/echod/control.sock")
    assert config.default_pidfile() == Path("/run/echod/echod.pid")
    assert config.default_log_file() == Path("/var/log/echod/echod.log")
