"""The operator command language, and the console that reads it from stdin.

Design
------
:class:`Commands` is the one interpreter behind every way in: the terminal
(:class:`StdinConsole`), the control socket (:mod:`echod.control`) and so
``echod ctl`` / ``echod console`` / ``socat``. It takes exactly what it
needs (the registry, the settings and a stop callback), so it is tested
without any socket of its own.

``execute(line)`` returns the answer as text without a trailing newline:
the first line is ``OK ...`` or ``ERR <reason>``; some answers (``/list``,
``/stats``, ``/help``) carry more lines after it, none of them empty. The
control socket ends every answer with an empty line (see
:mod:`echod.control`); the terminal just prints it. A blank input line is no
command and gets no answer (``""``).

Input: :class:`CommandLines` cuts the bytes of a terminal or a socket into
lines, holding at most about twice ``--max-line`` bytes; a longer line is
answered ``ERR command too long`` and skipped. Lines are ``str`` decoded
with ``surrogateescape`` and operator text is encoded back the same way, so
any bytes an operator types reach the client unchanged. Text is refused,
never split, if it holds CR or LF or is longer than ``--max-line`` bytes: one
operator message is one client line.

Concurrency: the registry lock is taken only to copy the client list
(:meth:`Registry.snapshot`, :meth:`Registry.get`); every write goes through
the client's own non-blocking :meth:`push` / :meth:`end`, so no command ever
waits on a client that does not read.

Logging: each command is one ``operator_command`` event at info, with its
name, the source (bound into the logger by the caller), target and outcome;
never the text of a message.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from echod import protocol
from echod.config import Settings
from echod.logs import Logger, get_logger
from echod.registry import Client, Registry

ENCODING = "utf-8"
ERRORS = "surrogateescape"  # byte-transparent: bytes -> str -> the same bytes
COMMAND_SLACK = 256  # room for "/send 12345 " etc. on top of --max-line
BACKGROUND_POLL = 1.0  # seconds between tries to read a terminal we are in the background of


class Target(Client, Protocol):
    """What a command needs of a connected client (echod.connection.Connection)."""

    peer: str
    started: float  # monotonic
    last_active: float  # monotonic

    def push(self, data: bytes, lines: int = 1) -> bool: ...

    def end(self, last_line: bytes | None, reason: str) -> bool: ...


class Operated(Protocol):
    """What the operator interfaces need of the running service (echod.service.Service)."""

    @property
    def registry(self) -> Registry[Any]: ...

    @property
    def settings(self) -> Settings: ...

    def request_stop(self, reason: str) -> None: ...


T = TypeVar("T", bound=Target)

HELP = (
    "/send ID TEXT       push 'Server says: TEXT' to client ID",
    "/broadcast TEXT     push it to every client (a line without / does the same)",
    "/list               one client a line: id addr age idle bytes_in/out lines_in/out",
    "/kick ID [REASON]   disconnect client ID, telling it 'Server says: REASON' first",
    "/stats              server counters",
    "/help               this list",
    "/shutdown           stop echod gracefully, like SIGTERM",
)

_WORD = re.compile(r"(\S*)(?:\s(.*))?", re.DOTALL)  # matches any string


class CommandError(Exception):
    """A command that cannot be carried out; ``str(err)`` follows ``ERR ``."""


def _show(word: str, limit: int = 40) -> str:
    """A user-supplied word, safe to quote in a one-line answer."""
    text = repr(word)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def decode(line: bytes) -> str:
    return line.decode(ENCODING, ERRORS)


def encode(text: str) -> bytes:
    return text.encode(ENCODING, ERRORS)


def split_word(text: str) -> tuple[str, str]:
    """The first word and the rest after one blank (the rest keeps its spacing)."""
    match = _WORD.fullmatch(text)
    assert match is not None
    return match.group(1), match.group(2) or ""


def strip_eol(line: str) -> str:
    """A line without its LF or CRLF ending (other CRs stay, and are refused)."""
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    return line


class Commands(Generic[T]):
    """The operator command interpreter; see the module docstring."""

    def __init__(
        self,
        registry: Registry[T],
        settings: Settings,
        stop: Callable[[], None],
        log: Logger | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.stop = stop
        self.log: Logger = log if log is not None else get_logger(source="console")
        self._table: dict[str, Callable[[str], str]] = {
            "send": self._send,
            "broadcast": self._broadcast,
            "list": self._list,
            "kick": self._kick,
            "stats": self._stats,
            "help": self._help,
            "shutdown": self._shutdown,
        }

    @property
    def max_command(self) -> int:
        """The longest command line worth reading whole (longer ones are refused)."""
        return self.settings.max_line * 2 + COMMAND_SLACK

    def execute(self, line: str) -> str:
        """Run one command line; the answer's first line is ``OK ...`` or ``ERR ...``."""
        line = strip_eol(line)
        if not line.strip():
            return ""
        if line.startswith("/"):
            name, rest = split_word(line[1:])
            name = name.lower()
        else:  # plain text: a broadcast, as in the original console
            name, rest = "broadcast", line
        handler = self._table.get(name)
        try:
            if "\n" in line or "\r" in line:  # one command is one line, whatever follows
                raise CommandError("text must be one line (no CR or LF)")
            if handler is None:
                raise CommandError(f"unknown command {_show('/' + name)} (try /help)")
            answer = handler(rest)
        except CommandError as err:
            self.log.info(
                "operator_command", command=name if handler else "unknown", ok=False, error=str(err)
            )
            return f"ERR {err}"
        except Exception as err:  # a bug must not kill the console or the session
            self.log.error(
                "operator_command_failed", command=name, error=type(err).__name__, detail=str(err)
            )
            return "ERR internal error (see the log)"
        return answer

    def too_long(self) -> str:
        """The answer to a command line longer than :attr:`max_command`."""
        self.log.info("operator_command", command=None, ok=False, error="command too long")
        return f"ERR command too long (operator text is at most {self.settings.max_line} bytes)"

    # -- helpers -----------------------------------------------------------

    def _text(self, text: str, usage: str) -> bytes:
        """Operator text as the one client line it becomes, or CommandError."""
        if not text:
            raise CommandError(f"usage: {usage}")
        if "\n" in text or "\r" in text:
            raise CommandError("text must be one line (no CR or LF)")
        data = encode(text)
        if len(data) > self.settings.max_line:
            raise CommandError(f"text too long ({len(data)} bytes, max {self.settings.max_line})")
        return protocol.server_says(data)

    def _client(self, word: str, usage: str) -> T:
        if not word:
            raise CommandError(f"usage: {usage}")
        if not word.isascii() or not word.isdigit():
            raise CommandError(f"bad client id {_show(word)} (ids are numbers, see /list)")
        client = self.registry.get(int(word))
        if client is None:
            raise CommandError(f"no client {int(word)} (see /list)")
        return client

    @staticmethod
    def _no_args(name: str, rest: str) -> None:
        if rest.strip():
            raise CommandError(f"usage: /{name} (no arguments)")

    # -- commands ----------------------------------------------------------

    def _send(self, rest: str) -> str:
        usage = "/send ID TEXT"
        word, text = split_word(rest)
        client = self._client(word, usage)
        line = self._text(text, usage)
        if not client.push(line):
            raise CommandError(f"client {client.id} is disconnecting")
        self.log.info(
            "operator_command",
            command="send",
            ok=True,
            client=client.id,
            text_bytes=len(line) - len(protocol.server_says(b"")),
        )
        return f"OK sent to client {client.id}"

    def _broadcast(self, rest: str) -> str:
        line = self._text(rest, "/broadcast TEXT")
        clients = self.registry.snapshot()  # the lock is released before any send
        delivered = sum(1 for client in clients if client.push(line))
        self.log.info(
            "operator_command",
            command="broadcast",
            ok=True,
            clients=delivered,
            text_bytes=len(line) - len(protocol.server_says(b"")),
        )
        return f"OK sent to {delivered} client{'s' if delivered != 1 else ''}"

    def _list(self, rest: str) -> str:
        self._no_args("list", rest)
        clients = self.registry.snapshot()
        now = time.monotonic()
        rows = [
            f"id={c.id} addr={c.peer} age={now - c.started:.1f}s "
            f"idle={max(0.0, now - c.last_active):.1f}s "
            f"bytes_in={c.bytes_in} bytes_out={c.bytes_out} "
            f"lines_in={c.lines_in} lines_out={c.lines_out}"
            for c in clients
        ]
        self.log.info("operator_command", command="list", ok=True, clients=len(rows))
        head = f"OK {len(rows)} client{'s' if len(rows) != 1 else ''}"
        return "\n".join([head, *rows])

    def _kick(self, rest: str) -> str:
        usage = "/kick ID [REASON]"
        word, reason = split_word(rest)
        client = self._client(word, usage)
        last = self._text(reason, usage) if reason else None
        if not client.end(last, "kicked"):
            raise CommandError(f"client {client.id} is already disconnecting")
        self.log.info(
            "operator_command",
            command="kick",
            ok=True,
            client=client.id,
            with_reason=last is not None,
        )
        return f"OK kicked client {client.id}"

    def _stats(self, rest: str) -> str:
        self._no_args("stats", rest)
        s = self.registry.stats()
        cfg = self.settings
        self.log.info("operator_command", command="stats", ok=True)
        return "\n".join(
            [
                "OK stats",
                f"connected={s.connected}",
                f"max_clients={cfg.max_clients}",
                f"total_accepted={s.total_accepted}",
                f"rejected={s.rejected}",
                f"lines_in={s.lines_in}",
                f"lines_out={s.lines_out}",
                f"bytes_in={s.bytes_in}",
                f"bytes_out={s.bytes_out}",
                f"uptime={s.uptime:.1f}s",
                f"max_line={cfg.max_line}",
                f"idle_timeout={cfg.idle_timeout:g}s",
                f"line_timeout={cfg.line_timeout:g}s",
                f"send_timeout={cfg.send_timeout:g}s",
                f"shutdown_timeout={cfg.shutdown_timeout:g}s",
                f"backlog={cfg.backlog}",
            ]
        )

    def _help(self, rest: str) -> str:
        self.log.info("operator_command", command="help", ok=True)
        return "\n".join(["OK commands", *HELP])

    def _shutdown(self, rest: str) -> str:
        self._no_args("shutdown", rest)
        self.log.info("operator_command", command="shutdown", ok=True)
        self.stop()
        return "OK shutting down"


