"""Shared fixtures: real servers on loopback, clients with timeouts, waiting helpers.

Every blocking call here has a timeout, and readiness is awaited (a log line,
a connect), never slept for.

- ``make_server(**settings)``: an in-process :class:`EchoServer` on
  127.0.0.1, port 0, serving in a thread; stopped at teardown.
- ``server``: ``make_server()`` with the defaults.
- ``connect(port, host=...)``: a :class:`Client` (socket + line reader) whose
  every call has a timeout; closed at teardown.
- ``spawn_echod(*args)``: the real ``echod`` command as a subprocess
  (``python -m echod --foreground --port 0 --control-socket none`` + args),
  its port read from the ``listening`` log line; ended by PID at teardown.
- :func:`wait_for`: poll a condition until a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from echod import logs
from echod.config import Settings
from echod.connection import Connection
from echod.registry import Registry
from echod.server import EchoServer

TIMEOUT = 10.0  # the longest any single blocking call in a test may take
ROOT = Path(__file__).resolve().parent.parent


# Socket activation as systemd does it, for the tests of echod.systemd and of
# echod.socket: move the inherited fds to 3, 4, ..., set LISTEN_PID (to the
# process's own pid unless told otherwise), LISTEN_FDS and LISTEN_FDNAMES,
# and exec, which keeps the pid. argv: <fd,fd,...> <LISTEN_PID or "self"> <cmd...>
ACTIVATE_WRAPPER = r"""
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
# Park copies above any target fd first, so moving to 3.. clobbers nothing.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # dup2 makes the target inheritable
    os.close(fd)
pid = sys.argv[2]
os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_FDNAMES"] = ":".join("x%d" % i for i in range(len(fds)))
os.execv(sys.argv[3], sys.argv[3:])
"""


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_for(
    condition: Callable[[], Any],
    timeout: float = TIMEOUT,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Return condition()'s first truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Client:
    """A test client: a connected socket with a timeout and a line reader."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        """One line including its LF; b'' at EOF (with any unterminated rest first)."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self._buf = self._buf, b""
                return rest
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_all(self) -> bytes:
        """Everything until the server closes (EOF or reset)."""
        chunks = [self._buf]
        self._buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def roundtrip(self, line: bytes) -> bytes:
        self.send(line)
        return self.readline()

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def roundtrip_once(port: int, line: bytes = b"ping\n") -> bytes:
    """Connect, send ``line``, return the line that comes back, close."""
    client = Client(port)
    try:
        return client.roundtrip(line)
    finally:
        client.close()


class RunningServer:
    """An in-process EchoServer serving in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.registry: Registry[Connection] = Registry()
        self.server = EchoServer(settings, self.registry)
        self.settings = settings
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.stopped = False

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 5.0) -> bool:
        if self.stopped:
            return True
        self.stopped = True
        done = self.server.stop(timeout)
        self.thread.join(TIMEOUT)
        return done


@pytest.fixture
def ctl_dir() -> Iterator[Path]:
    """A short private directory under /tmp (sun_path is 108 bytes; pytest's are long)."""
    path = Path(tempfile.mkdtemp(prefix="echod-ctl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class CapturedLogs:
    """structlog events captured as dicts (JSON lines written to a pipe-like list)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                with self._lock:
                    self.events.append(json.loads(line))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event]


@pytest.fixture
def captured_logs() -> Iterator[CapturedLogs]:
    captured = CapturedLogs()
    logs.configure("debug", "json", captured)
    yield captured
    logs.configure("info", "json", sys.stderr)


@pytest.fixture
def make_server() -> Iterator[Callable[..., RunningServer]]:
    servers: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        base = Settings(host="127.0.0.1", port=0, control_socket=None, foreground=True)
        running = RunningServer(replace(base, **overrides))
        servers.append(running)
        return running

    yield make
    for running in servers:
        running.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> Client:
        client = Client(port, host, timeout)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class EchodProcess:
    """The real ``echod`` command in a subprocess, its stderr parsed as JSON events."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, ready_event: str = "listening"
    ) -> None:
        cmd = [sys.executable, "-m", "echod", *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []
        self.raw_stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.listening = self.wait_event(ready_event)
        self.port: int = int(self.listening.get("port", 0))

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def _take(self, timeout: float) -> bool:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            return False
        self.raw_stderr.append(line)
        try:
            self.events.append(json.loads(line))
        except ValueError:
            pass
        return True

    def wait_event(
        self,
        name: str,
        timeout: float = TIMEOUT,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
    ) -> dict[str, Any]:
        """The first event called ``name`` (matching ``where``), waiting for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("event") == name and where(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {name!r} event within {timeout}s; "
                    f"stderr: {''.join(self.raw_stderr)[-2000:]}"
                )
            if not self._take(min(remaining, 0.1)) and self.proc.poll() is not None:
                # stderr closed: drain whatever is queued, then give up
                while self._take(0) and not self._lines.empty():
                    pass
                for event in self.events[seen:]:
                    if event.get("event") == name and where(event):
                        return event
                raise AssertionError(
                    f"echod exited ({self.proc.returncode}) before {name!r}; "
                    f"stderr: {''.join(self.raw_stderr)[-2000:]}"
                )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        while self._take(0.2):
            pass
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)


@pytest.fixture
def spawn_echod() -> Iterator[Callable[..., EchodProcess]]:
    procs: list[EchodProcess] = []

    def spawn(
        *args: str,
        env: dict[str, str] | None = None,
        default_args: bool = True,
        ready_event: str = "listening",
    ) -> EchodProcess:
        base = (
            ["--foreground", "--port", "0", "--control-socket", "none", "--log-format", "json"]
            if default_args
            else []
        )
        proc = EchodProcess([*base, *args], env=env, ready_event=ready_event)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.stop()
