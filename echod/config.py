"""Settings: every option declared once, with its type, default, validation and help.

Each field of the frozen :class:`Settings` dataclass *is* an option: its
annotation is the type, and :func:`option` gives, in one place, the
default, the value kind (how text becomes a valid value, and which values
are valid), the help text and the metadata below. :data:`OPTIONS` is read
off those fields; the command line is built from it (:func:`add_arguments`),
README.md's flag table is checked against it (tests/unit/test_config.py),
and :meth:`Settings.__post_init__` runs the same checks, so that
``Settings(idle_timeout=-1)`` fails with the sentence the flag gives.

Adding an option
----------------
Add one field to :class:`Settings` with ``option(...)`` and a row to the
README's flag table. Its names follow from the field name: the flag is
``--`` plus the name with ``-`` for ``_`` (and so will a config file's key
be, the field name itself). An :class:`Option` also says:

- ``kind``: a :class:`Kind`, the parser from text (for flags, later config
  files) and the check of a typed value (for :class:`Settings` built in
  code). Kinds shared with other commands are public: :func:`parse_duration`
  and :func:`parse_path` (``echod stop --timeout``, every ``--pidfile``, and
  ``echod ctl`` / ``echod console``: ``--timeout``, ``--control-socket``),
  so one mistake gets one sentence everywhere.
- no ``kind``: a switch, a ``--flag`` without a value (``negatable`` adds
  ``--no-flag``).
- ``repeatable``: ``action="append"``, every occurrence adds one item, each
  parsed by ``kind``; declare the field ``tuple[X, ...]`` with
  ``default_factory=tuple`` (for example ``--allow CIDR``).
- ``reloadable``: whether a running echod applies a new value at a reload
  (:mod:`echod.reload`); the others are bound, opened or decided at start
  and are reported as needing a restart.
- ``shown``: the README's default cell when it is not the value itself (a
  default that depends on who runs echod, computed by a ``default_*``
  function below and described in README.md).

Error handling
--------------
A bad value raises :class:`InvalidValue` (a ``ValueError``, and argparse's
``ArgumentTypeError`` so argparse prints its sentence) with one sentence
that does not repeat the value's name; whoever knows the name adds it.
:class:`Settings` raises :class:`~echod.errors.UsageError` (exit status 2),
``"argument --NAME: SENTENCE"``, the words argparse uses for the flag, and
one sentence for options that do not go together.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

from echod import admission, proxy
from echod.admission import IPNetwork, Rate
from echod.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, not usage plus error.

    Every command line of echod (the daemon, ``ctl``, ``status``/``stop``)
    parses with it, so a mistake reads the same everywhere.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878
# The longest duration any option or command accepts: one day. Far more than
# any timeout needs, and far below where Python's time conversions overflow
# (thread.join(), lock and socket timeouts raise OverflowError above about
# 9.2e9 s, 2**63 nanoseconds).
MAX_SECONDS = 86_400.0


def _runtime_dir() -> Path:
    """Where per-user runtime files live: /run/echod for root, else $XDG_RUNTIME_DIR/echod."""
    if os.geteuid() == 0:
        return Path("/run/echod")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "echod"
    return Path(f"/tmp/echod-{os.geteuid()}")


def default_control_socket() -> Path:
    return _runtime_dir() / "control.sock"


def default_pidfile() -> Path:
    return _runtime_dir() / "echod.pid"


def default_log_file() -> Path:
    if os.geteuid() == 0:
        return Path("/var/log/echod/echod.log")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "echod" / "echod.log"


# -- value kinds ------------------------------------------------------------------


class InvalidValue(argparse.ArgumentTypeError, ValueError):
    """A value an option does not accept: ``str(err)`` is one sentence."""


@dataclass(frozen=True)
class Kind(Generic[T]):
    """How an option's text becomes a value, and which values are valid."""

    convert: Callable[[str], T]  # text -> value; raises InvalidValue
    check: Callable[[T], None] = lambda value: None  # raises InvalidValue

    def parse(self, text: str) -> T:
        value = self.convert(text)
        self.check(value)
        return value


def _to_int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidValue(f"{text!r} is not a whole number") from None


def int_range(lo: int, hi: int | None = None) -> Kind[int]:
    def check(value: int) -> None:
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise InvalidValue(f"{value} is out of range (must be {bound})")

    return Kind(_to_int, check)


def _to_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise InvalidValue(f"{text!r} is not a number of seconds")
    return value


def check_duration(value: float, *, allow_zero: bool = False) -> None:
    """Raise :class:`InvalidValue` unless ``value`` is a usable number of seconds."""
    if value != value:  # NaN
        raise InvalidValue(f"{value!r} is not a number of seconds")
    if allow_zero and value < 0:
        raise InvalidValue("must be 0 or more seconds")
    if not allow_zero and value <= 0:
        raise InvalidValue("must be more than 0 seconds")
    if value > MAX_SECONDS:
        raise InvalidValue(f"must be at most {MAX_SECONDS:g} seconds (one day)")


