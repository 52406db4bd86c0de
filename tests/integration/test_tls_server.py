"""TLS over real loopback sockets, against an in-process EchoServer.

The whole echo suite also runs over TLS (tests/integration/test_echo.py's
``transport`` parameter); this file has what only TLS has: client
certificates, handshakes that stall or are not TLS at all, rotation, and
the TLS fields of /stats and /list. Certificates come from trustme
(tests/tlskit.py).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from echod.commands import Commands
from tests.helpers import TIMEOUT, CapturedLogs, Client, RunningServer, wait_for
from tests.tlskit import TLSClient, TLSKit, serial_of

MakeServer = Callable[..., RunningServer]


@pytest.fixture
def kit(tmp_path: Path) -> TLSKit:
    return TLSKit(tmp_path)


def tls_server(make_server: MakeServer, kit: TLSKit, **overrides: Any) -> RunningServer:
    return make_server(tls_cert=kit.cert, tls_key=kit.key, **overrides)


def refused(captured_logs: CapturedLogs, count: int = 1) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = wait_for(
        lambda: (e := captured_logs.named("client_refused")) and len(e) >= count and e,
        what=f"{count} client_refused events",
    )
    return events


def test_echo_and_version(make_server: MakeServer, kit: TLSKit) -> None:
    srv = tls_server(make_server, kit)
    client = TLSClient(srv.port, context=kit.client_context())
    assert client.roundtrip(b"hello\n") == b"hello\n"
    assert client.obj.version() == "TLSv1.3"
    assert client.peer_serial() == serial_of(kit.cert)
    client.close()


def test_min_version_1_3_refuses_1_2(
    make_server: MakeServer, kit: TLSKit, captured_logs: CapturedLogs
) -> None:
    srv = tls_server(make_server, kit, tls_min_version="1.3")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TLSClient(srv.port, context=kit.client_context(max_version=ssl.TLSVersion.TLSv1_2))
    (event,) = refused(captured_logs)
    assert event["reason"] == "tls_handshake"
    assert event["error"] == "UNSUPPORTED_PROTOCOL"


def test_tls_1_2_works_by_default(make_server: MakeServer, kit: TLSKit) -> None:
    srv = tls_server(make_server, kit)
    client = TLSClient(srv.port, context=kit.client_context(max_version=ssl.TLSVersion.TLSv1_2))
    assert client.roundtrip(b"twelve\n") == b"twelve\n"
    assert client.obj.version() == "TLSv1.2"
    client.close()


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare_fin"])
def test_end_of_input_echoes_the_partial_line(
    make_server: MakeServer, kit: TLSKit, close_notify: bool
) -> None:
    srv = tls_server(make_server, kit)
    client = TLSClient(srv.port, context=kit.client_context())
    client.send(b"abc\ndef")
    client.half_close(close_notify=close_notify)
    assert client.read_all() == b"abc\ndef"
    client.close()


# -- client certificates ----------------------------------------------------------------


def _served(client_call: Callable[[], TLSClient]) -> bool:
    """Whether a client gets an echo; a refusal shows in the handshake or the first read."""
    try:
        client = client_call()
        try:
            return client.roundtrip(b"let me in\n") == b"let me in\n"
        finally:
            client.close()
    except (ssl.SSLError, ConnectionError):
        return False


def test_client_certificates(
    make_server: MakeServer, kit: TLSKit, captured_logs: CapturedLogs
) -> None:
    srv = tls_server(make_server, kit, tls_client_ca=kit.ca_file)
    port = srv.port
    assert not _served(lambda: TLSClient(port, context=kit.client_context()))
    stranger = kit.issue("mallory", ca=trustme.CA(), common_name="mallory")
    assert not _served(lambda: TLSClient(port, context=kit.client_context(stranger)))
    errors = [e["error"] for e in refused(captured_logs, 2)]
    assert errors == ["PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"]
    assert srv.registry.stats().tls_handshake_failures == 2

    alice = kit.issue("alice", common_name="alice")
    client = TLSClient(port, context=kit.client_context(alice))
    assert client.roundtrip(b"alice here\n") == b"alice here\n"
    commands = Commands(srv.registry, lambda: srv.settings, lambda: None)
    head, row = commands.execute("/list").splitlines()
    assert head == "OK 1 client"
    assert row.endswith(" tls=TLSv1.3 cn=alice")
    stats = commands.execute("/stats").splitlines()
    assert "tls=on" in stats
    assert "tls_handshake_failures=2" in stats
    client.close()


def test_list_without_client_certificates_and_stats_without_tls(
    make_server: MakeServer, kit: TLSKit
) -> None:
    srv = tls_server(make_server, kit)
    client = TLSClient(srv.port, context=kit.client_context(max_version=ssl.TLSVersion.TLSv1_2))
    assert client.roundtrip(b"hi\n") == b"hi\n"
    _, row = (
        Commands(srv.registry, lambda: srv.settings, lambda: None).execute("/list").splitlines()
    )
    assert row.endswith(" tls=TLSv1.2") and "cn=" not in row
    client.close()
    plain = make_server()
    stats = (
        Commands(plain.registry, lambda: plain.settings, lambda: None)
        .execute("/stats")
        .splitlines()
    )
    assert "tls=off" in stats and "tls_handshake_failures=0" in stats


# -- handshakes that do not happen -----------------------------------------------------


def test_stalled_handshake_does_not_delay_others(
    make_server: MakeServer, kit: TLSKit, captured_logs: CapturedLogs
) -> None:
    srv = tls_server(make_server, kit, tls_handshake_timeout=60.0)
    stalled = Client(srv.port)  # connects, never sends a byte
    wait_for(lambda: len(srv.registry) == 1, what="the stalled client registered")
    other = TLSClient(srv.port, context=kit.client_context())
    assert other.roundtrip(b"not delayed\n") == b"not delayed\n"
    # The stalled client is still waiting: it was not cut short to serve the other.
    stalled.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        stalled.sock.recv(1)
    assert len(srv.registry) == 2
    other.close()
    stalled.close()


def test_silent_client_is_cut_at_the_handshake_timeout(
    make_server: MakeServer, kit: TLSKit, captured_logs: CapturedLogs
) -> None:
    srv = tls_server(make_server, kit, tls_handshake_timeout=0.3)
    silent = Client(srv.port)
    start = time.monotonic()
    assert silent.read_all() == b""
    assert time.monotonic() - start >= 0.3
    (event,) = refused(captured_logs)
    assert (event["reason"], event["error"]) == ("tls_handshake", "timeout")
    wait_for(lambda: len(srv.registry) == 0, what="the client gone")


def test_trickled_client_hello_is_cut_at_the_handshake_timeout(
    make_server: MakeServer, kit: TLSKit, captured_logs: CapturedLogs
) -> None:
    srv = tls_server(make_server, kit, tls_handshake_timeout=0.5)
    hello = kit.client_hello()
    client = Client(srv.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = 0
    deadline = time.monotonic() + TIMEOUT
    try:
        # One byte per 20 ms would take seconds; the server must cut it at 0.5 s.
        while sent < len(hello) and time.monotonic() < deadline:
            client.send(hello[sent : sent + 1])
            sent += 1
            time.sleep(0.02)
    except OSError:
        pass  # closed by the server: what we wait for
    assert sent < len(hello)
    (event,) = refused(captured_logs)
    assert event["error"] == "timeout"


def test_plain_text_client_is_closed_and_not_echoed(
    make_server: MakeServer, kit: TLSKit, captured_logs: CapturedLogs
) -> None:
    srv = tls_server(make_server, kit)
    client = Client(srv.port)
    client.send(b"hello in clear\n")
    start = time.monotonic()
    answer = client.read_all()
    assert time.monotonic() - start < srv.settings.tls_handshake_timeout
    assert b"hello" not in answer
    assert answer == b"" or answer[:1] == b"\x15"  # nothing, or one TLS alert
    (event,) = refused(captured_logs)
    assert event["error"] == "WRONG_VERSION_NUMBER"
    # And the server goes on.
    other = TLSClient(srv.port, context=kit.client_context())
    assert other.roundtrip(b"fine\n") == b"fine\n"
    other.close()


def test_handshaking_clients_count_towards_max_clients(
    make_server: MakeServer, kit: TLSKit
) -> None:
    srv = tls_server(make_server, kit, max_clients=1, tls_handshake_timeout=60.0)
    stalled = Client(srv.port)
    wait_for(lambda: len(srv.registry) == 1, what="the stalled client registered")
    extra = Client(srv.port)
    assert extra.read_all() == b"ERR server full (max 1 clients)\n"
    stalled.close()
    extra.close()


def test_shutdown_during_the_handshake(make_server: MakeServer, kit: TLSKit) -> None:
    srv = tls_server(make_server, kit, tls_handshake_timeout=60.0)
    stalled = Client(srv.port)
    wait_for(lambda: len(srv.registry) == 1, what="the stalled client registered")
    assert srv.stop(5.0) is True
    assert stalled.read_all() == b""  # no plaintext notice into a TLS port
    stalled.close()


# -- rotation ------------------------------------------------------------------------


def test_reload_new_connections_get_the_new_certificate(
    make_server: MakeServer, kit: TLSKit
) -> None:
    srv = tls_server(make_server, kit)
    old = TLSClient(srv.port, context=kit.client_context())
    assert old.roundtrip(b"before\n") == b"before\n"
    first = old.peer_serial()
    cert, key = kit.issue("localhost", "127.0.0.1")
    kit.cert.write_bytes(cert.read_bytes())
    kit.key.write_bytes(key.read_bytes())
    assert srv.server.tls is not None
    srv.server.tls.reload()
    new = TLSClient(srv.port, context=kit.client_context())
    assert new.peer_serial() == serial_of(cert) != first
    assert old.roundtrip(b"still here\n") == b"still here\n"
    assert new.roundtrip(b"new\n") == b"new\n"
    old.close()
    new.close()


def test_chat_relay_and_operator_push_are_encrypted(make_server: MakeServer, kit: TLSKit) -> None:
    """Lines written by other threads (relays, operator messages) go through the client's TLS."""
    srv = tls_server(make_server, kit, chat=True)
    alice = TLSClient(srv.port, context=kit.client_context())
    bob = TLSClient(srv.port, context=kit.client_context())
    assert alice.roundtrip(b"hi bob\n") == b"hi bob\n"
    wait_for(lambda: len(srv.registry) == 2, what="both registered")
    assert bob.readline() == b"client 1: hi bob\n"
    commands = Commands(srv.registry, lambda: srv.settings, lambda: None)
    assert commands.execute("/broadcast maintenance") == "OK sent to 2 clients"
    assert alice.readline() == bob.readline() == b"Server says: maintenance\n"
    alice.close()
    bob.close()


def test_a_push_during_the_handshake_arrives_after_it(make_server: MakeServer, kit: TLSKit) -> None:
    srv = tls_server(make_server, kit, tls_handshake_timeout=60.0)
    client = TLSClient(srv.port, context=kit.client_context(), handshake=False)
    wait_for(lambda: len(srv.registry) == 1, what="the client registered")
    commands = Commands(srv.registry, lambda: srv.settings, lambda: None)
    assert commands.execute("/broadcast early bird") == "OK sent to 1 client"
    client.handshake()
    assert client.readline() == b"Server says: early bird\n"
    assert client.roundtrip(b"then echo\n") == b"then echo\n"
    client.close()
