"""Unit tests for echod.commands: the operator command interpreter and its line cutter.

The interpreter runs against a real Registry of real server Connections,
each over a socketpair: what a client would receive is read from the other
end of the pair, with a timeout. No server, no threads of echod's own.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echod.commands import HELP, CommandLines, Commands, decode
from echod.config import Settings
from echod.connection import Connection
from echod.registry import Registry
from echod.reload import Outcome, ReloadError
from tests.helpers import LineReader

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0


@dataclass
class Peer:
    """The client's end of a socketpair behind a registered Connection."""

    conn: Connection
    sock: socket.socket

    def __post_init__(self) -> None:
        self.reader = LineReader.of_socket(self.sock, TIMEOUT)
        self.readline = self.reader.readline
        self.pending = self.reader.available  # whatever has arrived so far, without waiting


@dataclass
class Rig:
    registry: Registry[Connection]
    settings: Settings
    commands: Commands[Connection]
    stops: list[str] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)

    def add(self, port: int = 40000) -> Peer:
        ours, theirs = socket.socketpair()
        theirs.settimeout(TIMEOUT)
        conn = Connection(ours, f"127.0.0.1:{port}", self.registry.next_id(), 1.0)
        self.registry.add(conn)
        peer = Peer(conn, theirs)
        self.peers.append(peer)
        return peer

    def run(self, line: str) -> str:
        return self.commands.execute(line)


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**overrides: Any) -> Rig:
        settings = Settings(**{"control_socket": None, **overrides})
        registry: Registry[Connection] = Registry()
        stops: list[str] = []
        commands = Commands(registry, lambda: settings, lambda: stops.append("operator"))
        rig = Rig(registry, settings, commands, stops)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        for peer in rig.peers:
            peer.sock.close()
            peer.conn.sock.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


def fields_of(row: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in row.split())


# -- pushing -----------------------------------------------------------------


def test_send_reaches_only_its_client(rig: Rig) -> None:
    a, b = rig.add(), rig.add()
    assert rig.run(f"/send {b.conn.id} hello there") == f"OK sent to client {b.conn.id}"
    assert b.readline() == b"Server says: hello there\n"
    assert a.pending() == b""
    assert b.conn.lines_out == 1


def test_send_keeps_the_text_spacing(rig: Rig) -> None:
    a = rig.add()
    assert rig.run(f"/send {a.conn.id}   indented  text ").startswith("OK")
    assert a.readline() == b"Server says:   indented  text \n"


def test_broadcast_reaches_everyone(rig: Rig) -> None:
    peers = [rig.add() for _ in range(3)]
    assert rig.run("/broadcast maintenance at 5") == "OK sent to 3 clients"
    for peer in peers:
        assert peer.readline() == b"Server says: maintenance at 5\n"


def test_plain_text_is_a_broadcast(rig: Rig) -> None:
    a, b = rig.add(), rig.add()
    assert rig.run("hello all\n") == "OK sent to 2 clients"
    assert a.readline() == b"Server says: hello all\n"
    assert b.readline() == b"Server says: hello all\n"


@pytest.mark.parametrize(
    ("line", "word"),
    [
        ("list", "list"),
        ("stats", "stats"),
        ("send 3 hi", "send"),
        ("kick 2", "kick"),
        ("LIST", "LIST"),
        ("  help me", "help"),
        ("shutdown now\n", "shutdown"),
    ],
)
def test_a_bare_command_name_is_a_forgotten_slash_not_a_broadcast(
    rig: Rig, line: str, word: str
) -> None:
    a = rig.add()
    assert rig.run(line) == f"ERR did you mean /{word}? (/broadcast {word} sends it as text)"
    assert a.pending() == b""
    assert rig.stops == []
    assert rig.run(f"/broadcast {line}") == "OK sent to 1 client"  # as the answer says
    assert a.readline() == b"Server says: " + line.rstrip("\n").encode() + b"\n"


@pytest.mark.parametrize("line", ["listing the changes", "stats: fine", "help!", "kicks"])
def test_other_bare_lines_are_still_broadcast(rig: Rig, line: str) -> None:
    a = rig.add()
    assert rig.run(line) == "OK sent to 1 client"
    assert a.readline() == b"Server says: " + line.encode() + b"\n"


