"""One connected client: its socket, protocol state, counters, write queue and send deadline.

Design
------
A :class:`Connection` is created and registered by the accepting thread
(:mod:`echod.server`) before its handler thread starts; from then on several
threads use it: its handler (reads, echoes), the janitor (timeouts), the
operator (pushes, kicks), other clients' handlers (chat relays).

Writing. Every write to a client (echoes, operator pushes, chat relays, error
lines) goes through the connection's queue of whole lines and its write lock,
with non-blocking sends: a thread that finds the lock taken leaves its line in
the queue for the lock holder, so no thread ever blocks on another client, and
a client only ever sees whole lines. The handler thread alone waits, in
:meth:`Connection.send`, with a deadline (``send_timeout``, ``--send-timeout``)
when its client stops reading: that is the back-pressure that keeps echod
from reading more than it can answer. A queue longer than :data:`MAX_QUEUED`
lines ends the client as ``slow_reader``.

Timing. The handler reads no clock: it only counts bytes and lines. The
janitor turns what the counters did since its last look into times
(:meth:`Connection.notice`).

TLS. A :class:`TLSConnection` keeps the socket a plain socket and queues
TLS records instead of lines (see :mod:`echod.tls` for why); it changes the
three methods that read, encrypt and close (``receiver``, ``_enqueue``,
``close_output``) and the send fast path, nothing else.

Ending. Any thread ends a connection the same way, with
:meth:`Connection.end`: queue a last line, then ``shutdown()`` the socket,
which wakes the handler; only the handler closes the socket, so a descriptor
is never reused under it. A line still queued at that moment (another thread
was sending) keeps the writing side open: the handler sends it before its
FIN. The first reason wins (``end_reason``).

State. Everything a connection is lives in its ``__slots__``, grouped in
:meth:`Connection.__init__` by who writes it: identity (``sock``, ``peer``,
``id``, ``started``, ``thread``; ``via`` and ``admitted``, which admission
control sets before the client is served), the protocol's unfinished input
(``proto``), the handler's counters, the janitor's times, writing (deadline,
queue, lock) and the ending. A step that must carry a connection elsewhere (to another process)
has exactly these to carry; nothing about a client is kept anywhere else
except its entry in the :class:`~echod.registry.Registry`.
"""

from __future__ import annotations

import _thread
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from echod import protocol
from echod.admission import Admitted
from echod.handover import ClientState
from echod.pause import Pause

if TYPE_CHECKING:  # connection and tls sit side by side: no import at run time
    from echod.tls import TLSSession

MAX_QUEUED = 256  # lines waiting for a client that is not reading; then slow_reader

_now = time.monotonic


class ClientThread:
    """The thread that serves one client, started without waiting for it to run.

    ``threading.Thread.start()`` returns only once the new thread has run far
    enough to say so. On one busy CPU that makes the accepting thread queue
    behind every runnable handler once per client: at 1,000 clients most of
    them waited, unaccepted, for seconds while the first ones were served
    (docs/benchmarks.md, the tail at 1,000 connections). The low-level
    ``_thread.start_new_thread`` returns at once; this adds what
    :meth:`echod.server.EchoServer.stop` needs: ``join`` with a timeout and
    ``is_alive``, on one lock that the thread holds while it runs.

    Error handling: ``can't start new thread`` is raised as the
    ``RuntimeError`` it is; an exception escaping ``target`` still ends the
    thread as stopped (it is reported by ``sys.unraisablehook``).
    """

    __slots__ = ("_running", "ident")

    def __init__(self, target: Callable[[], object]) -> None:
        self.ident: int | None = None  # set by the thread itself; for a hand-over's wake-up
        self._running = _thread.allocate_lock()
        self._running.acquire()
        try:
            _thread.start_new_thread(self._run, (target,))
        except BaseException:
            self._running.release()
            raise

    def _run(self, target: Callable[[], object]) -> None:
        self.ident = _thread.get_ident()
        try:
            target()
        finally:
            self._running.release()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the thread to end."""
        if self._running.acquire(timeout=max(0.0, timeout)):
            self._running.release()

    def is_alive(self) -> bool:
        return self._running.locked()


class Parked(Exception):
    """A hand-over's pause holds this handler: end its thread, keep its client."""


