"""Timeouts on a real echod: idle and line timeouts fire at the configured time, not before."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.stress.stresskit import Harness, MiB

pytestmark = pytest.mark.slow

IDLE, LINE = 1.5, 1.0
LATE = 1.0  # the janitor ticks every tenth of the shortest timeout; this is far above


def read_to_close(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def test_idle_and_line_timeouts_fire_on_time(echod: Callable[..., Harness]) -> None:
    srv = echod("--idle-timeout", str(IDLE), "--line-timeout", str(LINE))
    results: dict[str, tuple[bytes, float]] = {}

    def idle_client() -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"hello\n")
            assert sock.recv(100) == b"hello\n"
            quiet_since = time.monotonic()
            results["idle"] = read_to_close(sock), time.monotonic() - quiet_since

    def trickler() -> None:
        """Half a line, then a byte every 0.2 s: activity that must not help."""
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"h")
            first = time.monotonic()
            sock.setblocking(False)
            got = b""
            while True:
                try:
                    chunk = sock.recv(4096)
                except BlockingIOError:
                    try:
                        sock.send(b"e")
                    except OSError:
                        pass  # closed under us; the next recv says how
                    time.sleep(0.2)
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            results["line"] = got, time.monotonic() - first

    def talker() -> None:
        """Talks every 0.5 s for longer than the idle timeout: never cut off."""
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            deadline = time.monotonic() + IDLE * 2
            n = 0
            while time.monotonic() < deadline:
                sock.sendall(b"still here\n")
                assert sock.recv(100) == b"still here\n"
                n += 1
                time.sleep(0.5)
            results["talker"] = b"%d" % n, 0.0

    threads = [threading.Thread(target=f) for f in (idle_client, trickler, talker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    idle_got, idle_after = results["idle"]
    line_got, line_after = results["line"]
    print(
        f"\nidle timeout {IDLE}s fired after {idle_after:.2f}s; "
        f"line timeout {LINE}s fired {line_after:.2f}s after the first byte"
    )
    assert idle_got == b"ERR idle timeout\n"
    assert IDLE <= idle_after <= IDLE + LATE
    assert line_got == b"ERR line timeout\n"
    assert LINE <= line_after <= LINE + LATE
    assert int(results["talker"][0]) >= 5
    closed = srv.wait_count("connection_closed", 4)
    reasons = {e["reason"]: e for e in closed}
    assert IDLE <= reasons["idle_timeout"]["duration"] <= IDLE + LATE + 0.5
    assert LINE <= reasons["line_timeout"]["duration"] <= LINE + LATE + 0.5
    srv.back_to_baseline(rss_slack=4 * MiB)
    srv.stop()
