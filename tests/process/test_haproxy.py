"""A real HAProxy in front: the headers it sends, and echod serving through it.

HAProxy (see tests/haproxy.py) runs on loopback; clients connect to it from
127.0.0.2 (a bound client socket), so HAProxy's own address (127.0.0.1) and
the client's differ. The first tests feed what HAProxy sends a bare listener
to :class:`echod.proxy.ProxyParser`, checking the parser against the real
sender; the others run the real ``echod`` command behind it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from echod.proxy import NEED_DATA, Header, ProxyParser, Result
from tests.haproxy import TIMEOUT, HAProxy, available
from tests.helpers import ROOT, EchodProcess
from tests.tlskit import TLSClient, TLSKit

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


def ctl(path: Path, command: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "echod", "ctl", "--control-socket", str(path), command],
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def readline(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(("keyword", "version"), [("send-proxy", "v1"), ("send-proxy-v2", "v2")])
def test_echod_behind_haproxy(
    make_haproxy: MakeHAProxy,
    spawn_echod: Callable[..., EchodProcess],
    ctl_dir: Path,
    keyword: str,
    version: str,
) -> None:
    control = ctl_dir / "control.sock"
    echod = spawn_echod(
        "--control-socket",
        str(control),
        "--proxy-protocol",
        version,
        "--proxy-trusted",
        "127.0.0.1/32",
        "--max-per-source",
        "2",
    )
    proxy = make_haproxy(echod.port, keyword)
    first = proxy.connect("127.0.0.2")
    port = first.getsockname()[1]
    # Byte-exact through HAProxy: a CRLF line, bytes that are not UTF-8,
    # and a line that looks like a PROXY header of its own.
    payload = (
        b"hello\r\n\x00\xff\xfe binary\nPROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + b"z" * 1000 + b"\n"
    )
    first.sendall(payload)
    echoed = b""
    while len(echoed) < len(payload):
        chunk = first.recv(65536)
        assert chunk, echoed
        echoed += chunk
    assert echoed == payload

    listed = ctl(control, "list")
    match = re.search(r"addr=(\S+) via=(\S+)", listed)
    assert match, listed
    assert match.group(1) == f"127.0.0.2:{port}"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", match.group(2)), listed

    # Per source: 127.0.0.2 is counted, not HAProxy.
    second = proxy.connect("127.0.0.2")
    second.sendall(b"two\n")
    assert readline(second) == b"two\n"
    third = proxy.connect("127.0.0.2")
    assert read_all(third) == b"ERR too many connections from your address (max 2)\n"
    other = proxy.connect("127.0.0.3")
    other.sendall(b"three\n")
    assert readline(other) == b"three\n"
    refused = echod.wait_event("client_refused")
    assert refused["reason"] == "per_source"
    assert refused["peer"].startswith("127.0.0.2:")

    first.close()
    closed = echod.wait_event("connection_closed", where=lambda e: e["peer"] == f"127.0.0.2:{port}")
    assert closed["via"].startswith("127.0.0.1:")
    for sock in (second, third, other):
        sock.close()


def test_tls_behind_haproxy_send_proxy_v2(
    make_haproxy: MakeHAProxy,
    spawn_echod: Callable[..., EchodProcess],
    ctl_dir: Path,
    tmp_path: Path,
) -> None:
    """HAProxy passes TLS through in TCP mode: its PROXY v2 header comes before the ClientHello."""
    kit = TLSKit(tmp_path)
    control = ctl_dir / "control.sock"
    echod = spawn_echod(
        "--control-socket",
        str(control),
        "--proxy-protocol",
        "v2",
        "--proxy-trusted",
        "127.0.0.1/32",
        "--tls-cert",
        str(kit.cert),
        "--tls-key",
        str(kit.key),
    )
    proxy = make_haproxy(echod.port, "send-proxy-v2")
    raw = proxy.connect("127.0.0.2")
    port = raw.getsockname()[1]
    client = TLSClient(0, context=kit.client_context(), sock=raw)
    assert client.roundtrip(b"through haproxy, encrypted\n") == b"through haproxy, encrypted\n"
    listed = ctl(control, "list")
    assert f"addr=127.0.0.2:{port} via=127.0.0.1:" in listed, listed
    assert "tls=TLSv1.3" in listed, listed
    client.close()