def duration(*, allow_zero: bool) -> Kind[float]:
    return Kind(_to_seconds, lambda value: check_duration(value, allow_zero=allow_zero))


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """Seconds from text: a number above 0 (or 0 too) up to :data:`MAX_SECONDS`."""
    return duration(allow_zero=allow_zero).parse(text)


def parse_path(text: str) -> Path:
    """A file system path from text: ``~`` expanded, made absolute (echod detaches to /)."""
    if not text:
        raise InvalidValue("the path must not be empty")
    return Path(text).expanduser().absolute()


def _optional_path(text: str) -> Path | None:
    return None if text.lower() == "none" else parse_path(text)


def _host(text: str) -> str:
    text = text.strip("[]")  # allow [::1] as people write it in URLs
    if not text:
        raise InvalidValue("the host must not be empty")
    return text


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _check_log_level(level: str) -> None:
    if level not in LOG_LEVELS:
        raise InvalidValue(f"{level!r} is not a log level ({', '.join(LOG_LEVELS)})")


def choice(*names: str) -> Kind[str]:
    def check(value: str) -> None:
        if value not in names:
            raise InvalidValue(f"invalid choice: {value!r} (choose from {', '.join(names)})")

    return Kind(str, check)


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) as its host and port; raises InvalidValue."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InvalidValue(f"{text!r} is not HOST:PORT (such as 127.0.0.1:9100)")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise InvalidValue(f"{text!r}: write an IPv6 address in brackets, as [::1]:9100")
    return _host(host), int_range(0, 65535).parse(port)


def _check_listen(text: str) -> None:
    split_host_port(text)


TEXT: Kind[str] = Kind(str)
PATH: Kind[Path] = Kind(parse_path)


