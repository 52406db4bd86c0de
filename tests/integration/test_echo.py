"""The protocol over real loopback sockets, against an in-process EchoServer on a free port.

Every client call has a timeout (helpers.TIMEOUT); readiness is awaited by
a round trip or by watching the registry, never by sleeping.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from echod import protocol
from echod.protocol import BYE, SHUTDOWN_NOTICE
from tests.helpers import (
    TIMEOUT,
    CapturedLogs,
    Client,
    RunningServer,
    has_ipv6_loopback,
    wait_for,
)

MakeServer = Callable[..., RunningServer]
Connect = Callable[..., Client]

ERR_1024 = b"ERR line too long (max 1024 bytes)\n"


@pytest.fixture(params=["tcp", "tls"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every test here runs over plain TCP, then again over TLS (see conftest)."""
    return str(request.param)


def closed_events(logs: CapturedLogs, count: int = 1) -> list[dict[str, Any]]:
    """Wait for ``count`` connection_closed events (logged as the handler thread ends)."""
    events: list[dict[str, Any]] = wait_for(
        lambda: (e := logs.named("connection_closed")) and len(e) >= count and e,
        what=f"{count} connection_closed events",
    )
    return events


# -- echo ----------------------------------------------------------------------------


def test_echo(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    assert client.roundtrip(b"hello\n") == b"hello\n"
    assert client.roundtrip(b"crlf\r\n") == b"crlf\r\n"
    assert client.roundtrip(b"\n") == b"\n"
    assert client.roundtrip(b"\x00\xff\xfe\xc3(\n") == b"\x00\xff\xfe\xc3(\n"


def test_many_lines_on_one_connection(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    for i in range(200):
        line = b"line %d\n" % i
        assert client.roundtrip(line) == line


def test_pipelined_lines(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    burst = b"".join(b"%05d %s\r\n" % (i, b"x" * (i % 50)) for i in range(2000))
    client.send(burst)
    assert client.read_exactly(len(burst)) == burst
    assert client.roundtrip(b"still here\n") == b"still here\n"


def test_line_split_across_sends(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in (b"he", b"l", b"lo wor", b"ld\r"):
        client.send(piece)
    assert client.roundtrip(b"\n") == b"hello world\r\n"


# -- the limit -----------------------------------------------------------------------


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_longest_lines_are_echoed(server: RunningServer, connect: Connect, ending: bytes) -> None:
    client = connect(server.port)
    for size in (1023, 1024):
        line = b"y" * size + ending
        assert client.roundtrip(line) == line


def test_cr_and_lf_at_the_limit_in_separate_sends(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.send(b"y" * 1024 + b"\r")
    assert client.roundtrip(b"\n") == b"y" * 1024 + b"\r\n"


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_line_too_long_closes(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs, ending: bytes
) -> None:
    client = connect(server.port)
    assert client.roundtrip(b"before\n") == b"before\n"
    client.send(b"y" * 1025 + ending)
    assert client.read_all() == ERR_1024
    client.close()  # else the server waits up to a second for our EOF before it logs
    assert closed_events(captured_logs)[0]["reason"] == "line_too_long"


def test_endless_line_is_cut_off(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    """Whatever the client sends, the server answers once it is over the limit and closes."""
    client = connect(server.port)
    errors: list[OSError] = []

    def flood() -> None:
        try:
            client.send(b"z" * 200_000)
        except OSError as err:  # the server may close before taking it all
            errors.append(err)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    assert client.read_all() == ERR_1024
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    client.close()
    assert closed_events(captured_logs)[0]["reason"] == "line_too_long"


def test_other_max_line(make_server: MakeServer, connect: Connect) -> None:
    srv = make_server(max_line=16)
    client = connect(srv.port)
    assert client.roundtrip(b"0123456789abcdef\n") == b"0123456789abcdef\n"
    assert client.roundtrip(b"0123456789abcdef\r\n") == b"0123456789abcdef\r\n"
    client.send(b"0123456789abcdefg\n")
    assert client.read_all() == b"ERR line too long (max 16 bytes)\n"


# -- exit and end of input -------------------------------------------------------------


@pytest.mark.parametrize("word", [b"exit\n", b" EXIT \r\n", b"\tExit\n"])
def test_exit(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs, word: bytes
) -> None:
    client = connect(server.port)
    assert client.roundtrip(b"exited\n") == b"exited\n"
    client.send(word + b"not echoed\n")
    assert client.read_all() == BYE
    client.close()
    assert closed_events(captured_logs)[0]["reason"] == "exit"


def test_exit_then_eof(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    client.send(b"exit")
    client.half_close()
    assert client.read_all() == BYE


def test_half_close_echoes_the_trailing_bytes(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    client = connect(server.port)
    client.send(b"abc\ndef")
    client.half_close()
    assert client.read_all() == b"abc\ndef"
    client.close()
    assert closed_events(captured_logs)[0]["reason"] == "eof"


def test_half_close_after_whole_lines(server: RunningServer, connect: Connect) -> None:
    client = connect(server.port)
    client.send(b"one\ntwo\n")
    client.half_close()
    assert client.read_all() == b"one\ntwo\n"


# -- many clients ------------------------------------------------------------------------


def test_50_concurrent_clients(server: RunningServer, connect: Connect) -> None:
    clients = [connect(server.port) for _ in range(50)]
    wait_for(lambda: len(server.registry) == 50, what="50 registered clients")
    for i, client in enumerate(clients):
        client.send(b"client %d first\n" % i)
    for i, client in enumerate(reversed(clients)):  # answered independently of order
        n = 49 - i
        assert client.readline() == b"client %d first\n" % n

    failures: list[str] = []

    def talk(i: int, client: Client) -> None:
        try:
            for j in range(20):
                line = b"%d:%d %s\n" % (i, j, b"p" * (j * 7))
                got = client.roundtrip(line)
                if got != line:
                    failures.append(f"client {i}: sent {line!r}, got {got!r}")
                    return
        except OSError as err:
            failures.append(f"client {i}: {err}")

    threads = [
        threading.Thread(target=talk, args=(i, c), daemon=True) for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert server.registry.stats().lines_in == 50 * 21


# -- shutdown ----------------------------------------------------------------------------


def test_shutdown_with_idle_clients(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    talked = [connect(server.port) for _ in range(3)]
    for client in talked:
        assert client.roundtrip(b"hi\n") == b"hi\n"
    silent = [connect(server.port) for _ in range(3)]  # never send a byte
    wait_for(lambda: len(server.registry) == 6, what="6 registered clients")
    partial = talked[0]
    partial.send(b"unfinished")  # an unfinished line is not echoed at shutdown

    assert server.stop(timeout=5.0) is True
    assert not server.thread.is_alive()
    for client in talked + silent:
        assert client.read_all() == SHUTDOWN_NOTICE
    events = closed_events(captured_logs, 6)
    assert [e["reason"] for e in events] == ["shutdown"] * 6
    assert len(server.registry) == 0
    with pytest.raises(OSError):
        Client(server.port, timeout=1.0)  # no longer accepting


def test_stop_with_no_clients(server: RunningServer) -> None:
    assert server.stop(timeout=5.0) is True
    assert not server.thread.is_alive()


# -- addresses -----------------------------------------------------------------------


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback(
    make_server: MakeServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    srv = make_server(host="::1")
    assert srv.server.host == "::1"
    client = connect(srv.port, host="::1")
    assert client.roundtrip(b"six\n") == b"six\n"
    client.close()
    assert closed_events(captured_logs)[0]["peer"].startswith("[::1]:")


# -- logging -------------------------------------------------------------------------


def test_connection_closed_event(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs, transport: str
) -> None:
    client = connect(server.port)
    local_port = client.sock.getsockname()[1]
    assert client.roundtrip(b"hello\n") == b"hello\n"
    assert client.roundtrip(b"a\r\n") == b"a\r\n"
    client.send(b"exit\n")
    assert client.read_all() == BYE
    client.close()

    (event,) = closed_events(captured_logs)
    assert event["level"] == "info"
    assert event["client"] == 1
    assert event["peer"] == f"127.0.0.1:{local_port}"
    assert event["reason"] == "exit"
    plain_in, plain_out = len(b"hello\na\r\nexit\n"), len(b"hello\na\r\n") + len(BYE)
    if transport == "tcp":
        assert (event["bytes_in"], event["bytes_out"]) == (plain_in, plain_out)
    else:  # bytes on the wire: the records' overhead, and the server's close_notify
        assert event["bytes_in"] > plain_in and event["bytes_out"] > plain_out
    assert event["lines_in"] == 2
    assert event["lines_out"] == 3  # two echoes and the bye
    assert isinstance(event["duration"], float | int)
    assert 0 <= event["duration"] < 60


def test_no_per_message_logging_at_info(
    server: RunningServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    client = connect(server.port)
    for i in range(50):
        assert client.roundtrip(b"%d\n" % i) == b"%d\n" % i
    client.close()
    closed_events(captured_logs)
    loud = [e["event"] for e in captured_logs.events if e["level"] != "debug"]
    assert loud == ["connection_closed"]


class Boom(Exception):
    pass


def test_handler_error_is_one_event_and_the_server_goes_on(
    server: RunningServer,
    connect: Connect,
    captured_logs: CapturedLogs,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    real_feed = protocol.LineProtocol.feed

    def feed(self: protocol.LineProtocol, data: bytes) -> list[protocol.Event]:
        if b"BOOM" in data:
            raise Boom("the handler broke")
        return real_feed(self, data)

    monkeypatch.setattr(protocol.LineProtocol, "feed", feed)
    victim = connect(server.port)
    assert victim.roundtrip(b"fine\n") == b"fine\n"
    victim.send(b"BOOM\n")
    assert victim.read_all() == b""  # closed without an answer

    (error,) = wait_for(lambda: captured_logs.named("handler_error"), what="handler_error")
    assert error["level"] == "error"
    assert error["error"] == "Boom"
    assert error["detail"] == "the handler broke"
    assert error["client"] == 1
    assert "exception" not in error  # a summary, not a traceback
    (closed,) = closed_events(captured_logs)
    assert closed["reason"] == "error"
    assert closed["client"] == 1

    other = connect(server.port)
    assert other.roundtrip(b"still serving\n") == b"still serving\n"
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert len(captured_logs.named("handler_error")) == 1
