"""Settings: every option declared once, with its default, validation and help.

:data:`OPTIONS` is the single table the command line is built from
(:func:`add_arguments`) and the frozen :class:`Settings` are built from
(:func:`settings_from_namespace`). Defaults that depend on who runs echod
(root or not) are computed by the ``default_*`` functions below and are
documented in README.md.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878


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


# -- value parsers: each raises argparse.ArgumentTypeError with one sentence --


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {bound})")
        return value

    return parse


def _seconds(allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if value != value or value in (float("inf"), float("-inf")) or value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
        if value == 0 and not allow_zero:
            raise argparse.ArgumentTypeError("must be more than 0 seconds")
        return value

    return parse


def _host(text: str) -> str:
    text = text.strip("[]")  # allow [::1] as people write it in URLs
    if not text:
        raise argparse.ArgumentTypeError("the host must not be empty")
    return text


def _optional_path(text: str) -> Path | None:
    if text.lower() == "none":
        return None
    return Path(text).expanduser().absolute()


def _path(text: str) -> Path:
    return Path(text).expanduser().absolute()


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (debug, info, warning, error, critical)"
        )
    return level


@dataclass(frozen=True)
class Option:
    """One command-line option: its flag, parser, default and help text."""

    name: str
    flag: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    flag_only: bool = False  # a --switch with no value
    metavar: str | None = None
    negatable: bool = False  # also accept --no-<name>


OPTIONS: tuple[Option, ...] = (
    Option(
        "host",
        "--host",
        "address to listen on (IPv4, IPv6 such as ::1, or a name)",
        DEFAULT_HOST,
        _host,
        metavar="ADDR",
    ),
    Option(
        "port",
        "--port",
        "TCP port to listen on; 0 picks a free port",
        DEFAULT_PORT,
        _int_range(0, 65535),
    ),
    Option(
        "max_line",
        "--max-line",
        "longest line in bytes, before its line ending",
        1024,
        _int_range(1, 1 << 20),
        metavar="BYTES",
    ),
    Option(
        "foreground",
        "--foreground",
        "stay attached to the terminal and log to stderr",
        False,
        flag_only=True,
    ),
    Option(
        "console",
        "--console",
        "read operator commands from stdin (default: on when --foreground and stdin is a TTY)",
        None,
        flag_only=True,
        negatable=True,
    ),
    Option(
        "chat",
        "--chat",
        "also relay each client's lines to every other client",
        False,
        flag_only=True,
    ),
    Option(
        "log_level", "--log-level", "least severe event to log", "info", _log_level, metavar="LEVEL"
    ),
    Option(
        "log_format",
        "--log-format",
        "console (colours on a TTY) or json; default: console on a TTY, json otherwise",
        "auto",
        choices=("auto", "console", "json"),
    ),
    Option(
        "log_file",
        "--log-file",
        "log file when detached (JSON lines; SIGHUP reopens it); "
        "default /var/log/echod/echod.log for root, ~/.local/state/echod/echod.log otherwise",
        None,
        _path,
        metavar="PATH",
    ),
    Option(
        "pidfile",
        "--pidfile",
        "pidfile, locked while echod runs; default when detached: "
        "/run/echod/echod.pid for root, $XDG_RUNTIME_DIR/echod/echod.pid otherwise",
        None,
        _path,
        metavar="PATH",
    ),
    Option(
        "control_socket",
        "--control-socket",
        "operator control socket, or 'none'; default /run/echod/control.sock for root, "
        "$XDG_RUNTIME_DIR/echod/control.sock otherwise",
        None,
        _optional_path,
        metavar="PATH|none",
    ),
    Option(
        "user", "--user", "when started as root: user to run as after binding", None, metavar="NAME"
    ),
    Option(
        "group",
        "--group",
        "when started as root: group to run as after binding",
        None,
        metavar="NAME",
    ),
    Option(
        "max_clients",
        "--max-clients",
        "most clients connected at once; more are refused",
        1000,
        _int_range(1),
        metavar="N",
    ),
    Option(
        "idle_timeout",
        "--idle-timeout",
        "close a client silent this many seconds (0 = never)",
        300.0,
        _seconds(True),
        metavar="SECONDS",
    ),
    Option(
        "line_timeout",
        "--line-timeout",
        "close a client whose unfinished line is this old (0 = never)",
        60.0,
        _seconds(True),
        metavar="SECONDS",
    ),
    Option(
        "send_timeout",
        "--send-timeout",
        "drop a client that cannot take its bytes within this many seconds",
        10.0,
        _seconds(False),
        metavar="SECONDS",
    ),
    Option(
        "shutdown_timeout",
        "--shutdown-timeout",
        "longest a graceful stop waits for clients to be closed",
        5.0,
        _seconds(False),
        metavar="SECONDS",
    ),
    Option(
        "backlog",
        "--backlog",
        "listen backlog (the kernel caps it at net.core.somaxconn)",
        4096,
        _int_range(1, 65535),
        metavar="N",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, validated; see :data:`OPTIONS`."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_line: int = 1024
    foreground: bool = False
    console: bool | None = None
    chat: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    log_file: Path | None = None
    pidfile: Path | None = None
    control_socket: Path | None = None
    user: str | None = None
    group: str | None = None
    max_clients: int = 1000
    idle_timeout: float = 300.0
    line_timeout: float = 60.0
    send_timeout: float = 10.0
    shutdown_timeout: float = 5.0
    backlog: int = 4096  # a burst that overflows it stalls clients for seconds (docs/limits.md)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


_UNSET_CONTROL = object()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option of :data:`OPTIONS` on ``parser``."""
    for opt in OPTIONS:
        dest = opt.name
        if opt.flag_only:
            action: Any = argparse.BooleanOptionalAction if opt.negatable else "store_true"
            parser.add_argument(
                opt.flag, dest=dest, action=action, default=opt.default, help=opt.help
            )
            continue
        default = opt.default
        if opt.name == "control_socket":
            default = _UNSET_CONTROL  # "not given" differs from "none"
        shown = f" (default: {opt.default})" if opt.default is not None else ""
        parser.add_argument(
            opt.flag,
            dest=dest,
            type=opt.type or str,
            default=default,
            choices=opt.choices,
            metavar=opt.metavar,
            help=opt.help + shown,
        )


def settings_from_namespace(ns: argparse.Namespace) -> Settings:
    """Build validated :class:`Settings` from parsed arguments."""
    values = {f.name: getattr(ns, f.name) for f in fields(Settings) if hasattr(ns, f.name)}
    if values.get("control_socket") is _UNSET_CONTROL:
        values["control_socket"] = default_control_socket()
    return Settings(**values)
