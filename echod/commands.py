"""The operator command language: one interpreter behind every console.

Design
------
:class:`Commands` is the one interpreter behind every way in: the terminal
(:mod:`echod.console`), the control socket (:mod:`echod.control`) and so
``echod ctl`` / ``echod console`` / ``socat`` (:mod:`echod.ctl`). It takes
exactly what it needs (the registry, the settings and a stop callback), so
it is tested without any socket of its own.

``execute(line)`` returns the answer as text without a trailing newline:
the first line is ``OK ...`` or ``ERR <reason>``; some answers (``/list``,
``/stats``, ``/help``) carry more lines after it, none of them empty. The
control socket ends every answer with an empty line (see
:mod:`echod.control`); the terminal just prints it. A blank input line is no
command and gets no answer (``""``). A line without ``/`` is a broadcast,
unless its first word is a command name (``list``, ``kick 3``): that is
almost always a forgotten slash, so it is answered ``ERR did you mean
/list? ...`` instead of being pushed to every client. A malformed command
is answered ``ERR usage: ...`` (:data:`USAGE`), which ``echod ctl`` turns
into exit status 2.

Extending it: everything a later command or counter needs is declared in
one place each.

* :data:`COMMANDS` is the command table: name, usage, help line and handler
  (a method of :class:`Commands` taking the text after the name). ``/help``,
  the usage errors and the "did you mean" check all read it. A new command
  (``/reload``, ``/upgrade``) is one method and one row.
* :data:`STATS` declares the ``/stats`` lines, each a name and a function of
  one :class:`StatsSample`, which is taken once per ``/stats`` (so the lines
  agree with each other). A new source of counters (admission, TLS) becomes
  a field of :class:`StatsSample`, filled in :meth:`Commands.sample`, and
  its lines rows of :data:`STATS`.
* :data:`LIST_FIELDS` declares the ``name=value`` fields of a ``/list``
  row, each a function of the client and the current monotonic time. A new
  per-client field (its TLS version, its PROXY source) is one row, plus the
  attribute in :class:`Target`; a field whose value is ``None`` is left out
  of that row (``via=`` only after a PROXY header, ``tls=`` only on TLS
  connections, ``cn=`` only with a client
  certificate).

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

Error handling: a mistake is a :class:`CommandError` raised by a handler
and answered ``ERR <reason>``; any other exception is a bug, logged as
``operator_command_failed`` and answered ``ERR internal error``, and the
console or session goes on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from echod import protocol
from echod.admission import REASONS, Admission, Policy
from echod.config import Settings
from echod.errors import UpgradeFailed
from echod.logs import Logger, get_logger
from echod.registry import Client, Registry, Stats
from echod.reload import Outcome, ReloadError

ENCODING = "utf-8"
ERRORS = "surrogateescape"  # byte-transparent: bytes -> str -> the same bytes
COMMAND_SLACK = 256  # room for "/send 12345 " etc. on top of --max-line
USAGE = "usage: "  # starts the reason of every malformed-command ERR (echod ctl: exit 2)


class Target(Client, Protocol):
    """What a command needs of a connected client (echod.connection.Connection)."""

    peer: str
    via: str | None  # the proxy, when a PROXY header named the client
    started: float  # monotonic
    last_active: float  # monotonic
    tls_version: str | None  # None: plain TCP, or the TLS handshake is not done
    tls_cn: str | None  # the verified client certificate's common name

    def push(self, data: bytes, lines: int = 1) -> bool: ...

    def end(self, last_line: bytes | None, reason: str) -> bool: ...


class Operated(Protocol):
    """What the operator interfaces need of the running service (echod.service.Service)."""

    @property
    def registry(self) -> Registry[Any]: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def admission(self) -> Admission: ...

    def request_stop(self, reason: str) -> None: ...

    def reload(self, trigger: str) -> Outcome: ...
    def upgrade(self) -> str: ...


T = TypeVar("T", bound=Target)

_WORD = re.compile(r"(\S*)(?:\s(.*))?", re.DOTALL)  # matches any string


class CommandError(Exception):
    """A command that cannot be carried out; ``str(err)`` follows ``ERR ``."""


class BadUsage(CommandError):
    """A malformed command: answered with ``ERR usage: `` and the command's usage."""


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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


