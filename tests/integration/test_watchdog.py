"""The systemd watchdog over a real server's progress counters.

A wedged janitor (its check blocks) must stop the pings while the accept
loop keeps going; when it moves again, the pings resume. The watchdog's
clock is the test's, so no test waits for half an interval; the server's
threads run for real.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from echod import systemd
from tests.helpers import TIMEOUT, RunningServer, wait_for

INTERVAL = 4.0  # WatchdogSec=; only the fake clock ever reaches it


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        yield sock
    finally:
        sock.close()


def _pinged(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(64) == b"WATCHDOG=1"
    except TimeoutError:
        return False


def test_a_wedged_janitor_withholds_the_ping(
    make_server: Callable[..., RunningServer],
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = make_server(idle_timeout=1.0).server  # the janitor ticks every 0.1 s
    now = [0.0]
    dog = systemd.Watchdog(INTERVAL, server.progress, clock=lambda: now[0])

    def moved() -> bool:
        return all(n > 2 for n in server.progress().values())

    wait_for(moved, what="both loops going round")
    now[0] += INTERVAL / 2
    dog.check()
    assert (dog.stalled, _pinged(notify_socket)) == ([], True)

    wedged, release = threading.Event(), threading.Event()

    def stuck() -> None:
        wedged.set()
        release.wait(TIMEOUT)

    real_check = server.check_timeouts
    monkeypatch.setattr(server, "check_timeouts", stuck)
    try:
        assert wedged.wait(TIMEOUT)
        # The janitor went round since the last ping (up to the round that
        # wedged), so one more ping may go out; the next check finds it still.
        now[0] += INTERVAL / 2
        dog.check()
        _pinged(notify_socket)
        janitor = server.progress()["janitor"]
        accepting = server.progress()["accept_loop"]
        wait_for(lambda: server.progress()["accept_loop"] > accepting + 2, what="accept rounds")
        assert server.progress()["janitor"] == janitor
        now[0] += INTERVAL / 2
        dog.check()
        assert (dog.stalled, _pinged(notify_socket)) == (["janitor"], False)
    finally:
        monkeypatch.setattr(server, "check_timeouts", real_check)
        release.set()

    wait_for(lambda: server.progress()["janitor"] > janitor, what="the janitor again")
    now[0] += INTERVAL / 2
    dog.check()
    assert (dog.stalled, _pinged(notify_socket)) == ([], True)
