"""Admission control on a real server: PROXY headers, allow/deny, per-source limits, rates.

Clients bind their sockets to 127.0.0.2, 127.0.0.3, ... (all of 127/8 is
loopback) to be different sources. PROXY headers are written by hand here;
tests/process/test_haproxy.py has a real HAProxy send them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from echod.admission import Rate, normalize, parse_entry
from echod.commands import Commands
from tests.helpers import (
    TIMEOUT,
    CapturedLogs,
    Client,
    RunningServer,
    flood_until_stalled,
    wait_for,
)

MakeServer = Callable[..., RunningServer]
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def clients() -> Any:
    made: list[Client] = []

    def make(port: int, source: str = "127.0.0.2") -> Client:
        client = Client(port, source=source)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def served(client: Client) -> bool:
    return client.roundtrip(b"ping\n") == b"ping\n"


def refused_with(client: Client) -> bytes:
    """What a refused client gets: its line, then EOF."""
    return client.read_all()


def nets(*texts: str) -> tuple[Any, ...]:
    return tuple(parse_entry(t) for t in texts)


def v1(source: str, sport: int, dest: str = "127.0.0.1", dport: int = 7878) -> bytes:
    family, dest = ("TCP6", "::1") if ":" in source else ("TCP4", dest)
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(source: str, sport: int, dest: str = "127.0.0.1", dport: int = 7878) -> bytes:
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("::1" if src.version == 6 else dest)
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


# -- per-source limits ---------------------------------------------------------------------


def test_per_source_limit(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(max_per_source=2)
    a, b = clients(srv.port), clients(srv.port)
    assert served(a) and served(b)
    third = clients(srv.port)
    assert refused_with(third) == b"ERR too many connections from your address (max 2)\n"
    assert served(clients(srv.port, "127.0.0.3"))  # another source
    a.close()
    wait_for(lambda: srv.server.admission.connections(normalize("127.0.0.2")) == 1)
    assert served(clients(srv.port))  # the freed slot
    assert srv.server.admission.refused["per_source"] == 1


def _end_by_exit(srv: RunningServer, c: Client) -> None:
    assert c.roundtrip(b"exit\n") == b"bye\n"


def _end_by_eof(srv: RunningServer, c: Client) -> None:
    c.half_close()


def _end_by_reset(srv: RunningServer, c: Client) -> None:
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST


def _end_by_idle(srv: RunningServer, c: Client) -> None:
    assert c.readline() == b"ERR idle timeout\n"


def _end_by_line_timeout(srv: RunningServer, c: Client) -> None:
    c.send(b"unfinished")
    assert c.readline() == b"ERR line timeout\n"


def _end_by_line_too_long(srv: RunningServer, c: Client) -> None:
    c.send(b"x" * 100 + b"\n")
    assert c.readline() == b"ERR line too long (max 64 bytes)\n"


def _end_by_kick(srv: RunningServer, c: Client) -> None:
    conn = srv.registry.snapshot()[0]  # the first client; the refused one may linger
    assert conn.end(b"Server says: bye\n", "kicked")


def _end_by_slow_reader(srv: RunningServer, c: Client) -> None:
    flood_until_stalled([c.sock], dropped_ok=True)  # never reading: --send-timeout drops it


ENDINGS: dict[str, Callable[[RunningServer, Client], None]] = {
    "exit": _end_by_exit,
    "eof": _end_by_eof,
    "reset": _end_by_reset,
    "idle_timeout": _end_by_idle,
    "line_timeout": _end_by_line_timeout,
    "line_too_long": _end_by_line_too_long,
    "kicked": _end_by_kick,
    "slow_reader": _end_by_slow_reader,
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_every_way_a_connection_ends_frees_its_slot(
    make_server: MakeServer, clients: Any, captured_logs: CapturedLogs, ending: str
) -> None:
    srv = make_server(
        max_per_source=1,
        max_line=64 if ending == "line_too_long" else 1024,
        idle_timeout=0.3 if ending == "idle_timeout" else 300,
        line_timeout=0.3 if ending == "line_timeout" else 60,
        send_timeout=0.3 if ending == "slow_reader" else 10,
    )
    first = clients(srv.port)
    try:
        assert served(first)
        assert refused_with(clients(srv.port)).startswith(b"ERR too many connections")
        ENDINGS[ending](srv, first)
        closed = wait_for(lambda: captured_logs.named("connection_closed"))
        assert closed[0]["reason"] == ending
        wait_for(lambda: srv.server.admission.connections(normalize("127.0.0.2")) == 0)
        assert served(clients(srv.port))
    finally:
        first.close()


def test_shutdown_frees_the_slots(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(max_per_source=3)
    for _ in range(3):
        assert served(clients(srv.port))
    assert srv.server.admission.connections(normalize("127.0.0.2")) == 3
    assert srv.stop()
    assert srv.server.admission.connections(normalize("127.0.0.2")) == 0
    assert srv.server.admission.groups() == 0


def test_a_failed_proxy_header_holds_no_slot(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(proxy_protocol="v1", proxy_trusted=nets("127.0.0.0/8"), max_per_source=1)
    bad = clients(srv.port)
    bad.send(b"GET / HTTP/1.0\r\n\r\n")
    assert bad.read_all() == b""
    assert srv.server.admission.groups() == 0
    good = clients(srv.port)
    good.send(v1("192.0.2.7", 1234) + b"ping\n")
    assert good.readline() == b"ping\n"


# -- allow and deny ------------------------------------------------------------------------


def test_allow_and_deny(make_server: MakeServer, clients: Any, captured_logs: CapturedLogs) -> None:
    srv = make_server(allow=nets("127.0.0.0/8"), deny=nets("127.0.0.0/30"))  # .0-.3 denied
    assert refused_with(clients(srv.port, "127.0.0.2")) == b"ERR access denied\n"
    assert served(clients(srv.port, "127.0.0.4"))
    event = wait_for(lambda: captured_logs.named("client_refused"))[0]
    assert event["reason"] == "access_denied"
    assert event["peer"].startswith("127.0.0.2:")
    assert srv.server.admission.refused["access_denied"] == 1
    assert not captured_logs.named("connection_closed") or all(
        not e["peer"].startswith("127.0.0.2:") for e in captured_logs.named("connection_closed")
    )


def test_an_ipv4_mapped_client_is_its_ipv4_address(
    make_server: MakeServer, captured_logs: CapturedLogs
) -> None:
    # A dual-stack listener: IPv4 clients arrive as ::ffff:a.b.c.d.
    srv = make_server(host="::ffff:127.0.0.1", allow=nets("127.0.0.2"), max_per_source=1)
    ok = Client(srv.port, source="127.0.0.2")
    try:
        assert served(ok)
        (conn,) = srv.registry.snapshot()
        assert conn.peer == f"127.0.0.2:{ok.port}"
        assert srv.server.admission.connections(normalize("127.0.0.2")) == 1
        other = Client(srv.port, source="127.0.0.3")
        assert refused_with(other) == b"ERR access denied\n"
        other.close()
    finally:
        ok.close()
    closed = wait_for(lambda: captured_logs.named("connection_closed"))
    assert closed[0]["peer"] == f"127.0.0.2:{ok.port}"


# -- rates ----------------------------------------------------------------------------------


def test_connect_rate(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(max_connect_rate=Rate(3, 3600))  # a burst of 3, then one an hour
    for _ in range(3):
        assert served(clients(srv.port))
    assert refused_with(clients(srv.port)) == b"ERR connecting too fast, try again later\n"
    assert served(clients(srv.port, "127.0.0.3"))  # its own bucket


def test_line_rate_slows_but_loses_nothing(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(max_line_rate=50)
    c = clients(srv.port)
    burst = b"".join(b"line %03d\n" % i for i in range(200))
    c.send(burst)  # one packet's worth: 200 lines at 50 a second, ~3 s
    assert c.read_exactly(len(burst)) == burst
    assert c.roundtrip(b"after\n") == b"after\n"


def test_line_rate_paced_client_is_still_kickable(
    make_server: MakeServer, clients: Any, captured_logs: CapturedLogs
) -> None:
    srv = make_server(max_line_rate=1)
    c = clients(srv.port)
    c.send(b"a\nb\nc\nd\n")  # d is due 3 s from now
    assert c.readline() == b"a\n"
    (conn,) = srv.registry.snapshot()
    conn.end(b"Server says: bye\n", "kicked")
    # The kick ends the wait: the handler does not serve out the budget first.
    rest = c.read_all()
    assert b"d\n" not in rest
    assert rest.endswith(b"Server says: bye\n")
    closed = wait_for(lambda: captured_logs.named("connection_closed"))[0]
    assert closed["reason"] == "kicked"
    assert closed["lines_out"] < 4


def test_line_rate_with_chat_relays_every_line(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(max_line_rate=100, chat=True)
    sender, listener = clients(srv.port), clients(srv.port, "127.0.0.3")
    wait_for(lambda: len(srv.registry) == 2)
    burst = b"".join(b"m%d\n" % i for i in range(150))
    sender.send(burst)
    assert sender.read_exactly(len(burst)) == burst
    (conn,) = [c for c in srv.registry.snapshot() if c.peer.startswith("127.0.0.2")]
    relayed = b"".join(b"client %d: m%d\n" % (conn.id, i) for i in range(150))
    assert listener.read_exactly(len(relayed)) == relayed


# -- the PROXY header -----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_names_the_client(
    make_server: MakeServer, clients: Any, captured_logs: CapturedLogs, version: str
) -> None:
    srv = make_server(proxy_protocol=version, proxy_trusted=nets("127.0.0.0/8"))
    c = clients(srv.port)
    header = (v1 if version == "v1" else v2)("203.0.113.9", 4711)
    # Client bytes in the same packet, one of them looking like another header.
    c.send(header + b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\nhello\n")
    assert c.readline() == b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n"
    assert c.readline() == b"hello\n"
    (conn,) = srv.registry.snapshot()
    assert conn.peer == "203.0.113.9:4711"
    assert conn.via == f"127.0.0.2:{c.port}"
    c.close()
    closed = wait_for(lambda: captured_logs.named("connection_closed"))[0]
    assert (closed["peer"], closed["via"]) == ("203.0.113.9:4711", f"127.0.0.2:{c.port}")


def test_proxy_header_split_across_reads(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(proxy_protocol="any", proxy_trusted=nets("127.0.0.2"))
    c = clients(srv.port)
    header = v2("2001:db8::7", 1)
    for i in range(0, len(header), 7):
        c.send(header[i : i + 7])
        time.sleep(0.01)  # separate segments, so the server reads them apart
    assert c.roundtrip(b"hi\n") == b"hi\n"
    (conn,) = srv.registry.snapshot()
    assert conn.peer == "[2001:db8::7]:1"


def test_proxy_header_source_meets_the_lists_and_limits(
    make_server: MakeServer, clients: Any
) -> None:
    srv = make_server(
        proxy_protocol="v1",
        proxy_trusted=nets("127.0.0.2"),
        deny=nets("198.51.100.0/24"),
        max_per_source=1,
    )
    denied = clients(srv.port)
    denied.send(v1("198.51.100.1", 1))
    assert denied.read_all() == b"ERR access denied\n"
    first = clients(srv.port)
    first.send(v1("192.0.2.1", 1) + b"x\n")
    assert first.readline() == b"x\n"
    second = clients(srv.port)  # the same balancer, another client: served
    second.send(v1("192.0.2.2", 1) + b"y\n")
    assert second.readline() == b"y\n"
    again = clients(srv.port)  # 192.0.2.1 once more: over its limit
    again.send(v1("192.0.2.1", 2))
    assert again.read_all() == b"ERR too many connections from your address (max 1)\n"


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", SIG + b"\x20\x00\x00\x00"],
    ids=["v1 UNKNOWN", "v2 LOCAL"],
)
def test_unknown_and_local_keep_the_peer(
    make_server: MakeServer, clients: Any, header: bytes
) -> None:
    srv = make_server(proxy_protocol="any", proxy_trusted=nets("127.0.0.2"))
    c = clients(srv.port)
    c.send(header + b"ok\n")
    assert c.readline() == b"ok\n"
    (conn,) = srv.registry.snapshot()
    assert (conn.peer, conn.via) == (f"127.0.0.2:{c.port}", None)


@pytest.mark.parametrize(
    ("name", "send", "detail"),
    [
        ("missing", b"", "timed out"),
        ("late", b"PROXY TCP4 1.2.3.4", "timed out"),
        ("malformed", b"GET / HTTP/1.0\r\n\r\n", "not a PROXY v1 header"),
        ("wrong version", SIG + b"\x20\x00\x00\x00", "not a PROXY v1 header"),
        ("eof", None, "closed before a whole header"),
    ],
)
def test_bad_headers_are_closed_without_a_reply(
    make_server: MakeServer,
    clients: Any,
    captured_logs: CapturedLogs,
    name: str,
    send: bytes | None,
    detail: str,
) -> None:
    srv = make_server(proxy_protocol="v1", proxy_trusted=nets("127.0.0.0/8"), proxy_timeout=0.3)
    c = clients(srv.port)
    if send is None:
        c.half_close()
    else:
        c.send(send)
    assert c.read_all() == b""
    event = wait_for(lambda: captured_logs.named("client_refused"))[0]
    assert (event["reason"], event["detail"]) == ("proxy_header", detail)
    assert srv.server.admission.refused["proxy_header"] == 1
    wait_for(lambda: len(srv.registry) == 0)
    assert srv.registry.stats().rejected == 1


def test_an_untrusted_peer_is_closed_without_a_reply(
    make_server: MakeServer, clients: Any, captured_logs: CapturedLogs
) -> None:
    srv = make_server(proxy_protocol="v2", proxy_trusted=nets("127.0.0.3"))
    c = clients(srv.port, "127.0.0.2")
    c.send(v2("192.0.2.1", 1) + b"hi\n")
    assert c.read_all() == b""
    event = wait_for(lambda: captured_logs.named("client_refused"))[0]
    assert event["reason"] == "proxy_untrusted"
    assert event["peer"].startswith("127.0.0.2:")


def test_a_client_kicked_while_its_header_is_awaited(
    make_server: MakeServer, clients: Any, captured_logs: CapturedLogs
) -> None:
    srv = make_server(proxy_protocol="v1", proxy_trusted=nets("127.0.0.2"), proxy_timeout=30)
    c = clients(srv.port)
    conn = wait_for(lambda: srv.registry.snapshot())[0]
    conn.end(None, "kicked")
    assert c.read_all() == b""
    closed = wait_for(lambda: captured_logs.named("connection_closed"))[0]
    assert closed["reason"] == "kicked"
    assert not captured_logs.named("client_refused")


# -- logging a flood ---------------------------------------------------------------------


def test_a_refusal_flood_is_summarized(
    make_server: MakeServer, captured_logs: CapturedLogs
) -> None:
    srv = make_server(deny=nets("127.0.0.2"))
    started = time.monotonic()
    total = 60
    for _ in range(total):
        c = Client(srv.port, source="127.0.0.2")
        assert c.read_all() == b"ERR access denied\n"
        c.close()
    elapsed = time.monotonic() - started

    def accounted() -> int:
        bursts = captured_logs.named("client_refused_burst")
        summarized: int = sum(b["count"] for b in bursts)
        return len(captured_logs.named("client_refused")) + summarized

    wait_for(lambda: accounted() == total, what="every refusal logged or summarized")
    logged = len(captured_logs.named("client_refused"))
    assert logged <= 20 * (int(elapsed) + 1)
    if elapsed < 1.0:
        assert captured_logs.named("client_refused_burst")[0]["reason"] == "access_denied"


def test_many_threads_many_sources(make_server: MakeServer) -> None:
    """Concurrent admits and releases from several sources leave every count at zero."""
    srv = make_server(max_per_source=5)
    errors: list[BaseException] = []

    def run(source: str) -> None:
        try:
            for _ in range(20):
                c = Client(srv.port, source=source)
                reply = c.roundtrip(b"x\n")
                assert reply in (b"x\n", b"ERR too many connections from your address (max 5)\n")
                c.close()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(f"127.0.0.{2 + i % 3}",)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not errors
    wait_for(lambda: srv.server.admission.groups() == 0)


# -- what the operator sees --------------------------------------------------------------


def operator(srv: RunningServer) -> Commands[Any]:
    return Commands(
        srv.registry, lambda: srv.settings, lambda: None, admission=srv.server.admission
    )


def test_list_shows_via_and_stats_count_refusals(make_server: MakeServer, clients: Any) -> None:
    srv = make_server(
        proxy_protocol="v1",
        proxy_trusted=nets("127.0.0.2"),
        deny=nets("198.51.100.0/24"),
        max_per_source=1,
        max_connect_rate=Rate(100, 1),
    )
    proxied = clients(srv.port)
    proxied.send(v1("192.0.2.1", 4242) + b"x\n")
    assert proxied.readline() == b"x\n"
    for source in ("198.51.100.1", "192.0.2.1"):  # denied, then over the per-source limit
        c = clients(srv.port)
        c.send(v1(source, 1))
        assert c.read_all().startswith(b"ERR ")
    untrusted = clients(srv.port, "127.0.0.3")
    assert untrusted.read_all() == b""
    garbled = clients(srv.port)
    garbled.send(b"hello\n")
    assert garbled.read_all() == b""
    wait_for(lambda: len(srv.registry) == 1)

    listed = operator(srv).execute("/list").split("\n")
    assert listed[0] == "OK 1 client"
    assert listed[1].startswith(f"id=1 addr=192.0.2.1:4242 via=127.0.0.2:{proxied.port} age=")
    answer = operator(srv).execute("/stats").split("\n")
    stats = dict(line.split("=", 1) for line in answer[1:])
    assert {k: v for k, v in stats.items() if k.startswith("refused_")} == {
        "refused_access_denied": "1",
        "refused_per_source": "1",
        "refused_connect_rate": "0",
        "refused_proxy_untrusted": "1",
        "refused_proxy_header": "1",
    }
    assert stats["rejected"] == "4"
    assert stats["source_groups"] == "1"  # 192.0.2.1; the denied source took no entry


def test_list_rows_without_a_header_have_no_via(make_server: MakeServer, clients: Any) -> None:
    srv = make_server()
    c = clients(srv.port)
    assert served(c)
    (row,) = operator(srv).execute("/list").split("\n")[1:]
    assert row.startswith(f"id=1 addr=127.0.0.2:{c.port} age=")
    assert "via=" not in row