@dataclass(frozen=True)
class StatsSample:
    """Everything one ``/stats`` reads, taken once so that its lines agree."""

    stats: Stats
    settings: Settings
    refused: dict[str, int]  # admission refusals by reason
    source_groups: int


class Commands(Generic[T]):
    """The operator command interpreter; see the module docstring."""

    def __init__(
        self,
        registry: Registry[T],
        settings: Callable[[], Settings],
        stop: Callable[[], None],
        log: Logger | None = None,
        admission: Admission | None = None,
        reload: Callable[[], Outcome] | None = None,
        upgrade: Callable[[], str] | None = None,
    ) -> None:
        self.registry = registry
        self._settings = settings  # called at each use: a reload replaces the settings
        self.stop = stop
        self.reloader = reload
        self.upgrade = upgrade  # waits until the new echod serves; raises UpgradeFailed
        self.log: Logger = log if log is not None else get_logger(source="console")
        # The server's admission state, for /stats (a fresh one counts nothing).
        self.admission = admission if admission is not None else Admission(Policy())

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def max_command(self) -> int:
        """The longest command line worth reading whole (longer ones are refused)."""
        return self.settings.max_line * 2 + COMMAND_SLACK

    def execute(self, line: str) -> str:
        """Run one command line; the answer's first line is ``OK ...`` or ``ERR ...``."""
        line = strip_eol(line)
        if not line.strip():
            return ""
        bare = not line.startswith("/")
        if bare:  # plain text: a broadcast, as in the original console
            name, rest = "broadcast", line
        else:
            name, rest = split_word(line[1:])
            name = name.lower()
        command = _BY_NAME.get(name)
        try:
            if "\n" in line or "\r" in line:  # one command is one line, whatever follows
                raise CommandError("text must be one line (no CR or LF)")
            if command is None:
                raise CommandError(f"unknown command {_show('/' + name)} (try /help)")
            if bare and (word := line.split(maxsplit=1)[0]).lower() in _BY_NAME:
                raise CommandError(f"did you mean /{word}? (/broadcast {word} sends it as text)")
            return command.handler(self, rest)
        except CommandError as err:
            reason = command.usage_error() if isinstance(err, BadUsage) and command else str(err)
            self.log.info(
                "operator_command", command=name if command else "unknown", ok=False, error=reason
            )
            return f"ERR {reason}"
        except Exception as err:  # a bug must not kill the console or the session
            self.log.error(
                "operator_command_failed", command=name, error=type(err).__name__, detail=str(err)
            )
            return "ERR internal error (see the log)"

    def too_long(self) -> str:
        """The answer to a command line longer than :attr:`max_command`."""
        self.log.info("operator_command", command=None, ok=False, error="command too long")
        return f"ERR command too long (operator text is at most {self.settings.max_line} bytes)"

    def sample(self) -> StatsSample:
        admission = self.admission
        return StatsSample(
            self.registry.stats(), self.settings, dict(admission.refused), admission.groups()
        )

    # -- helpers -----------------------------------------------------------

    def _text(self, text: str) -> bytes:
        """Operator text as the one client line it becomes, or CommandError."""
        if not text:
            raise BadUsage
        if "\n" in text or "\r" in text:
            raise CommandError("text must be one line (no CR or LF)")
        data = encode(text)
        if len(data) > self.settings.max_line:
            raise CommandError(f"text too long ({len(data)} bytes, max {self.settings.max_line})")
        return protocol.server_says(data)

    def _client(self, word: str) -> T:
        if not word:
            raise BadUsage
        if not word.isascii() or not word.isdigit():
            raise CommandError(f"bad client id {_show(word)} (ids are numbers, see /list)")
        client = self.registry.get(int(word))
        if client is None:
            raise CommandError(f"no client {int(word)} (see /list)")
        return client

    @staticmethod
    def _no_args(rest: str) -> None:
        if rest.strip():
            raise BadUsage

    # -- the handlers, one per row of COMMANDS ----------------------------

    def _send(self, rest: str) -> str:
        word, text = split_word(rest)
        client = self._client(word)
        line = self._text(text)
        if not client.push(line):
            raise CommandError(f"client {client.id} is disconnecting")
        self.registry.count_operator_messages(1)
        self.log.info(
            "operator_command",
            command="send",
            ok=True,
            client=client.id,
            text_bytes=len(line) - len(protocol.server_says(b"")),
        )
        return f"OK sent to client {client.id}"

    def _broadcast(self, rest: str) -> str:
        line = self._text(rest)
        clients = self.registry.snapshot()  # the lock is released before any send
        delivered = sum(1 for client in clients if client.push(line))
        self.registry.count_operator_messages(delivered)
        self.log.info(
            "operator_command",
            command="broadcast",
            ok=True,
            clients=delivered,
            text_bytes=len(line) - len(protocol.server_says(b"")),
        )
        return f"OK sent to {_plural(delivered, 'client')}"

    def _list(self, rest: str) -> str:
        self._no_args(rest)
        clients = self.registry.snapshot()
        now = time.monotonic()
        rows = [
            " ".join(
                f"{name}={shown}"
                for name, value in LIST_FIELDS
                if (shown := value(client, now)) is not None  # a field a client lacks
            )
            for client in clients
        ]
        self.log.info("operator_command", command="list", ok=True, clients=len(rows))
        return "\n".join([f"OK {_plural(len(rows), 'client')}", *rows])

    def _kick(self, rest: str) -> str:
        word, reason = split_word(rest)
        client = self._client(word)
        last = self._text(reason) if reason else None
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
        self._no_args(rest)
        sample = self.sample()
        self.log.info("operator_command", command="stats", ok=True)
        return "\n".join(["OK stats", *(f"{name}={value(sample)}" for name, value in STATS)])

    def _help(self, rest: str) -> str:
        self.log.info("operator_command", command="help", ok=True)
        return "\n".join(["OK commands", *HELP])

    def _reload(self, rest: str) -> str:
        self._no_args(rest)
        if self.reloader is None:
            raise CommandError("this console cannot reload")
        try:
            outcome = self.reloader()
        except ReloadError as err:  # logged as config_reload_failed; nothing changed
            raise CommandError(str(err)) from None
        self.log.info(
            "operator_command",
            command="reload",
            ok=True,
            changed=list(outcome.changed),
            needs_restart=list(outcome.needs_restart),
        )
        return "\n".join(["OK reloaded", *(f"needs restart: {k}" for k in outcome.needs_restart)])

    def _shutdown(self, rest: str) -> str:
        self._no_args(rest)
        self.log.info("operator_command", command="shutdown", ok=True)
        self.stop()
        return "OK shutting down"

    def _upgrade(self, rest: str) -> str:
        self._no_args(rest)
        if self.upgrade is None:
            raise CommandError("upgrade is not available here")
        try:
            answer = self.upgrade()
        except UpgradeFailed as err:
            raise CommandError(f"upgrade failed: {err}") from None
        self.log.info("operator_command", command="upgrade", ok=True)
        return answer


