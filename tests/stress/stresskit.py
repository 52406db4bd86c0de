"""Tools for the adversarial suite: thousands of clients from one thread, /proc readings.

A thread per test client would measure the test, not echod, on a 2-core
machine, so :class:`Swarm` drives every socket from the calling thread with a
selector. Every wait is bounded; a timeout raises AssertionError with a
summary of what was missing.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tests.helpers import LineReader, read_answer

CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


def raise_own_nofile() -> int:
    """Raise this process's soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True)
class Sample:
    """One reading of a process from /proc."""

    threads: int
    rss: int  # bytes
    cpu: float  # user + system seconds

    @property
    def rss_mib(self) -> float:
        return round(self.rss / MiB, 1)


def sample(pid: int) -> Sample:
    threads = rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return Sample(threads, rss, cpu)


def settled(pid: int, quiet: float = 0.2, timeout: float = 10.0) -> Sample:
    """A sample once the thread count has not changed for ``quiet`` seconds.

    A handler logs ``connection_closed`` just before its thread ends, so a
    count still moving means threads are still ending. Fails the test if the
    count has not held still within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last = sample(pid)
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"thread count of {pid} still changing after {timeout}s (now {last.threads})"
            )
        time.sleep(0.02)
        now = sample(pid)
        if now.threads != last.threads:
            since = time.monotonic()
        last = now
    return last


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_threads(pid: int, threads: int, timeout: float) -> Sample:
    """Wait until the process is back to ``threads`` threads; return that sample."""
    deadline = time.monotonic() + timeout
    while True:
        now = sample(pid)
        if now.threads <= threads:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(
                f"threads did not return to {threads} within {timeout}s: {now.threads}"
            )
        time.sleep(0.05)


class Swarm:
    """Many client sockets on one selector, driven by the calling thread.

    Client ``i`` is ``socks[i]``; what it received is ``inbox[i]``; ``eof[i]``
    says the server closed it (EOF or reset; ``reset[i]`` for the latter).
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.addr = (host, port)
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.inbox: list[bytearray] = []
        self.eof: list[bool] = []
        self.reset: list[bool] = []
        self._reading: set[int] = set()

    def __len__(self) -> int:
        return len(self.socks)

    # -- connecting --------------------------------------------------------

    def connect(self, n: int, timeout: float = 30.0) -> range:
        """Open ``n`` more connections at once; return their indexes once all are up."""
        first = len(self.socks)
        pending: set[int] = set()
        for i in range(first, first + n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                raise AssertionError(f"connect #{i}: {os.strerror(err)}")
            self.socks.append(sock)
            self.inbox.append(bytearray())
            self.eof.append(False)
            self.reset.append(False)
            if err == errno.EINPROGRESS:
                pending.add(i)
                self.sel.register(sock, selectors.EVENT_WRITE, i)
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(pending)} of {n} connects pending after {timeout}s")
            for key, _ in self.sel.select(min(remaining, 1.0)):
                i = key.data
                sock = self.socks[i]
                self.sel.unregister(sock)
                pending.discard(i)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise AssertionError(f"connect #{i}: {os.strerror(err)}")
        return range(first, first + n)

    # -- sending and receiving ---------------------------------------------

    def send(
        self, payload: Callable[[int], bytes], which: Iterable[int], timeout: float = 30.0
    ) -> None:
        """Send ``payload(i)`` on every client in ``which``, whole, while reading replies."""
        todo = {i: memoryview(payload(i)) for i in which}
        deadline = time.monotonic() + timeout
        while todo:
            for i in list(todo):
                try:
                    sent = self.socks[i].send(todo[i])
                except BlockingIOError:
                    continue
                rest = todo[i][sent:]
                if rest:
                    todo[i] = rest
                else:
                    del todo[i]
            if todo:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(todo)} clients could not send in {timeout}s")
                self.pump(0.01, todo)

    def pump(self, timeout: float, which: Iterable[int] | None = None) -> None:
        """Read whatever has arrived on the clients in ``which`` (default: all), once."""
        want = set(range(len(self.socks))) if which is None else set(which)
        for i in want - self._reading:
            if not self.eof[i]:
                self.sel.register(self.socks[i], selectors.EVENT_READ, i)
                self._reading.add(i)
        for key, _ in self.sel.select(timeout):
            self._read(key.data)

    def _read(self, i: int) -> None:
        try:
            chunk = self.socks[i].recv(65536)
        except BlockingIOError:
            return
        except (ConnectionResetError, BrokenPipeError):
            self.reset[i] = True
            chunk = b""
        if chunk:
            self.inbox[i] += chunk
            return
        self.eof[i] = True
        self.sel.unregister(self.socks[i])
        self._reading.discard(i)

    def read_until(
        self,
        done: Callable[[int], bool],
        which: Iterable[int],
        timeout: float = 30.0,
        what: str = "replies",
    ) -> None:
        """Read until ``done(i)`` holds for every client in ``which`` (or it was closed)."""
        todo = {i for i in which if not done(i)}
        deadline = time.monotonic() + timeout
        while todo:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                example = min(todo)
                raise AssertionError(
                    f"{len(todo)} clients still waiting for {what} after {timeout}s; "
                    f"e.g. #{example} got {bytes(self.inbox[example][-200:])!r}"
                )
            self.pump(min(remaining, 0.5), todo)
            todo = {i for i in todo if not done(i) and not self.eof[i]}

    def read_to_eof(self, which: Iterable[int], timeout: float = 30.0) -> None:
        self.read_until(lambda i: self.eof[i], which, timeout, "the server to close")

    def echo(self, which: Iterable[int], timeout: float = 60.0, tag: bytes = b"") -> None:
        """Every client in ``which`` sends a line of its own and must get exactly it back."""
        which = list(which)
        start = {i: len(self.inbox[i]) for i in which}
        lines = {i: b"hello from %d%s\n" % (i, tag) for i in which}
        self.send(lines.__getitem__, which, timeout)
        self.read_until(
            lambda i: len(self.inbox[i]) - start[i] >= len(lines[i]), which, timeout, "their echo"
        )
        wrong = [i for i in which if bytes(self.inbox[i][start[i] :]) != lines[i]]
        assert not wrong, (
            f"{len(wrong)} clients got a wrong echo, e.g. #{wrong[0]}: "
            f"{bytes(self.inbox[wrong[0]][start[wrong[0]] :])!r}"
        )

    # -- closing -----------------------------------------------------------

    def close(self, which: Iterable[int] | None = None, reset: bool = False) -> None:
        """Close clients (all by default); ``reset`` closes with SO_LINGER 0 (RST)."""
        for i in range(len(self.socks)) if which is None else which:
            sock = self.socks[i]
            if sock.fileno() < 0:
                continue
            if i in self._reading:
                self.sel.unregister(sock)
                self._reading.discard(i)
            if reset:
                linger0(sock)
            sock.close()
            self.eof[i] = True

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self.sel.close()


