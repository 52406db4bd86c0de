"""Minimal, dependency-free client side of two systemd protocols.

*Readiness notification* (sd_notify(3),
https://www.freedesktop.org/software/systemd/man/sd_notify.html): when a
service runs with ``Type=notify``, systemd passes ``$NOTIFY_SOCKET``, the
address of an ``AF_UNIX``/``SOCK_DGRAM`` socket (a filesystem path, or an
abstract-namespace name written with a leading ``@``). The service sends
newline-separated ``KEY=value`` assignments to it as single datagrams, e.g.
``READY=1``, ``STATUS=3 clients``, ``STOPPING=1``.

*Socket activation* (sd_listen_fds(3),
https://www.freedesktop.org/software/systemd/man/sd_listen_fds.html): systemd
passes already-listening sockets as inherited file descriptors starting at
fd 3 (``SD_LISTEN_FDS_START``), announced by ``$LISTEN_FDS`` (how many),
``$LISTEN_PID`` (the pid they are meant for) and optionally
``$LISTEN_FDNAMES``.

*Watchdog* (sd_watchdog_enabled(3)): with ``WatchdogSec=``, systemd passes
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and kills the service unless it
sends ``WATCHDOG=1`` within that interval. :class:`Watchdog` sends it at
half the interval, but only while every part it is told to watch has moved
since the last ping: a plain timer thread would keep a wedged server alive.

All of it is pure stdlib, never raises on protocol problems, and
:func:`notify` and :func:`listen_sockets` are safe to call from several
threads.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = [
    "SD_LISTEN_FDS_START",
    "Watchdog",
    "listen_sockets",
    "notify",
    "notifying",
    "watchdog_interval",
]

#: First file descriptor number used for socket activation.
SD_LISTEN_FDS_START = 3

#: Upper bound for a blocking send to the notification socket. systemd drains
#: it promptly; the bound only matters if the receiver is wedged.
_NOTIFY_SEND_TIMEOUT = 2.0

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address, or ``None``."""
    if value.startswith("@"):
        # Abstract namespace: '@' stands for the leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # sd_notify(3) only supports absolute paths and abstract names over
    # AF_UNIX (newer systemd also knows vsock:, which we do not need).
    return None


def notifying() -> bool:
    """True if ``$NOTIFY_SOCKET`` names a socket :func:`notify` would send to.

    Lets callers skip building status messages nobody receives. It does not
    check that the socket exists: :func:`notify` still may return ``False``.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    return bool(value) and _notify_address(value or "") is not None


def notify(state: str) -> bool:
    """Send *state* (e.g. ``"READY=1"``) to the service manager.

    Returns ``True`` if the datagram was sent, ``False`` if ``$NOTIFY_SOCKET``
    is unset or unusable or the send failed. Never raises for those cases and
    never logs. A fresh socket is used per call, so concurrent calls from
    several threads need no locking. ``$NOTIFY_SOCKET`` is left in the
    environment (sd_notify(3) with ``unset_environment=0``) so that later
    calls keep working.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _notify_address(value)
    if address is None:
        return False
    try:
        payload = state.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_NOTIFY_SEND_TIMEOUT)
            sock.connect(address)
            sent = sock.send(payload)
    except (OSError, UnicodeError, ValueError):
        return False
    return sent == len(payload)


def listen_sockets() -> list[socket.socket]:
    """Return the sockets passed by socket activation (possibly none).

    Mirrors ``sd_listen_fds(1)``: the sockets are only taken if ``$LISTEN_PID``
    equals :func:`os.getpid`; otherwise (or if the variables are malformed)
    ``[]`` is returned. In every case ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed from :data:`os.environ`, exactly like
    libsystemd does with ``unset_environment`` set: the variables describe
    this process's fd table and must not leak to children, whose pid differs
    anyway.

    Each returned socket is created with ``socket.socket(fileno=fd)`` (family,
    type and protocol are detected from the descriptor), is marked
    non-inheritable (close-on-exec) and is switched to blocking mode, because
    systemd hands listening sockets over with ``O_NONBLOCK`` set while a
    fresh Python socket object assumes blocking mode. Descriptors that are not
    sockets are skipped and left untouched.
    """
    pid_value = os.environ.get("LISTEN_PID")
    fds_value = os.environ.get("LISTEN_FDS")
    for name in _LISTEN_ENV:
        os.environ.pop(name, None)

    if pid_value is None or fds_value is None:
        return []
    try:
        pid = int(pid_value)
        count = int(fds_value)
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []

    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            # Not a socket (ENOTSOCK) or not open (EBADF): nothing to adopt.
            continue
        try:
            sock.set_inheritable(False)
            sock.setblocking(True)
        except OSError:
            sock.detach()
            continue
        sockets.append(sock)
    return sockets


def watchdog_interval() -> float | None:
    """``WatchdogSec=`` in seconds if systemd expects ``WATCHDOG=1`` from us, else ``None``.

    As sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the interval in
    microseconds, meant for ``$WATCHDOG_PID`` if that is set. Malformed or
    non-positive values mean no watchdog.
    """
    try:
        usec = int(os.environ["WATCHDOG_USEC"])
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except (KeyError, ValueError):
        return None
    return usec / 1e6 if usec > 0 else None


class Watchdog:
    """Send ``WATCHDOG=1`` every half ``interval`` while every watched part moves.

    ``progress()`` maps each part that must keep going to a counter it
    advances as it goes round (echod: the accept loop and the janitor).
    :meth:`check`, called from the main loop, pings when half the interval
    has passed since the last check *and* every counter changed since the
    last ping; otherwise it withholds the ping and names the parts that
    stood still in :attr:`stalled`. Withheld until ``interval`` is over,
    systemd kills and restarts the service. Half the interval leaves a whole
    half for a late check, as sd_watchdog_enabled(3) advises.
    """

    def __init__(
        self,
        interval: float,
        progress: Callable[[], Mapping[str, int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = interval / 2
        self._progress = progress
        self._clock = clock
        self._last = dict(progress())
        self._due = clock() + self.every
        self.stalled: list[str] = []  # parts that had not moved at the last check

    def check(self) -> float:
        """Ping if it is due and everything moved; seconds until the next check."""
        now = self._clock()
        if now >= self._due:
            current = dict(self._progress())
            self.stalled = [part for part, n in current.items() if self._last.get(part) == n]
            if not self.stalled:
                notify("WATCHDOG=1")
                self._last = current
            self._due = now + self.every
        return self._due - now
