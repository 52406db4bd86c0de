"""The clients of the control socket: ``echod ctl`` and ``echod console``.

Design
------
Both speak the control socket's framing (:mod:`echod.control`): one command
line out, the answer's lines back up to an empty line. :class:`ControlClient`
is that exchange; a refused connection's ``ERR`` is read even when sending
the command hit EPIPE.

``echod ctl`` turns its words into one command line (``ctl send 3 hi`` is
``/send 3 hi``), prints the answer (``OK`` on stdout, ``ERR`` on stderr) and
exits 0 on ``OK``; 2 on bad usage, its own or the daemon's (an ``ERR
usage: ...`` answer); 1 on any other ``ERR`` or when no echod answers.

``echod console`` sends stdin line by line and prints each answer; only end
of input (Ctrl-D) ends it, a blank line is skipped. On a terminal it edits
lines through the stdlib ``readline`` (history, Up-arrow); lines are
decoded like the commands' own text (UTF-8, ``surrogateescape``), so any
bytes typed or piped reach the daemon unchanged.

Connecting waits up to ``--timeout``: when echod is busy or stopped its
listen queue fills, and a Unix socket's ``connect()`` then fails at once
with EAGAIN instead of waiting, so it is retried (pausing
:data:`CONNECT_PAUSE` seconds, doubling up to :data:`CONNECT_PAUSE_MAX`)
until the deadline.

Error handling: every failure is an :class:`~echod.errors.EchodError` with
one sentence, which :mod:`echod.cli` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from echod.commands import ENCODING, ERRORS, USAGE, decode, encode
from echod.config import Parser, default_control_socket, parse_duration, parse_path
from echod.errors import EchodError

CLIENT_TIMEOUT = 10.0  # how long to wait for the daemon to accept, then for each answer
# The least wait for the answer to /upgrade: a new echod starts and takes every
# client over (echod.upgrade's START_TIMEOUT + PAUSE_TIMEOUT + READY_TIMEOUT, and some).
UPGRADE_TIMEOUT = 120.0
CONNECT_PAUSE = 0.01  # first pause before connecting again to a full listen queue
CONNECT_PAUSE_MAX = 0.1  # the longest pause: a freed slot is taken within this
PROMPT = "echod> "


class ControlClient:
    """One session on the control socket, from the operator's side."""

    def __init__(self, path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(time.monotonic() + timeout)
        except OSError as err:
            self._sock.close()
            raise EchodError(_connect_failure(path, err)) from None
        except BaseException:
            self._sock.close()
            raise

    def _connect(self, deadline: float) -> None:
        """Connect, trying again while the listen queue is full, until ``deadline``."""
        pause = CONNECT_PAUSE
        while True:
            try:
                self._sock.connect(str(self.path))
                return
            except BlockingIOError:  # EAGAIN: the queue is full (see the module docstring)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EchodError(
                        f"echod did not accept a connection within {self.timeout:g} s on "
                        f"control socket {self.path} (it is busy or stopped)"
                    ) from None
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, CONNECT_PAUSE_MAX)

    def ask(self, line: str) -> str | None:
        """Send one command line; its answer without the final empty line, or None if the
        daemon closed the connection without answering."""
        # Refused or closed: an ERR answer may still be waiting to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._sock.sendall(encode(line) + b"\n")
        if line.strip().lower() == "/upgrade":
            return self.read_answer(max(self.timeout, UPGRADE_TIMEOUT))
        return self.read_answer()

    def read_answer(self, timeout: float | None = None) -> str | None:
        """The next answer; ``timeout``: longer than ``--timeout`` for this one."""
        timeout = self.timeout if timeout is None else timeout
        self._sock.settimeout(timeout)
        lines: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                if not line:
                    return decode(b"\n".join(lines))
                lines.append(line)
                continue
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise EchodError(
                    f"echod did not answer within {timeout:g} s on control socket {self.path}"
                ) from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self._buf:
                    lines.append(self._buf)
                    self._buf = b""
                return decode(b"\n".join(lines)) if lines else None
            self._buf += chunk

    def close(self) -> None:
        self._sock.close()


