"""TLS: building, checking and swapping the server's SSLContext, and each client's session.

Design
------
echod terminates TLS itself, with the standard library's :mod:`ssl`, in the
client's own handler thread. Three parts, one job each:

- :func:`load` builds a server :class:`ssl.SSLContext` from the files and
  checks what a client would otherwise find out the hard way: every file is
  there and readable, the key is unencrypted and matches the certificate,
  the certificate has not expired, the client CA file holds certificates.
  It raises :class:`TLSConfigError`, one sentence, so a bad file stops the
  start before detaching and a bad rotation changes nothing.
- :class:`TLSEndpoint` holds the current context and swaps it on
  :meth:`~TLSEndpoint.reload` (SIGHUP): one attribute assignment, atomic under
  the GIL, so a connection accepted afterwards handshakes with the new
  certificate and an established one keeps the session it has. If loading
  fails the old context stays.
- :class:`TLSSession` is one client's TLS state as bytes in, bytes out (an
  :class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`), like h11: it never
  touches a socket. :func:`handshake` drives it over the client's socket
  against one deadline for the whole handshake.

Why memory BIOs and not :class:`ssl.SSLSocket`: echod writes to a client
from any thread (operator pushes, chat relays, shutdown notices) with
non-blocking sends while the handler thread sits in a blocking ``recv``.
An OpenSSL connection must not be read and written by two threads at once,
``SSLSocket.send`` refuses ``MSG_DONTWAIT``, and ``SSLSocket.shutdown`` from
another thread drops the SSL object under the reader. With memory BIOs the
socket stays a plain socket, so waking, shutting down and non-blocking sends
work exactly as for plain TCP; the connection serialises encryption with a
lock (OpenSSL's work on in-memory bytes, never a wait on the network) and
queues the records in order.

The handshake deadline: :func:`handshake` never blocks without a timeout. It
polls the socket with what is left of ``deadline`` and reads what is there,
so a client that sends nothing, half a ClientHello, or a ClientHello one byte
at a time is cut when the deadline passes, not after one timeout per byte.

Error handling
--------------
:func:`load` raises :class:`TLSConfigError` (a
:class:`~echod.errors.StartupError`, exit status 1) for every problem with the
files. :func:`handshake` raises :class:`HandshakeFailed` whose ``error`` is a
short name (OpenSSL's reason such as ``WRONG_VERSION_NUMBER``, or
``timeout``, ``eof``, ``reset``); the server logs it and closes the client.
After the handshake, :meth:`TLSSession.receive` raises :class:`ssl.SSLError`
(an :class:`OSError`) for a corrupt record, which the handler treats like a
reset.
"""

from __future__ import annotations

import datetime
import errno
import functools
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from echod.errors import StartupError

T = TypeVar("T")

# --tls-min-version's values (config.py declares the option with these choices).
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# A TLS record carries at most 16 KiB of plaintext; reading one whole record
# per call keeps receive() to one read for the common small message.
RECORD_SIZE = 16384
# Handshake messages are a few KiB (a certificate chain); reads this size take
# a flight in one or two system calls.
HANDSHAKE_READ = 16384


class TLSConfigError(StartupError):
    """A TLS file is missing, unreadable, expired, or the key does not fit."""


class HandshakeFailed(Exception):
    """The client did not complete the handshake; ``error`` is a short name for the log."""

    def __init__(self, error: str, detail: str = "") -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class TLSFiles:
    """Where the key material is, and the policy: what :func:`load` reads."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    min_version: str = "1.2"


@dataclass(frozen=True)
class CertInfo:
    """What the log and ``/stats`` say about a certificate."""

    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "X")


# -- the certificate's validity, read from its DER -----------------------------
#
# ssl parses a certificate only for a peer (getpeercert), so the server's
# own certificate is read here: the few fields of TBSCertificate up to its
# validity (RFC 5280, 4.1), by a strict DER walker that rejects anything
# truncated or malformed with ValueError.


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """The DER item at ``pos``: (tag, start of contents, end of contents)."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ; RFC 5280: YY < 50 is 20YY
        year = int(text[:2])
        text = ("20" if year < 50 else "19") + text
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    parsed = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return parsed.replace(tzinfo=datetime.UTC)


