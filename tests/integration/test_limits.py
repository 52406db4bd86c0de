"""Limits and timeouts with small values, against an in-process EchoServer: fast and exact.

The same limits under real load, on a real echod, are in tests/stress.
"""

from __future__ import annotations

import itertools
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echod import server as server_module
from echod.config import OPTIONS, Settings
from echod.protocol import BYE, line_too_long
from echod.server import EchoServer
from tests.helpers import TIMEOUT, CapturedLogs, Client, RunningServer, wait_for

MakeServer = Callable[..., RunningServer]
Connect = Callable[..., Client]


def closed(logs: CapturedLogs, count: int = 1) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = wait_for(
        lambda: (e := logs.named("connection_closed")) and len(e) >= count and e,
        what=f"{count} connection_closed events",
    )
    return events


def silent_for(client: Client) -> float:
    """Wait for the server to close on a client that says nothing; return how long it took."""
    start = time.monotonic()
    client.read_all()
    return time.monotonic() - start


# -- defaults --------------------------------------------------------------------------


def test_documented_defaults() -> None:
    defaults = {opt.name: opt.default for opt in OPTIONS}
    assert defaults["max_clients"] == Settings.max_clients == 1000
    assert defaults["idle_timeout"] == Settings.idle_timeout == 300.0
    assert defaults["line_timeout"] == Settings.line_timeout == 60.0
    assert defaults["shutdown_timeout"] == Settings.shutdown_timeout == 5.0
    assert defaults["backlog"] == Settings.backlog >= 128


