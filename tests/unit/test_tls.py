"""echod.tls: checking the files, swapping contexts, sessions, the handshake deadline.

Sessions are driven in memory against a client SSLObject, whole and byte by
byte; the handshake is driven over a real socketpair, with a deadline.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from echod import tls
from echod.tls import HandshakeFailed, TLSConfigError, TLSEndpoint, TLSFiles, TLSSession
from tests.helpers import TIMEOUT
from tests.tlskit import TLSKit, serial_of

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def kit(tmp_path: Path) -> TLSKit:
    return TLSKit(tmp_path)


def files(kit: TLSKit, **overrides: object) -> TLSFiles:
    base: dict[str, object] = {"cert": kit.cert, "key": kit.key}
    base.update(overrides)
    return TLSFiles(**base)  # type: ignore[arg-type]


# -- the certificate's DER ----------------------------------------------------------


def test_parse_certificate_matches_cryptography(kit: TLSKit) -> None:
    der = tls.first_pem_certificate(kit.cert.read_text())
    assert der is not None
    info = tls.parse_certificate(der)
    real = x509.load_der_x509_certificate(der)
    assert info.serial == real.serial_number
    assert info.not_before == real.not_valid_before_utc
    assert info.not_after == real.not_valid_after_utc


def test_parse_certificate_generalized_time(kit: TLSKit) -> None:
    # Dates from 2050 on are GeneralizedTime in DER, earlier ones UTCTime.
    cert, _ = kit.issue("localhost", not_after=datetime.datetime(2051, 3, 4, 5, 6, 7))
    der = tls.first_pem_certificate(cert.read_text())
    assert der is not None
    assert tls.parse_certificate(der).not_after == datetime.datetime(
        2051, 3, 4, 5, 6, 7, tzinfo=datetime.UTC
    )


def test_parse_certificate_rejects_every_truncation(kit: TLSKit) -> None:
    der = tls.first_pem_certificate(kit.cert.read_text())
    assert der is not None
    # Cut anywhere before the validity ends: always ValueError, never anything else.
    for n in range(200):
        with pytest.raises(ValueError):
            tls.parse_certificate(der[:n])
    with pytest.raises(ValueError):
        tls.parse_certificate(b"\x02\x01\x00" + der)


def test_first_pem_certificate_takes_the_leaf(kit: TLSKit) -> None:
    chain = kit.cert.read_text() + kit.ca_file.read_text()  # leaf, then its issuer
    der = tls.first_pem_certificate(chain)
    assert der is not None
    assert x509.load_der_x509_certificate(der).serial_number == serial_of(kit.cert)
    assert tls.first_pem_certificate("no pem here") is None


# -- loading --------------------------------------------------------------------------


def test_load_good_files(kit: TLSKit) -> None:
    context, info = tls.load(files(kit))
    assert info.serial == serial_of(kit.cert)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    assert context.options & ssl.OP_IGNORE_UNEXPECTED_EOF


def test_load_min_version_and_client_ca(kit: TLSKit) -> None:
    context, _ = tls.load(files(kit, min_version="1.3", client_ca=kit.ca_file))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("which", ["cert", "key", "client_ca"])
def test_load_missing_file(kit: TLSKit, tmp_path: Path, which: str) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=f"cannot read the TLS .*{missing}: no such file"):
        tls.load(files(kit, **{which: missing}))


def test_load_directory_and_unreadable(kit: TLSKit, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="it is a directory"):
        tls.load(files(kit, key=tmp_path))
    if os.geteuid() != 0:  # root reads anything
        kit.key.chmod(0)
        with pytest.raises(TLSConfigError, match="permission denied"):
            tls.load(files(kit))


def test_load_key_mismatch(kit: TLSKit) -> None:
    _, other_key = kit.issue("localhost")
    with pytest.raises(TLSConfigError, match="does not match the certificate"):
        tls.load(files(kit, key=other_key))


def test_load_expired(kit: TLSKit) -> None:
    cert, key = kit.issue(
        "localhost",
        not_before=datetime.datetime(2020, 1, 1),
        not_after=datetime.datetime(2021, 6, 1, 12, 0),
    )
    with pytest.raises(TLSConfigError, match="expired on 2021-06-01 12:00 UTC"):
        tls.load(files(kit, cert=cert, key=key))


def test_load_not_pem(kit: TLSKit, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(TLSConfigError, match="holds no PEM certificate"):
        tls.load(files(kit, cert=junk))
    with pytest.raises(TLSConfigError, match="cannot load the TLS certificate"):
        tls.load(files(kit, key=junk))
    with pytest.raises(TLSConfigError, match="client CA file"):
        tls.load(files(kit, client_ca=junk))


def test_load_encrypted_key_never_prompts(kit: TLSKit, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(kit.key.read_bytes(), None)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted"):
        tls.load(files(kit, key=encrypted))


def test_reload_swaps_and_a_broken_file_keeps_the_old(kit: TLSKit) -> None:
    endpoint = TLSEndpoint(files(kit), 1.0)
    first = endpoint.context
    assert endpoint.info.serial == serial_of(kit.cert)
    new_cert, new_key = kit.issue("localhost", "127.0.0.1")
    kit.cert.write_bytes(new_cert.read_bytes())
    kit.key.write_bytes(new_key.read_bytes())
    assert endpoint.reload().serial == serial_of(new_cert)
    second = endpoint.context
    assert second is not first
    kit.cert.write_text("broken\n")
    with pytest.raises(TLSConfigError):
        endpoint.reload()
    assert endpoint.context is second
    assert endpoint.info.serial == serial_of(new_cert)


# -- sessions, in memory ---------------------------------------------------------------


class MemoryClient:
    """A client SSLObject over memory BIOs, pumped against a TLSSession."""

    def __init__(self, kit: TLSKit, context: ssl.SSLContext | None = None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = context or kit.client_context()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, server: TLSSession, byte_by_byte: bool = False) -> None:
        server_done = client_done = False
        for _ in range(20):
            try:
                self.obj.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            data = self.outgoing.read()
            chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
            out = b""
            for chunk in chunks or [b""]:
                server_done, more = server.do_handshake(chunk)
                out += more
            self.incoming.write(out)
            if client_done and server_done:
                break
        assert client_done and server_done

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def read(self, records: bytes) -> bytes:
        self.incoming.write(records)
        return self.obj.read(65536)


def test_session_echo_whole_and_byte_by_byte(kit: TLSKit) -> None:
    context, _ = tls.load(files(kit))
    for byte_by_byte in (False, True):
        server = TLSSession(context)
        client = MemoryClient(kit)
        client.handshake(server, byte_by_byte)
        assert server.version in ("TLSv1.2", "TLSv1.3")
        records = client.send(b"hello\n") + client.send(b"world\n")
        plain = b""
        pieces = [records[i : i + 1] for i in range(len(records))] if byte_by_byte else [records]
        for piece in pieces:
            text, _, closed = server.receive(piece)
            assert not closed
            plain += text
        assert plain == b"hello\nworld\n"
        assert client.read(server.encrypt(b"hello\n")) == b"hello\n"


def test_session_close_notify_ends_input_after_the_data(kit: TLSKit) -> None:
    context, _ = tls.load(files(kit))
    server = TLSSession(context)
    client = MemoryClient(kit)
    client.handshake(server)
    records = client.send(b"partial")
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.unwrap()  # writes close_notify, waits for ours
    records += client.outgoing.read()
    text, _, closed = server.receive(records)
    assert (text, closed) == (b"partial", True)
    client.incoming.write(server.close())
    client.obj.unwrap()  # our close_notify completes the client's shutdown


def test_session_corrupt_record_is_an_error(kit: TLSKit) -> None:
    context, _ = tls.load(files(kit))
    server = TLSSession(context)
    client = MemoryClient(kit)
    client.handshake(server)
    records = bytearray(client.send(b"hello\n"))
    records[-1] ^= 1
    with pytest.raises(ssl.SSLError):
        server.receive(bytes(records))


def test_session_peer_cn(kit: TLSKit) -> None:
    context, _ = tls.load(files(kit, client_ca=kit.ca_file))
    server = TLSSession(context)
    alice = kit.issue("alice@example.org", common_name="alice")
    MemoryClient(kit, kit.client_context(alice)).handshake(server)
    assert server.peer_cn == "alice"


# -- the handshake over a socket, with its deadline --------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    client.settimeout(10)
    yield server, client
    server.close()
    client.close()


def run_handshake(session: TLSSession, sock: socket.socket, timeout: float) -> float:
    """Run tls.handshake; return how long it took (it raises on failure)."""
    start = time.monotonic()
    tls.handshake(session, sock, start + timeout, time.monotonic)
    return time.monotonic() - start


def test_handshake_over_a_socket(kit: TLSKit, pair: tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    context, _ = tls.load(files(kit))
    session = TLSSession(context)
    result: list[bytes] = []

    def client() -> None:
        with kit.client_context().wrap_socket(client_sock, server_hostname="localhost") as s:
            s.sendall(b"hi\n")
            result.append(s.recv(100))

    thread = threading.Thread(target=client)
    thread.start()
    run_handshake(session, server_sock, 5.0)
    # The handshake's last read may have brought the record too.
    data, _, _ = session.receive(b"")
    while not data:
        server_sock.settimeout(5)
        data, _, _ = session.receive(server_sock.recv(4096))
    server_sock.sendall(session.encrypt(data))
    thread.join(10)
    assert result == [b"hi\n"]


def test_handshake_silent_client_is_cut_at_the_deadline(
    kit: TLSKit, pair: tuple[socket.socket, socket.socket]
) -> None:
    context, _ = tls.load(files(kit))
    start = time.monotonic()
    with pytest.raises(HandshakeFailed) as failed:
        run_handshake(TLSSession(context), pair[0], 0.3)
    assert failed.value.error == "timeout"
    assert 0.3 <= time.monotonic() - start < TIMEOUT  # at the deadline, not never


def test_handshake_trickled_client_hello_is_cut_at_one_deadline(
    kit: TLSKit, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A ClientHello one byte per 50 ms: the deadline is for the whole handshake, not per read."""
    server_sock, client_sock = pair
    context, _ = tls.load(files(kit))
    client_hello = kit.client_hello()
    assert len(client_hello) > 100  # so trickling it takes > 5 s
    stop = threading.Event()

    def trickle() -> None:
        for byte in client_hello:
            if stop.wait(0.05):
                return
            try:
                client_sock.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(HandshakeFailed) as failed:
            run_handshake(TLSSession(context), server_sock, 0.5)
    finally:
        stop.set()
        thread.join(10)
    assert failed.value.error == "timeout"
    # Cut well before the trickle could finish (one timeout per read would never cut it).
    assert time.monotonic() - start < len(client_hello) * 0.05 / 2


