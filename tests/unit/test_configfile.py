"""The config file (echod.configfile) and the reload core (echod.reload), without a server."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from echod import configfile
from echod.admission import Rate
from echod.config import OPTIONS, InvalidValue, Settings, split_host_port
from echod.configfile import ConfigError, Source
from echod.errors import UsageError
from echod.reload import Reloader, ReloadError

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "echod.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "echod.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        configfile.read(path)
    assert info.value.exit_status == 2
    return [p.replace(f"config file {path}", "F") for p in info.value.problems]


def test_shipped_example_is_generated_from_the_options() -> None:
    assert EXAMPLE.read_text() == configfile.example(), (
        "systemd/echod.toml is out of date: python -m echod.configfile > systemd/echod.toml"
    )


def test_example_has_every_key_once_and_each_fixed_default_reads_back_as_the_default(
    tmp_path: Path,
) -> None:
    lines = EXAMPLE.read_text().splitlines()
    checked = set()
    for opt in OPTIONS:
        keyed = [line for line in lines if line.startswith(f"#{opt.name} = ")]
        assert len(keyed) == 1, opt.name
        written_default = opt.repeatable or (opt.shown or "`").startswith("`")
        if written_default and (opt.default is not None or opt.repeatable or opt.shown):
            values = configfile.read(write(tmp_path, keyed[0][1:] + "\n"))
            assert values == {opt.name: getattr(Settings(), opt.name)}, opt.name
            checked.add(opt.name)
    assert {"port", "allow", "source_prefix", "max_line_rate"} <= checked
    assert not configfile.read(EXAMPLE)  # all commented out: nothing set


def test_values_are_typed_and_strings_go_through_the_flag_parsers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'max_clients = 5\nidle_timeout = 2\nsend_timeout = 0.5\nchat = true\nlog_level = "DEBUG"\n'
        'pidfile = "~/x.pid"\ncontrol_socket = "none"\nhost = "[::1]"\n'
        'metrics_listen = "127.0.0.1:0"\n',
    )
    values = configfile.read(path)
    assert values == {
        "max_clients": 5,
        "idle_timeout": 2.0,
        "send_timeout": 0.5,
        "chat": True,
        "log_level": "debug",
        "pidfile": Path("~/x.pid").expanduser(),
        "control_socket": None,
        "host": "::1",
        "metrics_listen": "127.0.0.1:0",
    }
    assert isinstance(values["idle_timeout"], float)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("max_clients = 0", "F, key max_clients: 0 is out of range (must be at least 1)"),
        ("max_client = 3", "F: unknown key 'max_client' (did you mean max_clients?)"),
        ("max-clients = 3", "F: unknown key 'max-clients' (did you mean max_clients?)"),
        (
            "[server]\nport = 1",
            "F: unknown key 'server' (every key is at the top level: no [tables])",
        ),
        ("max_clients = 5.0", "F, key max_clients: must be a whole number"),
        ('max_clients = "5"', "F, key max_clients: must be a whole number"),
        ("max_clients = true", "F, key max_clients: must be a whole number"),
        ("max_clients = [5]", "F, key max_clients: must be a whole number"),
        ('idle_timeout = "30"', "F, key idle_timeout: must be a number"),
        ("idle_timeout = -1", "F, key idle_timeout: must be 0 or more seconds"),
        ("idle_timeout = nan", "F, key idle_timeout: nan is not a number of seconds"),
        ("send_timeout = 1e10", "F, key send_timeout: must be at most 86400 seconds (one day)"),
        ("chat = 1", "F, key chat: must be true or false"),
        ("port = 70000", "F, key port: 70000 is out of range (must be from 0 to 65535)"),
        ("host = 1", "F, key host: must be a string"),
        (
            'log_level = "loud"',
            "F, key log_level: 'loud' is not a log level (debug, info, warning, error, critical)",
        ),
        ('pidfile = ""', "F, key pidfile: the path must not be empty"),
        (
            'metrics_listen = "9100"',
            "F, key metrics_listen: '9100' is not HOST:PORT (such as 127.0.0.1:9100)",
        ),
        ("max_clients = [", "F is not valid TOML: Invalid value (at end of document)"),
    ],
)
def test_one_sentence_names_the_file_the_key_and_what_is_wrong(
    tmp_path: Path, text: str, problem: str
) -> None:
    assert problems(tmp_path, text + "\n") == [problem]


def test_every_problem_is_reported(tmp_path: Path) -> None:
    assert problems(tmp_path, "max_clients = 0\nnope = 1\nchat = 2\n") == [
        "F, key max_clients: 0 is out of range (must be at least 1)",
        "F: unknown key 'nope'",
        "F, key chat: must be true or false",
    ]


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read config file .*: No such file"):
        configfile.read(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'host = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"is not valid TOML: it is not UTF-8 text$"):
        configfile.read(path)


def test_flags_win_over_the_file_and_the_rest_is_default(tmp_path: Path) -> None:
    path = write(tmp_path, "max_clients = 5\nidle_timeout = 9\n")
    settings = Source(path, {"max_clients": 7}).load()
    assert (settings.max_clients, settings.idle_timeout) == (7, 9.0)
    assert settings.line_timeout == Settings().line_timeout
    assert Source().load() == Settings()


def test_options_that_do_not_go_together_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "console = true\n")
    with pytest.raises(ConfigError, match=r"--console needs --foreground .*\(with config file "):
        Source(path).load()
    assert Source(path, {"foreground": True}).load().console is True


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert split_host_port("[::1]:0") == ("::1", 0)
    assert split_host_port("localhost:1") == ("localhost", 1)
    for bad in ("9100", ":9100", "::1:9100", "h:x", "h:70000"):
        with pytest.raises(InvalidValue):
            split_host_port(bad)
    with pytest.raises(UsageError, match=r"^argument --metrics-listen: 'x' is not HOST:PORT"):
        Settings(metrics_listen="x")


# -- the reload core --------------------------------------------------------------


class Recorder:
    """An applier that records its calls, and fails to prepare when told to."""

    def __init__(self) -> None:
        self.prepared: list[tuple[Settings, Settings]] = []
        self.committed: list[Settings] = []
        self.fail: str | None = None

    def __call__(self, old: Settings, new: Settings) -> Any:
        self.prepared.append((old, new))
        if self.fail:
            raise ReloadError(self.fail)
        return lambda: self.committed.append(new)


def reloader(tmp_path: Path, text: str, flags: dict[str, Any] | None = None) -> Reloader:
    source = Source(write(tmp_path, text), flags or {})
    return Reloader(source.load(), source)


def test_reload_applies_reloadable_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    r = reloader(tmp_path, "max_clients = 5\nport = 1000\n")
    applier = Recorder()
    r.add(applier)
    write(tmp_path, "max_clients = 2\nport = 2000\nbacklog = 10\nlog_level = 'debug'\n")
    outcome = r.reload("test")
    assert outcome.changed == ("log_level", "max_clients")  # in OPTIONS order
    assert outcome.needs_restart == ("port", "backlog")
    assert (r.current.max_clients, r.current.log_level) == (2, "debug")
    assert (r.current.port, r.current.backlog) == (1000, Settings().backlog)  # kept
    assert applier.committed == [r.current]
    assert r.reload("test").changed == ()  # the same file again: nothing changes...
    assert len(applier.prepared) == 2  # ...but every applier is asked anyway (TLS re-reads)


def test_a_flag_still_wins_at_reload(tmp_path: Path) -> None:
    r = reloader(tmp_path, "max_clients = 5\n", {"max_clients": 9})
    write(tmp_path, "max_clients = 3\n")
    assert r.reload("test").changed == ()
    assert r.current.max_clients == 9


def test_a_broken_file_or_a_failed_prepare_changes_nothing(tmp_path: Path) -> None:
    r = reloader(tmp_path, "max_clients = 5\n")
    before = r.current
    first, second = Recorder(), Recorder()
    r.add(first)
    r.add(second)
    write(tmp_path, "max_clients = 0\nidle_timeout = 1\n")
    with pytest.raises(ReloadError, match=r"key max_clients: 0 is out of range"):
        r.reload("test")
    assert r.current is before and not first.prepared
    write(tmp_path, "max_clients = 6\n")
    second.fail = "the new certificate does not load"
    with pytest.raises(ReloadError, match="certificate"):
        r.reload("test")
    assert r.current is before
    assert first.prepared and not first.committed  # prepared, never committed
    (tmp_path / "echod.toml").unlink()
    with pytest.raises(ReloadError, match=r"^cannot read config file"):
        r.reload("test")
    assert r.current is before


def test_without_a_config_file_there_is_nothing_to_reload() -> None:
    r = Reloader(Settings(), Source())
    with pytest.raises(ReloadError, match=r"^echod was started without --config"):
        r.reload("test")


def test_list_network_and_rate_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'allow = ["10.0.0.0/8", "::1"]\nsource_prefix = "24:48"\nmax_connect_rate = "5/2"\n',
    )
    values = configfile.read(path)
    assert values["allow"] == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
    assert values["source_prefix"] == (24, 48)
    assert values["max_connect_rate"] == Rate(5, 2.0)
    assert problems(tmp_path, 'allow = "10.0.0.0/8"\n') == [
        'F, key allow: must be an array, such as ["a", "b"]'
    ]
    assert problems(tmp_path, "allow = [10]\n") == ["F, key allow: must be a string"]
    assert problems(tmp_path, "source_prefix = 24\n") == ["F, key source_prefix: must be a string"]
