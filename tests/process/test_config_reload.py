"""The config file, echod check-config, and live reload, with the real echod command.

Each echod is ``python -m echod --foreground`` on port 0 with a config file
in the test's directory; a reload is a real SIGHUP or a real ``echod ctl
reload`` on a real control socket, and its effect is checked with real
clients (a refusal, an echo) and the daemon's own log events.
"""

from __future__ import annotations

import functools
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Client, EchodProcess, ctl, echod_command, roundtrip_once

pytestmark = pytest.mark.timeout(60)


def is_client(cid: int, event: dict[str, Any]) -> bool:
    return bool(event.get("client") == cid)


def stats(sock: Path) -> dict[str, str]:
    done = ctl(sock, "stats")
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines()[1:])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "echod.toml"


def test_the_file_sets_options_and_flags_win(
    spawn_echod: Callable[..., EchodProcess], config: Path
) -> None:
    config.write_text("max_clients = 3\nmax_line = 100\n")
    echod = spawn_echod("--config", str(config), "--max-line", "7")
    assert (echod.listening["max_clients"], echod.listening["max_line"]) == (3, 7)
    client = Client(echod.port)
    try:
        assert client.roundtrip(b"1234567\n") == b"1234567\n"
        assert client.roundtrip(b"12345678\n") == b"ERR line too long (max 7 bytes)\n"
    finally:
        client.close()


def test_a_bad_file_is_one_sentence_per_problem_and_exit_2(config: Path) -> None:
    config.write_text('max_clients = 0\nmax_client = 5\nidle_timeout = "soon"\n')
    done = echod_command("--foreground", "--port", "0", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"echod: config file {config}, key max_clients: 0 is out of range (must be at least 1)",
        f"echod: config file {config}: unknown key 'max_client' (did you mean max_clients?)",
        f"echod: config file {config}, key idle_timeout: must be a number",
    ]
    missing = echod_command("--foreground", "--config", str(config.with_name("nope.toml")))
    assert (missing.returncode, missing.stderr) == (
        2,
        f"echod: cannot read config file {config.with_name('nope.toml')}: "
        "No such file or directory\n",
    )


def test_check_config_starts_nothing(config: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port nobody could bind now
        port = str(busy.getsockname()[1])
        config.write_text(f"port = {port}\nmax_clients = 10\n")
        ok = echod_command("check-config", "--config", str(config))
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, "configuration ok\n", "")
    shipped = echod_command("check-config", "--config", str(ROOT / "systemd" / "echod.toml"))
    assert (shipped.returncode, shipped.stdout) == (0, "configuration ok\n")
    flag = echod_command("check-config", "--config", str(config), "--max-clients", "0")
    assert flag.returncode == 2
    assert flag.stderr.startswith("echod: argument --max-clients: 0 is out of range")
    config.write_text("max_clients = -1\nchat = 1\n")
    bad = echod_command("check-config", "--config", str(config))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.splitlines() == [
        f"echod: config file {config}, key max_clients: -1 is out of range (must be at least 1)",
        f"echod: config file {config}, key chat: must be true or false",
    ]


def test_sighup_lowers_max_clients_without_kicking_and_turns_debug_on(
    spawn_echod: Callable[..., EchodProcess], config: Path
) -> None:
    config.write_text("max_clients = 2\n")
    echod = spawn_echod("--config", str(config))
    held = [Client(echod.port), Client(echod.port)]
    try:
        for i, client in enumerate(held):
            assert client.roundtrip(b"held %d\n" % i) == b"held %d\n" % i
        assert roundtrip_once(echod.port) == b"ERR server full (max 2 clients)\n"
        config.write_text('max_clients = 1\nlog_level = "debug"\n')
        echod.signal(signal.SIGHUP)
        reloaded = echod.wait_event("config_reloaded")
        assert reloaded["changed"] == ["log_level", "max_clients"]
        assert (reloaded["needs_restart"], reloaded["trigger"]) == ([], "SIGHUP")
        # Both stay served, over the new limit; a newcomer is refused by it.
        for i, client in enumerate(held):
            assert client.roundtrip(b"still %d\n" % i) == b"still %d\n" % i
        assert roundtrip_once(echod.port) == b"ERR server full (max 1 clients)\n"
    finally:
        for client in held:
            client.close()
    assert not [e for e in echod.events if e["event"] == "connection_opened"]  # was info
    for cid in (1, 2):  # the held clients (refused ones get no id)
        echod.wait_event("connection_closed", where=functools.partial(is_client, cid))
    assert roundtrip_once(echod.port) == b"ping\n"  # room again, and debug events now show
    assert echod.wait_event("connection_opened")["client"] == 3


