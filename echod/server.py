"""socketserver glue: the listening server and the handler that serves each client.

Design
------
:class:`EchoServer` is a :class:`socketserver.TCPServer` that starts one
thread per client itself; one thread accepts, and each client's thread runs
:class:`EchoHandler`, which only moves bytes between the socket and a
:class:`~echod.protocol.LineProtocol`.

Each client is a :class:`~echod.connection.Connection` (its socket, protocol
state, counters, write queue and send deadline; that module's docstring says
how writes and endings work), registered in the
:class:`~echod.registry.Registry` by the accepting thread *before* its
handler thread starts, so ``--max-clients`` is exact. The accepting thread
does not wait for that thread to run (:class:`~echod.connection.ClientThread`):
waiting made it queue behind every busy handler once per client, and at
1,000 clients left most of them unaccepted for seconds.

Before a client is served, :meth:`EchoHandler.setup` runs admission control
in its thread (:meth:`EchoServer.admit`): with ``--proxy-protocol`` the peer
must be in ``--proxy-trusted`` and send its PROXY header
(:mod:`echod.proxy`) within ``--proxy-timeout``, and the header's source
becomes the client; then :class:`~echod.admission.Admission` applies the
allow/deny lists, the connect rate and the per-source count. A refused
client is ended with its one line (none for the PROXY refusals) and logged
as ``client_refused``, at most :data:`~echod.admission.LOG_PER_SECOND` a
second per reason (the janitor logs the rest as ``client_refused_burst``).
The handler thread's ``finally`` releases the per-source count, however the
connection ends. ``--max-line-rate`` paces a client's lines
(``EchoHandler._paced``): its handler stops reading while it waits, so TCP
slows the client and nothing is lost.

With ``--tls-cert``/``--tls-key`` the listener speaks only TLS: the
connections are :class:`~echod.connection.TLSConnection`, and
:meth:`EchoHandler.setup` runs the handshake in the client's own thread,
against one deadline (:mod:`echod.tls` has the design). A client in the
handshake is registered, so it counts towards ``--max-clients``, and blocks
nobody else.

Timeouts are not kept on the sockets: the handler's ``recv`` blocks without
one, which keeps the hot path to one ``recv`` and one ``send`` per burst, and
the handler reads no clock. Reads start small and grow to :data:`RECV_SIZE`
while a client sends more (:data:`SMALL_RECV`). A single janitor thread looks
at every connection a few times a second (:meth:`Connection.notice`) and ends
the connections that are idle, trickling a line, or not reading
(``--idle-timeout``, ``--line-timeout``, ``--send-timeout``).

Running out of descriptors (``accept`` fails with EMFILE/ENFILE) or threads
(``can't start new thread``) makes the accept loop pause
:data:`BACKOFF_SECONDS` per attempt instead of spinning on a listening socket
that stays readable; one ``out_of_resources`` event is logged per 5 s, and
``out_of_resources_ended`` when a handler starts again. A client refused for
want of a thread is told ``ERR server busy``; for want of a descriptor, a
reserve descriptor is closed for a moment so one waiting client per pause can
be accepted and told ``ERR server out of resources``. Threads get
:data:`THREAD_STACK` bytes of stack, and the GIL switch interval is raised
(:data:`SWITCH_INTERVAL`), so thousands of clients fit in modest memory and
CPU; docs/limits.md has the figures.

A listening socket passed in (socket activation) is served as it is, except
that echod calls ``listen()`` on it again with ``--backlog``: the queue
length is echod's setting, whatever the passer chose. The accept loop and
the janitor count their rounds (:meth:`EchoServer.progress`), so that the
systemd watchdog is fed only while both go round.

Extension points: :attr:`EchoServer.RequestHandlerClass`,
:meth:`EchoHandler.setup` (the pre-serve step: anything a connection must go
through before it is served), :meth:`EchoHandler.on_lines` (chat relay),
:attr:`Registry.on_change`.

Hand-over
---------
An upgrade (:mod:`echod.upgrade`) passes every client to another echod.
:meth:`EchoServer.pause_clients` stops the accept loop (the listening socket
stays open) and the janitor, and parks every handler where it holds no
unanswered byte (:mod:`echod.pause` has the mechanism); the handler's only
cost on its hot path is the ``holding`` flag it tests after each read, the
one :meth:`stop` sets too. Then either :meth:`EchoServer.let_go` (the
successor serves them: forget them, close our descriptors) or
:meth:`EchoServer.resume` (called off: start their handlers again). The
successor's side is :meth:`EchoServer.adopt`.

Shutdown
--------
From any thread but the one running :meth:`serve_forever`, :meth:`EchoServer.stop`:

1. stops the accept loop (``shutdown()``) and closes the listening socket;
2. sends every client ``Server shutting down`` and shuts its socket down
   (a handler that reads meanwhile answers that read, then does that itself:
   busy handlers would otherwise starve this loop of the GIL);
3. joins the handler threads until the deadline;
4. stops the janitor. Returns whether every handler ended in time.
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from echod import protocol, proxy
from echod.admission import (
    REASONS,
    AccessList,
    Admission,
    BurstLog,
    Refused,
    TokenBucket,
    normalize,
)
from echod.config import Settings
from echod.connection import ClientThread, Connection, ConnectionGone, Parked, TLSConnection
from echod.errors import StartupError
from echod.logs import Logger, get_logger
from echod.pause import Pause
from echod.registry import Registry
from echod.tls import HandshakeFailed, TLSEndpoint, TLSFiles, handshake

RECV_SIZE = 65536
# recv(n) makes a bytes object of n + 33 bytes (its header), then shrinks it to
# what arrived. Up to 512 bytes in all, CPython's small-object allocator serves
# it; above, it is a malloc and a realloc (5 % of the instructions per echoed
# 64-byte line), and the malloc held by a thread blocked in recv kept ~7 KiB
# resident per connection. So handlers read this much until a read fills it.
SMALL_RECV = 512 - 33
LINGER_SECONDS = 1.0  # after the last reply, read and discard input this long at most
LINGER_BYTES = 256 * 1024
THREAD_STACK = 256 * 1024  # handlers are shallow; thousands of threads must fit
# Every thread waiting for the GIL wakes once per switch interval; at the
# default 5 ms, 5,000 clients becoming readable at once burn seconds of CPU
# in those wake-ups alone. Handlers release the GIL at every recv and send,
# so a longer interval costs nothing in latency.
SWITCH_INTERVAL = 0.05
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_SECONDS = 0.1  # accept loop pause when out of descriptors or threads
ACCEPT_POLL = 0.1  # how soon the accept loop notices stop(); part of the shutdown deadline

# How long a handler paced by --max-line-rate sleeps at most before it looks
# again whether its connection is being ended (a kick, a shutdown).
PACE_SLICE = 0.05

_now = time.monotonic


def format_peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = str(addr[0]), addr[1]
        if host.startswith("::ffff:"):  # IPv4-mapped: the IPv4 client it is
            host = str(normalize(host))
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr) or "unknown"


def peer_host(peer: str) -> str:
    """The host part of what :func:`format_peer` made (``[::1]:80`` -> ``::1``)."""
    if peer.startswith("["):
        return peer[1 : peer.index("]")]
    return peer.rpartition(":")[0]


class EchoHandler(socketserver.BaseRequestHandler):
    """Moves bytes between one client's socket and its line protocol.

    :class:`socketserver.BaseRequestHandler` runs :meth:`setup`, then
    :meth:`handle`, then ``finish()``, in the client's own thread; ``request``
    is the client's :class:`Connection`, already registered.
    """

    request: Connection
    server: EchoServer

    def setup(self) -> None:
        """The pre-serve step: what a connection goes through before it is served.

        Runs in the client's thread, after registration, before :meth:`handle`
        reads anything; today it does nothing. A step here (reading a PROXY
        header, an admission check, a TLS handshake) may block on this one
        client only, and must bound its own wait. To refuse the client it
        calls ``self.request.end(error_line, reason)``: :meth:`handle` then
        sees ``end_reason`` at its first read, reads no further and closes the
        socket as for any other ending. An exception here is a bug, logged as
        ``handler_error`` (reason ``error``) by :meth:`EchoServer.handle_error`.

        The steps, in order: the PROXY header and admission control
        (:meth:`EchoServer.admit`), then, with TLS on, the TLS handshake
        (:meth:`tls_handshake`): a PROXY header comes before the ClientHello,
        as HAProxy's ``send-proxy-v2`` in front of a TLS backend sends it.
        Not run again for a connection that was through them already
        (``carried``: resumed after a hand-over was called off, or handed
        over by an upgrade).
        """
        if self.server.gated and not self.request.carried:
            self.server.admit(self.request, self.client_address)
        carried, tls = self.request.carried, self.server.tls
        if tls is not None and self.request.end_reason is None and not carried:
            self.tls_handshake()

    def tls_handshake(self) -> None:
        """Complete the TLS handshake within ``--tls-handshake-timeout``, or refuse the client.

        One deadline for the whole handshake (:func:`echod.tls.handshake`).
        A failure is logged as ``client_refused`` with ``reason=tls_handshake``
        and OpenSSL's short name of the error (at most as often as the other
        refusals, :class:`~echod.admission.BurstLog`), counted in the
        registry, and ends the connection without a line (the client does not
        speak our TLS: a plaintext ``ERR`` would mean nothing to it).
        """
        conn = self.request
        tls = self.server.tls
        assert tls is not None and isinstance(conn, TLSConnection)
        session = tls.session()
        try:
            handshake(session, conn.sock, _now() + tls.handshake_timeout, _now)
        except HandshakeFailed as failed:
            server = self.server
            if conn.end(None, "tls_handshake"):  # False: ended meanwhile (shutdown, kick)
                server.registry.tls_failed()
                if server.refusal_log.should_log("tls_handshake"):  # a flood: bursts summarized
                    extra: dict[str, Any] = {} if conn.via is None else {"via": conn.via}
                    server.log.warning(
                        "client_refused",
                        reason="tls_handshake",
                        error=failed.error,
                        detail=failed.detail or None,
                        client=conn.id,
                        peer=conn.peer,
                        **extra,
                    )
            return
        conn.established(session)

    def handle(self) -> None:
        """Serve the client until it is done; then send the last reply and close.

        Returns when the client sent ``exit``, a too-long line or end of
        input, reset, or was ended by another thread (:meth:`Connection.end`:
        a timeout, a kick, shutdown); ``end_reason`` then says which. The
        handler owns the reading side and the socket itself: it alone reads,
        and it alone closes, in :meth:`_close`. Its body is one inline loop
        on purpose: it is the hot path, and every call or attribute look-up
        in it is paid per read (bench/instructions.py counts them).
        """
        conn = self.request
        server = self.server
        proto = conn.proto
        recv = conn.receiver()
        rate = server.settings.max_line_rate
        pace = TokenBucket(rate, rate, _now()) if rate else None  # --max-line-rate: bursts of N
        reason = "eof"
        final: bytes | None = None
        size = SMALL_RECV
        pause = server.pause
        try:
            while True:
                try:
                    data = recv(size)
                except BlockingIOError:  # a hand-over's pause made the socket non-blocking
                    if pause.park(conn):
                        return  # the thread ends; the client, its line and its queue live on
                    continue  # the pause was called off meanwhile: the socket blocks again
                except OSError:
                    reason = "reset"
                    break
                if conn.end_reason is not None:
                    break
                if data:
                    n = len(data)
                    conn.bytes_in += n
                    # Adaptive read size, as in Netty: a read that filled the
                    # small size means more is coming, so read big until a
                    # read brings no more than the small size again.
                    if n == size:
                        size = RECV_SIZE
                    elif n <= SMALL_RECV:
                        size = SMALL_RECV
                    events = proto.feed(data)
                else:
                    events = proto.end_of_input()
                relay = server.settings.chat  # per read, so a reload reaches every client
                for event in events:
                    if type(event) is protocol.Echo:
                        if pace is not None:
                            self._paced(event, pace)
                            continue
                        conn.lines_in += event.lines
                        # Relay first: send() may park this thread for a hand-over.
                        if relay:
                            self.on_lines(event.data)
                        conn.send(event.data, event.lines)
                    elif type(event) is protocol.Exit:
                        reason, final = "exit", event.reply
                    elif type(event) is protocol.LineTooLong:
                        reason, final = "line_too_long", event.reply
                if proto.finished:
                    break
                # stop() or a hand-over wants this thread. Tested after the
                # answer, so nothing read is left unanswered, and on every
                # read: a client that never pauses never makes recv() fail.
                if server.holding:
                    if server.stopping:
                        conn.end(protocol.SHUTDOWN_NOTICE, "shutdown")
                        break
                    if pause.park(conn):
                        return
        except Parked:
            return
        except ConnectionGone as gone:
            reason = gone.reason
        if conn.end_reason is None:
            conn.end_reason = reason
        self._close(final)

    def _paced(self, echo: protocol.Echo, pace: TokenBucket) -> None:
        """Handle an echo's lines no faster than ``--max-line-rate``, waiting for the budget.

        While the handler waits here it reads nothing more, so further lines
        stay unread in the kernel and TCP slows the client down: it is slowed,
        never cut, and no byte is lost. Raises :class:`ConnectionGone` when the
        connection is ended meanwhile (a kick, a shutdown).
        """
        conn = self.request
        server = self.server
        data, left = echo.data, echo.lines
        start = 0
        while left:
            now = _now()
            budget = int(pace.refill(now))
            if budget < 1:
                wait = pace.wait_for(now)
                if conn.end_reason is None and server.stopping:
                    conn.end(protocol.SHUTDOWN_NOTICE, "shutdown")
                if conn.end_reason is not None:
                    raise ConnectionGone(conn.end_reason)
                time.sleep(min(wait, PACE_SLICE))
                continue
            take = min(budget, left)
            end = start
            for _ in range(take):
                nl = data.find(b"\n", end)
                end = len(data) if nl < 0 else nl + 1  # a last line at EOF has no LF
            pace.level -= take
            left -= take
            chunk = data[start:end]
            start = end
            conn.lines_in += take
            conn.send(chunk, take)
            if server.settings.chat:
                self.on_lines(chunk)

    def on_lines(self, data: bytes) -> None:
        """Chat mode: relay each line to every other client as ``client <id>: <line>``."""
        conn = self.request
        prefix = b"client %d: " % conn.id
        # Split on LF only (splitlines would also split on a lone CR); a
        # final line without LF (at end of input) gets one.
        lines = data.split(b"\n")
        if not lines[-1]:
            lines.pop()
        message = b"".join(prefix + line + b"\n" for line in lines)
        for other in self.server.registry.snapshot():
            if other is not conn:
                other.push(message, len(lines))

    def _close(self, final: bytes | None) -> None:
        """Send the last reply, half-close, drain a little input, close.

        Draining before close() matters: closing a socket with unread input
        makes the kernel send RST, which can destroy the reply in flight.
        """
        conn = self.request
        sock = conn.sock
        linger = min(conn.send_timeout, LINGER_SECONDS)
        # What is still queued goes first: a last line from Connection.end (a
        # kick, a timeout, shutdown) that another thread was about to send.
        conn.send_last(final, linger)
        conn.close_output(linger)
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = _now() + LINGER_SECONDS
            drained = 0
            while drained < LINGER_BYTES:
                remaining = deadline - _now()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(RECV_SIZE)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # reset or timed out: nothing more to save
        sock.close()


class EchoServer(socketserver.TCPServer):
    """The listening server; see the module docstring for the design.

    Inherited from :class:`socketserver.TCPServer` and used as they are:
    binding and listening (``server_bind``, ``server_activate``), the accept
    loop (``serve_forever``, ``shutdown``, ``_handle_request_noblock``, which
    calls ``get_request``, ``verify_request``, ``process_request`` in turn),
    ``server_close``, ``fileno``. Replaced: ``get_request`` (backs off when
    out of descriptors), ``verify_request`` (``--max-clients``),
    ``process_request`` (the thread per client), ``handle_error`` (one log
    event instead of a traceback). ``finish_request`` and
    ``shutdown_request`` are not used: the client's thread builds the
    handler and the handler closes its socket.

    Why not :class:`socketserver.ThreadingMixIn`: its ``process_request``
    starts a thread that it neither names nor hands back, appends it to a
    list that only ``server_close`` joins (without a deadline), and lets
    ``can't start new thread`` escape to ``handle_error``. echod needs the
    client registered before its thread starts (``--max-clients`` exact), the
    thread on the :class:`Connection` (``stop()`` joins each with one
    deadline), and a refused client told ``ERR server busy`` while the accept
    loop backs off; overriding all of that would leave nothing of the mixin.
    """

    allow_reuse_address = True
    RequestHandlerClass: Callable[[Any, Any, EchoServer], socketserver.BaseRequestHandler]

    def __init__(
        self,
        settings: Settings,
        registry: Registry[Connection] | None = None,
        listener: socket.socket | None = None,
        handler: type[EchoHandler] = EchoHandler,
    ) -> None:
        """Bind ``settings.host``/``port``, or adopt an already listening socket.

        Raises :class:`~echod.errors.StartupError` with one sentence when the
        address cannot be used.
        """
        self.settings = settings
        # Before binding: a bad TLS file fails the start with nothing to undo.
        self.tls = _tls_endpoint(settings)
        self.connection_class = Connection if self.tls is None else TLSConnection
        self.registry: Registry[Connection] = registry if registry is not None else Registry()
        self.request_queue_size = settings.backlog
        self.log: Logger = get_logger()
        self.stopping = False
        # The one flag handlers test on every read: stop() or a hand-over wants them.
        self.holding = False
        self.pause = Pause()
        self._paused: list[Connection] = []  # what the current pause holds
        self._janitor_lock = threading.Lock()  # held by a check, and for a whole pause
        self._janitor_stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self._resource_log_at = 0.0
        self._exhausted_since: float | None = None  # out of descriptors or threads since
        self._exhausted_refused = 0
        self._reserve_fd: int | None = None
        self._reject_burst = 0
        self._last_reject = 0.0
        # Rounds of the accept loop and of the janitor, for the systemd watchdog.
        self._accept_rounds = self._janitor_rounds = 0
        self.admission = Admission(settings.admission_policy())
        self.refusal_log = BurstLog()
        self._proxy_versions = None if settings.proxy_protocol == "off" else settings.proxy_protocol
        self._gate(settings)
        if listener is not None:
            self.address_family = listener.family
            super().__init__(listener.getsockname()[:2], handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()
            try:  # the queue length is ours to say (--backlog), not the passer's
                listener.listen(settings.backlog)
            except OSError as err:
                self.server_close()
                raise StartupError(
                    f"cannot listen on the socket passed by systemd: {err.strerror or err}"
                ) from None
        else:
            family, address = resolve(settings.host, settings.port)
            self.address_family = family
            super().__init__(address, handler, bind_and_activate=False)
            try:
                self.server_bind()
                self.server_activate()
            except OSError as err:
                self.server_close()
                raise StartupError(bind_error_message(settings.host, settings.port, err)) from None
        self._reserve_fd = _open_reserve()
        threading.stack_size(THREAD_STACK)
        sys.setswitchinterval(SWITCH_INTERVAL)

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    # -- accepting ---------------------------------------------------------

    def serve_forever(self, poll_interval: float = ACCEPT_POLL) -> None:
        self._start_janitor()
        super().serve_forever(poll_interval)

    def service_actions(self) -> None:
        """Called by serve_forever once per round (at least every ``ACCEPT_POLL``)."""
        self._accept_rounds += 1

    def progress(self) -> dict[str, int]:
        """Counters that grow while the accept loop and the janitor go round."""
        return {"accept_loop": self._accept_rounds, "janitor": self._janitor_rounds}

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request = self.socket.accept()
        except OSError as err:
            if err.errno in RESOURCE_ERRNOS:
                kind = "descriptors" if err.errno in (errno.EMFILE, errno.ENFILE) else "memory"
                self._out_of_resources(kind, err.strerror or str(err))
            raise
        if self._reserve_fd is None:  # spent while out of descriptors: take it back
            self._reserve_fd = _open_reserve()
        return request

    def verify_request(self, request: Any, client_address: Any) -> bool:
        limit = self.settings.max_clients
        if len(self.registry) < limit:
            return True
        rejected = self.registry.reject("server_full")
        _refuse(request, protocol.error_line(f"server full (max {limit} clients)"))
        now = _now()
        if now - self._last_reject > 1.0:  # a new burst
            self.log.warning(
                "client_rejected",
                reason="server_full",
                max_clients=limit,
                peer=format_peer(client_address),
                rejected_total=rejected,
            )
        self._reject_burst += 1
        self._last_reject = now
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Register the client, then start its handler thread."""
        conn = self.connection_class(
            request,
            format_peer(client_address),
            self.registry.next_id(),
            self.settings.send_timeout,
            self.settings.max_line,
            self.pause,
        )
        self.registry.add(conn)
        try:
            self._start_handler(conn, client_address)
        except RuntimeError as err:  # can't start new thread
            conn.end_reason = "out_of_threads"
            self.registry.remove(conn, refused=True)
            _refuse(request, protocol.error_line("server busy, try again later"))
            self._exhausted_refused += 1
            self._out_of_resources("threads", str(err))
            return
        if self._exhausted_since is not None:
            self._resources_back()

    def _start_handler(
        self, conn: Connection, address: Any, gate: threading.Event | None = None
    ) -> None:
        """Start the client's thread (it serves once ``gate`` opens); RuntimeError if none
        can be started."""
        conn.thread = ClientThread(lambda: self._run_handler(conn, address, gate))

    def _run_handler(
        self, conn: Connection, address: Any, gate: threading.Event | None = None
    ) -> None:
        if gate is not None:
            gate.wait()
        self.log.debug("connection_opened", client=conn.id, peer=conn.peer)
        try:
            self.RequestHandlerClass(conn, address, self)
        except Exception:
            conn.end_reason = "error"
            self.handle_error(conn, conn.peer)
            try:
                conn.sock.close()
            except OSError:
                pass
        finally:
            if not conn.parked:  # parked for a hand-over: not closed, still registered
                self._closed(conn)

    def _closed(self, conn: Connection) -> None:
        if conn.admitted is not None:
            self.admission.release(conn.admitted)
        refused = conn.end_reason in REASONS  # refused by admit(): never served
        self.registry.remove(conn, refused=refused)
        if not refused:
            extra = {} if conn.via is None else {"via": conn.via}
            self.log.info(
                "connection_closed",
                client=conn.id,
                peer=conn.peer,
                **extra,
                reason=conn.end_reason,
                duration=round(_now() - conn.started, 3),
                bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out,
                lines_in=conn.lines_in,
                lines_out=conn.lines_out,
            )

    # -- admission: the PROXY header, then who may connect ---------------------------

    def admit(self, conn: Connection, address: Any) -> None:
        """The PROXY header (``--proxy-protocol``), then the admission rules; the pre-serve step.

        Runs in the client's handler thread (:meth:`EchoHandler.setup`). A
        client that may not be served is ended with its refusal's line (the
        PROXY refusals get none) and reason, one of
        :data:`~echod.admission.REASONS`, and logged as ``client_refused``;
        :meth:`EchoHandler.handle` then closes it. One kicked or shut down
        meanwhile keeps that reason.
        """
        host = str(address[0])
        if self._proxy_versions is not None:
            if not self._proxy_trusted.allows(normalize(host)):
                self._refuse(conn, self.admission.refuse("proxy_untrusted"))
                return
            header = self._read_proxy_header(conn, self._proxy_versions)
            if not isinstance(header, proxy.Header):
                if conn.end_reason is None:  # not kicked or shut down while waiting
                    self._refuse(conn, self.admission.refuse("proxy_header"), header)
                return
            if header.source is not None:
                conn.via = conn.peer
                conn.peer = format_peer(header.source)
                host = header.source[0]
        verdict = self.admission.admit(normalize(host))
        if isinstance(verdict, Refused):
            self._refuse(conn, verdict)
        else:
            conn.admitted = verdict

    def _read_proxy_header(self, conn: Connection, versions: str) -> proxy.Header | str:
        """The PROXY header, or why there is none, within ``--proxy-timeout``.

        Reads with MSG_PEEK and then takes from the socket exactly the
        header's bytes, never one more: whatever the client sent after it
        stays in the kernel, byte-exact, for the next reader (the line
        protocol, or a TLS handshake), as if no header had been there. Bytes
        peeked while the header is unfinished are all header, so they are
        taken and the next peek waits for more.
        """
        sock = conn.sock
        parser = proxy.ProxyParser(versions)
        deadline = _now() + self.settings.proxy_timeout
        try:
            while True:
                remaining = deadline - _now()
                if remaining <= 0:
                    return "timed out"
                sock.settimeout(remaining)
                data = sock.recv(proxy.V2_MAX, socket.MSG_PEEK)
                if not data:
                    return "closed before a whole header"
                result = parser.feed(data)
                if isinstance(result, proxy.Invalid):
                    return result.reason
                header = result if isinstance(result, proxy.Header) else None
                used = len(data) - len(header.rest) if header is not None else len(data)
                while used > 0:  # take exactly what was peeked; it is there, this does not wait
                    taken = len(sock.recv(used))
                    if not taken:
                        return "closed before a whole header"
                    used -= taken
                if header is not None:
                    return header  # its rest is still in the kernel, see above
        except TimeoutError:
            return "timed out"
        except OSError as err:
            return f"read failed: {err.strerror or err}"
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass

    def _refuse(self, conn: Connection, refused: Refused, detail: str | None = None) -> None:
        """End a client that is not served with its refusal's line, and log it."""
        if not conn.end(refused.line or None, refused.reason):
            return  # ended meanwhile, for another reason
        if self.refusal_log.should_log(refused.reason):
            extra: dict[str, Any] = {} if conn.via is None else {"via": conn.via}
            if detail is not None:
                extra["detail"] = detail
            self.log.warning(
                "client_refused", reason=refused.reason, client=conn.id, peer=conn.peer, **extra
            )

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One structured line instead of socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        tb = traceback.extract_tb(exc.__traceback__)[-1:] if exc is not None else []
        where = f"{tb[0].filename}:{tb[0].lineno} in {tb[0].name}" if tb else None
        client = request.id if isinstance(request, Connection) else None
        self.log.error(
            "handler_error",
            client=client,
            peer=str(client_address),
            error=type(exc).__name__,
            detail=str(exc),
            where=where,
        )

    def _out_of_resources(self, kind: str, detail: str) -> None:
        """Back off instead of spinning; refuse one waiting client with a line if we can.

        ``kind`` is ``descriptors`` or ``memory`` (accept failed) or
        ``threads`` (the client was already refused). Logged at most every 5 s, and once more when
        the shortage ends (:meth:`_resources_back`).
        """
        now = _now()
        if self._exhausted_since is None:
            self._exhausted_since = now
        if now - self._resource_log_at > 5.0:
            self._resource_log_at = now
            self.log.error(
                "out_of_resources",
                resource=kind,
                detail=detail,
                backoff=BACKOFF_SECONDS,
                clients=len(self.registry),
            )
        # The reserve descriptor trick: free one fd, accept and answer one
        # client so it is told rather than left hanging, then take it back.
        if kind == "descriptors" and self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
            try:
                self.socket.settimeout(0)
                sock, _ = self.socket.accept()
                self.registry.reject("out_of_descriptors")
                self._exhausted_refused += 1
                _refuse(sock, protocol.error_line("server out of resources, try again later"))
            except OSError:
                pass
            finally:
                self.socket.settimeout(None)
                self._reserve_fd = _open_reserve()
        self._janitor_stop.wait(BACKOFF_SECONDS)

    def _resources_back(self) -> None:
        """A handler started after a shortage: say how long it lasted and whom it cost."""
        since = self._exhausted_since or _now()
        self.log.warning(
            "out_of_resources_ended",
            refused=self._exhausted_refused,
            lasted=round(_now() - since, 3),
            clients=len(self.registry),
        )
        self._exhausted_since = None
        self._exhausted_refused = 0
        self._resource_log_at = 0.0

    # -- timeouts ------------------------------------------------------------

    def _start_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = threading.Thread(
                target=self._janitor_loop, name="echod-janitor", daemon=True
            )
            self._janitor.start()

    def _janitor_loop(self) -> None:
        while not self._janitor_stop.wait(self._janitor_tick()):
            self._janitor_rounds += 1
            try:
                with self._janitor_lock:
                    self.check_timeouts()
            except Exception:
                self.log.error("janitor_error", exc_info=True)

    def _janitor_tick(self) -> float:
        """A tenth of the shortest timeout, from 0.05 to 1 s; read anew after each tick."""
        s = self.settings
        limits = [t for t in (s.idle_timeout, s.line_timeout, s.send_timeout) if t > 0]
        return min(1.0, max(0.05, min(limits) / 10))

    def check_timeouts(self) -> None:
        """End connections that are idle, trickling a line, or not reading."""
        s = self.settings
        now = _now()
        if self._reject_burst and now - self._last_reject > 1.0:
            self.log.warning("client_rejected_burst_ended", rejected=self._reject_burst)
            self._reject_burst = 0
        for reason, count in self.refusal_log.summaries():
            self.log.warning("client_refused_burst", reason=reason, count=count)
        for conn in self.registry.snapshot():
            if conn.end_reason is not None:
                continue
            conn.notice(now)
            if conn.stalled_since is not None:
                conn.flush()
                stalled = conn.stalled_since
                if stalled is not None and now - stalled >= s.send_timeout:
                    conn.end(None, "slow_reader")
                    continue
            started = conn.line_started
            if s.line_timeout and started is not None and now - started >= s.line_timeout:
                conn.end(protocol.error_line("line timeout"), "line_timeout")
            elif s.idle_timeout and now - conn.last_active >= s.idle_timeout:
                conn.end(protocol.error_line("idle timeout"), "idle_timeout")

    # -- reloading -------------------------------------------------------

    def apply(self, settings: Settings) -> None:
        """Serve by reloaded ``settings`` from now on (see :mod:`echod.reload`).

        Read when used: ``max_clients`` at each accept (lowering it refuses
        new clients and ends nobody), the timeouts at each janitor tick (for
        every client), ``chat`` at each read, ``proxy_timeout`` at each
        header; ``max_line`` and ``max_line_rate`` for clients that connect
        from now on (a client keeps the limits it started under). The
        admission rules (lists, list files read anew, per-source limit,
        rates, trusted balancers) apply from the next connect
        (:meth:`Admission.set_policy`). ``send_timeout`` is also copied to
        every connected client, whose handler waits by it.
        """
        if settings.admission_policy() != self.settings.admission_policy():
            self.admission.set_policy(settings.admission_policy())
        self._gate(settings)
        self.settings = settings
        for conn in self.registry.snapshot():
            conn.send_timeout = settings.send_timeout

    def _gate(self, settings: Settings) -> None:
        policy = settings.admission_policy()
        self._proxy_trusted = AccessList(allow=settings.proxy_trusted)
        # Whether connections pass admit() at all: nothing to do costs nothing.
        self.gated = self._proxy_versions is not None or bool(
            policy.allow or policy.deny or policy.max_per_source or policy.connect_rate
        )

    # -- stopping --------------------------------------------------------

    def stop(self, timeout: float) -> bool:
        """Graceful stop; see the module docstring. Not from the serve_forever thread."""
        deadline = _now() + timeout
        self.stopping = self.holding = True
        self.shutdown()
        self.socket.close()
        clients = self.registry.snapshot()
        for conn in clients:
            conn.end(protocol.SHUTDOWN_NOTICE, "shutdown")
        for conn in clients:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - _now()))
        self._janitor_stop.set()
        if self._janitor is not None:
            self._janitor.join(1.0)
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
        return all(c.thread is None or not c.thread.is_alive() for c in clients)

    # -- handing over --------------------------------------------------------

    def pause_clients(self, timeout: float) -> list[Connection]:
        """Stop accepting and the janitor, and park every client's handler (echod.pause).

        Returns the parked connections, whose state and sockets the caller
        hands over (:meth:`let_go`) or gives back (:meth:`resume`). Clients
        already ending are not parked; they finish here. Raises
        :class:`~echod.pause.PauseTimeout` after resuming, if some handler did
        not park within ``timeout``. Not from the serve_forever thread.
        """
        self.holding = True
        self.shutdown()  # the accept loop; the listening socket stays open, queueing clients
        self._janitor_lock.acquire()
        self._paused = self.registry.snapshot()
        try:
            return self.pause.hold(self._paused, timeout)
        except BaseException:
            self.resume()
            raise

    def resume(self) -> None:
        """Call a pause off: every parked client is served here again, accepting goes on."""
        paused, self._paused = self._paused, []
        parked = [c for c in paused if c.parked]
        self.pause.release(paused)
        self.holding = self.stopping
        self._janitor_lock.release()
        self._restart(parked).set()
        threading.Thread(target=self.serve_forever, name="echod-accept", daemon=True).start()

    def let_go(self) -> None:
        """The successor serves the parked clients: forget them and close our descriptors.

        Clients that were ending stay until they are done; the janitor looks
        after them, and nothing is accepted here any more.
        """
        paused, self._paused = self._paused, []
        handed = [c for c in paused if c.parked]
        self.pause.release(paused, restore=False)  # the successor set them blocking
        for conn in handed:
            self.registry.remove(conn)
            conn.sock.close()  # our descriptor only: the successor holds its own
        self.socket.close()
        self._janitor_lock.release()

    def retire(self, timeout: float) -> bool:
        """After :meth:`let_go`: let the clients that were ending here finish, then stop."""
        deadline = _now() + timeout
        for conn in self.registry.snapshot():
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - _now()))
        return self.stop(max(0.0, deadline - _now()))

    def adopt(self, conns: list[Connection]) -> threading.Event:
        """Take connections another echod handed over: register them, start their handlers.

        The handlers wait until the returned gate is set (once the old echod
        has let go).
        """
        for conn in conns:
            os.set_blocking(conn.sock.fileno(), True)  # the old echod's handlers are parked
            self.registry.add(conn, notify=False)
        return self._restart(conns)

    def _restart(self, conns: list[Connection]) -> threading.Event:
        """Start handlers for connections that have none, held at a gate until it is set.

        Starting a thread waits for it to run; with the other handlers
        already busy, each start would wait for the GIL, a switch interval
        at a time: thousands of them took seconds. Held at the gate, the new
        threads only block, and the starts take milliseconds.
        """
        gate = threading.Event()
        for conn in conns:
            conn.flush()  # output queued while it was parked
            try:
                conn.carried = True  # through its pre-serve step already: not again
                self._start_handler(conn, None, gate)
            except RuntimeError:  # can't start new thread: nothing else can serve it
                conn.end(protocol.error_line("server busy, try again later"), "busy")
                conn.sock.close()
                self._closed(conn)
        return gate


def tls_files(settings: Settings) -> TLSFiles | None:
    """What the TLS options say to load, or None with TLS off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return TLSFiles(
        settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_min_version
    )


def _tls_endpoint(settings: Settings) -> TLSEndpoint | None:
    """The listener's TLS, or None; raises :class:`~echod.tls.TLSConfigError`."""
    files = tls_files(settings)
    return None if files is None else TLSEndpoint(files, settings.tls_handshake_timeout)


def _refuse(sock: socket.socket, line: bytes) -> None:
    """Tell a client we will not serve it, without ever blocking the accept loop."""
    try:
        sock.send(line, socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and address to bind for ``host`` (an address or a name)."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as err:
        raise StartupError(f"cannot listen on {host!r}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    return family, address


def bind_error_message(host: str, port: int, err: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the address is already in use"
    if err.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: permission denied "
            "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: that address is not on this machine"
    return f"cannot listen on {where}: {err.strerror or err}"