@dataclass(frozen=True)
class Command:
    """One row of the command table."""

    name: str  # typed after the slash, in any case
    usage: str  # shown by /help and in ERR usage answers
    help: str
    handler: Callable[[Commands[Any], str], str]  # gets the text after the name

    def usage_error(self) -> str:
        takes_arguments = " " in self.usage
        return f"{USAGE}{self.usage}{'' if takes_arguments else ' (no arguments)'}"


COMMANDS: tuple[Command, ...] = (
    Command("send", "/send ID TEXT", "push 'Server says: TEXT' to client ID", Commands._send),
    Command(
        "broadcast",
        "/broadcast TEXT",
        "push it to every client (a line without / does the same)",
        Commands._broadcast,
    ),
    Command(
        "list",
        "/list",
        "one client a line: id addr [via] age idle bytes_in/out lines_in/out",
        Commands._list,
    ),
    Command(
        "kick",
        "/kick ID [REASON]",
        "disconnect client ID, telling it 'Server says: REASON' first",
        Commands._kick,
    ),
    Command("stats", "/stats", "server counters", Commands._stats),
    Command(
        "reload",
        "/reload",
        "re-read the config file and apply it (like SIGHUP)",
        Commands._reload,
    ),
    Command("help", "/help", "this list", Commands._help),
    Command("shutdown", "/shutdown", "stop echod gracefully, like SIGTERM", Commands._shutdown),
    Command(
        "upgrade",
        "/upgrade",
        "start the echod now installed and hand every client to it",
        Commands._upgrade,
    ),
)
_BY_NAME = {command.name: command for command in COMMANDS}
HELP = tuple(f"{command.usage:<19} {command.help}" for command in COMMANDS)

