"""Chat mode (--chat): each client line is echoed and relayed to every other client.

Real in-process servers and real TCP clients. A relayed line reads
``client <id>: <line>``, where id is the sender's registry id (as /list shows).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from echod.commands import Commands
from echod.connection import Connection
from tests.helpers import Client, RunningServer, wait_for

pytestmark = pytest.mark.timeout(60)


def client_id(server: RunningServer, client: Client) -> int:
    peer = f"127.0.0.1:{client.sock.getsockname()[1]}"
    conn: Connection = wait_for(
        lambda: next((c for c in server.registry.snapshot() if c.peer == peer), None),
        what=f"client {peer} registered",
    )
    return conn.id


def test_chat_relays_a_lone_cr_inside_its_line(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    server = make_server(chat=True)
    a, b = connect(server.port), connect(server.port)
    ida = client_id(server, a)
    client_id(server, b)
    assert a.roundtrip(b"one\rtwo\n") == b"one\rtwo\n"
    assert b.readline() == b"client %d: one\rtwo\n" % ida  # one line, not two


def test_chat_relays_between_three_clients(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    server = make_server(chat=True)
    a, b, c = (connect(server.port) for _ in range(3))
    ids = {name: client_id(server, cl) for name, cl in zip("abc", (a, b, c), strict=True)}

    assert a.roundtrip(b"hello from a\n") == b"hello from a\n"  # the sender's own echo
    assert b.readline() == b"client %d: hello from a\n" % ids["a"]
    assert c.readline() == b"client %d: hello from a\n" % ids["a"]

    assert c.roundtrip(b"and from c\r\n") == b"and from c\r\n"
    assert a.readline() == b"client %d: and from c\r\n" % ids["c"]
    assert b.readline() == b"client %d: and from c\r\n" % ids["c"]

    # Several lines in one burst: each is relayed as its own prefixed line.
    b.send(b"one\ntwo\n")
    assert b.readline() == b"one\n" and b.readline() == b"two\n"
    for other in (a, c):
        assert other.readline() == b"client %d: one\n" % ids["b"]
        assert other.readline() == b"client %d: two\n" % ids["b"]

    # Nothing goes back to a sender: a's next line is the echo of its next request.
    assert a.roundtrip(b"ping\n") == b"ping\n"
    assert b.readline() == b"client %d: ping\n" % ids["a"]


def test_chat_is_off_by_default(server: RunningServer, connect: Callable[..., Client]) -> None:
    a, b = connect(server.port), connect(server.port)
    client_id(server, a)
    client_id(server, b)
    assert a.roundtrip(b"private\n") == b"private\n"
    # A handler answers in order: once a's second echo arrived, any relay of its
    # first line would already be queued for b, ahead of b's own echo.
    assert a.roundtrip(b"again\n") == b"again\n"
    assert b.roundtrip(b"mine\n") == b"mine\n"


def test_chat_relay_and_operator_pushes_mix_as_whole_lines(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    server = make_server(chat=True)
    a, b = connect(server.port), connect(server.port)
    a_id = client_id(server, a)
    client_id(server, b)
    commands = Commands(server.registry, lambda: server.settings, lambda: None)
    n = 200
    for i in range(n):
        a.send(b"chat-%03d\n" % i)
        if i % 10 == 0:
            assert commands.execute(f"/broadcast notice-{i:03d}") == "OK sent to 2 clients"
    expected_relays = [b"client %d: chat-%03d\n" % (a_id, i) for i in range(n)]
    expected_notices = [b"Server says: notice-%03d\n" % i for i in range(0, n, 10)]
    got = [b.readline() for _ in range(n + len(expected_notices))]
    assert [x for x in got if x.startswith(b"client ")] == expected_relays
    assert [x for x in got if x.startswith(b"Server says: ")] == expected_notices
