"""Settings: the OPTIONS table, its parsers and the Settings it builds.

Parsing goes through the real ``echod`` parser (:func:`echod.cli.build_parser`),
whose errors are :class:`UsageError` with one sentence.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from echod import config
from echod.admission import Policy, Rate
from echod.cli import build_parser
from echod.config import OPTIONS, Settings, settings_from_namespace
from echod.errors import UsageError


def parse(*argv: str) -> Settings:
    return settings_from_namespace(build_parser().parse_args(list(argv)))


def test_every_setting_is_an_option_with_a_valid_default() -> None:
    assert [opt.name for opt in OPTIONS] == [f.name for f in fields(Settings)]
    defaults = Settings()
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-")
        assert opt.help, opt.name
        if opt.default is not None:
            assert getattr(defaults, opt.name) == opt.default, opt.name


def test_defaults() -> None:
    s = parse()
    assert (s.host, s.port, s.max_line) == ("127.0.0.1", 7878, 1024)
    assert s.foreground is False
    assert (s.log_level, s.log_format) == ("info", "auto")
    assert s.control_socket == config.default_control_socket()


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
    assert parse("--console", "--foreground").console is True
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
        (["--idle-timeout", "-1"], "argument --idle-timeout: must be 0 or more seconds"),
        (["--idle-timeout", "x"], "argument --idle-timeout: 'x' is not a number of seconds"),
        (["--send-timeout", "-1"], "argument --send-timeout: must be more than 0 seconds"),
        (
            ["--shutdown-timeout", "1e10"],
            "argument --shutdown-timeout: must be at most 86400 seconds (one day)",
        ),
        (["--send-timeout", "inf"], "argument --send-timeout: must be at most 86400 seconds"),
        (["--pidfile", ""], "argument --pidfile: the path must not be empty"),
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--foreground", "--log-file", "/tmp/x.log"],
            "--log-file is for detached mode; with --foreground, echod logs to "
            "stderr and keeps no pidfile",
        ),
        (
            ["--pidfile", "/tmp/x.pid", "--foreground"],
            "--pidfile is for detached mode; with --foreground, echod logs to "
            "stderr and keeps no pidfile",
        ),
        (["--console"], "--console needs --foreground (a detached echod has no terminal)"),
    ],
)
def test_options_that_do_not_go_together(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(*argv)
    assert str(info.value) == message
    assert info.value.exit_status == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"idle_timeout": -1}, "argument --idle-timeout: must be 0 or more seconds"),
        ({"shutdown_timeout": 0}, "argument --shutdown-timeout: must be more than 0 seconds"),
        ({"send_timeout": 1e10}, "argument --send-timeout: must be at most 86400 seconds"),
        ({"send_timeout": float("nan")}, "argument --send-timeout: nan is not a number"),
        ({"port": 70000}, "argument --port: 70000 is out of range (must be from 0 to 65535)"),
        ({"max_clients": 0}, "argument --max-clients: 0 is out of range (must be at least 1)"),
        ({"log_level": "loud"}, "argument --log-level: 'loud' is not a log level"),
        ({"log_format": "xml"}, "argument --log-format: invalid choice: 'xml'"),
        ({"foreground": True, "pidfile": Path("/x.pid")}, "--pidfile is for detached mode"),
    ],
)
def test_settings_built_in_code_fail_like_the_flags(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError) as info:
        Settings(**overrides)
    assert str(info.value).startswith(message)


def test_the_same_mistake_gets_the_same_sentence_from_flags_and_settings() -> None:
    with pytest.raises(UsageError) as flag:
        parse("--idle-timeout", "-1")
    with pytest.raises(UsageError) as built:
        Settings(idle_timeout=-1)
    assert str(flag.value) == f"{built.value} (see 'echod --help')"


def test_durations_up_to_one_day_are_accepted() -> None:
    assert parse("--shutdown-timeout", "86400").shutdown_timeout == config.MAX_SECONDS == 86400
    assert config.parse_duration("0.5") == 0.5
    assert config.parse_duration("0", allow_zero=True) == 0.0
    with pytest.raises(config.InvalidValue, match=r"^must be more than 0 seconds$"):
        config.parse_duration("0")


def test_parse_path_expands_and_makes_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    assert config.parse_path("x.pid") == tmp_path / "x.pid"
    assert config.parse_path("~/x.pid") == Path("/home/someone/x.pid")


def test_a_repeatable_option_collects_every_occurrence() -> None:
    """action="append" options (none yet; --allow CIDR will be one): a tuple, each item parsed."""
    table = (config.Option("a port", config.int_range(1, 9), repeatable=True, name="ports"),)
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, table)
    assert parser.parse_args(["--ports", "1", "--ports", "3"]).ports == [1, 3]
    assert not hasattr(parser.parse_args([]), "ports")  # not given: the field's default
    with pytest.raises(SystemExit):
        parser.parse_args(["--ports", "10"])


def test_only_what_needs_a_socket_a_file_or_a_process_needs_a_restart() -> None:
    # The list (what is bound, opened, or decided at start), and no more:
    # a new option is reloadable unless it is one of these kinds.
    restart = {opt.name for opt in OPTIONS if not opt.reloadable}
    assert restart == {
        "host",
        "port",
        "backlog",
        "user",
        "group",
        "pidfile",
        "control_socket",
        "log_file",
        "foreground",
        "console",
        "metrics_listen",
        "proxy_protocol",  # whether every connection starts with a header: clients must agree
    }


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_flag_table() -> dict[str, str]:
    """README's flag table: every --flag named in a row's first cell -> that row's default."""
    rows: dict[str, str] = {}
    text = README.read_text()
    table = text[text.index("## Flags") :].split("\n\n")[1]
    for line in table.splitlines()[2:]:
        flag_cell, default, _ = line.strip("|").split("|", 2)
        for flag in re.findall(r"--[a-z-]+", flag_cell):
            rows[flag] = default.strip()
    return rows