# The fields of one /list row, in order: name, and its value for (client,
# monotonic now); a field whose value is None is left out of that row.
LIST_FIELDS: tuple[tuple[str, Callable[[Target, float], object]], ...] = (
    ("id", lambda c, now: c.id),
    ("addr", lambda c, now: c.peer),
    ("via", lambda c, now: c.via),
    ("age", lambda c, now: f"{now - c.started:.1f}s"),
    # last_active is stamped by the janitor, so it can be a little ahead of "now"
    ("idle", lambda c, now: f"{max(0.0, now - c.last_active):.1f}s"),
    ("bytes_in", lambda c, now: c.bytes_in),
    ("bytes_out", lambda c, now: c.bytes_out),
    ("lines_in", lambda c, now: c.lines_in),
    ("lines_out", lambda c, now: c.lines_out),
    # TLS connections only; cn= only with a verified client certificate.
    ("tls", lambda c, now: c.tls_version),
    ("cn", lambda c, now: c.tls_cn),
)

# The lines of /stats after "OK stats", in order: name, and its value in one sample.
STATS: tuple[tuple[str, Callable[[StatsSample], object]], ...] = (
    ("connected", lambda s: s.stats.connected),
    ("max_clients", lambda s: s.settings.max_clients),
    ("total_accepted", lambda s: s.stats.total_accepted),
    ("rejected", lambda s: s.stats.rejected),
    ("lines_in", lambda s: s.stats.lines_in),
    ("lines_out", lambda s: s.stats.lines_out),
    ("bytes_in", lambda s: s.stats.bytes_in),
    ("bytes_out", lambda s: s.stats.bytes_out),
    ("uptime", lambda s: f"{s.stats.uptime:.1f}s"),
    ("max_line", lambda s: s.settings.max_line),
    ("idle_timeout", lambda s: f"{s.settings.idle_timeout:g}s"),
    ("line_timeout", lambda s: f"{s.settings.line_timeout:g}s"),
    ("send_timeout", lambda s: f"{s.settings.send_timeout:g}s"),
    ("shutdown_timeout", lambda s: f"{s.settings.shutdown_timeout:g}s"),
    ("backlog", lambda s: s.settings.backlog),
    # One line per refusal reason, also when 0, so a scraper sees every name.
    *((f"refused_{reason}", lambda s, r=reason: s.refused[r]) for reason in REASONS),
    ("source_groups", lambda s: s.source_groups),
    ("tls", lambda s: "on" if s.settings.tls else "off"),
    ("tls_handshake_failures", lambda s: s.stats.tls_handshake_failures),
)


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
        service.registry,
        lambda: service.settings,
        lambda: service.request_stop("operator"),
        log,
        service.admission,
        reload=lambda: service.reload("operator"),
        upgrade=service.upgrade,
    )
