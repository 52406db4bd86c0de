"""The operator interfaces of the real ``echod`` command, as an operator uses them.

Real processes only: ``echod`` serving (in the foreground with stdin a pipe,
and detached), ``echod ctl`` and ``echod console`` as commands,
``socat`` on the control socket and ``nc`` as the client that receives the
pushes; the consoles at a terminal are in test_consoles.py. Every control
socket lives in its own short directory under /tmp (sun_path holds 107
bytes, pytest's directories are long).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from echod.pidfile import is_alive
from tests.helpers import (
    ROOT,
    TIMEOUT,
    Client,
    EchodProcess,
    LineReader,
    roundtrip_once,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def run_echod(
    *args: str, stdin: bytes | str = b"", text: bool = False
) -> subprocess.CompletedProcess[Any]:
    """``python -m echod ARGS`` to completion (``ctl``, ``console``, a failing start)."""
    data: bytes | str = stdin.decode() if text and isinstance(stdin, bytes) else stdin
    return subprocess.run(
        [sys.executable, "-m", "echod", *args],
        input=data,
        capture_output=True,
        text=text,
        timeout=3 * TIMEOUT,
        cwd=ROOT,
    )


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = run_echod(
        "ctl", "--control-socket", str(path), *args, text=True
    )
    return result


@pytest.fixture
def sock_path(ctl_dir: Path) -> Path:
    return ctl_dir / "run" / "control.sock"


@pytest.fixture
def daemon(spawn_echod: Callable[..., EchodProcess], sock_path: Path) -> EchodProcess:
    return spawn_echod("--control-socket", str(sock_path))


class Reader:
    """Lines from a child's output stream, collected by a thread; waits have deadlines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.reader = LineReader.of_pipe(stream)
        self.seen: list[bytes] = []

    def next(self, timeout: float = TIMEOUT) -> bytes | None:
        """The next line (None at end of stream)."""
        line = self.reader.readline(timeout)
        if not line:
            return None
        self.seen.append(line)
        return line

    def wait_for(self, pattern: bytes, timeout: float = TIMEOUT) -> bytes:
        """The first line from now on that contains ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {pattern!r} within {timeout}s; seen: {b''.join(self.seen)[-2000:]!r}"
                )
            try:
                line = self.next(remaining)
            except TimeoutError:
                continue
            if line is None:
                raise AssertionError(
                    f"stream ended before {pattern!r}; seen: {b''.join(self.seen)[-2000:]!r}"
                )
            if pattern in line:
                return line


@pytest.fixture
def nc_client() -> Iterator[Callable[[int], tuple[subprocess.Popen[bytes], Reader]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> tuple[subprocess.Popen[bytes], Reader]:
        proc = subprocess.Popen(
            ["nc", "127.0.0.1", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        assert proc.stdout is not None
        return proc, Reader(proc.stdout)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)


# -- echod ctl ---------------------------------------------------------------------


def test_ctl_sees_and_pushes_to_an_nc_client(
    daemon: EchodProcess, sock_path: Path, nc_client: Callable[..., Any]
) -> None:
    nc, out = nc_client(daemon.port)
    nc.stdin.write(b"hi\n")
    nc.stdin.flush()
    assert out.next() == b"hi\n"

    listed = ctl(sock_path, "list")
    assert listed.returncode == 0, listed.stderr
    head, row = listed.stdout.splitlines()
    assert head == "OK 1 client"
    fields = dict(item.split("=", 1) for item in row.split())
    assert fields["bytes_in"] == "3" and fields["lines_in"] == "1"
    cid = fields["id"]

    sent = ctl(sock_path, "send", cid, "hello", "there")
    assert (sent.returncode, sent.stdout, sent.stderr) == (0, f"OK sent to client {cid}\n", "")
    assert out.next() == b"Server says: hello there\n"

    sent = ctl(sock_path, "broadcast", "maintenance", "at", "5")
    assert (sent.returncode, sent.stdout) == (0, "OK sent to 1 client\n")
    assert out.next() == b"Server says: maintenance at 5\n"

    stats = ctl(sock_path, "stats")
    assert stats.returncode == 0
    assert "connected=1" in stats.stdout.splitlines()

    kicked = ctl(sock_path, "kick", cid, "going", "down")
    assert (kicked.returncode, kicked.stdout) == (0, f"OK kicked client {cid}\n")
    assert out.next() == b"Server says: going down\n"
    event = daemon.wait_event("connection_closed")
    assert event["reason"] == "kicked"


def test_ctl_exit_codes(daemon: EchodProcess, sock_path: Path, ctl_dir: Path) -> None:
    ok = ctl(sock_path, "list")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "OK 0 clients\n", "")
    slash = ctl(sock_path, "/list")  # the console spelling works too
    assert (slash.returncode, slash.stdout) == (0, "OK 0 clients\n")

    unknown_id = ctl(sock_path, "send", "99", "hi")
    assert (unknown_id.returncode, unknown_id.stdout) == (1, "")
    assert unknown_id.stderr == "ERR no client 99 (see /list)\n"

    unknown = ctl(sock_path, "frobnicate")
    assert (unknown.returncode, unknown.stderr) == (
        1,
        "ERR unknown command '/frobnicate' (try /help)\n",
    )

    multi = ctl(sock_path, "broadcast", "two\nlines")
    assert (multi.returncode, multi.stderr) == (1, "ERR text must be one line (no CR or LF)\n")

    long = ctl(sock_path, "broadcast", "x" * 1025)
    assert (long.returncode, long.stderr) == (1, "ERR text too long (1025 bytes, max 1024)\n")

    usage = ctl(sock_path)
    assert usage.returncode == 2
    assert usage.stderr.startswith("echod: ") and len(usage.stderr.splitlines()) == 1

    # Usage mistakes only the daemon can see are usage errors too.
    for words, answer in [
        (["send"], "ERR usage: /send ID TEXT\n"),
        (["kick"], "ERR usage: /kick ID [REASON]\n"),
        (["list", "all"], "ERR usage: /list (no arguments)\n"),
    ]:
        bad = ctl(sock_path, *words)
        assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", answer), words

    nowhere = ctl_dir / "nothing-here.sock"
    missing = ctl(nowhere, "list")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == f"echod: no echod is listening on control socket {nowhere}\n"


def test_ctl_on_a_stale_socket_file_says_no_daemon(ctl_dir: Path) -> None:
    path = ctl_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    result = ctl(path, "list")
    assert result.returncode == 1
    assert result.stderr == f"echod: no echod is listening on control socket {path}\n"


def full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A Unix listener that accepts nobody, its queue filled (as a busy or stopped echod's)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    for _ in range(64):  # Linux queues backlog + 1; bounded whatever the kernel does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:  # EAGAIN: the queue is full
            sock.close()
            return listener, queued
        queued.append(sock)
    raise AssertionError("the listen queue never filled up")


def test_ctl_waits_for_a_full_listen_queue_until_its_timeout(ctl_dir: Path) -> None:
    path = ctl_dir / "busy.sock"
    listener, queued = full_listener(path)
    try:
        started = time.monotonic()
        result = run_echod(
            "ctl", "--control-socket", str(path), "--timeout", "1", "list", text=True
        )
        assert time.monotonic() - started >= 1.0  # it waited the whole --timeout
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == (
            f"echod: echod did not accept a connection within 1 s on control socket {path}"
            " (it is busy or stopped)\n"
        )

        # A queue that drains while ctl waits lets it through.
        proc = subprocess.Popen(
            [sys.executable, "-m", "echod", "ctl", "--control-socket", str(path), "list"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            for sock in queued:  # accept (and drop) the connections that filled the queue
                sock.close()
                listener.settimeout(TIMEOUT)
                listener.accept()[0].close()
            conn, _ = listener.accept()  # ctl's, after its retries
            with conn:
                conn.settimeout(TIMEOUT)
                assert conn.recv(100) == b"/list\n"
                conn.sendall(b"OK 0 clients\n\n")
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
        assert (proc.returncode, out, err) == (0, b"OK 0 clients\n", b"")
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_ctl_shutdown_stops_echod_and_removes_the_socket(
    daemon: EchodProcess, sock_path: Path
) -> None:
    client = Client(daemon.port)
    try:
        assert client.roundtrip(b"hi\n") == b"hi\n"
        result = ctl(sock_path, "shutdown")
        assert (result.returncode, result.stdout) == (0, "OK shutting down\n")
        assert client.read_all() == b"Server shutting down\n"
    finally:
        client.close()
    assert daemon.wait() == 0
    assert daemon.wait_event("stopping")["reason"] == "operator"
    assert not sock_path.exists()
    after = ctl(sock_path, "list")
    assert after.returncode == 1 and "no echod is listening" in after.stderr


# -- socat and echod console ---------------------------------------------------------


def test_plain_socat_session(daemon: EchodProcess, sock_path: Path) -> None:
    result = subprocess.run(
        ["socat", "-t", "5", "-", f"UNIX-CONNECT:{sock_path}"],
        input=b"/list\n/bogus\n\n/stats\n",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    answers = result.stdout.decode().split("\n\n")
    assert answers[0] == "OK 0 clients"
    assert answers[1] == "ERR unknown command '/bogus' (try /help)"
    assert answers[2].startswith("OK stats\nconnected=0\n")
    assert answers[3:] == [""]  # every answer, the last included, ends with an empty line


def test_echod_console_session_from_a_pipe(
    daemon: EchodProcess, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python's stdin as under a UTF-8 locale such as en_US.UTF-8 (which this machine may
    # lack): strict about bytes that are not UTF-8. Under C or C.UTF-8 it is lenient.
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8:strict")
    client = Client(daemon.port)
    try:
        result = run_echod(
            "console",
            "--control-socket",
            str(sock_path),
            stdin=b"/list\n\nhello from the console\n/send 99 x\ncaf\xc3\xa9 \xff\xfe\n",
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().splitlines()
        assert lines[0] == "OK 1 client"
        assert lines[1].startswith("id=")
        assert lines[2:] == [
            "OK sent to 1 client",
            "ERR no client 99 (see /list)",
            "OK sent to 1 client",
        ]
        assert client.readline() == b"Server says: hello from the console\n"
        # Bytes that are not UTF-8 pass through unchanged, as over socat.
        assert client.readline() == b"Server says: caf\xc3\xa9 \xff\xfe\n"
    finally:
        client.close()


def test_echod_console_without_a_daemon(ctl_dir: Path) -> None:
    path = ctl_dir / "none.sock"
    result = run_echod("console", "--control-socket", str(path), text=True)
    assert result.returncode == 1
    assert result.stderr == f"echod: no echod is listening on control socket {path}\n"


# -- the control socket's life ----------------------------------------------------------


def test_a_second_echod_on_the_same_control_socket_is_refused(
    daemon: EchodProcess, sock_path: Path
) -> None:
    result = run_echod("--foreground", "--port", "0", "--control-socket", str(sock_path), text=True)
    assert result.returncode == 1
    assert result.stderr == (
        f"echod: another echod is already listening on control socket {sock_path}\n"
    )
    assert ctl(sock_path, "list").returncode == 0  # the first one is untouched


def test_a_killed_echods_socket_is_recovered(
    spawn_echod: Callable[..., EchodProcess], sock_path: Path
) -> None:
    first = spawn_echod("--control-socket", str(sock_path))
    first.signal(signal.SIGKILL)
    first.wait()
    assert sock_path.is_socket()  # left behind: nobody removed it
    second = spawn_echod("--control-socket", str(sock_path))
    second.wait_event("control_socket_stale_removed")
    assert ctl(sock_path, "list").stdout == "OK 0 clients\n"


def test_an_unusable_control_socket_path_is_one_sentence(ctl_dir: Path) -> None:
    (ctl_dir / "file").write_text("")
    path = ctl_dir / "file" / "control.sock"
    result = run_echod("--foreground", "--port", "0", "--control-socket", str(path), text=True)
    assert result.returncode == 1
    assert result.stderr == f"echod: control socket directory {path.parent} is not a directory\n"


def test_detached_echod_is_operated_through_the_socket(ctl_dir: Path, sock_path: Path) -> None:
    log = ctl_dir / "echod.log"
    started = run_echod(
        "--port",
        "0",
        "--control-socket",
        str(sock_path),
        "--pidfile",
        str(ctl_dir / "echod.pid"),
        "--log-file",
        str(log),
        text=True,
    )
    assert started.returncode == 0, started.stderr
    match = re.search(r":(\d+) \(pid (\d+)\)", started.stdout)
    assert match, started.stdout
    port, pid = int(match[1]), int(match[2])
    try:
        client = Client(port)
        try:
            assert client.roundtrip(b"hello\n") == b"hello\n"
            listed = ctl(sock_path, "list")
            assert listed.returncode == 0 and listed.stdout.startswith("OK 1 client\n")
            assert ctl(sock_path, "broadcast", "from afar").returncode == 0
            assert client.readline() == b"Server says: from afar\n"
            assert ctl(sock_path, "shutdown").stdout == "OK shutting down\n"
            assert client.read_all() == b"Server shutting down\n"
        finally:
            client.close()
        wait_for(lambda: not is_alive(pid), what="the daemon to exit")
        assert not sock_path.exists()
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(
            e["event"] == "operator_command" and e.get("command") == "shutdown" for e in events
        )
    finally:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- the terminal console -----------------------------------------------------------------


class StdinEchod:
    """echod --foreground with stdin, stdout and stderr all pipes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
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
                "json",
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.proc.stdout and self.proc.stderr and self.proc.stdin
        self.stdin = self.proc.stdin
        self.out = Reader(self.proc.stdout)
        self.err = Reader(self.proc.stderr)
        self.port = int(json.loads(self.err.wait_for(b'"listening"'))["port"])

    def send(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


def test_console_flag_reads_commands_from_stdin(nc_client: Callable[..., Any]) -> None:
    echod = StdinEchod("--console")
    try:
        nc, out = nc_client(echod.port)
        nc.stdin.write(b"x\n")
        nc.stdin.flush()
        assert out.next() == b"x\n"  # connected and served
        echod.send(b"/list\n")
        assert echod.out.next() == b"OK 1 client\n"
        assert echod.out.next().startswith(b"id=")  # type: ignore[union-attr]
        echod.send(b"hello from the terminal\n")
        assert echod.out.next() == b"OK sent to 1 client\n"
        assert out.next() == b"Server says: hello from the terminal\n"
        echod.send(b"/nope\n")
        assert echod.out.next() == b"ERR unknown command '/nope' (try /help)\n"
        # End of input ends the console, not the server.
        echod.stdin.close()
        echod.err.wait_for(b'"console_closed"')
        assert roundtrip_once(echod.port, b"still serving\n") == b"still serving\n"
        assert echod.proc.poll() is None
        echod.proc.send_signal(signal.SIGTERM)
        assert echod.proc.wait(TIMEOUT) == 0
    finally:
        echod.stop()


def test_console_shutdown_from_stdin() -> None:
    echod = StdinEchod("--console")
    try:
        echod.send(b"/shutdown\n")
        assert echod.out.next() == b"OK shutting down\n"
        assert echod.proc.wait(TIMEOUT) == 0
    finally:
        echod.stop()


def test_no_console_without_a_terminal() -> None:
    echod = StdinEchod()  # stdin is a pipe, not a TTY, and no --console
    try:
        echod.send(b"/shutdown\n")
        echod.stdin.close()
        assert roundtrip_once(echod.port) == b"ping\n"  # ignored: still serving
        assert echod.proc.poll() is None
        echod.proc.send_signal(signal.SIGTERM)
        assert echod.proc.wait(TIMEOUT) == 0
        assert echod.out.next() is None  # nothing was ever answered on stdout
    finally:
        echod.stop()