def _from(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A parser of echod.admission, its ValueError turned into InvalidValue."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise InvalidValue(str(err)) from None

    return convert


CIDR: Kind[IPNetwork] = Kind(_from(admission.parse_entry))


# -- the option table -----------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option, as declared on its :class:`Settings` field; see the module docstring."""

    help: str
    kind: Kind[Any] | None = None  # None: a switch, --flag without a value
    metavar: str | None = None
    negatable: bool = False  # a switch that also has --no-flag
    repeatable: bool = False
    reloadable: bool = False
    shown: str | None = None
    name: str = ""  # the Settings field, filled in by OPTIONS
    default: Any = None  # likewise; None also for a computed (factory) default

    @property
    def switch(self) -> bool:
        return self.kind is None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def option(
    help: str,
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    **meta: Any,
) -> Any:
    """A :class:`Settings` field that is an option; ``meta`` as for :class:`Option`."""
    info = {"option": Option(help, **meta)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=info)
    return field(default=default, metadata=info)


def _list(help: str, kind: Kind[Any], metavar: str, **meta: Any) -> Any:
    """A repeatable option, empty unless given: each use adds one item."""
    return option(
        help, default_factory=tuple, kind=kind, metavar=metavar, repeatable=True, shown="—", **meta
    )


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, validated; each field is one option."""

    host: str = option(
        "address to listen on (IPv4, IPv6 such as ::1, or a name)",
        DEFAULT_HOST,
        kind=Kind(_host),
        metavar="ADDR",
    )
    port: int = option(
        "TCP port to listen on; 0 picks a free port", DEFAULT_PORT, kind=int_range(0, 65535)
    )
    max_line: int = option(
        "longest line in bytes, before its line ending",
        1024,
        kind=int_range(1, 1 << 20),
        metavar="BYTES",
        reloadable=True,
    )
    foreground: bool = option("stay attached to the terminal and log to stderr", False)
    console: bool | None = option(
        "read operator commands from stdin (default: on when --foreground and stdin is a TTY)",
        None,
        negatable=True,
        shown="on with `--foreground` on a TTY",
    )
    chat: bool = option(
        "also relay each client's lines to every other client", False, reloadable=True
    )
    log_level: str = option(
        "least severe event to log",
        "info",
        kind=Kind(str.lower, _check_log_level),
        metavar="LEVEL",
        reloadable=True,
    )
    log_format: str = option(
        "console (colours on a TTY) or json; default: console on a TTY, json otherwise",
        "auto",
        kind=choice("auto", "console", "json"),
        metavar="{auto,console,json}",
        reloadable=True,
    )
    log_file: Path | None = option(
        "log file when detached (JSON lines; SIGHUP reopens it); "
        "default /var/log/echod/echod.log for root, ~/.local/state/echod/echod.log otherwise",
        None,
        kind=PATH,
        metavar="PATH",
        shown="see below",
    )
    pidfile: Path | None = option(
        "pidfile when detached, locked while echod runs; "
        "default /run/echod/echod.pid for root, $XDG_RUNTIME_DIR/echod/echod.pid otherwise",
        None,
        kind=PATH,
        metavar="PATH",
        shown="see below",
    )
    control_socket: Path | None = option(
        "operator control socket, or 'none'; default /run/echod/control.sock for root, "
        "$XDG_RUNTIME_DIR/echod/control.sock otherwise",
        default_factory=default_control_socket,
        kind=Kind(_optional_path),
        metavar="PATH|none",
        shown="see below",
    )
    user: str | None = option(
        "when started as root: user to run as after binding",
        None,
        kind=TEXT,
        metavar="NAME",
        shown="—",
    )
    group: str | None = option(
        "when started as root: group to run as after binding",
        None,
        kind=TEXT,
        metavar="NAME",
        shown="—",
    )
    max_clients: int = option(
        "most clients connected at once; more are refused",
        1000,
        kind=int_range(1),
        metavar="N",
        reloadable=True,
    )
    idle_timeout: float = option(
        "close a client silent this many seconds (0 = never)",
        300.0,
        kind=duration(allow_zero=True),
        metavar="SECONDS",
        reloadable=True,
    )
    line_timeout: float = option(
        "close a client whose unfinished line is this old (0 = never)",
        60.0,
        kind=duration(allow_zero=True),
        metavar="SECONDS",
        reloadable=True,
    )
    send_timeout: float = option(
        "drop a client that cannot take its bytes within this many seconds",
        10.0,
        kind=duration(allow_zero=False),
        metavar="SECONDS",
        reloadable=True,
    )
    shutdown_timeout: float = option(
        "longest a graceful stop waits for clients to be closed",
        5.0,
        kind=duration(allow_zero=False),
        metavar="SECONDS",
        reloadable=True,
    )
    backlog: int = option(
        # A burst that overflows it stalls clients for seconds (docs/limits.md).
        "listen backlog (the kernel caps it at net.core.somaxconn)",
        4096,
        kind=int_range(1, 65535),
        metavar="N",
    )
    metrics_listen: str | None = option(
        "serve Prometheus metrics over HTTP on this address (off by default)",
        None,
        kind=Kind(str, _check_listen),
        metavar="HOST:PORT",
        shown="off",
    )
    # TLS (echod/tls.py). Reloadable: the TLS context is rebuilt whole from
    # them (TLSEndpoint.reload); SIGHUP does that with the values given at start.
    tls_cert: Path | None = option(
        "serve TLS only, with this PEM certificate (then any intermediates); needs --tls-key",
        None,
        kind=PATH,
        metavar="PATH",
        reloadable=True,
        shown="—",
    )
    tls_key: Path | None = option(
        "the unencrypted PEM key of --tls-cert; a reload (SIGHUP) loads both anew",
        None,
        kind=PATH,
        metavar="PATH",
        reloadable=True,
        shown="—",
    )
    tls_client_ca: Path | None = option(
        "require client certificates signed by a CA in this PEM file",
        None,
        kind=PATH,
        metavar="PATH",
        reloadable=True,
        shown="—",
    )
    tls_min_version: str = option(
        "oldest TLS version accepted",
        "1.2",
        kind=choice("1.2", "1.3"),
        metavar="{1.2,1.3}",
        reloadable=True,
    )
    tls_handshake_timeout: float = option(
        "close a client whose whole TLS handshake is not done within this many seconds",
        10.0,
        kind=duration(allow_zero=False),
        metavar="SECONDS",
        reloadable=True,
    )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    proxy_protocol: str = option(
        "every connection begins with a PROXY header of this version (needs --proxy-trusted)",
        "off",
        kind=choice("off", *proxy.VERSIONS),
        metavar="{off,v1,v2,any}",
    )
    proxy_trusted: tuple[IPNetwork, ...] = _list(
        "a network of load balancers that may send the PROXY header", CIDR, "CIDR", reloadable=True
    )
    proxy_timeout: float = option(
        "the PROXY header must be complete this many seconds after the connect",
        3.0,
        kind=duration(allow_zero=False),
        metavar="SECONDS",
        reloadable=True,
    )
    allow: tuple[IPNetwork, ...] = _list(
        "serve only clients that match an allow entry (an address or CIDR network)",
        CIDR,
        "CIDR",
        reloadable=True,
    )
    deny: tuple[IPNetwork, ...] = _list(
        "refuse clients that match, unless a more specific allow entry does",
        CIDR,
        "CIDR",
        reloadable=True,
    )
    allow_file: tuple[Path, ...] = _list(
        "allow entries from a file, one a line, # comments; joins --allow in one list",
        PATH,
        "PATH",
        reloadable=True,
    )
    deny_file: tuple[Path, ...] = _list(
        "deny entries from a file, one a line, # comments; joins --deny in one list",
        PATH,
        "PATH",
        reloadable=True,
    )
    max_per_source: int = option(
        "most connections one source group holds at once (0 = no limit)",
        0,
        kind=int_range(0),
        metavar="N",
        reloadable=True,
    )
    source_prefix: tuple[int, int] = option(
        "prefix lengths that make client addresses one source group, IPv4:IPv6",
        admission.DEFAULT_SOURCE_PREFIX,
        kind=Kind(_from(admission.parse_source_prefix)),
        metavar="V4:V6",
        shown="`32:64`",
        reloadable=True,
    )
    max_connect_rate: Rate | None = option(
        "connects per source group: bursts of N, refilled at N per SECONDS",
        None,
        kind=Kind(_from(Rate.parse)),
        metavar="N/SECONDS",
        shown="off",
        reloadable=True,
    )
    max_line_rate: int = option(
        "lines handled per second per client; faster clients are slowed, not cut (0 = off)",
        0,
        kind=int_range(0),
        metavar="N",
        reloadable=True,
    )

    @functools.cached_property
    def access_lists(self) -> tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]:
        """Allow and deny entries: the flags' and the files' in one list each (files read once).

        Raises :class:`ValueError` naming the file and line of a bad entry.
        """
        allow, deny = self.allow, self.deny
        for path in self.allow_file:
            allow += tuple(admission.read_entries(path))
        for path in self.deny_file:
            deny += tuple(admission.read_entries(path))
        return allow, deny

    def admission_policy(self) -> admission.Policy:
        allow, deny = self.access_lists
        return admission.Policy(
            allow=allow,
            deny=deny,
            max_per_source=self.max_per_source,
            source_prefix=self.source_prefix,
            connect_rate=self.max_connect_rate,
        )

    def __post_init__(self) -> None:
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if opt.kind is None or value is None:
                continue
            try:
                for item in value if opt.repeatable else (value,):
                    opt.kind.check(item)
            except InvalidValue as err:
                raise UsageError(f"argument {opt.flag}: {err}") from None
        if self.proxy_protocol != "off" and not self.proxy_trusted:
            raise UsageError(
                "--proxy-protocol needs --proxy-trusted CIDR: the networks of the load "
                "balancers that may say who the client is"
            )
        try:
            _ = self.access_lists  # read the files now: a bad line stops echod at start
        except ValueError as err:
            raise UsageError(str(err)) from None
        if self.console and not self.foreground:
            raise UsageError("--console needs --foreground (a detached echod has no terminal)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        for given in ("log_file", "pidfile"):
            if getattr(self, given) is not None and self.foreground:
                flag = "--" + given.replace("_", "-")
                raise UsageError(
                    f"{flag} is for detached mode; with --foreground, echod logs to "
                    "stderr and keeps no pidfile"
                )


def _options() -> tuple[Option, ...]:
    table = []
    for f in fields(Settings):
        opt: Option = f.metadata["option"]
        default = None if f.default is MISSING else f.default
        table.append(Option(**{**vars(opt), "name": f.name, "default": default}))
    return tuple(table)


OPTIONS: tuple[Option, ...] = _options()


def add_arguments(parser: argparse.ArgumentParser, options: tuple[Option, ...] = OPTIONS) -> None:
    """Declare every option of ``options`` on ``parser``; unset ones are left out."""
    for opt in options:
        if opt.switch:
            action: Any = argparse.BooleanOptionalAction if opt.negatable else "store_true"
            parser.add_argument(
                opt.flag, dest=opt.name, action=action, default=argparse.SUPPRESS, help=opt.help
            )
            continue
        assert opt.kind is not None, opt.name
        shown = f" (default: {opt.default})" if opt.default is not None else ""
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            type=opt.kind.parse,
            action="append" if opt.repeatable else "store",
            default=argparse.SUPPRESS,  # not given: the Settings field's default
            metavar=opt.metavar,
            help=opt.help + (" (repeatable)" if opt.repeatable else "") + shown,
        )


def given_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The options given in parsed arguments (unset ones are absent), as Settings takes them."""
    names = {opt.name: opt for opt in OPTIONS}
    return {
        name: tuple(value) if names[name].repeatable else value
        for name, value in vars(ns).items()
        if name in names
    }


def settings_from_namespace(ns: argparse.Namespace) -> Settings:
    """Build validated :class:`Settings` from parsed arguments (only those given)."""
    return Settings(**given_values(ns))
