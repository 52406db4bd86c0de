"""Operator console over the control socket, against a real in-process echod.

Each test builds a real :class:`echod.service.Service` (echo server on
127.0.0.1 port 0, control socket in a private temporary directory), serves
it in threads, and talks to it with real TCP clients and real Unix-socket
operator sessions. ``Service.run`` itself needs the main thread for its
signal handlers, so the process tests cover it; here the test starts the
accept loop and the control socket itself and stops them the way ``run``
does.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from echod.admission import Admission, Policy
from echod.config import Settings
from echod.connection import Connection
from echod.control import ControlServer
from echod.errors import StartupError
from echod.reload import Outcome
from echod.service import Service
from tests.helpers import (
    TIMEOUT,
    CapturedLogs,
    Client,
    LineReader,
    flood_until_stalled,
    read_answer,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534


class Session:
    """An operator session on the control socket, reading answers by their framing."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = LineReader.of_socket(self.sock, timeout)

    def read_answer(self) -> list[str]:
        """The lines of one answer, up to the empty line that ends it ([] at EOF)."""
        return read_answer(self.reader)

    def ask(self, line: str | bytes) -> list[str]:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\n")
        return self.read_answer()

    def at_eof(self) -> bool:
        return self.reader.read_exactly(1) == b""

    def close(self) -> None:
        self.sock.close()


@dataclass
class Operated:
    service: Service
    path: Path
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.service.server.port

    def conn(self, client: Client) -> Connection:
        """The server's Connection for a test client (found by its address)."""
        peer = f"127.0.0.1:{client.sock.getsockname()[1]}"
        conn: Connection = wait_for(
            lambda: next((c for c in self.service.registry.snapshot() if c.peer == peer), None),
            what=f"client {peer}",
        )
        return conn


