"""Shared test helpers: clients with timeouts, one line reader, waits, real servers.

Every blocking call here has a timeout, and readiness is awaited (a log line,
a connect), never slept for. The fixtures that hand these out (and end what
they started) are in ``tests/conftest.py``.

- :class:`LineReader`: the one way tests read lines, from a socket or a
  subprocess's pipe; every wait is bounded.
- :class:`Client`: a connected socket plus a :class:`LineReader`;
  :func:`read_answer`: one answer of the control socket.
- :func:`wait_for`: poll a condition until a deadline.
- :func:`flood_until_stalled`: send lines, never reading, until echod stops
  taking them (its handler is blocked sending echoes nobody reads).
- :class:`RunningServer`: an in-process :class:`EchoServer` serving in a thread.
- :class:`EchodProcess`: the real ``echod`` command in a subprocess, its
  stderr read as JSON events.
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
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

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


def installed_echod() -> str | None:
    """The ``echod`` console script of the environment running the tests, else PATH's.

    A venv's ``bin/`` is not on PATH under ``.venv/bin/python -m pytest``, but
    pip put the script next to that interpreter. None means really absent.
    """
    beside = Path(sys.executable).parent / "echod"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("echod")


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


# -- reading lines -----------------------------------------------------------------


class LineReader:
    """Lines from a socket or a pipe, every wait bounded by ``timeout``.

    ``chunk(wait)`` returns the next bytes (``b""`` at end of input), waiting
    at most ``wait`` seconds, or raises :class:`TimeoutError` (``wait=0``:
    never waits). Build one with :meth:`of_socket` or :meth:`of_pipe`.
    """

    def __init__(self, chunk: Callable[[float], bytes], timeout: float = TIMEOUT) -> None:
        self._chunk = chunk
        self.timeout = timeout
        self.buf = b""

    @classmethod
    def of_socket(cls, sock: socket.socket, timeout: float = TIMEOUT) -> LineReader:
        def chunk(wait: float) -> bytes:
            sock.settimeout(wait)
            try:
                return sock.recv(65536)
            except BlockingIOError:  # wait=0 and nothing there
                raise TimeoutError from None
            finally:
                sock.settimeout(timeout)

        return cls(chunk, timeout)

    @classmethod
    def of_pipe(cls, pipe: IO[Any], timeout: float = TIMEOUT) -> LineReader:
        """A reader of a subprocess's pipe (opened in binary mode), fed by a thread.

        A pipe has no timeout of its own, so a daemon thread reads it and the
        reader waits on the thread's queue.
        """
        chunks: queue.Queue[bytes] = queue.Queue()
        fd = pipe.fileno()

        def pump() -> None:
            try:
                while data := os.read(fd, 65536):
                    chunks.put(data)
            except OSError:
                pass  # the owner closed the pipe while we read: that is its end of input
            chunks.put(b"")

        threading.Thread(target=pump, daemon=True).start()
        ended = False

        def chunk(wait: float) -> bytes:
            nonlocal ended
            if ended:
                return b""
            try:
                data = chunks.get(timeout=wait) if wait > 0 else chunks.get_nowait()
            except queue.Empty:
                raise TimeoutError from None
            ended = not data
            return data

        return cls(chunk, timeout)

    def _more(self, wait: float | None) -> bool:
        """Read one chunk into the buffer; False at end of input."""
        limit = self.timeout if wait is None else wait
        try:
            data = self._chunk(limit)
        except TimeoutError:
            raise TimeoutError(f"nothing to read within {limit}s; have {self.buf!r}") from None
        self.buf += data
        return bool(data)

    def readline(self, timeout: float | None = None) -> bytes:
        """One line including its LF; at end of input what is left, then b''.

        Raises :class:`TimeoutError` when a wait for more input exceeds
        ``timeout`` (default: the reader's).
        """
        while b"\n" not in self.buf:
            if not self._more(timeout):
                rest, self.buf = self.buf, b""
                return rest
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer if the input ends first."""
        while len(self.buf) < n and self._more(None):
            pass
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_all(self) -> bytes:
        """Everything until the input ends (EOF or reset)."""
        try:
            while self._more(None):
                pass
        except ConnectionResetError:
            pass
        data, self.buf = self.buf, b""
        return data

    def available(self) -> bytes:
        """Whatever has arrived so far, without waiting."""
        try:
            self._more(0)
        except TimeoutError:
            pass
        data, self.buf = self.buf, b""
        return data


def read_answer(reader: LineReader, cut_short_ok: bool = False) -> list[str]:
    """One answer on the control socket: its lines, up to the empty line that ends it.

    ``[]`` when the input ends before the answer starts. An answer cut short
    by the end of input fails the test, unless ``cut_short_ok`` (then the
    lines that arrived are returned).
    """
    lines: list[str] = []
    while (line := reader.readline()) != b"\n":
        if not line.endswith(b"\n"):
            assert cut_short_ok or not (lines or line), f"answer cut short: {lines} {line!r}"
            return [*lines, line.decode()] if line else lines
        lines.append(line[:-1].decode())
    return lines


class Client:
    """A test client: a connected socket with a timeout and a line reader.

    ``source``: the address to connect from (all of 127/8 is loopback, so
    127.0.0.2, 127.0.0.3, ... are other sources for admission control).
    ``rcvbuf``: a small receive window, so that echod's sends to it stall soon.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = TIMEOUT,
        source: str | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect(): the window is agreed on then
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.port: int = self.sock.getsockname()[1]  # the client's own
        self.reader = LineReader.of_socket(self.sock, timeout)
        self.readline = self.reader.readline
        self.read_exactly = self.reader.read_exactly
        self.read_all = self.reader.read_all

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def roundtrip(self, line: bytes) -> bytes:
        self.send(line)
        return self.readline()

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def echod_command(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m echod ARGS`` to its end (a subcommand, a failing start); text, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "echod", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
        cwd=ROOT,
    )


def ctl(sock: Path, *words: str) -> subprocess.CompletedProcess[str]:
    """``echod ctl`` on the control socket ``sock``."""
    return echod_command("ctl", "--control-socket", str(sock), *words)


def roundtrip_once(port: int, line: bytes = b"ping\n") -> bytes:
    """Connect, send ``line``, return the line that comes back, close."""
    client = Client(port)
    try:
        return client.roundtrip(line)
    finally:
        client.close()


# -- the metrics endpoint ----------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """GET /metrics; the text and its samples, parsed as a Prometheus server reads them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


# -- making echod stall ------------------------------------------------------------


def flood_until_stalled(
    socks: list[socket.socket],
    stall: float = 0.5,
    timeout: float = 60.0,
    dropped_ok: bool = False,
) -> int:
    """Send whole lines on the sockets, never reading, until echod takes no more.

    The server's buffers absorb megabytes first, so "send would block" once
    proves nothing: a client counts as stalled when echod has taken none of
    its bytes for ``stall`` seconds, i.e. its handler is blocked sending
    echoes that are not read. The sockets are made non-blocking. A send that
    fails (echod dropped the client) fails the test unless ``dropped_ok``;
    then that client counts as done. Fails the test if clients are still
    not stalled after ``timeout``. Returns the bytes sent in all.
    """
    lines = b"".join(b"%999d\n" % i for i in range(64))
    for sock in socks:
        sock.setblocking(False)
    pending = {sock: memoryview(lines) for sock in socks}
    progress = dict.fromkeys(socks, time.monotonic())
    dropped: set[socket.socket] = set()
    total = 0
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        active = [s for s in socks if s not in dropped and now - progress[s] < stall]
        if not active:
            return total
        if now > deadline:
            raise AssertionError(f"{len(active)} clients still not stalled after {timeout}s")
        moved = False
        for sock in active:
            try:
                sent = sock.send(pending[sock])
            except BlockingIOError:
                continue
            except OSError:
                if not dropped_ok:
                    raise
                dropped.add(sock)
                continue
            total += sent
            progress[sock] = now
            moved = True
            pending[sock] = pending[sock][sent:] or memoryview(lines)
        if not moved:
            time.sleep(0.005)


# -- servers -----------------------------------------------------------------------


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


class EchodProcess:
    """The real ``echod`` command in a subprocess, its stderr parsed as JSON events."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        ready_event: str = "listening",
        cwd: Path = ROOT,
        program: list[str] | None = None,
    ) -> None:
        """``program``: what to run instead of ``python -m echod`` (a wrapper and a path)."""
        cmd = [*(program or [sys.executable, "-m", "echod"]), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []
        self.raw_stderr: list[str] = []
        assert self.proc.stderr is not None
        self._stderr = LineReader.of_pipe(self.proc.stderr)
        try:
            self.listening = self.wait_event(ready_event)
        except BaseException:  # nobody holds this object to stop it: end the process here
            self.stop()
            raise
        self.port: int = int(self.listening.get("port", 0))

    def _take(self, timeout: float) -> bool:
        """Take in one stderr line, waiting up to ``timeout``; False once stderr is closed."""
        try:
            raw = self._stderr.readline(timeout)
        except TimeoutError:
            return True
        if not raw:
            return False
        line = raw.decode("utf-8", "replace")
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
                raise AssertionError(
                    f"echod exited ({self.proc.returncode}) before {name!r}; "
                    f"stderr: {''.join(self.raw_stderr)[-2000:]}"
                )

    def wait_line(self, text: str, timeout: float = TIMEOUT) -> str:
        """The first stderr line containing ``text``, JSON or not, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in self.raw_stderr if text in line), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._take(min(remaining, 0.1)):
                raise AssertionError(f"no line with {text!r}; stderr: {''.join(self.raw_stderr)}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the exit status, then take in the rest of stderr (bounded too)."""
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + TIMEOUT
        while self._take(0.2) and time.monotonic() < deadline:
            pass
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)