def test_broadcast_with_nobody_connected(rig: Rig) -> None:
    assert rig.run("/broadcast anyone?") == "OK sent to 0 clients"


def test_operator_text_is_byte_transparent(rig: Rig) -> None:
    a = rig.add()
    raw = "caf\u00e9 ".encode() + b"\xff\xfe"  # valid UTF-8 and stray bytes
    assert rig.run(decode(b"/broadcast " + raw + b"\n")).startswith("OK")
    assert a.readline() == b"Server says: " + raw + b"\n"


@pytest.mark.parametrize("text", ["two\nlines", "carriage\rreturn", "trailing\r\n\n"])
@pytest.mark.parametrize("command", ["/broadcast {}", "/send {id} {}", "/kick {id} {}", "{}"])
def test_multi_line_text_is_refused_not_split(rig: Rig, command: str, text: str) -> None:
    a = rig.add()
    answer = rig.run(command.format(text, id=a.conn.id))
    assert answer == "ERR text must be one line (no CR or LF)"
    assert a.pending() == b""
    assert a.conn.end_reason is None


def test_text_at_the_limit_passes_and_one_byte_more_is_refused(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_line=10)
    a = rig.add()
    assert rig.run("/broadcast " + "x" * 10) == "OK sent to 1 client"
    assert a.readline() == b"Server says: " + b"x" * 10 + b"\n"
    assert rig.run("/broadcast " + "x" * 11) == "ERR text too long (11 bytes, max 10)"
    assert rig.run(f"/send {a.conn.id} " + "x" * 11) == "ERR text too long (11 bytes, max 10)"
    # The limit is in encoded bytes, as the client's line limit is.
    assert rig.run("/broadcast " + "\u00e9" * 6) == "ERR text too long (12 bytes, max 10)"
    assert a.pending() == b""


def test_push_to_a_disconnecting_client_is_an_error(rig: Rig) -> None:
    a = rig.add()
    a.conn.end(None, "eof")
    assert rig.run(f"/send {a.conn.id} hi") == f"ERR client {a.conn.id} is disconnecting"
    assert rig.run("/broadcast hi") == "OK sent to 0 clients"


# -- ids and usage errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("/send 99 hi", "ERR no client 99 (see /list)"),
        ("/kick 99", "ERR no client 99 (see /list)"),
        ("/send abc hi", "ERR bad client id 'abc' (ids are numbers, see /list)"),
        ("/send -1 hi", "ERR bad client id '-1' (ids are numbers, see /list)"),
        ("/send \u0663 hi", "ERR bad client id '\u0663' (ids are numbers, see /list)"),
        ("/send", "ERR usage: /send ID TEXT"),
        ("/send 1", "ERR usage: /send ID TEXT"),
        ("/kick", "ERR usage: /kick ID [REASON]"),
        ("/broadcast", "ERR usage: /broadcast TEXT"),
        ("/list now", "ERR usage: /list (no arguments)"),
        ("/stats please", "ERR usage: /stats (no arguments)"),
        ("/shutdown now", "ERR usage: /shutdown (no arguments)"),
        ("/frobnicate", "ERR unknown command '/frobnicate' (try /help)"),
        ("/", "ERR unknown command '/' (try /help)"),
    ],
)
def test_errors_are_one_err_line(rig: Rig, line: str, answer: str) -> None:
    rig.add()
    assert rig.run(line) == answer
    assert rig.stops == []


def test_command_names_ignore_case(rig: Rig) -> None:
    assert rig.run("/LIST").startswith("OK 0 clients")


def test_blank_lines_get_no_answer(rig: Rig) -> None:
    assert rig.run("") == ""
    assert rig.run("   \n") == ""
    assert rig.run("\r\n") == ""