def test_handshake_plain_text_is_refused_at_once(
    kit: TLSKit, pair: tuple[socket.socket, socket.socket]
) -> None:
    server_sock, client_sock = pair
    context, _ = tls.load(files(kit))
    client_sock.sendall(b"hello there\n")
    with pytest.raises(HandshakeFailed) as failed:
        run_handshake(TLSSession(context), server_sock, 5.0)
    assert failed.value.error in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD")


def test_handshake_eof_and_initial_bytes(
    kit: TLSKit, pair: tuple[socket.socket, socket.socket]
) -> None:
    server_sock, client_sock = pair
    context, _ = tls.load(files(kit))
    client_hello = kit.client_hello()
    # The first bytes came with a PROXY header (already read); the rest, then EOF.
    client_sock.sendall(client_hello[10:])
    client_sock.shutdown(socket.SHUT_WR)
    session = TLSSession(context)
    with pytest.raises(HandshakeFailed) as failed:
        tls.handshake(session, server_sock, time.monotonic() + 5, time.monotonic, client_hello[:10])
    assert failed.value.error == "eof"  # the ServerHello was sent: the ClientHello was whole
    assert client_sock.recv(5)[:1] == b"\x16"  # a handshake record


def test_client_certificate_from_another_ca_is_refused(
    kit: TLSKit, pair: tuple[socket.socket, socket.socket]
) -> None:
    server_sock, client_sock = pair
    context, _ = tls.load(files(kit, client_ca=kit.ca_file))
    stranger = kit.issue("mallory", ca=trustme.CA(), common_name="mallory")

    def client() -> None:
        try:
            with kit.client_context(stranger).wrap_socket(
                client_sock, server_hostname="localhost"
            ) as s:
                s.recv(10)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=client)
    thread.start()
    with pytest.raises(HandshakeFailed) as failed:
        run_handshake(TLSSession(context), server_sock, 5.0)
    thread.join(10)
    assert failed.value.error == "CERTIFICATE_VERIFY_FAILED"


def test_min_versions_are_the_flags_choices() -> None:
    from echod.config import OPTIONS, InvalidValue

    (option,) = [o for o in OPTIONS if o.name == "tls_min_version"]
    assert option.kind is not None
    for version in tls.MIN_VERSIONS:
        option.kind.check(version)
    with pytest.raises(InvalidValue):
        option.kind.check("1.1")


def test_reload_with_new_settings(kit: TLSKit) -> None:
    endpoint = TLSEndpoint(files(kit), 1.0)
    cert, key = kit.issue("localhost")
    info = endpoint.reload(files(kit, cert=cert, key=key, min_version="1.3"), 2.5)
    assert info.serial == serial_of(cert)
    assert endpoint.context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert (endpoint.files.cert, endpoint.handshake_timeout) == (cert, 2.5)
    with pytest.raises(TLSConfigError):
        endpoint.reload(files(kit, cert=kit.dir / "missing.pem"), 9.0)
    assert (endpoint.files.cert, endpoint.handshake_timeout) == (cert, 2.5)