class CommandLines:
    """Cuts a byte stream into command lines, never holding more than ``cap`` bytes.

    :meth:`feed` returns the complete lines (with their LF); a line longer
    than ``cap`` bytes (before its LF) comes out once as ``None`` (answer it
    with :meth:`Commands.too_long`) and the rest of it is skipped.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._buf = b""
        self._skipping = False  # inside a line longer than cap

    def feed(self, data: bytes) -> list[bytes | None]:
        lines: list[bytes | None] = []
        buf = self._buf + data
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:  # however the bytes were cut up, a long line is refused the same way
                lines.append(buf[start : nl + 1] if nl - start <= self.cap else None)
            start = nl + 1
        buf = buf[start:]
        if self._skipping:
            buf = b""
        elif len(buf) > self.cap:
            lines.append(None)
            self._skipping, buf = True, b""
        self._buf = buf
        return lines

    def end(self) -> bytes | None:
        """At end of input: a last line that had no newline, if any."""
        rest, self._buf = self._buf, b""
        return rest or None


def commands_for(service: Operated, log: Logger) -> Commands[Any]:
    """The interpreter wired to a running service."""
    return Commands(
        service.registry, service.settings, lambda: service.request_stop("operator"), log
    )


class StdinConsole:
    """The terminal console: a daemon thread running stdin lines as commands.

    Answers go to stdout. End of input ends the console, not the server.
    It reads and writes the file descriptors with ``os.read``/``os.write``,
    not through ``sys.stdin``/``sys.stdout``: a daemon thread blocked inside a
    buffered stream holds its lock, and the interpreter aborts at exit when it
    finds that lock taken.
    """

    def __init__(self, service: Operated, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.log = get_logger(source="console")
        self.commands = commands_for(service, self.log)
        self._in = stdin_fd
        self._out = stdout_fd
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading; call from the main thread (it may set a signal disposition)."""
        if os.isatty(self._in) and threading.current_thread() is threading.main_thread():
            # Started in the background (`echod --foreground &`), a read from the
            # terminal would stop the whole process with SIGTTIN; ignored, the
            # read fails with EIO instead and the console waits to be in front.
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        self.thread = threading.Thread(target=self._run, name="echod-console", daemon=True)
        self.thread.start()

    def _read(self) -> bytes:
        while True:
            try:
                return os.read(self._in, 65536)
            except OSError as err:
                if err.errno != errno.EIO or not self._in_background():
                    raise
            time.sleep(BACKGROUND_POLL)

    def _in_background(self) -> bool:
        try:
            return os.tcgetpgrp(self._in) != os.getpgrp()
        except OSError:
            return False

    def _run(self) -> None:
        self.log.info("console_started")
        try:
            if os.isatty(self._in):
                self._print(
                    "echod console: /help lists commands; other lines are broadcast; "
                    "Ctrl-D ends the console, Ctrl-C stops echod"
                )
            self._loop()
        except OSError as err:  # stdin or stdout unusable
            self.log.warning("console_error", detail=err.strerror or str(err))
        self.log.info("console_closed", detail="end of input; echod keeps running")

    def _loop(self) -> None:
        commands = self.commands
        lines = CommandLines(commands.max_command)
        while data := self._read():
            for line in lines.feed(data):
                self._print(commands.too_long() if line is None else commands.execute(decode(line)))
        last = lines.end()
        if last is not None:
            self._print(commands.execute(decode(last)))

    def _print(self, text: str) -> None:
        if not text:
            return
        data = encode(text + "\n")
        while data:
            data = data[os.write(self._out, data) :]