def parse_certificate(der: bytes) -> CertInfo:
    """Serial number and validity of a DER certificate; ValueError if malformed."""
    tag, start, _ = _der_item(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, tbs_end = _der_item(der, start)  # TBSCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, item, item_end = _der_item(der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version, absent for v1
        pos = item_end
        tag, item, item_end = _der_item(der, pos)
    if tag != 0x02:
        raise ValueError("no serial number")
    serial = int.from_bytes(der[item:item_end], "big", signed=True)
    pos = item_end
    for _ in range(2):  # signature algorithm, issuer
        tag, _, pos = _der_item(der, pos)
        if tag != 0x30:
            raise ValueError("malformed certificate")
    tag, pos, validity_end = _der_item(der, pos)
    if tag != 0x30 or validity_end > tbs_end:
        raise ValueError("no validity")
    times = []
    for _ in range(2):
        tag, item, pos = _der_item(der, pos)
        times.append(_der_time(tag, der[item:pos]))
    return CertInfo(serial, times[0], times[1])


def first_pem_certificate(pem: str) -> bytes | None:
    """The DER of the first certificate in PEM text (the leaf, in a chain file)."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(pem[start : stop + len(end)] + "\n")
    except ValueError:
        return None


# -- building the context --------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: no such file") from None
    except IsADirectoryError:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: it is a directory") from None
    except PermissionError:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: permission denied") from None
    except OSError as err:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: {err.strerror}") from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key; without it, OpenSSL would
    # prompt on the terminal, or hang a detached daemon.
    raise _EncryptedKey


def _ssl_reason(err: ssl.SSLError) -> str:
    return str(err.reason or err.strerror or err).replace("_", " ").lower()


def load(files: TLSFiles, now: datetime.datetime | None = None) -> tuple[ssl.SSLContext, CertInfo]:
    """A server context for ``files``, and its certificate's details.

    Raises :class:`TLSConfigError` with one sentence naming the file at fault.
    """
    pem = _read(files.cert, "certificate").decode("ascii", "replace")
    _read(files.key, "key")  # its own sentence for a missing or unreadable key
    der = first_pem_certificate(pem)
    if der is None:
        raise TLSConfigError(f"the TLS certificate {files.cert} holds no PEM certificate")
    try:
        info = parse_certificate(der)
    except ValueError:
        raise TLSConfigError(f"the TLS certificate {files.cert} cannot be parsed") from None
    now = now or datetime.datetime.now(datetime.UTC)
    if info.not_after < now:
        raise TLSConfigError(
            f"the TLS certificate {files.cert} expired on {info.not_after:%Y-%m-%d %H:%M} UTC"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[files.min_version]
    # A client that closes with a bare FIN instead of close_notify has still
    # ended its input; without this OpenSSL 3 calls it an error (and sends an alert).
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"the TLS key {files.key} is encrypted; echod needs it unencrypted "
            "(protect it by file permissions or systemd's LoadCredential=)"
        ) from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"the TLS key {files.key} does not match the certificate {files.cert}"
            ) from None
        raise TLSConfigError(
            f"cannot load the TLS certificate {files.cert} with the key {files.key}: "
            f"{_ssl_reason(err)}"
        ) from None
    if files.client_ca is not None:
        _read(files.client_ca, "client CA file")
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except ssl.SSLError as err:
            raise TLSConfigError(
                f"cannot load the TLS client CA file {files.client_ca}: {_ssl_reason(err)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context, info


@dataclass(frozen=True)
class Prepared:
    """A loaded context waiting to be installed (a reload prepares, then commits)."""

    files: TLSFiles
    context: ssl.SSLContext
    info: CertInfo


class TLSEndpoint:
    """The listener's TLS: the current context, swapped whole on reload.

    Handler threads read ``context`` without a lock: it is replaced by one
    assignment, never changed in place.
    """

    def __init__(self, files: TLSFiles, handshake_timeout: float) -> None:
        """Load ``files``; raises :class:`TLSConfigError`."""
        self.files = files
        self.handshake_timeout = handshake_timeout
        self.context, self.info = load(files)

    def reload(
        self, files: TLSFiles | None = None, handshake_timeout: float | None = None
    ) -> CertInfo:
        """Load the files again (or ``files``, new settings) and swap the new context in.

        Raises :class:`TLSConfigError` and keeps the current context, files
        and timeout if anything is wrong with the files.
        """
        prepared = self.prepare(files or self.files)
        self.install(prepared, handshake_timeout)
        return prepared.info

    def prepare(self, files: TLSFiles) -> Prepared:
        """A context for ``files``, not in use yet; raises :class:`TLSConfigError`."""
        context, info = load(files)
        return Prepared(files, context, info)

    def install(self, prepared: Prepared, handshake_timeout: float | None = None) -> None:
        """Make ``prepared`` the context of every connection accepted from now on."""
        # Both in one assignment: a reader never sees a context with another's details.
        self.context, self.info = prepared.context, prepared.info
        self.files = prepared.files
        if handshake_timeout is not None:
            self.handshake_timeout = handshake_timeout

    def session(self) -> TLSSession:
        return TLSSession(self.context)


class TLSSession:
    """One client's TLS connection as bytes in, bytes out; never touches a socket.

    Not thread-safe: the caller serialises all calls (the connection's TLS lock).
    """

    __slots__ = ("_in", "_obj", "_out")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)

    def do_handshake(self, data: bytes = b"") -> tuple[bool, bytes]:
        """Feed handshake bytes; returns (finished, bytes to send).

        Raises :class:`ssl.SSLError` when the client's bytes are not an
        acceptable handshake; the bytes to send (an alert) are then in
        :meth:`pending_output`.
        """
        if data:
            self._in.write(data)
        try:
            self._obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        return done, self._out.read()

    def pending_output(self) -> bytes:
        return self._out.read()

    def receive(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """Feed received bytes; returns (plaintext, bytes to send, peer closed).

        ``plaintext`` may be empty while a record is incomplete. ``peer
        closed`` means close_notify arrived: the end of the client's input.
        Bytes to send are TLS's own (key updates, the answer to close_notify).
        """
        incoming = self._in
        incoming.write(data)
        read = self._obj.read
        plain = b""
        closed = False
        try:
            # One read takes a whole record (at most RECORD_SIZE of plaintext),
            # so OpenSSL holds no plaintext back: loop only while bytes remain.
            while True:
                chunk = read(RECORD_SIZE)
                if not chunk:  # close_notify (SSLObject returns b"" for it, no exception)
                    closed = True
                    break
                plain += chunk  # b"" + chunk is chunk itself: no copy for one record
                if not incoming.pending:
                    break
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            closed = True
        out = self._out.read() if self._out.pending else b""
        return plain, out, closed

    def encrypt(self, data: bytes) -> bytes:
        """The records carrying ``data``."""
        self._obj.write(data)
        return self._out.read()

    def close(self) -> bytes:
        """Our close_notify, to send before the FIN."""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: the peer's close_notify is not awaited
        return self._out.read()

    @property
    def version(self) -> str | None:
        return self._obj.version()

    @property
    def peer_cn(self) -> str | None:
        """The client certificate's subject common name, if one was verified."""
        cert = self._obj.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for attribute in rdn:
                if attribute[0] == "commonName":
                    return str(attribute[1])
        return None


def _when_ready(
    sock: socket.socket,
    events: int,
    deadline: float,
    now: Callable[[], float],
    attempt: Callable[[], T],
) -> T:
    """``attempt()``, a non-blocking send or recv, once ``sock`` is ready, before ``deadline``."""
    poller = select.poll()
    poller.register(sock, events)
    while True:
        remaining = deadline - now()
        if remaining <= 0:
            raise HandshakeFailed("timeout", "the handshake did not finish in time")
        if poller.poll(remaining * 1000):
            try:
                return attempt()
            except BlockingIOError:
                pass  # woken, but not ready after all: wait again
            except OSError as err:
                error = "reset" if err.errno in (errno.ECONNRESET, errno.EPIPE) else "error"
                raise HandshakeFailed(error, err.strerror or str(err)) from None


def handshake(
    session: TLSSession,
    sock: socket.socket,
    deadline: float,
    now: Callable[[], float],
    initial: bytes = b"",
) -> None:
    """Complete ``session``'s handshake over ``sock`` before ``deadline`` (``now()`` time).

    ``initial``: bytes already read from the socket (past a PROXY header).
    Every wait is a poll for what is left until the deadline, so the whole
    handshake, however the client paces it, ends by then. The last read may
    have brought application data too: call ``session.receive(b"")`` before
    reading the socket again.

    Raises :class:`HandshakeFailed`; an alert OpenSSL produced is sent
    first, best effort, so the client learns why.
    """
    data = initial
    while True:
        try:
            done, out = session.do_handshake(data)
        except ssl.SSLError as err:
            alert = session.pending_output()
            if alert:
                try:
                    sock.send(alert, socket.MSG_DONTWAIT)
                except OSError:
                    pass  # the client is gone or not reading: nothing to tell it
            name = err.reason or type(err).__name__
            raise HandshakeFailed(str(name), getattr(err, "verify_message", "") or "") from None
        view = memoryview(out)
        while view:
            send = functools.partial(sock.send, view, socket.MSG_DONTWAIT)
            view = view[_when_ready(sock, select.POLLOUT, deadline, now, send) :]
        if done:
            return
        recv = functools.partial(sock.recv, HANDSHAKE_READ, socket.MSG_DONTWAIT)
        data = _when_ready(sock, select.POLLIN, deadline, now, recv)
        if not data:
            raise HandshakeFailed("eof", "the client closed during the handshake")
