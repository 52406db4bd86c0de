"""Both operator consoles at a terminal, typed at as a person would.

The installed ``echod`` command runs on a pseudo-terminal of its own (the
stdlib ``pty``), which is its controlling terminal, as in a shell: the stdin
console of ``echod --foreground``, and ``echod console`` on a control
socket. The test types keys, escape sequences included (Up-arrow is
``ESC [ A``), and reads the screen with deadlines.

Readiness: readline takes the terminal out of canonical mode while it waits
for a line and puts it back after each one. Keys typed in between are
cooked by the kernel instead (Ctrl-D there is lost, as it would be for any
readline program), so before each line the test waits until the terminal
is in readline's mode. The pty master reports the terminal's modes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.helpers import (
    TIMEOUT,
    Client,
    EchodProcess,
    installed_echod,
    roundtrip_once,
    wait_for,
)

ECHOD = installed_echod()  # the console script pip installed, what a user runs
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        ECHOD is None, reason="the echod console script is not installed (pip install -e .)"
    ),
]
UP = b"\x1b[A"
LEFT = b"\x1b[D"
# Become the session's controlling terminal's owner, as a shell's child is, then run argv.
CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A command on a pseudo-terminal; ``screen`` is everything it has printed.

    ``program``: what runs with ``args`` (default: the installed ``echod``).
    """

    def __init__(self, *args: str, program: Sequence[str] = ()) -> None:
        assert ECHOD is not None
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONTROLLING_TTY, *(program or [ECHOD]), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            # PYTHONIOENCODING: Python's stdin as under a UTF-8 locale such as en_US.UTF-8,
            # strict about bytes that are not UTF-8 (under C or C.UTF-8 it is lenient).
            env={
                **os.environ,
                "TERM": "xterm",
                "NO_COLOR": "1",
                "PYTHONIOENCODING": "utf-8:strict",
            },
        )
        os.close(slave)
        self.master = master
        self.screen = b""
        self.prompt = b""  # what the program prints when it wants a line
        self._seen = 0  # expect() searches from here

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def _read(self, until: float) -> bool:
        """Read what is there before ``until``; False at end of output."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, until - time.monotonic()))
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the last process on the terminal closed it
                data = b""
            if not data:
                return False
            self.screen += data
        return True

    def expect(self, pattern: bytes, timeout: float = TIMEOUT) -> bytes:
        """Wait for ``pattern`` after what earlier calls matched; the line it is on."""
        deadline = time.monotonic() + timeout
        while (at := self.screen.find(pattern, self._seen)) < 0:
            if time.monotonic() >= deadline or not self._read(deadline):
                raise AssertionError(
                    f"no {pattern!r} on the screen within {timeout}s; "
                    f"after it so far: {self.screen[self._seen :][-2000:]!r}"
                )
        start = self.screen.rfind(b"\n", 0, at) + 1
        end = self.screen.find(b"\n", at)
        self._seen = at + len(pattern)
        return self.screen[start : end if end >= 0 else len(self.screen)]

    def lflag(self) -> int:
        return int(termios.tcgetattr(self.master)[3])

    def wait_for_line_editing(self) -> None:
        """Until readline has the terminal (not canonical, no kernel echo)."""

        def editing() -> bool:
            self._read(time.monotonic() + 0.05)  # keep the output flowing
            return not self.lflag() & (termios.ICANON | termios.ECHO)

        wait_for(editing, what="readline to take the terminal (line editing)")

    def ready(self) -> None:
        """Until the program waits for the next line: its prompt, if any, and readline."""
        if self.prompt:
            self.expect(self.prompt)
        self.wait_for_line_editing()

    def enter(self, keys: bytes, answer: bytes) -> None:
        """Type ``keys`` and Enter, see ``answer``, wait until ready for the next line."""
        self.type(keys + b"\r")
        self.expect(answer)
        self.ready()

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline) and time.monotonic() < deadline:
            pass  # drain the screen, or the child may block writing to it
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*args: str, program: Sequence[str] = ()) -> Terminal:
        opened.append(Terminal(*args, program=program))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


@pytest.fixture
def foreground(terminal: Callable[..., Terminal]) -> Iterator[tuple[Terminal, int, Client]]:
    """``echod --foreground`` at a terminal (so with its console), its port, a client."""
    term = terminal(
        "--foreground", "--port", "0", "--control-socket", "none", "--log-format", "json"
    )
    line = term.expect(b'"event": "listening"')
    port = int(json.loads(line.strip())["port"])
    term.wait_for_line_editing()
    assert b"echod console: /help lists commands" in term.screen  # before reading anything
    client = Client(port)
    try:
        assert client.roundtrip(b"hi\n") == b"hi\n"  # connected and served
        yield term, port, client
    finally:
        client.close()


def assert_next_push(client: Client, term: Terminal, marker: bytes) -> None:
    """Nothing reached ``client`` before ``marker``, broadcast now."""
    term.type(b"/broadcast " + marker + b"\r")
    assert client.readline() == b"Server says: " + marker + b"\n"


# -- the stdin console of echod --foreground ------------------------------------------


def test_stdin_console_up_arrow_recalls_the_last_command(
    foreground: tuple[Terminal, int, Client],
) -> None:
    term, _, client = foreground
    term.enter(b"/list", b"OK 1 client")
    term.enter(UP, b"OK 1 client")  # the same command again, not the text ESC [ A
    term.enter(b"/lst" + LEFT + LEFT + b"i", b"OK 1 client")  # edited in place into /list
    assert_next_push(client, term, b"after the arrows")


def test_stdin_console_passes_typed_bytes_through(
    foreground: tuple[Terminal, int, Client],
) -> None:
    term, _, client = foreground
    term.type(b"/broadcast caf\xc3\xa9 \xff\xfe\r")  # UTF-8, then bytes that are not
    assert client.readline() == b"Server says: caf\xc3\xa9 \xff\xfe\n"
    term.wait_for_line_editing()
    assert_next_push(client, term, b"and the console goes on")


def test_stdin_console_answers_a_bare_command_word(
    foreground: tuple[Terminal, int, Client],
) -> None:
    term, _, client = foreground
    term.enter(b"list", b"ERR did you mean /list? (/broadcast list sends it as text)")
    term.enter(b"kick 1", b"ERR did you mean /kick? (/broadcast kick sends it as text)")
    assert_next_push(client, term, b"nothing before this")


def test_stdin_console_ctrl_d_ends_the_console_not_echod(
    foreground: tuple[Terminal, int, Client],
) -> None:
    term, port, client = foreground
    term.type(b"over the terminal\r")
    assert client.readline() == b"Server says: over the terminal\n"
    term.wait_for_line_editing()
    term.type(b"\x04")  # Ctrl-D: end of input on the terminal
    term.expect(b'"console_closed"')
    assert roundtrip_once(port, b"still serving\n") == b"still serving\n"
    assert term.proc.poll() is None
    os.kill(term.proc.pid, signal.SIGTERM)
    assert term.wait() == 0


def test_ctrl_c_stops_echod_and_gives_the_terminal_back(
    foreground: tuple[Terminal, int, Client],
) -> None:
    term, _, _ = foreground
    term.type(b"\x03")  # Ctrl-C: SIGINT to the foreground process group
    term.expect(b'"event": "stopped"')
    assert term.wait() == 0
    # readline had the terminal in its own mode when echod stopped; it is cooked again.
    lflag = term.lflag()
    assert lflag & termios.ICANON and lflag & termios.ECHO


# echod whose graceful stop takes a minute. In real life thousands of clients
# make a stop slow; no kind of client holds it deterministically (each ends
# within about a second), so the server's stop step itself is made to sleep.
SLOW_STOP = (
    "import sys, time, echod.server as s; stop = s.EchoServer.stop; "
    "s.EchoServer.stop = lambda self, timeout: time.sleep(60) or stop(self, timeout); "
    "from echod.cli import main; sys.exit(main())"
)


def test_a_second_ctrl_c_while_stopping_exits_and_gives_the_terminal_back(
    terminal: Callable[..., Terminal],
) -> None:
    term = terminal(
        *("--foreground", "--port", "0", "--control-socket", "none", "--log-format", "json"),
        program=[sys.executable, "-c", SLOW_STOP],
    )
    term.expect(b'"event": "listening"')
    term.wait_for_line_editing()
    term.type(b"\x03")  # Ctrl-C: the graceful stop begins, and takes its time
    term.expect(b'"event": "stopping"')
    term.type(b"\x03")  # again: the operator insists
    assert term.wait() == 1
    lflag = term.lflag()  # readline's mode is gone: cooked, echoing
    assert lflag & termios.ICANON and lflag & termios.ECHO


# -- echod console on the control socket ------------------------------------------------


@pytest.fixture
def sock_path(ctl_dir: Path) -> Path:
    return ctl_dir / "run" / "control.sock"


@pytest.fixture
def daemon(spawn_echod: Callable[..., EchodProcess], sock_path: Path) -> EchodProcess:
    return spawn_echod("--control-socket", str(sock_path))


def echod_console(terminal: Callable[..., Terminal], sock_path: Path) -> Terminal:
    term = terminal("console", "--control-socket", str(sock_path))
    term.prompt = b"echod> "
    term.ready()
    return term


def test_echod_console_ignores_a_blank_line(
    terminal: Callable[..., Terminal], daemon: EchodProcess, sock_path: Path
) -> None:
    term = echod_console(terminal, sock_path)
    term.type(b"\r")  # Enter on an empty line: no command, and the session goes on
    term.ready()
    term.type(b"   \r")
    term.ready()
    term.enter(b"/list", b"OK 0 clients")
    assert term.proc.poll() is None
    term.type(b"\x04")  # only Ctrl-D ends it
    assert term.wait() == 0


def test_echod_console_up_arrow_and_bare_words(
    terminal: Callable[..., Terminal], daemon: EchodProcess, sock_path: Path
) -> None:
    client = Client(daemon.port)
    try:
        assert client.roundtrip(b"hi\n") == b"hi\n"
        term = echod_console(terminal, sock_path)
        term.enter(b"/list", b"OK 1 client")
        term.enter(UP, b"OK 1 client")  # the same command again, not the text ESC [ A
        term.enter(b"stats", b"ERR did you mean /stats? (/broadcast stats sends it as text)")
        term.enter(b"send 1 hi", b"ERR did you mean /send? (/broadcast send sends it as text)")
        assert_next_push(client, term, b"only this")
    finally:
        client.close()


# -- /upgrade, typed at either console ------------------------------------------------


def _end_successor(screen: bytes) -> None:
    """The echod an /upgrade started is nobody's child here: end it by its pid."""
    match = re.search(rb"OK upgraded pid \d+ -> (\d+)", screen)
    if match is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(match.group(1)), signal.SIGKILL)


def test_stdin_console_upgrade_hands_the_client_over(
    foreground: tuple[Terminal, int, Client],
) -> None:
    term, _, client = foreground
    try:
        term.type(b"/upgrade\r")
        line = term.expect(b"OK upgraded pid", timeout=120)
        assert re.search(rb"OK upgraded pid \d+ -> \d+", line), line
        assert term.wait(30) == 0  # the old echod left; the new one has no stdin console
        assert client.roundtrip(b"still served\n") == b"still served\n"
    finally:
        _end_successor(term.screen)


def test_echod_console_upgrade(
    terminal: Callable[..., Terminal], daemon: EchodProcess, sock_path: Path
) -> None:
    client = Client(daemon.port)
    term = echod_console(terminal, sock_path)
    try:
        assert client.roundtrip(b"before\n") == b"before\n"
        term.type(b"/upgrade\r")
        term.expect(b"OK upgraded pid %d -> " % daemon.pid, timeout=120)
        assert client.roundtrip(b"after\n") == b"after\n"
    finally:
        client.close()
        _end_successor(term.screen)
