"""Logging: the only place structlog is configured.

One event is one line: colourful key=value output when writing to a TTY,
JSON lines otherwise (or as ``--log-format`` says). Exceptions are rendered
as structured data, never as multi-line tracebacks. A detached daemon logs to
a :class:`LogFile`, which SIGHUP reopens so logrotate can move it away.

When stderr is the journal (systemd sets ``$JOURNAL_STREAM`` to the device
and inode of the stream it connected, sd-daemon(3)), every line starts with
its syslog priority, ``<3>`` to ``<7>``; journald strips the prefix and
stores the line at that priority, so ``journalctl -p warning`` finds
echod's warnings. Both formats get it; nothing else does (a terminal or a
log file would show it verbatim).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog

from echod.errors import StartupError

Logger = structlog.typing.FilteringBoundLogger

# sd-daemon(3) priority prefixes by structlog level name (syslog numbering).
PRIORITIES = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}
ERROR_PRIORITY = PRIORITIES["error"]


class LogFile:
    """An append-only text file that can be reopened at the same path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self) -> TextIO:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as err:
            raise StartupError(f"cannot open log file {self.path}: {err.strerror or err}") from None

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            return self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def isatty(self) -> bool:
        return False

    def reopen(self) -> None:
        """Open the path anew (after logrotate moved the file) and close the old one."""
        new = self._open()
        with self._lock:
            old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _wants_console(fmt: str, stream: Any) -> bool:
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return fmt == "console"


def _exception_summary(
    _logger: Any, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Replace ``exc_info`` with error/detail fields: ConsoleRenderer would print a traceback."""
    exc_info = event.pop("exc_info", None)
    if exc_info is True:
        exc: BaseException | None = sys.exc_info()[1]
    elif isinstance(exc_info, BaseException):
        exc = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = None
    if exc is not None:
        event.setdefault("error", type(exc).__name__)
        event.setdefault("detail", str(exc))
    return event


def is_journal(stream: Any) -> bool:
    """True if ``stream`` is the one systemd connected to the journal (``$JOURNAL_STREAM``)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):
        return False  # no descriptor (a StringIO), closed, or no/garbled variable


def journal_prefix(priority: int, stream: Any = None) -> str:
    """``"<N>"`` if ``stream`` (default stderr) is the journal, else ``""``."""
    return f"<{priority}>" if is_journal(sys.stderr if stream is None else stream) else ""


def _with_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    def render(logger: Any, name: str, event: structlog.typing.EventDict) -> str:
        priority = PRIORITIES.get(event.get("level", name), PRIORITIES["info"])
        line = renderer(logger, name, event)
        assert isinstance(line, str)  # both renderers make text
        return f"<{priority}>{line}"

    return render


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Route every echod event to ``stream`` (default stderr) as ``fmt`` says."""
    stream = sys.stderr if stream is None else stream
    console = _wants_console(fmt, stream)
    renderer: structlog.typing.Processor
    if console:
        colors = bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    else:
        renderer = structlog.processors.JSONRenderer()
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamp,
    ]
    # JSON: the traceback as data on the one line; console: a one-line summary.
    processors.append(structlog.processors.dict_tracebacks if not console else _exception_summary)
    processors.append(_with_priority(renderer) if is_journal(stream) else renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Logger:
    logger: Logger = structlog.get_logger(**initial)
    return logger
