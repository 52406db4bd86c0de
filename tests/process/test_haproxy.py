"""A real HAProxy sends echod's parser the headers it must understand.

These tests put HAProxy (see tests/haproxy.py) in front of a bare listener
and feed what arrives to :class:`echod.proxy.ProxyParser`, so the parser is
checked against the real sender and not only against the spec's examples.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from echod.proxy import NEED_DATA, Header, ProxyParser, Result
from tests.haproxy import TIMEOUT, HAProxy, available

pytestmark = pytest.mark.skipif(not available(), reason="haproxy is not installed")

MakeHAProxy = Callable[..., HAProxy]


@pytest.fixture
def make_haproxy(tmp_path: Path) -> Iterator[MakeHAProxy]:
    started: list[HAProxy] = []

    def make(backend_port: int, send_proxy: str, check: bool = False) -> HAProxy:
        proxy = HAProxy(tmp_path / f"haproxy{len(started)}", backend_port, send_proxy, check=check)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def read_header(conn: socket.socket, versions: str = "any") -> Result:
    parser = ProxyParser(versions)
    result: Result = NEED_DATA
    while result is NEED_DATA:
        data = conn.recv(4096)
        assert data, "the proxy closed before a whole header"
        result = parser.feed(data)
    return result


@pytest.mark.parametrize(("keyword", "version"), [("send-proxy", 1), ("send-proxy-v2", 2)])
def test_haproxy_header_names_the_real_client(
    make_haproxy: MakeHAProxy, keyword: str, version: int
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as backend:
        backend.settimeout(TIMEOUT)
        proxy = make_haproxy(backend.getsockname()[1], keyword)
        client = proxy.connect("127.0.0.2")
        client.sendall(b"hello\r\n")
        conn, peer = backend.accept()
        with conn, client:
            conn.settimeout(TIMEOUT)
            header = read_header(conn)
            assert isinstance(header, Header), header
            assert header.version == version
            assert header.source == ("127.0.0.2", client.getsockname()[1])
            assert header.destination == ("127.0.0.1", proxy.port)
            rest = header.rest
            while len(rest) < 7:
                rest += conn.recv(4096)
            assert rest == b"hello\r\n"
            assert peer[0] == "127.0.0.1"  # what echod sees without the header


def test_haproxy_v2_health_checks_are_local(make_haproxy: MakeHAProxy) -> None:
    with socket.create_server(("127.0.0.1", 0)) as backend:
        backend.settimeout(TIMEOUT)
        make_haproxy(backend.getsockname()[1], "send-proxy-v2", check=True)
        conn, _ = backend.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            header = read_header(conn, "v2")
            assert header == Header(2, None, None, b"")