def linger0(sock: socket.socket) -> None:
    """Make close() send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Harness:
    """A real echod subprocess (from the ``spawn_echod`` fixture) plus what the suite checks.

    ``baseline`` is read after one client came and went, so the accept loop
    and the janitor are running and the first-connection allocations are done.
    """

    def __init__(self, proc: Any, ctl: str) -> None:
        self.proc = proc
        self.ctl = ctl  # the control socket's path
        self.pid: int = proc.pid
        self.port: int = proc.port
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"warm up\n")
            assert sock.recv(100) == b"warm up\n"
        self.wait_count("connection_closed", 1)
        self.baseline = settled(self.pid)

    def sample(self) -> Sample:
        return sample(self.pid)

    def stats(self) -> dict[str, int]:
        """The server's own counters (``/stats``), as numbers."""
        return {k: int(v) for k, v in stats(self.ctl).items() if v.isdigit()}

    # -- log events ----------------------------------------------------------

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.proc.events
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_count(
        self, name: str, n: int, timeout: float = 30.0, **match: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``n`` events called ``name`` (with fields ``match``) were logged."""
        have = 0

        def enough(event: dict[str, Any]) -> bool:  # wait_event shows each event once
            nonlocal have
            have += all(event.get(k) == v for k, v in match.items())
            return have >= n

        if len(self.events(name, **match)) < n:
            try:
                self.proc.wait_event(name, timeout, enough)
            except AssertionError:
                got = len(self.events(name, **match))
                raise AssertionError(
                    f"{got} of {n} {name} {match} events within {timeout}s; "
                    f"tail: {''.join(self.proc.raw_stderr)[-1500:]}"
                ) from None
        return self.events(name, **match)

    def pump(self, seconds: float) -> None:
        """Take in the log lines that arrive within ``seconds``."""
        try:
            self.proc.wait_event("no such event", seconds)
        except AssertionError:
            pass

    def reasons(self) -> dict[str, int]:
        """connection_closed events counted by reason."""
        counts: dict[str, int] = {}
        for event in self.events("connection_closed"):
            reason = str(event.get("reason"))
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    # -- baseline and ending -----------------------------------------------------

    def back_to_baseline(self, rss_slack: int, timeout: float = 15.0) -> Sample:
        """Threads return to the idle count; RSS is within ``rss_slack`` of the baseline."""
        now = wait_threads(self.pid, self.baseline.threads, timeout)
        assert now.rss - self.baseline.rss < rss_slack, (
            f"RSS {now.rss_mib} MiB, baseline {self.baseline.rss_mib} MiB, "
            f"allowed growth {rss_slack / MiB} MiB"
        )
        return now

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM; echod must exit 0 with no traceback. Returns the seconds it took."""
        start = time.monotonic()
        self.proc.signal()
        code = self.proc.wait(timeout)
        took = time.monotonic() - start
        self.assert_no_traceback()
        assert code == 0, f"exit status {code}; stderr: {''.join(self.proc.raw_stderr)[-1500:]}"
        return took

    def assert_no_traceback(self) -> None:
        stderr = "".join(self.proc.raw_stderr)
        assert "Traceback" not in stderr, stderr[-3000:]


class PeakWatch:
    """Samples a process every ``interval`` in a thread; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import threading

        self.pid = pid
        self.interval = interval
        self.rss = 0
        self.threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = sample(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.rss = max(self.rss, now.rss)
            self.threads = max(self.threads, now.threads)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def rss_mib(self) -> float:
        return round(self.rss / MiB, 1)


def control(path: str, command: str, timeout: float = 10.0) -> str:
    """One operator command over the control socket; its answer (lines before the blank one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        return "\n".join(read_answer(LineReader.of_socket(sock, timeout), cut_short_ok=True))


def stats(path: str) -> dict[str, str]:
    """``/stats`` as a dict of its key=value lines."""
    answer = control(path, "/stats")
    assert answer.startswith("OK"), answer
    return dict(line.split("=", 1) for line in answer.splitlines()[1:] if "=" in line)