def test_an_internal_failure_is_an_err_not_a_traceback(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()

    def broken() -> None:
        raise RuntimeError("boom")

    rig.commands.stop = broken
    assert rig.run("/shutdown") == "ERR internal error (see the log)"


# -- list, kick, stats, help, shutdown ---------------------------------------


def test_list_names_every_field(rig: Rig) -> None:
    a, b = rig.add(port=5555), rig.add(port=6666)
    a.conn.bytes_in, a.conn.bytes_out, a.conn.lines_in, a.conn.lines_out = 12, 34, 1, 2
    answer = rig.run("/list").split("\n")
    assert answer[0] == "OK 2 clients"
    rows = [fields_of(row) for row in answer[1:]]
    assert [r["id"] for r in rows] == [str(a.conn.id), str(b.conn.id)]
    assert rows[0]["addr"] == "127.0.0.1:5555" and rows[1]["addr"] == "127.0.0.1:6666"
    assert (rows[0]["bytes_in"], rows[0]["bytes_out"]) == ("12", "34")
    assert (rows[0]["lines_in"], rows[0]["lines_out"]) == ("1", "2")
    for row in rows:
        assert set(row) == {
            "id",
            "addr",
            "age",
            "idle",
            "bytes_in",
            "bytes_out",
            "lines_in",
            "lines_out",
        }
        assert row["age"].endswith("s") and float(row["age"][:-1]) >= 0
        assert row["idle"].endswith("s") and float(row["idle"][:-1]) >= 0


def test_list_with_one_client_and_with_none(rig: Rig) -> None:
    assert rig.run("/list") == "OK 0 clients"
    rig.add()
    assert rig.run("/list").split("\n")[0] == "OK 1 client"


def test_kick_with_a_reason(rig: Rig) -> None:
    a, b = rig.add(), rig.add()
    assert rig.run(f"/kick {a.conn.id} please reconnect later") == f"OK kicked client {a.conn.id}"
    assert a.readline() == b"Server says: please reconnect later\n"
    assert a.readline() == b""  # then the connection is shut down
    assert a.conn.end_reason == "kicked"
    assert b.conn.end_reason is None
    assert rig.run(f"/kick {a.conn.id}") == f"ERR client {a.conn.id} is already disconnecting"


def test_kick_without_a_reason(rig: Rig) -> None:
    a = rig.add()
    assert rig.run(f"/kick {a.conn.id}").startswith("OK")
    assert a.readline() == b""
    assert a.conn.end_reason == "kicked"


def test_kick_reason_is_checked_like_any_operator_text(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_line=5)
    a = rig.add()
    assert rig.run(f"/kick {a.conn.id} far too long").startswith("ERR text too long")
    assert a.conn.end_reason is None


def test_stats_counts(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_clients=7)
    a, b = rig.add(), rig.add()
    a.conn.bytes_in, a.conn.lines_in, a.conn.bytes_out, a.conn.lines_out = 10, 2, 10, 2
    b.conn.bytes_in, b.conn.lines_in = 4, 1
    rig.registry.remove(b.conn)  # departed clients still count in the totals
    rig.registry.reject("server_full")
    lines = rig.run("/stats").split("\n")
    assert lines[0] == "OK stats"
    stats = dict(line.split("=", 1) for line in lines[1:])
    assert stats == {
        **stats,
        "connected": "1",
        "max_clients": "7",
        "total_accepted": "2",
        "rejected": "1",
        "lines_in": "3",
        "lines_out": "2",
        "bytes_in": "14",
        "bytes_out": "10",
    }
    assert stats["uptime"].endswith("s") and float(stats["uptime"][:-1]) >= 0
    # The limits in force are reported too (the hardening issue asks /stats for them).
    assert {
        k: stats[k]
        for k in (
            "max_line",
            "idle_timeout",
            "line_timeout",
            "send_timeout",
            "shutdown_timeout",
            "backlog",
        )
    } == {
        "max_line": "1024",
        "idle_timeout": "300s",
        "line_timeout": "60s",
        "send_timeout": "10s",
        "shutdown_timeout": "5s",
        "backlog": "4096",
    }


def test_help_lists_every_command(rig: Rig) -> None:
    lines = rig.run("/help").split("\n")
    assert lines[0] == "OK commands"
    assert lines[1:] == list(HELP)
    for name in ("send", "broadcast", "list", "kick", "stats", "help", "shutdown"):
        assert any(line.startswith(f"/{name} ") for line in lines[1:])


def test_shutdown_calls_the_stop_callback(rig: Rig) -> None:
    assert rig.run("/shutdown") == "OK shutting down"
    assert rig.stops == ["operator"]


# -- invariants the control socket framing relies on ---------------------------


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    line=st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda cmd, rest: cmd + rest,
            st.sampled_from(
                [
                    "/send ",
                    "/kick ",
                    "/broadcast ",
                    "/list",
                    "/stats",
                    "/help",
                    "/SEND 1 ",
                    "/send 1",
                    "/",
                ]
            ),
            st.text(max_size=40),
        ),
    )
)
def test_every_answer_is_framable(make_rig: Callable[..., Rig], line: str) -> None:
    rig = make_rig(max_line=20)
    peer = rig.add()
    try:
        answer = rig.run(line)
    finally:
        peer.sock.close()
        peer.conn.sock.close()
        rig.peers.clear()
    if not line.strip():
        assert answer == ""
        return
    lines = answer.split("\n")
    assert lines[0].startswith(("OK", "ERR "))
    assert all(lines), "an empty line would end the answer early on the control socket"
    assert not any(x.startswith(("OK", "ERR")) for x in lines[1:])