def test_ctl_reload_reports_restart_keys_and_a_broken_file_changes_nothing(
    spawn_echod: Callable[..., EchodProcess], config: Path, ctl_dir: Path
) -> None:
    sock = ctl_dir / "control.sock"
    config.write_text("idle_timeout = 30\n")
    echod = spawn_echod("--config", str(config), "--control-socket", str(sock))
    assert stats(sock)["idle_timeout"] == "30s"
    # port is also a flag here (--port 0), and a flag wins: not a change at all.
    config.write_text('idle_timeout = 20\nport = 1\nhost = "127.0.0.2"\nbacklog = 10\n')
    done = ctl(sock, "reload")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "OK reloaded\nneeds restart: host\nneeds restart: backlog\n",
        "",
    )
    now = stats(sock)
    assert (now["idle_timeout"], now["backlog"]) == ("20s", "4096")  # backlog kept
    assert roundtrip_once(echod.port) == b"ping\n"  # still on its first port

    config.write_text("idle_timeout = 5\nline_timeout = -1\n")
    broken = ctl(sock, "reload")
    assert (broken.returncode, broken.stdout) == (1, "")
    why = f"config file {config}, key line_timeout: must be 0 or more seconds"
    assert broken.stderr == f"ERR {why}\n"
    failed = echod.wait_event("config_reload_failed")
    assert (failed["detail"], failed["trigger"], failed["level"]) == (why, "operator", "error")
    assert stats(sock)["idle_timeout"] == "20s"  # idle_timeout = 5 was not applied either

    config.write_text("not toml at all\n")
    echod.signal(signal.SIGHUP)
    echod.wait_event("config_reload_failed", where=lambda e: e["trigger"] == "SIGHUP")
    assert stats(sock)["idle_timeout"] == "20s"
    assert roundtrip_once(echod.port) == b"ping\n"


def test_reload_without_a_config_file_is_an_err(
    spawn_echod: Callable[..., EchodProcess], ctl_dir: Path
) -> None:
    sock = ctl_dir / "control.sock"
    spawn_echod("--control-socket", str(sock))
    done = ctl(sock, "reload")
    assert (done.returncode, done.stderr) == (
        1,
        "ERR echod was started without --config: there is no file to re-read\n",
    )


def test_reload_applies_admission_lists_including_a_files_new_contents(
    spawn_echod: Callable[..., EchodProcess], config: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "allow.txt"
    allowed.write_text("127.0.0.1  # the tests' own address\n")
    config.write_text(f'allow_file = ["{allowed}"]\n')
    echod = spawn_echod("--config", str(config))
    held = Client(echod.port)  # from 127.0.0.1
    try:
        assert held.roundtrip(b"in\n") == b"in\n"
        allowed.write_text("127.0.0.2\n")  # the same key, a new list
        echod.signal(signal.SIGHUP)
        assert echod.wait_event("config_reloaded")["changed"] == []
        assert roundtrip_once(echod.port) == b"ERR access denied\n"
        assert held.roundtrip(b"still in\n") == b"still in\n"  # admitted once, kept
        config.write_text(
            f'allow_file = ["{allowed}"]\ndeny = ["127.0.0.2"]\nallow = ["127.0.0.1"]\n'
        )
        echod.signal(signal.SIGHUP)
        changed = echod.wait_event("config_reloaded", where=lambda e: bool(e["changed"]))
        assert changed["changed"] == ["allow", "deny"]
        assert roundtrip_once(echod.port) == b"ping\n"
        allowed.write_text("not an address\n")
        echod.signal(signal.SIGHUP)
        failed = echod.wait_event("config_reload_failed")
        assert str(allowed) in failed["detail"] and "not an address" in failed["detail"]
        assert roundtrip_once(echod.port) == b"ping\n"  # the lists in force are kept
    finally:
        held.close()


def test_sighup_switches_the_log_format(
    spawn_echod: Callable[..., EchodProcess], config: Path
) -> None:
    config.write_text('log_format = "json"\n')
    base = ("--foreground", "--port", "0", "--control-socket", "none")
    echod = spawn_echod(*base, "--config", str(config), default_args=False)  # JSON: started
    config.write_text('log_format = "console"\nlog_level = "debug"\n')
    echod.signal(signal.SIGHUP)
    reloaded = echod.wait_line("config_reloaded")
    assert not reloaded.startswith("{") and "log_format" in reloaded  # key=value now
    assert roundtrip_once(echod.port) == b"ping\n"
    assert not echod.wait_line("connection_closed").startswith("{")
