"""The real ``echod --foreground`` process, driven the way an operator and a netcat user would.

echod runs as a subprocess (``spawn_echod``: ``python -m echod --foreground
--port 0 ...``); its port comes from the ``listening`` log event. Clients are
Debian's ``nc`` (netcat-openbsd) with piped input, or an ``nc`` kept open
through pipes like an interactive session. Every subprocess call and every
read has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from echod import __version__
from tests.helpers import (
    ROOT,
    TIMEOUT,
    EchodProcess,
    LineReader,
    has_ipv6_loopback,
    installed_echod,
)

Spawn = Callable[..., EchodProcess]


NC = shutil.which("nc")
ECHOD = installed_echod()
pytestmark = pytest.mark.skipif(NC is None, reason="nc (netcat-openbsd) is not installed")

COMMANDS = [
    pytest.param([sys.executable, "-m", "echod"], id="python-m-echod"),
    pytest.param(
        [ECHOD or "echod"],
        id="echod-script",
        marks=pytest.mark.skipif(
            ECHOD is None, reason="the echod console script is not installed (pip install -e .)"
        ),
    ),
]


def nc(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Pipe ``data`` through ``nc -N`` (shut down the socket at end of input); its output."""
    done = subprocess.run(
        [NC or "nc", "-N", host, str(port)],
        input=data,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Netcat:
    """``nc`` kept open through pipes, as a person typing lines into it."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.proc = subprocess.Popen(
            [NC or "nc", "-N", host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader.of_pipe(self.proc.stdout)
        self.readline = self.reader.readline

    def type(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def quit(self) -> int:
        """Close nc's input (Ctrl-D) and wait for it to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


@pytest.fixture
def netcat() -> Iterator[Callable[..., Netcat]]:
    sessions: list[Netcat] = []

    def start(port: int, host: str = "127.0.0.1") -> Netcat:
        session = Netcat(port, host)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.kill()


def run(cmd: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("echod: ")
    assert done.stdout == ""
    return lines[0]


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def all_json(proc: EchodProcess) -> None:
    """Every stderr line was one JSON event: no tracebacks, no stray prints."""
    assert proc.raw_stderr, "no log output"
    for line in proc.raw_stderr:
        assert isinstance(json.loads(line), dict), line


# -- serving -----------------------------------------------------------------------------


def test_nc_session_and_sigterm(spawn_echod: Spawn, netcat: Callable[..., Netcat]) -> None:
    echod = spawn_echod()
    listening = echod.listening
    assert listening["host"] == "127.0.0.1"
    assert listening["pid"] == echod.pid
    assert listening["max_line"] == 1024
    assert 0 < echod.port < 65536

    data = b"hello\nworld\r\n\n\x00nul\xff\xfe invalid utf-8\nno newline at the end"
    assert nc(echod.port, data) == data
    assert nc(echod.port, b"one\n EXIT \r\nnot echoed\n") == b"one\nbye\n"

    user = netcat(echod.port)
    user.type(b"typed by hand\n")
    assert user.readline() == b"typed by hand\n"
    echod.signal(signal.SIGTERM)
    assert user.readline() == b"Server shutting down\n"
    assert echod.wait() == 0
    # netcat-openbsd keeps running on its input after the server closed; Ctrl-D ends it.
    assert user.quit() == 0
    assert user.readline() == b""

    stopping = echod.wait_event("stopping")
    assert stopping["reason"] == "SIGTERM"
    assert stopping["clients"] == 1
    closed = [e for e in echod.events if e["event"] == "connection_closed"]
    assert [e["reason"] for e in closed] == ["eof", "exit", "shutdown"]
    assert echod.wait_event("stopped")["served"] == 3
    all_json(echod)


def test_sigint_with_idle_clients(spawn_echod: Spawn) -> None:
    echod = spawn_echod("--log-level", "debug")
    idle = [socket.create_connection(("127.0.0.1", echod.port), timeout=TIMEOUT) for _ in range(3)]
    try:
        echod.wait_event("connection_opened", where=lambda e: e["client"] == 3)
        echod.signal(signal.SIGINT)
        for sock in idle:
            assert read_to_eof(sock) == b"Server shutting down\n"
        assert echod.wait() == 0
    finally:
        for sock in idle:
            sock.close()
    assert echod.wait_event("stopping")["reason"] == "SIGINT"
    closed = [e for e in echod.events if e["event"] == "connection_closed"]
    assert sorted(e["client"] for e in closed) == [1, 2, 3]
    assert {e["reason"] for e in closed} == {"shutdown"}
    all_json(echod)


def test_max_line_option(spawn_echod: Spawn) -> None:
    echod = spawn_echod("--max-line", "8")
    assert echod.listening["max_line"] == 8
    assert nc(echod.port, b"12345678\n87654321\r\n") == b"12345678\n87654321\r\n"
    assert nc(echod.port, b"ok\n123456789\nnever\n") == b"ok\nERR line too long (max 8 bytes)\n"
    echod.signal()
    assert echod.wait() == 0
    closed = [e for e in echod.events if e["event"] == "connection_closed"]
    assert [e["reason"] for e in closed] == ["eof", "line_too_long"]


# The second stop signal, sent this long after the first: before, during and after
# the graceful stop (which logs `stopped` about 0.1 s after the first signal).
SECOND_SIGNAL_DELAYS = (0.0, 0.03, 0.06, 0.1, 0.13, 0.16, 0.2)


def _client_connected(echod: EchodProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", echod.port), timeout=TIMEOUT)
    sock.sendall(b"hi\n")
    assert sock.recv(16) == b"hi\n"
    return sock


def test_a_second_stop_signal_at_any_moment_exits_0_or_1(spawn_echod: Spawn) -> None:
    """Never killed by the signal (-15): 1 if it came while stopping, 0 once stopped."""
    for delay in SECOND_SIGNAL_DELAYS:
        echod = spawn_echod()
        with _client_connected(echod):
            echod.signal(signal.SIGTERM)
            time.sleep(delay)  # a timing to try, not a wait for something
            echod.signal(signal.SIGTERM)
            assert echod.wait() in (0, 1), f"second SIGTERM {delay} s after the first"
        assert "Traceback" not in "".join(echod.raw_stderr)


def test_stop_signals_after_stopped_leave_exit_status_0(spawn_echod: Spawn) -> None:
    """SIGTERM, SIGINT and SIGHUP without pause from `stopped` until the process is gone.

    This covers the interpreter's teardown, when Python has put the signals it
    handled back to their default action (death by the signal).
    """
    echod = spawn_echod()
    with _client_connected(echod):
        echod.signal(signal.SIGTERM)
        echod.wait_event("stopped")
        deadline = time.monotonic() + TIMEOUT
        sent = 0
        while echod.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(echod.pid, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)[sent % 3])
            sent += 1
            time.sleep(0.0005)
        assert echod.wait() == 0, f"after {sent} signals"


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback(spawn_echod: Spawn) -> None:
    echod = spawn_echod("--host", "::1")
    assert echod.listening["host"] == "::1"
    assert nc(echod.port, b"over ipv6\n", host="::1") == b"over ipv6\n"
    echod.signal()
    assert echod.wait() == 0
    (closed,) = [e for e in echod.events if e["event"] == "connection_closed"]
    assert closed["peer"].startswith("[::1]:")


def test_console_log_format(netcat: Callable[..., Netcat]) -> None:
    """--log-format console: human key=value lines, no JSON, no colours off a terminal."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "echod",
            "--foreground",
            "--port",
            "0",
            "--control-socket",
            "none",
            "--log-format",
            "console",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    lines = LineReader.of_pipe(proc.stderr)
    try:
        first = lines.readline().decode()
        assert "listening" in first, first
        found = re.search(r"\bport=(\d+)\b", first)
        assert found, first
        port = int(found.group(1))
        assert nc(port, b"hi\n") == b"hi\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    rest: list[str] = [first]
    while raw := lines.readline():
        rest.append(raw.decode())
    assert [
        name
        for name in ("listening", "connection_closed", "stopping", "stopped")
        if any(name in line for line in rest)
    ] == ["listening", "connection_closed", "stopping", "stopped"]
    for line in rest:
        with pytest.raises(ValueError):
            json.loads(line)
        assert "\x1b[" not in line
        assert re.search(r"\b\w+=\S", line), line
    assert "reason=eof" in next(line for line in rest if "connection_closed" in line)


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_and_version(cmd: list[str]) -> None:
    helped = run(cmd, "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: echod")
    assert "--max-line" in helped.stdout
    assert helped.stderr == ""
    version = run(cmd, "--version")
    assert version.returncode == 0
    assert version.stdout == f"echod {__version__}\n"


@pytest.mark.skipif(
    ECHOD is None, reason="the echod console script is not installed (pip install -e .)"
)
def test_python_m_echod_is_echod() -> None:
    for args in (["--help"], ["--version"], ["--port", "x"], ["--nope"]):
        module = run([sys.executable, "-m", "echod"], *args)
        script = run([ECHOD or "echod"], *args)
        assert (module.returncode, module.stdout, module.stderr) == (
            script.returncode,
            script.stdout,
            script.stderr,
        ), args


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (["--bogus"], 2, "echod: unrecognized arguments: --bogus (see 'echod --help')"),
        (
            ["--port", "65536"],
            2,
            "echod: argument --port: 65536 is out of range (must be from 0 to 65535) "
            "(see 'echod --help')",
        ),
        (
            ["--port", "seven"],
            2,
            "echod: argument --port: 'seven' is not a whole number (see 'echod --help')",
        ),
        (
            ["--foreground", "--host", "192.0.2.1", "--port", "0", "--control-socket", "none"],
            1,
            "echod: cannot listen on 192.0.2.1:0: that address is not on this machine",
        ),
    ],
    ids=["bad-flag", "port-out-of-range", "port-not-a-number", "unbindable-address"],
)
def test_errors_are_one_sentence(
    cmd: list[str], args: list[str], status: int, expected: str
) -> None:
    done = run(cmd, *args)
    assert one_error_line(done) == expected
    assert done.returncode == status


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--shutdown-timeout", "1e10"],
            "echod: argument --shutdown-timeout: must be at most 86400 seconds (one day) "
            "(see 'echod --help')",
        ),
        (
            ["--send-timeout", "1e10"],
            "echod: argument --send-timeout: must be at most 86400 seconds (one day) "
            "(see 'echod --help')",
        ),
        (
            ["--idle-timeout", "-1"],
            "echod: argument --idle-timeout: must be 0 or more seconds (see 'echod --help')",
        ),
        (
            ["--log-file", "x.log"],
            "echod: --log-file is for detached mode; with --foreground, echod logs to "
            "stderr and keeps no pidfile",
        ),
        (
            ["--pidfile", "x.pid"],
            "echod: --pidfile is for detached mode; with --foreground, echod logs to "
            "stderr and keeps no pidfile",
        ),
    ],
    ids=["huge-shutdown-timeout", "huge-send-timeout", "negative-timeout", "log-file", "pidfile"],
)
def test_bad_daemon_options_are_usage_errors(args: list[str], expected: str) -> None:
    done = run([sys.executable, "-m", "echod"], "--foreground", "--port", "0", *args)
    assert one_error_line(done) == expected
    assert done.returncode == 2


def test_the_longest_timeouts_still_stop_cleanly(spawn_echod: Spawn, tmp_path: Path) -> None:
    """--shutdown-timeout and --send-timeout at their upper bound: no OverflowError anywhere."""
    control = tmp_path / "control.sock"
    echod = spawn_echod(
        "--shutdown-timeout", "86400", "--send-timeout", "86400", "--control-socket", str(control)
    )
    with _client_connected(echod):
        asked = run(
            [sys.executable, "-m", "echod"], "ctl", "--control-socket", str(control), "list"
        )
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.startswith("OK 1 client"), asked.stdout
        echod.signal(signal.SIGTERM)
        assert echod.wait() == 0
    assert "Traceback" not in "".join(echod.raw_stderr)
    assert echod.wait_event("stopped")


def test_port_in_use(spawn_echod: Spawn) -> None:
    first = spawn_echod()
    done = run(
        [sys.executable, "-m", "echod"],
        "--foreground",
        "--port",
        str(first.port),
        "--control-socket",
        "none",
        "--log-format",
        "json",
    )
    assert done.returncode == 1
    assert one_error_line(done) == (
        f"echod: cannot listen on 127.0.0.1:{first.port}: the address is already in use"
    )
    assert nc(first.port, b"first still serves\n") == b"first still serves\n"


def test_no_traceback_when_a_client_vanishes(spawn_echod: Spawn) -> None:
    """A client that resets mid-burst ends as one connection_closed line, nothing more."""
    echod = spawn_echod()
    sock = socket.create_connection(("127.0.0.1", echod.port), timeout=TIMEOUT)
    sock.sendall(b"x\n" * 50_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST with unread echoes pending
    closed: dict[str, Any] = echod.wait_event("connection_closed")
    assert closed["reason"] in ("reset", "eof", "slow_reader")
    echod.signal()
    assert echod.wait() == 0
    all_json(echod)


def test_a_reader_that_left_early_gets_no_traceback(
    spawn_echod: Callable[..., EchodProcess], ctl_dir: Path
) -> None:
    # echod ctl stats | head -1: our stdout is a pipe nobody reads any more.
    sock = str(ctl_dir / "ctl.sock")
    spawn_echod("--control-socket", sock)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "echod", "ctl", "--control-socket", sock, "stats"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
            cwd=ROOT,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr
