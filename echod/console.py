"""The stdin console: operator commands typed where ``echod --foreground`` runs.

Design
------
A daemon thread reads stdin line by line, runs each line through the
command language (:mod:`echod.commands`) and prints the answer on stdout;
the log goes to stderr as usual. End of input (Ctrl-D) ends the console,
not the server.

It reads one of two ways:

* **A terminal** (stdin and stdout are TTYs) with the stdlib ``readline``:
  ``input()``, so the operator gets line editing and history; Up-arrow
  recalls the last command instead of sending ``ESC [ A`` as text. While
  it waits for a line, readline keeps the terminal in its own raw mode,
  and echod usually exits while it waits, so :meth:`StdinConsole.start`
  saves the terminal's modes and :meth:`StdinConsole.close` restores them.
  ``input()`` decodes like :func:`echod.commands.decode` (UTF-8 with
  ``surrogateescape``), so what is typed reaches clients byte for byte.
* **Anything else** (a pipe, a file, no readline): ``os.read`` on the
  descriptor, cut by :class:`~echod.commands.CommandLines`. Not
  ``sys.stdin``: a daemon thread blocked inside a buffered stream holds its
  lock, and the interpreter aborts at exit when it finds that lock taken
  (``input()`` on a terminal reads through readline, outside that lock).

In the background (``echod --foreground &``, or Ctrl-Z then ``bg``), a read
from the terminal would stop the whole server with SIGTTIN, and readline
setting the terminal's modes would stop it with SIGTTOU. Both are ignored
(on a terminal only), so the read fails instead, and the console waits
until it is in the foreground again, looking every :data:`BACKGROUND_POLL`
seconds.

Error handling: an unusable stdin or stdout ends the console with a
``console_error`` warning; echod keeps serving.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

from echod.commands import ENCODING, ERRORS, CommandLines, Operated, commands_for, decode, encode
from echod.logs import get_logger

BACKGROUND_POLL = 1.0  # seconds between tries to read a terminal we are in the background of
BANNER = (
    "echod console: /help lists commands; other lines are broadcast; "
    "Ctrl-D ends the console, Ctrl-C stops echod"
)


def can_edit_lines(stdin_fd: int, stdout_fd: int) -> bool:
    """Whether ``input()`` edits lines on these descriptors (loading ``readline`` if so)."""
    try:
        if (sys.stdin.fileno(), sys.stdout.fileno()) != (stdin_fd, stdout_fd):
            return False  # input() reads sys.stdin and echoes on sys.stdout
    except (AttributeError, ValueError, OSError):  # None, closed or not a file
        return False
    if not (os.isatty(stdin_fd) and os.isatty(stdout_fd)):
        return False  # input() would read sys.stdin's buffer, not through readline
    try:
        import readline  # noqa: F401  (importing it is what turns editing on for input())
    except ImportError:  # a Python built without it
        return False
    return True


class StdinConsole:
    """The terminal console: a daemon thread running stdin lines as commands.

    Answers go to stdout (``os.write``, for the reason in the module
    docstring). :meth:`start` from the main thread; :meth:`close` when echod
    stops, to hand the terminal back as it was.
    """

    def __init__(self, service: Operated, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.log = get_logger(source="console")
        self.commands = commands_for(service, self.log)
        self._in = stdin_fd
        self._out = stdout_fd
        self._tty = os.isatty(stdin_fd)
        self._editing = can_edit_lines(stdin_fd, stdout_fd)
        self._modes: list[Any] | None = None  # the terminal's, to restore at close
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading; call from the main thread (it may set signal dispositions)."""
        if self._tty and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)  # see the module docstring
            if self._editing:
                signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        if self._editing:
            self._modes = termios.tcgetattr(self._in)
            if isinstance(sys.stdin, io.TextIOWrapper):  # input() decodes with its codec
                sys.stdin.reconfigure(encoding=ENCODING, errors=ERRORS)
        self.thread = threading.Thread(target=self._run, name="echod-console", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Give the terminal back in the modes it had at :meth:`start`."""
        modes, self._modes = self._modes, None
        if modes is None or self._in_background():
            return  # from the background it would change the modes of the shell's prompt
        try:
            termios.tcsetattr(self._in, termios.TCSADRAIN, modes)
        except OSError as err:  # the terminal is gone (hung up)
            self.log.debug("console_terminal_not_restored", detail=err.strerror)

    def _in_background(self) -> bool:
        try:
            return os.tcgetpgrp(self._in) != os.getpgrp()
        except OSError:
            return False

    def _run(self) -> None:
        self.log.info("console_started")
        try:
            if self._tty:
                self._print(BANNER)
            if self._editing:
                self._edited_loop()
            else:
                self._raw_loop()
        except OSError as err:  # stdin or stdout unusable
            self.log.warning("console_error", detail=err.strerror or str(err))
        self.log.info("console_closed", detail="end of input; echod keeps running")

    def _edited_loop(self) -> None:
        commands = self.commands
        for line in self._edited_lines():
            too_long = len(encode(line)) > commands.max_command  # as CommandLines refuses it
            self._print(commands.too_long() if too_long else commands.execute(line))

    def _edited_lines(self) -> Iterator[str]:
        """Lines typed at the terminal through readline, until Ctrl-D."""
        while True:
            if self._in_background():
                time.sleep(BACKGROUND_POLL)
                continue
            try:
                yield input()
            except EOFError:
                if not self._in_background():
                    return  # Ctrl-D; in the background it is the failed read: wait

    def _raw_loop(self) -> None:
        commands = self.commands
        lines = CommandLines(commands.max_command)
        while data := self._read():
            for line in lines.feed(data):
                self._print(commands.too_long() if line is None else commands.execute(decode(line)))
        last = lines.end()
        if last is not None:
            self._print(commands.execute(decode(last)))

    def _read(self) -> bytes:
        while True:
            try:
                return os.read(self._in, 65536)
            except OSError as err:
                if err.errno != errno.EIO or not self._in_background():
                    raise
            time.sleep(BACKGROUND_POLL)

    def _print(self, text: str) -> None:
        if not text:
            return
        data = encode(text + "\n")
        while data:
            data = data[os.write(self._out, data) :]