@pytest.fixture
def make_operated(captured_logs: CapturedLogs, ctl_dir: Path) -> Iterator[Callable[..., Operated]]:
    made: list[Operated] = []

    def make(**overrides: Any) -> Operated:
        path = ctl_dir / "run" / "control.sock"
        settings = Settings(
            **{
                "host": "127.0.0.1",
                "port": 0,
                "foreground": True,
                "control_socket": path,
                **overrides,
            }
        )
        service = Service(settings)
        thread = threading.Thread(target=service.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        assert service.control is not None
        service.control.start()
        operated = Operated(service, path, thread)
        made.append(operated)
        return operated

    yield make
    for operated in made:
        operated.service._shutdown()  # what run() does after a stop request
        operated.thread.join(TIMEOUT)


@pytest.fixture
def echod(make_operated: Callable[..., Operated]) -> Operated:
    return make_operated()


@pytest.fixture
def session(echod: Operated) -> Iterator[Session]:
    s = Session(echod.path)
    yield s
    s.close()


def parse_row(row: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in row.split())


# -- pushing ---------------------------------------------------------------------


def test_send_to_one_client(
    echod: Operated, session: Session, connect: Callable[..., Client]
) -> None:
    a, b = connect(echod.port), connect(echod.port)
    a_id, b_id = echod.conn(a).id, echod.conn(b).id
    assert session.ask(f"/send {a_id} hello a") == [f"OK sent to client {a_id}"]
    assert a.readline() == b"Server says: hello a\n"
    # b got nothing: its next line is the answer to its own request
    assert b.roundtrip(b"ping\n") == b"ping\n"
    assert session.ask(f"/send {b_id} hello b") == [f"OK sent to client {b_id}"]
    assert b.readline() == b"Server says: hello b\n"


def test_broadcast_to_all_clients(
    echod: Operated, session: Session, connect: Callable[..., Client]
) -> None:
    clients = [connect(echod.port) for _ in range(3)]
    for c in clients:
        echod.conn(c)
    assert session.ask("/broadcast maintenance at 5") == ["OK sent to 3 clients"]
    assert session.ask("plain text broadcasts too") == ["OK sent to 3 clients"]
    for c in clients:
        assert c.readline() == b"Server says: maintenance at 5\n"
        assert c.readline() == b"Server says: plain text broadcasts too\n"


def test_push_and_echo_share_the_line_order(
    echod: Operated, session: Session, connect: Callable[..., Client]
) -> None:
    c = connect(echod.port)
    assert c.roundtrip(b"one\n") == b"one\n"
    assert session.ask("/broadcast two")[0].startswith("OK")
    assert c.readline() == b"Server says: two\n"
    assert c.roundtrip(b"three\n") == b"three\n"


# -- list, kick, stats -------------------------------------------------------------


def test_list_fields(echod: Operated, session: Session, connect: Callable[..., Client]) -> None:
    assert session.ask("/list") == ["OK 0 clients"]
    a, b = connect(echod.port), connect(echod.port)
    assert a.roundtrip(b"hello\n") == b"hello\n"
    a_conn = echod.conn(a)
    a_id, b_id = a_conn.id, echod.conn(b).id
    # The handler counts a send after it returns, which can be after the client read it.
    wait_for(lambda: a_conn.lines_out == 1, what="the echo to be counted")
    answer = session.ask("/list")
    assert answer[0] == "OK 2 clients"
    rows = {int(r["id"]): r for r in map(parse_row, answer[1:])}
    assert set(rows) == {a_id, b_id}
    ra, rb = rows[a_id], rows[b_id]
    assert ra["addr"] == f"127.0.0.1:{a.sock.getsockname()[1]}"
    assert rb["addr"] == f"127.0.0.1:{b.sock.getsockname()[1]}"
    assert (ra["bytes_in"], ra["bytes_out"], ra["lines_in"], ra["lines_out"]) == (
        "6",
        "6",
        "1",
        "1",
    )
    assert (rb["bytes_in"], rb["bytes_out"], rb["lines_in"], rb["lines_out"]) == (
        "0",
        "0",
        "0",
        "0",
    )
    for r in (ra, rb):
        assert float(r["age"].removesuffix("s")) >= float(r["idle"].removesuffix("s")) >= 0


def test_kick_with_reason(
    echod: Operated, session: Session, connect: Callable[..., Client], captured_logs: CapturedLogs
) -> None:
    a, b = connect(echod.port), connect(echod.port)
    a_id = echod.conn(a).id
    echod.conn(b)
    assert session.ask(f"/kick {a_id} see you later") == [f"OK kicked client {a_id}"]
    assert a.read_all() == b"Server says: see you later\n"
    closed = wait_for(
        lambda: [e for e in captured_logs.named("connection_closed") if e["client"] == a_id],
        what="connection_closed",
    )
    assert closed[0]["reason"] == "kicked"
    assert b.roundtrip(b"still here\n") == b"still here\n"
    assert session.ask(f"/kick {a_id}") in (
        [f"ERR no client {a_id} (see /list)"],
        [f"ERR client {a_id} is already disconnecting"],
    )


def test_kick_without_reason(
    echod: Operated, session: Session, connect: Callable[..., Client]
) -> None:
    a = connect(echod.port)
    a_id = echod.conn(a).id
    assert session.ask(f"/kick {a_id}") == [f"OK kicked client {a_id}"]
    assert a.read_all() == b""
    wait_for(lambda: echod.service.registry.get(a_id) is None, what="client removed")
    assert session.ask("/list") == ["OK 0 clients"]


def test_a_kick_line_queued_behind_unread_output_still_arrives(
    make_operated: Callable[..., Operated], connect: Callable[..., Client]
) -> None:
    # The client has stopped reading for a moment: the server's lines to it
    # wait in its queue, and the kick line joins them there. The handler
    # sends the queue before its FIN, so the client, reading again, gets
    # every line and then the kick's, within the handler's linger (1 s).
    # (Ended with the socket shut both ways at once, it got only what the
    # kernel buffers held.)
    echod = make_operated(send_timeout=30.0)  # not a slow reader yet
    session = Session(echod.path)
    try:
        c = connect(echod.port)
        conn = echod.conn(c)
        line = b"%1023d\n"
        pushed = 0
        # Until the kernel's buffers are full and lines queue (a few MB; not by
        # a small SO_RCVBUF, which would make reading them crawl on loopback).
        while not conn._out:
            assert pushed < 100_000, "the server's socket never filled up"
            assert conn.push(line % pushed)
            pushed += 1
        assert session.ask(f"/kick {conn.id} bye") == [f"OK kicked client {conn.id}"]
        data = c.read_all()
        expected = b"".join(line % i for i in range(pushed)) + b"Server says: bye\n"
        assert data == expected
    finally:
        session.close()


def test_stats_counters(
    make_operated: Callable[..., Operated], connect: Callable[..., Client]
) -> None:
    echod = make_operated(max_clients=2)
    session = Session(echod.path)
    try:
        a, b = connect(echod.port), connect(echod.port)
        echod.conn(a)
        echod.conn(b)
        assert a.roundtrip(b"12345\n") == b"12345\n"
        assert b.roundtrip(b"x\ny\n") == b"x\n"
        assert b.readline() == b"y\n"
        refused = connect(echod.port)
        assert refused.read_all() == b"ERR server full (max 2 clients)\n"
        a.send(b"exit\n")
        assert a.read_all() == b"bye\n"
        wait_for(lambda: len(echod.service.registry) == 1, what="a removed")
        wait_for(lambda: echod.service.registry.stats().lines_out == 4, what="sends counted")
        answer = session.ask("/stats")
        assert answer[0] == "OK stats"
        stats = dict(line.split("=", 1) for line in answer[1:])
        assert {k: stats[k] for k in stats if k != "uptime"} == {
            "connected": "1",
            "max_clients": "2",
            "total_accepted": "2",
            "rejected": "1",
            "lines_in": "3",
            "lines_out": "4",
            "bytes_in": str(6 + 4 + 5),
            "bytes_out": str(6 + 4 + 4),
            "max_line": "1024",
            "idle_timeout": "300s",
            "line_timeout": "60s",
            "send_timeout": "10s",
            "shutdown_timeout": "5s",
            "backlog": "4096",
            "refused_access_denied": "0",  # admission control is off
            "refused_per_source": "0",
            "refused_connect_rate": "0",
            "refused_proxy_untrusted": "0",
            "refused_proxy_header": "0",
            "source_groups": "0",
            "tls": "off",
            "tls_handshake_failures": "0",
        }
        assert float(stats["uptime"].removesuffix("s")) >= 0
    finally:
        session.close()


# -- errors --------------------------------------------------------------------


def test_unknown_id_and_command_get_err_and_the_session_goes_on(
    echod: Operated, session: Session
) -> None:
    assert session.ask("/send 424242 hi") == ["ERR no client 424242 (see /list)"]
    assert session.ask("/kick 424242") == ["ERR no client 424242 (see /list)"]
    assert session.ask("/send x hi") == ["ERR bad client id 'x' (ids are numbers, see /list)"]
    assert session.ask("/nope") == ["ERR unknown command '/nope' (try /help)"]
    assert session.ask("/help")[0] == "OK commands"


def test_over_long_and_multi_line_operator_text(
    make_operated: Callable[..., Operated], connect: Callable[..., Client]
) -> None:
    echod = make_operated(max_line=32)
    session = Session(echod.path)
    try:
        c = connect(echod.port)
        c_id = echod.conn(c).id
        assert session.ask("/broadcast " + "x" * 33) == ["ERR text too long (33 bytes, max 32)"]
        assert session.ask(f"/send {c_id} " + "y" * 33) == ["ERR text too long (33 bytes, max 32)"]
        assert session.ask("/broadcast a\rb") == ["ERR text must be one line (no CR or LF)"]
        # Far beyond any valid command: refused whole, and the session goes on.
        assert session.ask("/broadcast " + "z" * 200_000) == [
            "ERR command too long (operator text is at most 32 bytes)"
        ]
        assert session.ask("/broadcast " + "k" * 32) == ["OK sent to 1 client"]
        # Nothing refused reached the client: the first line it gets is the last push.
        assert c.readline() == b"Server says: " + b"k" * 32 + b"\n"
        assert c.roundtrip(b"end\n") == b"end\n"
    finally:
        session.close()


def test_commands_are_answered_in_order_when_pipelined(echod: Operated, session: Session) -> None:
    session.sock.sendall(b"/list\n\n/nope\n/help\n/stats\n")
    assert session.read_answer() == ["OK 0 clients"]  # the blank line got no answer
    assert session.read_answer()[0] == "ERR unknown command '/nope' (try /help)"
    assert session.read_answer()[0] == "OK commands"
    assert session.read_answer()[0] == "OK stats"


def test_a_last_command_without_newline_is_answered(echod: Operated) -> None:
    s = Session(echod.path)
    try:
        s.sock.sendall(b"/list")
        s.sock.shutdown(socket.SHUT_WR)
        assert s.read_answer() == ["OK 0 clients"]
        assert s.read_answer() == []
    finally:
        s.close()


def test_shutdown_requests_a_graceful_stop(echod: Operated, session: Session) -> None:
    assert session.ask("/shutdown") == ["OK shutting down"]
    assert echod.service._stop_reason == "operator"


# -- concurrency: whole lines, no lock across I/O ------------------------------------


def test_operator_lines_never_land_inside_echoed_lines(
    echod: Operated, session: Session, connect: Callable[..., Client]
) -> None:
    client = connect(echod.port)
    echod.conn(client)
    n_lines, n_pushes = 3000, 300
    sent = [b"line-%05d-" % i + b"e" * 700 + b"\n" for i in range(n_lines)]
    pushes = [b"Server says: push-%04d-" % j + b"p" * 300 + b"\n" for j in range(n_pushes)]
    received: list[bytes] = []

    def writer() -> None:
        for i in range(0, n_lines, 10):
            client.send(b"".join(sent[i : i + 10]))

    def reader() -> None:
        while len(received) < n_lines + n_pushes:
            line = client.readline()
            if not line:
                return
            received.append(line)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for push in pushes:
        text = push.removeprefix(b"Server says: ").removesuffix(b"\n").decode()
        assert session.ask("/broadcast " + text) == ["OK sent to 1 client"]
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    echoes = [line for line in received if not line.startswith(b"Server says: ")]
    says = [line for line in received if line.startswith(b"Server says: ")]
    assert echoes == sent  # every echo whole and in order
    assert says == pushes  # every push whole and in order


def test_a_client_that_never_reads_slows_nobody(
    make_operated: Callable[..., Operated],
    connect: Callable[..., Client],
    captured_logs: CapturedLogs,
) -> None:
    echod = make_operated(send_timeout=2.0)
    session = Session(echod.path)
    try:
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(TIMEOUT)
        slow.connect(("127.0.0.1", echod.port))
        other = connect(echod.port)
        peer = f"127.0.0.1:{slow.getsockname()[1]}"
        slow_conn = wait_for(
            lambda: next((c for c in echod.service.registry.snapshot() if c.peer == peer), None),
            what="slow client",
        )
        echod.conn(other)
        assert flood_until_stalled([slow], stall=0.3, timeout=20.0, dropped_ok=True) > 0
        # While the server cannot write to the slow client (or has just dropped it):
        wait_for(
            lambda: slow_conn.stalled_since is not None or slow_conn.end_reason,
            what="the server to stall on the slow client",
        )
        lock = echod.service.registry._lock
        assert lock.acquire(timeout=1.0), "the registry lock is held across I/O"
        lock.release()
        assert other.roundtrip(b"still served\n") == b"still served\n"
        answer = session.ask("/broadcast everyone")
        assert answer[0].startswith("OK sent to ")
        assert other.readline() == b"Server says: everyone\n"
        assert session.ask("/list")[0].startswith("OK")
        closed = wait_for(
            lambda: [
                e for e in captured_logs.named("connection_closed") if e["client"] == slow_conn.id
            ],
            what="slow client dropped",
        )
        assert closed[0]["reason"] == "slow_reader"
        assert other.roundtrip(b"after\n") == b"after\n"
        slow.close()
    finally:
        session.close()


# -- the control socket itself ---------------------------------------------------


def test_socket_and_directory_modes_ignore_the_umask(ctl_dir: Path) -> None:
    for mask in (0o000, 0o077, 0o777):
        path = ctl_dir / f"m{mask:o}" / "control.sock"
        old = os.umask(mask)
        try:
            control = ControlServer(path, _NoService())
        finally:
            os.umask(old)
        try:
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
        finally:
            control.close()
        assert not path.exists(), "the socket file is removed at exit"


def _as_nobody(path: Path) -> subprocess.CompletedProcess[bytes]:
    """socat, running as uid/gid 65534, connecting to the control socket.

    It sends nothing, only reads: a command sent after the refusal would fail
    with EPIPE, and socat gives up on EPIPE without reading what is waiting.
    """
    return subprocess.run(
        ["socat", "-t", "2", "-T", "5", "-", f"UNIX-CONNECT:{path}"],
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_is_refused_by_the_file_and_by_so_peercred(
    echod: Operated, ctl_dir: Path, captured_logs: CapturedLogs
) -> None:
    os.chmod(ctl_dir, 0o711)  # let nobody reach echod's own directory
    # Layer 1: the 0700 directory and 0600 socket keep nobody from connecting at all.
    result = _as_nobody(echod.path)
    assert result.returncode != 0
    assert b"Permission denied" in result.stderr
    assert result.stdout == b""
    assert not captured_logs.named("control_refused")
    # Layer 2: open the file up (as a misconfiguration would); SO_PEERCRED still refuses.
    os.chmod(echod.path.parent, 0o711)
    os.chmod(echod.path, 0o666)
    result = _as_nobody(echod.path)
    assert result.stdout == b"ERR permission denied\n\n"
    refused = wait_for(lambda: captured_logs.named("control_refused"), what="control_refused")
    assert refused[0]["uid"] == NOBODY and refused[0]["reason"] == "permission_denied"
    assert not captured_logs.named("control_session_opened")
    # The owner (root) is still served.
    s = Session(echod.path)
    try:
        assert s.ask("/list") == ["OK 0 clients"]
    finally:
        s.close()


class _NoService:
    """For tests of the socket alone: no command is ever run."""

    registry: Any = None
    settings = Settings(control_socket=None)
    admission = Admission(Policy())

    def request_stop(self, reason: str) -> None:
        raise AssertionError("not expected")

    def upgrade(self) -> str:
        raise AssertionError("not expected")

    def reload(self, trigger: str) -> Outcome:
        raise AssertionError("not expected")


def test_stale_socket_file_is_replaced(ctl_dir: Path, captured_logs: CapturedLogs) -> None:
    path = ctl_dir / "control.sock"
    os.chmod(ctl_dir, 0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed echod leaves
    control = ControlServer(path, _NoService())
    try:
        assert captured_logs.named("control_socket_stale_removed")
        control.start()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(TIMEOUT)
        probe.connect(str(path))  # the new socket answers
        probe.close()
    finally:
        control.close()
    assert not path.exists()


def test_a_live_socket_is_not_taken_over(echod: Operated) -> None:
    with pytest.raises(StartupError) as err:
        ControlServer(echod.path, _NoService())
    assert str(err.value) == f"another echod is already listening on control socket {echod.path}"
    s = Session(echod.path)  # and the first echod still answers
    try:
        assert s.ask("/list") == ["OK 0 clients"]
    finally:
        s.close()


def test_close_leaves_a_replaced_socket_file_alone(ctl_dir: Path) -> None:
    path = ctl_dir / "control.sock"
    os.chmod(ctl_dir, 0o700)
    control = ControlServer(path, _NoService())
    os.unlink(path)
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(path))  # another echod took the path meanwhile
    try:
        control.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        newer.close()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "regular_file",
            "{path} exists and is not a socket; remove it or choose another --control-socket",
        ),
        ("dir_is_file", "control socket directory {dir} is not a directory"),
        (
            "world_writable",
            "control socket directory {dir} is writable by other users; choose a "
            "private directory for --control-socket",
        ),
        ("foreign_owner", "control socket directory {dir} belongs to another user (uid 65534)"),
        ("too_long", "control socket path {path} is too long (at most 107 bytes)"),
    ],
)
def test_unusable_paths_are_one_sentence(ctl_dir: Path, setup: str, message: str) -> None:
    d = ctl_dir / "sub"
    path = d / "control.sock"
    if setup == "regular_file":
        d.mkdir(mode=0o700)
        path.write_text("not a socket")
    elif setup == "dir_is_file":
        d.write_text("a file where the directory should be")
    elif setup == "world_writable":
        d.mkdir()
        os.chmod(d, 0o777)
    elif setup == "foreign_owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to chown")
        d.mkdir(mode=0o700)
        os.chown(d, NOBODY, NOBODY)
    elif setup == "too_long":
        d = ctl_dir / ("d" * 120)
        path = d / "control.sock"
    with pytest.raises(StartupError) as err:
        ControlServer(path, _NoService())
    assert str(err.value) == message.format(path=path, dir=d)