class ConnectionGone(Exception):
    """The client can no longer be written to; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Connection:
    """One connected client: its socket, protocol state, counters and the way to write to it."""

    __slots__ = (
        "_out",
        "_wlock",
        "admitted",
        "bytes_in",
        "bytes_out",
        "carried",
        "end_reason",
        "id",
        "last_active",
        "line_started",
        "lines_in",
        "lines_out",
        "parked",
        "pause",
        "peer",
        "proto",
        "seen_bytes_in",
        "seen_lines_in",
        "send_timeout",
        "sock",
        "stalled_since",
        "started",
        "thread",
        "via",
    )

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        cid: int,
        send_timeout: float,
        max_line: int = protocol.DEFAULT_MAX_LINE,
        pause: Pause | None = None,
    ) -> None:
        # Identity, fixed at accept: the socket, who it is, which client.
        self.sock = sock
        self.peer = peer
        self.id = cid
        self.started = _now()  # for ages and durations
        self.thread: ClientThread | None = None  # set by the accepting thread
        # Set by the handler thread before it serves (server._admit): the
        # proxy's address when a PROXY header named the client (peer is then
        # the client), and the admission to hand back when the client goes.
        self.via: str | None = None
        self.admitted: Admitted | None = None
        # A hand-over (echod.pause): the server's pause, and whether it holds
        # this client (its handler thread ended; the client lives on).
        self.pause = pause
        self.parked = False
        self.carried = False  # resumed or handed over: its pre-serve step is done
        # Protocol state: the unfinished line. The handler feeds it; the janitor reads it.
        self.proto = protocol.LineProtocol(max_line)
        # Counters. The handler only counts; the janitor turns counts into times (notice()).
        self.bytes_in = self.bytes_out = self.lines_in = self.lines_out = 0
        # The janitor's times, and what the counters were at its last look.
        self.seen_bytes_in = self.seen_lines_in = 0
        self.last_active = self.started
        self.line_started: float | None = None  # first byte of an unfinished line, as seen
        # Writing: the send deadline, the queue of whole lines, its lock.
        self.send_timeout = send_timeout
        self.stalled_since: float | None = None  # a send could not finish
        self._wlock = threading.Lock()
        # Lines waiting to be sent. A list, not a deque: it is nearly always
        # empty, and an empty list costs 56 bytes where a deque costs ~600,
        # on every one of thousands of connections. append and pop(0) are
        # atomic under the GIL, which is all the sharing below relies on.
        self._out: list[tuple[bytes, int]] = []
        # Ending: set once, by whoever ends the connection; the first reason wins.
        self.end_reason: str | None = None

    # -- writing ---------------------------------------------------------

    def push(self, data: bytes, lines: int = 1) -> bool:
        """Queue whole lines from any thread and send what the socket takes now.

        Never blocks. Returns False if the client is gone or is being ended;
        a client whose queue overflows is ended as ``slow_reader``.
        """
        if self.end_reason is not None:
            return False
        if len(self._out) >= MAX_QUEUED:
            self.end(None, "slow_reader")
            return False
        if not self._enqueue(data, lines):
            return False
        self.flush()
        return True

    def _enqueue(self, data: bytes, lines: int) -> bool:
        """Put whole lines at the end of the queue (TLS: encrypted); False if they cannot be."""
        self._out.append((data, lines))
        return True

    def send(self, data: bytes, lines: int) -> None:
        """Send from the handler thread, waiting while the client cannot take it.

        Raises :class:`ConnectionGone` when the client is gone, being ended,
        or did not take its bytes within ``send_timeout``.
        """
        out = self._out
        # Fast path, nearly every echo: nothing queued, nobody else sending,
        # and the socket takes it all. Otherwise queue it behind the rest.
        if not out and self._wlock.acquire(False):
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                sent = 0  # would block, or broken: the queued path finds out which
            if sent == len(data):
                self.bytes_out += sent
                self.lines_out += lines
                self._wlock.release()
                if out:  # another thread queued a line while we held the lock
                    self.flush()
                return
            if sent:
                self.bytes_out += sent
                data = data[sent:]
            out.insert(0, (data, lines))  # before anything queued meanwhile
            self._wlock.release()
        else:
            out.append((data, lines))
        self.flush()
        if out:
            self._wait_sent(_now() + self.send_timeout)
        if self.end_reason is not None:
            raise ConnectionGone(self.end_reason)

    def flush(self) -> None:
        """Send queued lines without blocking, if no other thread is sending.

        Whoever holds the write lock sends everything queued, including what
        other threads added meanwhile; the outer loop re-checks after the
        release so no line is left behind by a thread that found the lock
        taken. A partial send leaves the rest at the head of the queue, so
        lines never interleave.
        """
        out = self._out
        while out and self._wlock.acquire(False):
            try:
                while out:
                    data, lines = out[0]
                    try:
                        sent = self.sock.send(data, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        out.clear()
                        self.end(None, "reset")
                        return
                    self.bytes_out += sent
                    if sent < len(data):
                        out[0] = (data[sent:], lines)
                        if self.stalled_since is None:
                            self.stalled_since = _now()
                        return
                    del out[0]
                    self.lines_out += lines
                self.stalled_since = None
            finally:
                self._wlock.release()

    def _wait_sent(self, deadline: float, ending: bool = False) -> None:
        """Wait until the queue is sent, or the deadline; raises :class:`Parked` for a pause.

        A pause wakes the poll (its descriptor becomes readable); a
        connection still being served parks with its queue unsent, which
        travels with it. One that is ending (``ending``, or its protocol
        finished: ``exit`` was read) finishes here instead.
        """
        # The protocol is decided before the send that waits: finished stays finished.
        pause = None if ending or self.proto.finished else self.pause
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        if pause is not None:
            poller.register(pause.wake_fd, select.POLLIN)
        while self._out and (ending or self.end_reason is None):
            remaining = deadline - _now()
            if remaining <= 0:
                if not ending:
                    self.end(None, "slow_reader")
                return
            poller.poll(min(remaining, 0.5) * 1000)
            if pause is not None and pause.active and pause.park(self):
                raise Parked
            self.flush()

    def send_last(self, data: bytes | None, timeout: float) -> None:
        """The handler's last output: what is queued, then ``data`` (bye, an error), if any.

        Queued even while ending; waits at most ``timeout`` for the client to take it.
        """
        if data is not None:
            self._enqueue(data, 1)
        self.flush()
        if self._out:
            self._wait_sent(_now() + timeout, ending=True)

    # -- hand-over ---------------------------------------------------------

    def state(self, fd: int, now: float) -> ClientState:
        """What a successor needs to serve on where this one stops; its handler is parked."""
        self.notice(now)  # counters since the janitor's last look become times
        return ClientState(
            id=self.id,
            fd=fd,
            peer=self.peer,
            age=now - self.started,
            idle=now - self.last_active,
            line_age=None if self.line_started is None else now - self.line_started,
            stalled=None if self.stalled_since is None else now - self.stalled_since,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            lines_in=self.lines_in,
            lines_out=self.lines_out,
            pending=self.proto.unfinished,
            queued=list(self._out),
            via=self.via,
            admitted=self.admitted is not None,
        )

    @classmethod
    def restore(
        cls,
        state: ClientState,
        sock: socket.socket,
        send_timeout: float,
        max_line: int,
        pause: Pause,
        now: float,
    ) -> Connection:
        """The connection an old echod described with :meth:`state`, on ``sock``."""
        conn = cls(sock, state.peer, state.id, send_timeout, max_line, pause)
        conn.started = now - state.age
        conn.last_active = now - state.idle
        conn.line_started = None if state.line_age is None else now - state.line_age
        conn.stalled_since = None if state.stalled is None else now - state.stalled
        conn.bytes_in = conn.seen_bytes_in = state.bytes_in
        conn.lines_in = conn.seen_lines_in = state.lines_in
        conn.bytes_out, conn.lines_out = state.bytes_out, state.lines_out
        conn._out = list(state.queued)
        conn.via = state.via  # admitted: the caller counts it with its own admission
        try:
            conn.proto.restore(state.pending)
        except ValueError:  # the new --max-line is shorter than the line it holds
            conn.end(protocol.line_too_long(max_line), "line_too_long")
        return conn

    # -- what TLS changes (TLSConnection) --------------------------------
    #
    # Called once per connection, never per line, so plain TCP's hot path
    # stays as it is.

    tls_version: str | None = None  # the negotiated version; None: not TLS (yet)
    tls_cn: str | None = None  # the verified client certificate's common name

    def receiver(self) -> Callable[[int], bytes]:
        """The handler's ``recv``: bytes of the line protocol, b"" at the end of input."""
        return self.sock.recv

    def close_output(self, timeout: float) -> None:
        """Before the FIN: what the transport sends after the last reply (TLS: close_notify)."""

    # -- timing ----------------------------------------------------------

    def notice(self, now: float) -> None:
        """The janitor's look: turn counter changes since the last one into times.

        Input since the last look makes the client active ``now``; a line
        completed since then, with another one unfinished, starts that line's
        clock ``now``. Both are noticed up to one tick late, never early.
        ``pending`` is read before ``lines_in``, so a line finished between
        the two reads counts as new rather than keeping an older start.
        """
        pending = self.proto.pending
        bytes_in, lines_in = self.bytes_in, self.lines_in
        # Lines handled count too: a client paced by --max-line-rate is busy
        # while its handler reads nothing.
        if bytes_in != self.seen_bytes_in or lines_in != self.seen_lines_in:
            self.seen_bytes_in = bytes_in
            self.last_active = now
        if not pending:
            self.line_started = None
        elif self.line_started is None or lines_in != self.seen_lines_in:
            self.line_started = now
        self.seen_lines_in = lines_in

    # -- ending ----------------------------------------------------------

    def end(self, last_line: bytes | None, reason: str) -> bool:
        """End the connection from any thread: queue ``last_line``, then wake the handler.

        The first reason wins; returns False if the connection was already
        being ended. The handler thread notices (its ``recv`` returns) and
        closes the socket (``EchoHandler._close``). If ``last_line`` is
        still queued (another thread held the write lock just now and sends
        it on release, or the client is slow to read), only the reading side
        is shut, and the handler sends the queue before its FIN: shutting
        the writing side here would lose the line. Otherwise, or for a
        parked connection (it has no handler), both sides are shut now.
        """
        if self.end_reason is not None:
            return False
        self.end_reason = reason
        how = socket.SHUT_RDWR
        if last_line is not None and self._enqueue(last_line, 1):
            self.flush()
            # Read unlocked: emptied meanwhile means the line went out already.
            if self._out and not self.parked:
                how = socket.SHUT_RD
        try:
            self.sock.shutdown(how)
        except OSError:
            pass  # already disconnected
        return True


