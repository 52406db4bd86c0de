"""Certificates for the TLS tests, made on the fly by trustme: no key material is committed.

:class:`TLSKit` is a CA with a server certificate for ``localhost`` and
127.0.0.1, written as PEM files into a directory of the test's own, plus
helpers to issue more (other serials, expired, from another CA) and to build
client contexts that trust the CA. :class:`TLSClient` is the TLS twin of
conftest's ``Client``.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import trustme
from cryptography import x509


class TLSKit:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._count = 0
        self.cert, self.key = self.issue("localhost", "127.0.0.1", "::1")

    def issue(
        self,
        *identities: str,
        ca: trustme.CA | None = None,
        common_name: str | None = None,
        not_after: datetime.datetime | None = None,
        not_before: datetime.datetime | None = None,
    ) -> tuple[Path, Path]:
        """A new certificate and its key as files: (chain PEM, key PEM)."""
        self._count += 1
        leaf = (ca or self.ca).issue_cert(
            *identities, common_name=common_name, not_after=not_after, not_before=not_before
        )
        cert = self.dir / f"cert{self._count}.pem"
        key = self.dir / f"key{self._count}.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_hello(self) -> bytes:
        """The bytes of a client's first flight (its ClientHello), from a fresh client."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass  # waiting for the ServerHello, as it should
        return outgoing.read()

    def client_context(
        self, cert: tuple[Path, Path] | None = None, max_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        """A client context that trusts the kit's CA, presenting ``cert`` if given."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(cert[0], cert[1])
        if max_version is not None:
            context.maximum_version = max_version
        return context


def serial_of(cert: Path) -> int:
    """The serial number of the first certificate in a PEM file."""
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


class TLSClient:
    """A TLS test client with the methods of conftest's ``Client``.

    TLS runs over memory BIOs, so ``sock`` stays the plain socket: a test
    can half-close with close_notify or with a bare FIN, and read what the
    server sends raw. A lock serialises the SSLObject (a reader and a
    sender thread may share one client); socket I/O happens outside it.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        context: ssl.SSLContext | None = None,
        handshake: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        """Connect to ``host``:``port``, or speak TLS over ``sock``, already connected."""
        if context is None:
            raise ValueError("TLSClient needs a client context (TLSKit.client_context())")
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect((host, port))
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_hostname=host)
        self._lock = threading.Lock()
        self._buf = b""
        if handshake:
            self.handshake()

    def handshake(self) -> None:
        while True:
            with self._lock:
                try:
                    self.obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                out = self._out.read()
            if out:
                self.sock.sendall(out)
            if done:
                return
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the server closed during the handshake")
            with self._lock:
                self._in.write(data)

    def peer_serial(self) -> int:
        der = self.obj.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def send(self, data: bytes) -> None:
        with self._lock:
            self.obj.write(data)
            out = self._out.read()
        self.sock.sendall(out)

    def _fill(self) -> bool:
        """Read more plaintext into the buffer; False at the end (close_notify or EOF)."""
        while True:
            with self._lock:
                try:
                    chunk: bytes | None = self.obj.read(65536)
                except ssl.SSLWantReadError:
                    chunk = None
                except ssl.SSLZeroReturnError:  # close_notify after we sent ours
                    chunk = b""
            if chunk:
                self._buf += chunk
                return True
            if chunk == b"":  # close_notify
                return False
            data = self.sock.recv(65536)
            if not data:
                return False
            with self._lock:
                self._in.write(data)

    def readline(self) -> bytes:
        while b"\n" not in self._buf:
            if not self._fill():
                rest, self._buf = self._buf, b""
                return rest
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n and self._fill():
            pass
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_all(self) -> bytes:
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        data, self._buf = self._buf, b""
        return data

    def roundtrip(self, line: bytes) -> bytes:
        self.send(line)
        return self.readline()

    def half_close(self, close_notify: bool = True) -> None:
        """End our input: close_notify then FIN, or (``close_notify=False``) a bare FIN."""
        if close_notify:
            with self._lock:
                try:
                    self.obj.unwrap()
                except ssl.SSLWantReadError:
                    pass  # sent ours; the server's comes after its last echo
                out = self._out.read()
            self.sock.sendall(out)
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