def test_readme_flag_table_names_every_option_with_its_default() -> None:
    rows = readme_flag_table()
    for opt in OPTIONS:
        assert opt.flag in rows, f"README's flag table lacks {opt.flag}"
        if opt.shown is not None:
            expected = opt.shown
        elif opt.switch and opt.default is False:
            expected = "off"
        else:
            value = opt.default
            expected = f"`{value:g}`" if isinstance(value, float) else f"`{value}`"
        assert rows[opt.flag] == expected, opt.flag
    negations = {f"--no-{opt.flag[2:]}" for opt in OPTIONS if opt.negatable}
    # Nothing undeclared; --config is where options come from, not one of them.
    assert set(rows) - {opt.flag for opt in OPTIONS} == negations | {"--config"}


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


# -- admission control ---------------------------------------------------------------


def test_admission_flags(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.write_text("# the office\n192.0.2.0/24\n\n2001:db8::/32  # v6\n")
    s = parse(
        "--proxy-protocol", "v2",
        "--proxy-trusted", "10.0.0.5",
        "--proxy-trusted", "10.0.1.0/24",
        "--allow", "127.0.0.0/8",
        "--allow-file", str(allow),
        "--deny", "::ffff:192.0.2.128/121",
        "--max-per-source", "4",
        "--source-prefix", "24:48",
        "--max-connect-rate", "10/2",
        "--max-line-rate", "50",
    )  # fmt: skip
    assert s.proxy_protocol == "v2"
    assert [str(n) for n in s.proxy_trusted] == ["10.0.0.5/32", "10.0.1.0/24"]
    policy = s.admission_policy()
    assert [str(n) for n in policy.allow] == ["127.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]
    assert [str(n) for n in policy.deny] == ["192.0.2.128/25"]  # mapped: the IPv4 network
    assert (policy.max_per_source, policy.source_prefix) == (4, (24, 48))
    assert policy.connect_rate == Rate(10, 2.0)
    assert s.max_line_rate == 50


def test_admission_defaults_are_off() -> None:
    s = parse()
    assert (s.proxy_protocol, s.proxy_trusted, s.proxy_timeout) == ("off", (), 3.0)
    assert s.admission_policy() == Policy()
    assert s.max_line_rate == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--proxy-protocol", "v1"],
            "--proxy-protocol needs --proxy-trusted CIDR: the networks of the load balancers "
            "that may say who the client is",
        ),
        (["--proxy-protocol", "v3"], "argument --proxy-protocol: invalid choice: 'v3'"),
        (
            ["--allow", "10.0.0.1/8"],
            "argument --allow: '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?",
        ),
        (["--deny", "example.com"], "argument --deny: 'example.com' is not an IP address"),
        (["--max-connect-rate", "10"], "argument --max-connect-rate: '10' is not a rate"),
        (["--source-prefix", "33:64"], "argument --source-prefix: '33:64' is not a source prefix"),
        (["--max-per-source", "-1"], "argument --max-per-source: -1 is out of range"),
        (["--proxy-timeout", "0"], "argument --proxy-timeout: must be more than 0 seconds"),
    ],
)
def test_admission_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(*argv)
    assert str(info.value).startswith(message)


def test_a_bad_line_in_an_allow_file_names_the_file_and_line(tmp_path: Path) -> None:
    deny = tmp_path / "deny"
    deny.write_text("10.0.0.0/8\n# fine\n\n10.1.2.3/16\n")
    with pytest.raises(UsageError) as info:
        parse("--deny-file", str(deny))
    assert str(info.value) == (
        f"{deny}, line 4: '10.1.2.3/16' has host bits set; did you mean 10.1.0.0/16?"
    )
    with pytest.raises(UsageError, match=r"cannot read .*missing: No such file"):
        parse("--allow-file", str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("argv", "sentence"),
    [
        (("--tls-cert", "/c.pem"), "--tls-cert and --tls-key go together: give both or neither"),
        (("--tls-key", "/k.pem"), "--tls-cert and --tls-key go together: give both or neither"),
        (("--tls-client-ca", "/ca.pem"), "--tls-client-ca needs --tls-cert and --tls-key"),
        (("--tls-min-version", "1.1"), "argument --tls-min-version: invalid choice: '1.1'"),
    ],
)
def test_tls_flags_that_do_not_go_together(argv: tuple[str, ...], sentence: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(*argv)
    assert str(info.value).startswith(sentence)


def test_tls_flags() -> None:
    s = parse("--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--tls-min-version", "1.3")
    assert (s.tls, s.tls_cert, s.tls_min_version) == (True, Path("/c.pem"), "1.3")
    assert s.tls_handshake_timeout == 10.0
    assert not parse().tls