def test_at_most_a_few_sessions(echod: Operated, captured_logs: CapturedLogs) -> None:
    assert echod.service.control is not None
    limit = echod.service.control.max_sessions
    sessions = [Session(echod.path) for _ in range(limit)]
    try:
        for s in sessions:
            assert s.ask("/list")[0] == "OK 0 clients"  # each one is being served
        extra = Session(echod.path)
        assert extra.read_answer() == [f"ERR too many operator sessions (max {limit})"]
        assert extra.at_eof()
        extra.close()
        assert captured_logs.named("control_refused")[0]["reason"] == "too_many_sessions"
        sessions.pop().close()
        wait_for(
            lambda: len(captured_logs.named("control_session_closed")) >= 1, what="a session to end"
        )
        again = Session(echod.path)
        sessions.append(again)
        assert again.ask("/list") == ["OK 0 clients"]
    finally:
        for s in sessions:
            s.close()


def test_idle_sessions_are_closed(
    echod: Operated, ctl_dir: Path, captured_logs: CapturedLogs
) -> None:
    path = ctl_dir / "idle" / "control.sock"
    control = ControlServer(path, echod.service, idle_timeout=0.3)
    control.start()
    try:
        s = Session(path)
        assert s.ask("/list") == ["OK 0 clients"]
        assert s.read_answer() == ["ERR idle timeout, closing"]  # after 0.3 s of silence
        assert s.at_eof()
        s.close()
        events = wait_for(
            lambda: [
                e
                for e in captured_logs.named("control_session_closed")
                if e["reason"] == "idle_timeout"
            ],
            what="session closed",
        )
        assert events
    finally:
        control.close()


def test_closing_ends_open_sessions_and_removes_the_file(echod: Operated) -> None:
    s = Session(echod.path)
    try:
        assert s.ask("/list") == ["OK 0 clients"]
        assert echod.service.control is not None
        echod.service.control.close()
        assert s.read_answer() == []  # end of input, not a hang
        assert not echod.path.exists()
    finally:
        s.close()