class TLSConnection(Connection):
    """A client on a TLS listener: the same queue and socket, with records in it.

    The socket stays a plain socket (see :mod:`echod.tls` for why): what is
    queued is already encrypted, and encrypting and queueing happen together
    under ``_tls_lock``, so records reach the queue in the order of their
    sequence numbers whichever thread writes. Lines pushed before the
    handshake is done (a broadcast, a chat relay) wait in ``_early`` as
    plaintext, at most :data:`MAX_QUEUED`, and are encrypted when it is;
    after close_notify nothing can be sent. ``bytes_in`` and ``bytes_out``
    count bytes on the wire, records included.
    """

    __slots__ = (
        "_early",
        "_tls",
        "_tls_eof",
        "_tls_leftover",
        "_tls_lock",
        "tls_cn",
        "tls_version",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # as Connection's
        super().__init__(*args, **kwargs)
        self._tls: TLSSession | None = None
        self._early: list[tuple[bytes, int]] | None = []  # None once established
        self._tls_lock = threading.Lock()
        self._tls_eof = False
        self._tls_leftover = False
        self.tls_version: str | None = None
        self.tls_cn: str | None = None

    def established(self, session: TLSSession) -> None:
        """The handshake is done: from now on lines are sent through ``session``."""
        self.tls_version = session.version
        self.tls_cn = session.peer_cn
        self._tls_leftover = True
        with self._tls_lock:
            self._tls = session
            early, self._early = self._early or [], None
            for data, lines in early:
                self._out.append((session.encrypt(data), lines))
        if early:
            self.flush()

    def _enqueue(self, data: bytes, lines: int) -> bool:
        with self._tls_lock:
            session = self._tls
            if session is not None:
                self._out.append((session.encrypt(data), lines))
                return True
            early = self._early
            if early is None or len(early) >= MAX_QUEUED:
                return False  # closed, or a handshake that lets lines pile up
            early.append((data, lines))
        return True

    def send(self, data: bytes, lines: int) -> None:
        out = self._out
        with self._tls_lock:
            session = self._tls
            if session is not None:
                records = session.encrypt(data)
                # Fast path as in Connection.send, but still under the TLS
                # lock: no other thread can encrypt a later record and queue
                # or send it before this one.
                if not out and self._wlock.acquire(False):
                    try:
                        sent = self.sock.send(records, socket.MSG_DONTWAIT)
                    except OSError:
                        sent = 0  # would block, or broken: the queued path finds out which
                    self.bytes_out += sent
                    if sent == len(records):
                        self.lines_out += lines
                    else:
                        out.append((records[sent:], lines))
                    self._wlock.release()
                else:
                    out.append((records, lines))
        if out:
            self.flush()
            if out:
                self._wait_sent(_now() + self.send_timeout)
        if self.end_reason is not None:
            raise ConnectionGone(self.end_reason)

    def receiver(self) -> Callable[[int], bytes]:
        return self._receive

    def _receive(self, size: int) -> bytes:
        """Read records until they carry plaintext; b"" at close_notify or EOF.

        Raises :class:`ssl.SSLError` (an OSError) for a corrupt record.
        """
        raw: bytes | None = None
        if self._tls_leftover:  # the handshake's last read may have brought records too
            self._tls_leftover = False
            raw = b""
        while not self._tls_eof:
            if raw is None:
                raw = self.sock.recv(size)
                if not raw:
                    return b""
            with self._tls_lock:
                session = self._tls
                if session is None:
                    return b""
                plain, out, self._tls_eof = session.receive(raw)
                if out:
                    self._out.append((out, 0))
            if out:
                self.flush()
            self.bytes_in += len(raw) - len(plain)  # the handler counts the plaintext
            if plain:
                return plain
            raw = None
        return b""

    def close_output(self, timeout: float) -> None:
        with self._tls_lock:
            session, self._tls, self._early = self._tls, None, None
            if session is None:
                return
            self._out.append((session.close(), 0))
        self.flush()
        if self._out:
            self._wait_sent(_now() + timeout, ending=True)
