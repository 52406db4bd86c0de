"""Unit tests for echod.systemd: sd_notify(3) and sd_listen_fds(3) clients.

notify() is tested in-process against datagram sockets owned by the test.
listen_sockets() is tested in a child process, because it adopts fd 3 and
beyond, which pytest itself may be using: a tiny wrapper moves a listening
socket to fd 3, sets LISTEN_PID to its own pid and execs the checking code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import systemd
from tests.helpers import ACTIVATE_WRAPPER

REPO_ROOT = Path(__file__).resolve().parents[2]
RECV_TIMEOUT = 5.0
CHILD_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------- notify


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "n.sock")
    assert len(path) < 100, "AF_UNIX path too long for sun_path"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"echod-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECV_TIMEOUT)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def _assert_nothing_queued(sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_notify_unset_returns_false(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    assert "NOTIFY_SOCKET" not in os.environ


def test_notify_empty_returns_false(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("relative.sock", False), ("/run/x", True), ("@abc", True)],
)
def test_notifying(clean_env: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is not None:
        clean_env.setenv("NOTIFY_SOCKET", value)
    assert systemd.notifying() is expected


def test_notify_path_socket(
    clean_env: pytest.MonkeyPatch, path_receiver: tuple[socket.socket, str]
) -> None:
    sock, path = path_receiver
    clean_env.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"
    assert systemd.notify("STATUS=3 clients") is True
    assert sock.recv(4096) == b"STATUS=3 clients"
    _assert_nothing_queued(sock)
    # The variable stays so that later notifications still work.
    assert os.environ["NOTIFY_SOCKET"] == path


def test_notify_abstract_socket(
    clean_env: pytest.MonkeyPatch, abstract_receiver: tuple[socket.socket, str]
) -> None:
    sock, address = abstract_receiver
    clean_env.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"
    _assert_nothing_queued(sock)


def test_notify_multiline_and_utf8(
    clean_env: pytest.MonkeyPatch, path_receiver: tuple[socket.socket, str]
) -> None:
    sock, path = path_receiver
    clean_env.setenv("NOTIFY_SOCKET", path)
    message = "READY=1\nSTATUS=prêt"
    assert systemd.notify(message) is True
    assert sock.recv(4096) == message.encode("utf-8")


@pytest.mark.parametrize(
    "value",
    [
        "relative/path.sock",  # sd_notify(3) only accepts absolute or abstract
        "/nonexistent-dir-echod/n.sock",  # ENOENT
        "@echod-test-nobody-listens-here-" + uuid.uuid4().hex,  # ECONNREFUSED
        "/" + "x" * 200,  # too long for sun_path
        "vsock:2:1234",  # unsupported transport
    ],
)
def test_notify_send_errors_return_false(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_notify_to_stream_socket_returns_false(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(path)
        stream.listen()
        clean_env.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1") is False  # EPROTOTYPE


def test_notify_is_thread_safe(
    clean_env: pytest.MonkeyPatch, path_receiver: tuple[socket.socket, str]
) -> None:
    sock, path = path_receiver
    clean_env.setenv("NOTIFY_SOCKET", path)
    threads_n, per_thread = 8, 10
    results: list[bool] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(per_thread):
            ok = systemd.notify(f"STATUS={n}-{i}")
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    received = {sock.recv(4096) for _ in range(threads_n * per_thread)}
    for t in threads:
        t.join(timeout=RECV_TIMEOUT)
        assert not t.is_alive()
    assert results == [True] * (threads_n * per_thread)
    assert received == {
        f"STATUS={n}-{i}".encode() for n in range(threads_n) for i in range(per_thread)
    }


# ------------------------------------------------------------- listen_sockets

# Runs in the child after the wrapper: reports what listen_sockets() returned,
# the environment afterwards, and whether an adopted socket really works.
_CHECK_CODE = r"""
import json, os, socket, sys
from echod import systemd
socks = systemd.listen_sockets()
out = {
    "socks": [
        {
            "fd": s.fileno(),
            "family": int(s.family),
            "type": int(s.type),
            "inheritable": s.get_inheritable(),
            "blocking": s.getblocking(),
            "port": s.getsockname()[1] if s.family == socket.AF_INET else None,
        }
        for s in socks
    ],
    "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
}
if socks and socks[0].family == socket.AF_INET:
    # A blocking accept() must work on the adopted socket.
    socks[0].settimeout(10)
    client = socket.create_connection(socks[0].getsockname(), timeout=10)
    conn, _ = socks[0].accept()
    client.sendall(b"ping\n")
    out["accepted"] = conn.recv(16).decode()
    conn.close()
    client.close()