def test_message_bodies_are_not_logged_at_info(rig: Rig, captured_logs: Any) -> None:
    a = rig.add()
    rig.run(f"/send {a.conn.id} secret-one")
    rig.run("/broadcast secret-two")
    rig.run(f"/kick {a.conn.id} secret-three")
    events = captured_logs.named("operator_command")
    assert [e["command"] for e in events] == ["send", "broadcast", "kick"]
    assert all(e["ok"] is True for e in events)
    assert "secret" not in json.dumps(captured_logs.events)


# -- cutting a stream into command lines ----------------------------------------


def test_command_lines_whole_and_byte_by_byte() -> None:
    stream = b"/list\r\nhello\n/stats\n"
    whole = CommandLines(100).feed(stream)
    assert whole == [b"/list\r\n", b"hello\n", b"/stats\n"]
    cutter = CommandLines(100)
    pieces = [line for i in range(len(stream)) for line in cutter.feed(stream[i : i + 1])]
    assert pieces == whole
    assert cutter.end() is None


def test_command_lines_refuse_a_long_line_once_and_skip_its_rest() -> None:
    cutter = CommandLines(8)
    assert cutter.feed(b"0123456789") == [None]
    assert cutter.feed(b"more of the same") == []
    assert cutter.feed(b" end\n/ok\n") == [b"/ok\n"]
    assert cutter.feed(b"tail") == []
    assert cutter.end() == b"tail"


def test_command_lines_limit_does_not_depend_on_how_bytes_arrive() -> None:
    assert CommandLines(8).feed(b"12345678\n123456789\n") == [b"12345678\n", None]


def test_reload_answers_ok_with_a_line_per_key_that_needs_a_restart() -> None:
    outcomes = [Outcome(("max_clients",), ("port", "backlog")), Outcome((), ())]
    calls: list[int] = []

    def reload() -> Outcome:
        calls.append(1)
        return outcomes[len(calls) - 1]

    settings = Settings(control_socket=None)
    commands: Commands[Connection] = Commands(
        Registry(), lambda: settings, lambda: None, reload=reload
    )
    assert commands.execute("/reload") == "OK reloaded\nneeds restart: port\nneeds restart: backlog"
    assert commands.execute("/RELOAD") == "OK reloaded"
    assert commands.execute("/reload now") == "ERR usage: /reload (no arguments)"
    assert len(calls) == 2


def test_reload_that_fails_is_one_err_line_and_without_a_reloader_too() -> None:
    def reload() -> Outcome:
        raise ReloadError("config file /x.toml, key max_clients: 0 is out of range")

    settings = Settings(control_socket=None)
    commands: Commands[Connection] = Commands(
        Registry(), lambda: settings, lambda: None, reload=reload
    )
    assert commands.execute("/reload") == (
        "ERR config file /x.toml, key max_clients: 0 is out of range"
    )
    bare: Commands[Connection] = Commands(Registry(), lambda: settings, lambda: None)
    assert bare.execute("/reload") == "ERR this console cannot reload"


def test_commands_read_the_settings_in_force_at_each_use() -> None:
    current = [Settings(control_socket=None, max_line=10)]
    commands: Commands[Connection] = Commands(Registry(), lambda: current[0], lambda: None)
    assert commands.execute("/broadcast " + "x" * 11) == "ERR text too long (11 bytes, max 10)"
    current[0] = Settings(control_socket=None, max_line=20, max_clients=7)
    assert commands.execute("/broadcast " + "x" * 11) == "OK sent to 0 clients"
    assert "max_clients=7" in commands.execute("/stats").splitlines()