def _connect_failure(path: Path, err: OSError) -> str:
    if isinstance(err, (FileNotFoundError, ConnectionRefusedError)):
        return f"no echod is listening on control socket {path}"
    if isinstance(err, PermissionError):
        return (
            f"permission denied on control socket {path} (run as the user "
            "echod runs as, or as root)"
        )
    return f"cannot connect to control socket {path}: {err.strerror or err}"


def _add_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket",
        type=parse_path,
        default=None,
        metavar="PATH",
        help=f"the daemon's control socket (default: {default_control_socket()})",
    )
    parser.add_argument(
        "--timeout",
        type=parse_duration,
        default=CLIENT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for echod to accept, then for each answer (default: %(default)s)",
    )


CTL_EPILOG = """\
commands (the console commands without their slash):
  list                  connected clients, one a line
  send ID TEXT          push 'Server says: TEXT' to client ID
  broadcast TEXT        push it to every client
  kick ID [REASON]      disconnect a client
  stats                 server counters
  reload                re-read the config file (--config) and apply it
  shutdown              stop echod gracefully
  upgrade               start the echod now installed and hand it every client
                        (waits up to 120 s; exit 1 if it failed, echod serves on)
  help                  the daemon's own list

Exit status: 0 on OK; 2 on bad usage, ours or the daemon's (ERR usage: ...);
1 on any other ERR or when no echod answers.
"""


def ctl_main(argv: Sequence[str]) -> int:
    """``echod ctl COMMAND [ARGS]``: one command, its answer; exit as the module docstring says."""
    parser = Parser(
        prog="echod ctl",
        usage="%(prog)s [--control-socket PATH] [--timeout SECONDS] COMMAND [ARGS...]",
        description="Send one operator command to a running echod and print its answer.",
        epilog=CTL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_socket_option(parser)
    # One REMAINDER, so that text such as "-1" or "--x" after the command is text.
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS]")
    ns = parser.parse_args(list(argv))
    if not ns.words:
        parser.error("a COMMAND is required")
    line = "/" + " ".join([ns.words[0].removeprefix("/"), *ns.words[1:]])
    if "\n" in line or "\r" in line:
        print("ERR text must be one line (no CR or LF)", file=sys.stderr)
        return 1
    path = ns.control_socket or default_control_socket()
    client = ControlClient(path, ns.timeout)
    try:
        answer = client.ask(line)
    finally:
        client.close()
    if answer is None:
        raise EchodError(f"echod closed control socket {path} without answering")
    if answer.startswith("OK"):
        print(answer)
        return 0
    print(answer, file=sys.stderr)
    return 2 if answer.startswith(f"ERR {USAGE}") else 1


def console_main(argv: Sequence[str]) -> int:
    """``echod console``: an interactive session, one command a line, until end of input."""
    parser = Parser(
        prog="echod console",
        description="An interactive operator session on "
        "a running echod's control socket (Ctrl-D ends it).",
    )
    _add_socket_option(parser)
    ns = parser.parse_args(list(argv))
    path = ns.control_socket or default_control_socket()
    client = ControlClient(path, ns.timeout)
    interactive = sys.stdin.isatty()
    if isinstance(sys.stdin, io.TextIOWrapper):  # any bytes typed reach the daemon unchanged
        sys.stdin.reconfigure(encoding=ENCODING, errors=ERRORS)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (importing it turns on line editing for input())
        print(
            f"connected to echod on {path}: /help lists commands, other lines are "
            "broadcast, Ctrl-D ends the session",
            file=sys.stderr,
        )
    try:
        for line in _typed_lines(interactive):
            if not line.strip():
                continue  # no command, no answer (the daemon would not send one)
            answer = client.ask(line)
            if answer is None:
                raise EchodError(f"echod closed the session on control socket {path}")
            print(answer, flush=True)
    finally:
        client.close()
    return 0


def _typed_lines(interactive: bool) -> Iterator[str]:
    """stdin's lines without their newline, until end of input (Ctrl-D on a terminal)."""
    if not interactive:
        for line in iter(sys.stdin.readline, ""):
            yield line.removesuffix("\n")
        return
    while True:
        try:
            yield input(PROMPT)  # "" is an empty line: only EOFError is the end
        except EOFError:
            print(file=sys.stderr)  # the shell's prompt on a line of its own
            return