print(json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return env


def _run_activated(fds: list[int], listen_pid: str = "self") -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            ACTIVATE_WRAPPER,
            ",".join(map(str, fds)),
            listen_pid,
            sys.executable,
            "-c",
            _CHECK_CODE,
        ],
        pass_fds=fds,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert isinstance(result, dict)
    return result


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    # systemd passes listening sockets in non-blocking mode.
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


CLEARED = {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_sockets_adopts_fd3(tcp_listener: socket.socket) -> None:
    result = _run_activated([tcp_listener.fileno()])
    assert result["socks"] == [
        {
            "fd": 3,
            "family": int(socket.AF_INET),
            "type": int(socket.SOCK_STREAM),
            "inheritable": False,
            "blocking": True,
            "port": tcp_listener.getsockname()[1],
        }
    ]
    assert result["accepted"] == "ping\n"
    assert result["env"] == CLEARED


def test_listen_sockets_several_families(tcp_listener: socket.socket, tmp_path: Path) -> None:
    unix_path = str(tmp_path / "l.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix_listener,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        unix_listener.bind(unix_path)
        unix_listener.listen()
        udp.bind(("127.0.0.1", 0))
        result = _run_activated([tcp_listener.fileno(), unix_listener.fileno(), udp.fileno()])
    socks = result["socks"]
    assert isinstance(socks, list)
    assert [(s["fd"], s["family"], s["type"]) for s in socks] == [
        (3, int(socket.AF_INET), int(socket.SOCK_STREAM)),
        (4, int(socket.AF_UNIX), int(socket.SOCK_STREAM)),
        (5, int(socket.AF_INET), int(socket.SOCK_DGRAM)),
    ]
    assert all(s["inheritable"] is False for s in socks)
    assert result["env"] == CLEARED


def test_listen_sockets_pid_mismatch(tcp_listener: socket.socket) -> None:
    """Sockets meant for another pid are ignored; the variables are still
    removed (our choice, like sd_listen_fds(1)): they describe a specific
    process's fd table and must not leak into children."""
    result = _run_activated([tcp_listener.fileno()], listen_pid="1")
    assert result["socks"] == []
    assert result["env"] == CLEARED


def test_listen_sockets_skips_non_sockets(tcp_listener: socket.socket) -> None:
    r, w = os.pipe()
    try:
        result = _run_activated([r, tcp_listener.fileno()])
    finally:
        os.close(r)
        os.close(w)
    socks = result["socks"]
    assert isinstance(socks, list)
    assert [s["fd"] for s in socks] == [4]


def test_listen_sockets_without_env_in_process(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.listen_sockets() == []


@pytest.mark.parametrize(
    ("pid", "fds"),
    [("abc", "1"), ("self", "x"), ("self", "0"), ("self", "-2"), ("0", "1")],
)
def test_listen_sockets_malformed_env_in_process(
    clean_env: pytest.MonkeyPatch, pid: str, fds: str
) -> None:
    # None of these can adopt anything, so fd 3 of the pytest process is safe.
    clean_env.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    clean_env.setenv("LISTEN_FDS", fds)
    clean_env.setenv("LISTEN_FDNAMES", "x")
    assert systemd.listen_sockets() == []
    for name in CLEARED:
        assert name not in os.environ


# ------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("2000000", None, 2.0),
        ("2000000", "self", 2.0),
        ("2000000", "1", None),  # meant for another process
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("2000000", "me", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


def test_watchdog_pings_only_while_every_part_moves(
    clean_env: pytest.MonkeyPatch, path_receiver: tuple[socket.socket, str]
) -> None:
    sock, path = path_receiver
    clean_env.setenv("NOTIFY_SOCKET", path)
    now = [100.0]
    counters = {"accept_loop": 0, "janitor": 0}
    dog = systemd.Watchdog(4.0, lambda: counters, clock=lambda: now[0])

    assert dog.check() == 2.0  # half the interval
    counters["accept_loop"] += 1
    counters["janitor"] += 1
    now[0] += 1.0
    assert dog.check() == 1.0  # not due yet, nothing sent
    _assert_nothing_queued(sock)
    now[0] += 1.0
    assert dog.check() == 2.0
    sock.settimeout(RECV_TIMEOUT)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert dog.stalled == []

    # The janitor is wedged, the accept loop is not: no ping, and it says who.
    counters["accept_loop"] += 5
    now[0] += 2.0
    dog.check()
    assert dog.stalled == ["janitor"]
    _assert_nothing_queued(sock)
    # Both move again: compared with the last ping, so it pings at once.
    counters["janitor"] += 1
    now[0] += 2.0
    dog.check()
    sock.settimeout(RECV_TIMEOUT)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert dog.stalled == []
