"""Stopping every handler thread where no byte it holds is lost, for a hand-over.

The problem
-----------
A handler blocks in ``recv`` without a timeout (that keeps its hot path to
one ``recv`` and one ``send`` per burst). For an upgrade, another process
takes over the very same sockets: they share each connection's open file
description. Nothing that acts on the socket (``shutdown``, ``close``) can
stop the old handler without hurting the successor, and a handler that
returns from ``recv`` with data after the successor took over would lose it.

The mechanism
-------------
:meth:`Pause.hold` does, in this order:

1. Sets :attr:`Pause.active` and makes :attr:`wake_fd` readable.
2. Puts every serving client's open file description into ``O_NONBLOCK``
   (``fcntl``; the handler's Python socket still believes it blocks, so a
   ``recv`` that finds nothing raises :class:`BlockingIOError` instead of
   waiting for data).
3. Sends :data:`WAKE_SIGNAL` to each handler thread (``pthread_kill``).
   Python installs its signal handlers without ``SA_RESTART``, so a ``recv``
   blocked in the kernel returns ``EINTR``; CPython's retry (PEP 475) then
   meets ``O_NONBLOCK`` and raises. A ``recv`` entered after step 2 never
   blocks, and a signal that arrives just before the thread sleeps is still
   pending when it does, so there is no window in which a thread can block.

Each handler then *parks* (:meth:`park`) at one of three points, none of
which has unprocessed input: ``recv`` raised :class:`BlockingIOError`; the
bottom of its loop, after answering a read, if the server's ``holding`` flag
is set (a client that sends without pause never makes ``recv`` fail); or in
``_wait_sent`` (a client not reading), which polls :attr:`wake_fd` too. A
parked handler's thread ends without closing its socket; its unfinished line
is in the protocol and its unsent output in the connection's queue, and
both travel with the connection. :meth:`release` (the hand-over was called
off) puts the sockets back to blocking, and the server starts the parked
connections' handlers again.

The hot path pays nothing: the handler tests the ``holding`` flag it already
tested for ``stop()``, and looks at the pause only on the error path. What
the signal costs is paid once per upgrade.

Connections that are already ending (an ``end_reason``, or a finished
protocol: ``exit`` was read) are not parked: they finish where they are.

Error handling
--------------
:meth:`hold` raises :class:`PauseTimeout` when some handler did not park
within its deadline; the caller releases the pause and restarts the parked. Descriptors that are
already closed are skipped: that connection is ending anyway.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Protocol, TypeVar

from echod.protocol import LineProtocol

# Go's runtime preempts threads with SIGURG for the same reason: nothing
# sends it to a process unless it asks for out-of-band data (F_SETOWN, which
# echod never does), and its default action is to ignore it, so a stray one
# is harmless.
WAKE_SIGNAL = signal.SIGURG
RESIGNAL_SECONDS = 0.1  # a thread not parked by then is signalled again
SETTLE_POLL = 0.005  # how often hold() looks whether everyone parked


class Threadlike(Protocol):
    """A handler's thread (echod.connection.ClientThread): what signalling it needs."""

    @property
    def ident(self) -> int | None: ...


class Parkable(Protocol):
    """What the pause needs of a connection (echod.server.Connection)."""

    id: int
    end_reason: str | None
    parked: bool
    sock: socket.socket
    proto: LineProtocol

    @property
    def thread(self) -> Threadlike | None: ...


P = TypeVar("P", bound=Parkable)


class PauseTimeout(Exception):
    """Some handlers did not park in time; the pause was released."""


def install_wake_handler() -> None:
    """Give :data:`WAKE_SIGNAL` a Python handler that does nothing; main thread only.

    The handler is needed only for what installing it does: a blocked system
    call in any thread returns EINTR instead of being restarted.
    """
    signal.signal(WAKE_SIGNAL, _ignore)


def _ignore(signum: int, frame: object) -> None:
    pass


def _set_blocking(conn: Parkable, blocking: bool) -> None:
    try:
        os.set_blocking(conn.sock.fileno(), blocking)
    except (OSError, ValueError):
        pass  # closed meanwhile: the connection is ending, not handed over


class Pause:
    """Where handler threads park during a hand-over; one per server."""

    def __init__(self) -> None:
        self.active = False
        self._lock = threading.Lock()  # makes "is it active? then park" one step
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def wake_fd(self) -> int:
        """Readable while a pause is active: pollers waiting on a client add it."""
        return self._wake_r

    def park(self, conn: Parkable) -> bool:
        """From a handler thread: True if a pause holds it (the thread must end now)."""
        with self._lock:
            if not self.active:
                return False
            conn.parked = True
            return True

    def hold(self, conns: Sequence[P], timeout: float) -> list[P]:
        """Park the handlers of ``conns``; return those parked, in the order given.

        Connections that end meanwhile are left to finish. Raises
        :class:`PauseTimeout` if some handler neither parked nor ended in time;
        the caller then releases the pause.
        """
        with self._lock:
            self.active = True
        os.write(self._wake_w, b"p")
        for conn in conns:
            _set_blocking(conn, False)
        deadline = time.monotonic() + timeout
        waiting = list(conns)
        signalled_at = 0.0
        while True:
            waiting = [c for c in waiting if not _settled(c)]
            if not waiting:
                break
            now = time.monotonic()
            if now >= deadline:
                raise PauseTimeout(
                    f"{len(waiting)} of {len(conns)} clients' handlers did not pause "
                    f"within {timeout:g} s"
                )
            if now - signalled_at >= RESIGNAL_SECONDS:
                signalled_at = now
                for conn in waiting:
                    # Again: a pre-serve step with a timeout of its own (the
                    # PROXY header) puts its socket back to blocking when done.
                    _set_blocking(conn, False)
                    _wake(conn)
            time.sleep(SETTLE_POLL)
        return [c for c in conns if c.parked]

    def release(self, conns: Sequence[Parkable], restore: bool = True) -> None:
        """End the pause. ``restore``: the hand-over was called off, sockets block again.

        ``conns`` are marked unparked: the caller, who noted which were parked,
        starts their handlers again (or has handed them over).
        """
        if restore:
            for conn in conns:
                if conn.end_reason is None:
                    _set_blocking(conn, True)
        with self._lock:
            try:
                os.read(self._wake_r, 64)
            except BlockingIOError:
                pass  # nothing to drain
            self.active = False
        for conn in conns:
            conn.parked = False

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)


def _settled(conn: Parkable) -> bool:
    return conn.parked or conn.end_reason is not None or conn.proto.finished


def _wake(conn: Parkable) -> None:
    ident = conn.thread.ident if conn.thread is not None else None
    if ident is None:
        return
    try:
        signal.pthread_kill(ident, WAKE_SIGNAL)
    except (OSError, ValueError):
        pass  # the thread just ended: nothing to wake