def listen_backlog(port: int) -> int:
    """The listening socket's backlog as the kernel applied it (ss shows it as Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    return int(out.split()[2])


def test_backlog_is_applied(make_server: MakeServer) -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    assert listen_backlog(make_server(backlog=200).port) == min(200, somaxconn)
    assert listen_backlog(make_server().port) == min(Settings.backlog, somaxconn)


def test_thread_stacks_are_small(server: RunningServer, connect: Connect) -> None:
    assert connect(server.port).roundtrip(b"x\n") == b"x\n"
    assert threading.stack_size() == server_module.THREAD_STACK <= 512 * 1024


# -- max clients -----------------------------------------------------------------------


def test_max_clients_refuses_with_a_line_and_logs_once_per_burst(
    make_server: MakeServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    srv = make_server(max_clients=3, send_timeout=1.0)  # a short janitor tick
    served = [connect(srv.port) for _ in range(3)]
    for client in served:
        assert client.roundtrip(b"in\n") == b"in\n"
    for _ in range(10):
        assert connect(srv.port).read_all() == b"ERR server full (max 3 clients)\n"
    assert srv.registry.stats().rejected == 10
    assert len(captured_logs.named("client_rejected")) == 1
    (ended,) = wait_for(
        lambda: captured_logs.named("client_rejected_burst_ended"), what="the end of the burst"
    )
    assert ended["rejected"] == 10
    served[0].close()
    wait_for(lambda: len(srv.registry) == 2, what="a free slot")
    assert connect(srv.port).roundtrip(b"room again\n") == b"room again\n"


# -- idle timeout ------------------------------------------------------------------------


def test_idle_timeout(
    make_server: MakeServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    srv = make_server(idle_timeout=0.3)
    client = connect(srv.port)
    assert client.roundtrip(b"hello\n") == b"hello\n"
    start = time.monotonic()
    assert client.read_all() == b"ERR idle timeout\n"
    took = time.monotonic() - start
    assert 0.3 <= took < 0.3 + 1.0
    (event,) = closed(captured_logs)
    assert event["reason"] == "idle_timeout"


def test_a_client_that_talks_is_not_idle(make_server: MakeServer, connect: Connect) -> None:
    srv = make_server(idle_timeout=0.3)
    client = connect(srv.port)
    for i in range(8):  # 0.8 s in all, never 0.3 s silent
        assert client.roundtrip(b"%d\n" % i) == b"%d\n" % i
        time.sleep(0.1)


def test_idle_timeout_zero_is_off(make_server: MakeServer, connect: Connect) -> None:
    srv = make_server(idle_timeout=0.0, line_timeout=0.2)
    client = connect(srv.port)
    assert client.roundtrip(b"hi\n") == b"hi\n"
    (conn,) = srv.registry.snapshot()
    srv.server.check_timeouts()  # the janitor has noticed the round trip
    conn.last_active -= 10**6  # silent for eleven days, as far as the janitor can tell
    srv.server.check_timeouts()
    assert conn.end_reason is None
    assert client.roundtrip(b"still\n") == b"still\n"


# -- line timeout ------------------------------------------------------------------------


def test_line_timeout_is_absolute_so_trickling_does_not_help(
    make_server: MakeServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    srv = make_server(line_timeout=0.4)
    client = connect(srv.port)
    client.send(b"t")
    start = time.monotonic()
    client.sock.setblocking(False)
    got = b""
    while time.monotonic() - start < 5:
        try:
            chunk = client.sock.recv(100)
        except BlockingIOError:
            try:
                client.sock.send(b"t")  # a byte every 50 ms keeps it active, not alive
            except OSError:
                pass
            time.sleep(0.05)
            continue
        if not chunk:
            break
        got += chunk
    took = time.monotonic() - start
    assert got == b"ERR line timeout\n"
    assert 0.4 <= took < 0.4 + 1.0
    (event,) = closed(captured_logs)
    assert event["reason"] == "line_timeout"


def test_line_timeout_counts_from_each_lines_first_byte(
    make_server: MakeServer, connect: Connect
) -> None:
    srv = make_server(line_timeout=0.5)
    client = connect(srv.port)
    # Lines that each take 0.3 s to complete, back to back for 1.5 s: never cut.
    for i in range(5):
        client.send(b"part %d, " % i)
        time.sleep(0.3)
        assert client.roundtrip(b"done\n") == b"part %d, done\n" % i


def test_line_timeout_zero_is_off(make_server: MakeServer, connect: Connect) -> None:
    srv = make_server(line_timeout=0.0, idle_timeout=0.0)
    client = connect(srv.port)
    client.send(b"unfinished")
    wait_for(lambda: srv.registry.stats().bytes_in == 10, what="the bytes to arrive")
    (conn,) = srv.registry.snapshot()
    srv.server.check_timeouts()  # the janitor notices the unfinished line
    assert conn.line_started is not None
    conn.line_started -= 10**6
    srv.server.check_timeouts()
    assert conn.end_reason is None
    assert client.roundtrip(b" line\n") == b"unfinished line\n"


# -- faults --------------------------------------------------------------------------------


def test_reset_mid_line_is_one_event(
    server: RunningServer,
    connect: Connect,
    captured_logs: CapturedLogs,
    capfd: pytest.CaptureFixture[str],
) -> None:
    client = connect(server.port)
    client.send(b"half a line")
    wait_for(lambda: server.registry.stats().bytes_in == 11, what="the bytes to arrive")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    client.close()
    (event,) = closed(captured_logs)
    assert event["reason"] == "reset"
    assert connect(server.port).roundtrip(b"others fine\n") == b"others fine\n"
    assert [e["event"] for e in captured_logs.events if e["level"] != "debug"] == [
        "connection_closed"
    ]
    assert "Traceback" not in "".join(capfd.readouterr())


def test_slow_reader_is_dropped_after_the_send_timeout(
    make_server: MakeServer, connect: Connect, captured_logs: CapturedLogs
) -> None:
    srv = make_server(send_timeout=0.5)
    hog = connect(srv.port)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.sock.setblocking(False)
    lines = b"".join(b"%999d\n" % i for i in range(64))
    pending = memoryview(lines)
    deadline = time.monotonic() + 10
    # Keep offering lines: the server's buffers absorb megabytes before it stalls.
    while not captured_logs.named("connection_closed") and time.monotonic() < deadline:
        try:
            pending = pending[hog.sock.send(pending) :] or memoryview(lines)
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break  # dropped
    (event,) = closed(captured_logs)
    assert event["reason"] == "slow_reader"
    assert connect(srv.port).roundtrip(b"fine\n") == b"fine\n"


# -- the open-files limit at start-up ----------------------------------------------------


NOFILE_PROBE = """
import json, resource, sys
from echod import logs
from echod.service import raise_nofile_limit
logs.configure("info", "json", sys.stdout)
soft = raise_nofile_limit(int(sys.argv[1]), logs.get_logger())
print(json.dumps({"soft": soft, "now": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


def probe_nofile(soft: int, hard: int, max_clients: int) -> list[dict[str, Any]]:
    """Run raise_nofile_limit in a child started with these limits; its JSON lines."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", NOFILE_PROBE, str(max_clients)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
        preexec_fn=limit,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_open_files_soft_limit_is_raised_to_the_hard_one() -> None:
    assert probe_nofile(256, 4096, 1000) == [{"soft": 4096, "now": 4096}]


def test_a_hard_limit_too_low_for_max_clients_is_a_warning() -> None:
    warning, result = probe_nofile(256, 512, 1000)
    assert warning["event"] == "nofile_limit_low"
    assert warning["level"] == "warning"
    assert (warning["soft"], warning["hard"], warning["max_clients"]) == (512, 512, 1000)
    assert warning["needed"] > 1000
    assert result == {"soft": 512, "now": 512}


# -- the line protocol over TCP, fuzzed ----------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, EchoServer]]:
    """One in-process server per max_line, started on demand (hypothesis runs many examples)."""
    running: dict[int, EchoServer] = {}
    yield running
    for srv in running.values():
        srv.stop(5.0)


def server_for(servers: dict[int, EchoServer], max_line: int) -> EchoServer:
    if max_line not in servers:
        srv = EchoServer(Settings(host="127.0.0.1", port=0, max_line=max_line, control_socket=None))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers[max_line] = srv
    return servers[max_line]


def expected_reply(data: bytes, limit: int) -> bytes:
    """What the server must answer to ``data`` followed by a half-close."""
    out = b""
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        content = line[:-1] if line.endswith(b"\r") and not last else line
        if last:
            # The unfinished tail: cut off once it cannot end within the limit,
            # else answered as a final line at end of input.
            if len(line) > limit + 1 or (len(line) == limit + 1 and not line.endswith(b"\r")):
                return out + line_too_long(limit)
            if not line:
                return out
            return out + (BYE if line.strip().lower() == b"exit" else line)
        if len(content) > limit:
            return out + line_too_long(limit)
        if content.strip().lower() == b"exit":
            return out + BYE
        out += line + b"\n"
    return out


ALPHABET = [b"a", b"b", b"\n", b"\r", b"\r\n", b"\0", b" ", b"exit", b"EXIT", b"xy" * 20]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.integers(1, 64),
    pieces=st.lists(st.sampled_from(ALPHABET), max_size=60),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_line_protocol_over_tcp(
    servers: dict[int, EchoServer], limit: int, pieces: list[bytes], cuts: list[int]
) -> None:
    """Random bytes in random chunks: every line within the limit echoed once, in order;
    nothing beyond the limit is held (a line that breaks it is refused before its newline)."""
    srv = server_for(servers, limit)
    data = b"".join(pieces)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for a, b in itertools.pairwise(points):
                sock.sendall(data[a:b])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first (too long, exit): its answer says why
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # closed with our input unread; what arrived before counts
    assert got == expected_reply(data, limit)


def test_expected_reply_model() -> None:
    """The model above, on cases worked out by hand."""
    assert expected_reply(b"ab\ncd", 2) == b"ab\ncd"
    assert expected_reply(b"abc\n", 2) == b"ERR line too long (max 2 bytes)\n"
    assert expected_reply(b"ab\r\n", 2) == b"ab\r\n"
    assert expected_reply(b"ab\r", 2) == b"ab\r"  # a CR at end of input is content
    assert expected_reply(b"abc", 2) == b"ERR line too long (max 2 bytes)\n"
    assert expected_reply(b"a\n exit \nb\n", 9) == b"a\nbye\n"
    assert expected_reply(b"", 5) == b""
