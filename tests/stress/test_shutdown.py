"""Shutdown under load: SIGTERM with a thousand clients, a tenth of them not reading."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.helpers import flood_until_stalled
from tests.stress.stresskit import Harness, Swarm

pytestmark = pytest.mark.slow

NOTICE = b"Server shutting down\n"


def test_sigterm_with_1000_clients_some_not_reading(echod: Callable[..., Harness]) -> None:
    n, stuck_every, shutdown_timeout = 1000, 10, 5.0
    # A send timeout far beyond the flood below: on a slow machine the flood
    # can take longer than the default 10 s, and the first clients to stall
    # would be ended as slow readers before the SIGTERM this test is about.
    srv = echod(
        "--max-clients",
        str(n),
        "--shutdown-timeout",
        str(shutdown_timeout),
        "--send-timeout",
        "120",
    )
    with Swarm(srv.port) as swarm:
        clients = swarm.connect(n)
        swarm.echo(clients)
        stuck = [i for i in clients if i % stuck_every == 0]
        reading = [i for i in clients if i % stuck_every]
        # The stuck clients send lines whose echoes they never read, until the
        # server stops reading from them too: their handlers are blocked sending.
        for i in stuck:  # small buffers on our side: stall sooner, hold less kernel memory
            swarm.socks[i].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            swarm.socks[i].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pushed = flood_until_stalled([swarm.socks[i] for i in stuck])
        stalled = srv.sample()
        start = time.monotonic()
        srv.proc.signal()
        code = srv.proc.wait(shutdown_timeout + 10)
        took = time.monotonic() - start
        swarm.read_to_eof(reading, timeout=10)
        missing = [i for i in reading if not bytes(swarm.inbox[i]).endswith(NOTICE)]
    print(
        f"\nSIGTERM: {len(reading)} reading + {len(stuck)} stuck clients "
        f"({pushed / 2**20:.0f} MiB pushed into the stuck ones, {stalled.threads} threads); "
        f"exit {code} after {took:.2f}s"
    )
    srv.assert_no_traceback()
    assert code == 0
    assert took <= shutdown_timeout + 1.5  # the deadline, plus interpreter exit
    assert not missing, (
        f"{len(missing)} reading clients missed the notice, e.g. "
        f"{bytes(swarm.inbox[missing[0]])[-100:]!r}"
    )
    closed = srv.events("connection_closed", reason="shutdown")
    assert len(closed) == n, f"{len(closed)} connection_closed(shutdown) events"
    assert not srv.events("shutdown_incomplete")


def test_a_second_sigterm_during_the_stop_exits_at_once(echod: Callable[..., Harness]) -> None:
    # Closing 2,000 clients takes a few hundred milliseconds; the second
    # signal goes out as soon as the `stopping` event is read, well inside it.
    n = 2000
    srv = echod("--max-clients", str(n))
    with Swarm(srv.port) as swarm:
        clients = swarm.connect(n)
        swarm.echo(clients)
        srv.proc.signal()
        srv.proc.wait_event("stopping")
        srv.proc.signal()
        code = srv.proc.wait(10)
    assert code == 1  # the operator insisted: not the clean 0 of a finished stop
    assert not srv.events("stopped")
    srv.assert_no_traceback()
