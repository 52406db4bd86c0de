"""Load: thousands of clients at once, thousands one after another, the client cap."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.stress.stresskit import Harness, MiB, PeakWatch, Swarm, wait_threads

pytestmark = pytest.mark.slow


def test_5000_concurrent_clients_each_echo_a_line(echod: Callable[..., Harness]) -> None:
    n = 5000
    srv = echod("--max-clients", str(n))
    after: list[float] = []
    with PeakWatch(srv.pid) as peak:
        # Two waves: the second must reuse what the first freed (no leak at scale).
        for wave in range(2):
            with Swarm(srv.port) as swarm:
                clients = swarm.connect(n)
                swarm.echo(clients)  # every client answered while all are connected
                during = srv.sample()
                counters = srv.stats()
                swarm.echo(clients, tag=b" again")
            srv.wait_count("connection_closed", 1 + n * (wave + 1), reason="eof", timeout=60)
            after.append(wait_threads(srv.pid, srv.baseline.threads, 30).rss / MiB)
            assert during.threads >= srv.baseline.threads + n  # a thread each, all at once
            assert counters["connected"] == n
            assert counters["total_accepted"] == 1 + n * (wave + 1)
            assert counters["rejected"] == 0
            print(
                f"\nwave {wave}: all connected {during.rss_mib} MiB, {during.threads} threads; "
                f"after {after[-1]:.1f} MiB"
            )
    print(
        f"baseline {srv.baseline.rss_mib} MiB/{srv.baseline.threads} threads, "
        f"peak {peak.rss_mib} MiB/{peak.threads} threads"
    )
    assert peak.rss < 250 * MiB
    # Freed memory is kept by the allocator but reused: a second wave must not
    # add another wave's worth (fragmentation moves it by a few MiB either way).
    assert after[1] - after[0] < 20, "the second wave did not reuse the first one's memory"
    assert not srv.events("client_rejected")
    srv.stop()


def cycle(port: int, i: int) -> None:
    """Connect, echo a line, exit, see the server close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        line = b"cycle %d\n" % i
        sock.sendall(line + b"exit\n")
        want = line + b"bye\n"
        got = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got == want, (i, got)


def test_10000_sequential_cycles_do_not_grow(echod: Callable[..., Harness]) -> None:
    srv = echod()
    for i in range(500):  # warm-up, so the allocator has reached its steady state
        cycle(srv.port, i)
    wait_threads(srv.pid, srv.baseline.threads, 10)
    before = srv.sample()
    start = time.monotonic()
    for i in range(10_000):
        cycle(srv.port, i)
    took = time.monotonic() - start
    srv.wait_count("connection_closed", 10_501, timeout=30)
    now = wait_threads(srv.pid, srv.baseline.threads, 10)
    counters = srv.stats()
    print(
        f"\n10,000 cycles in {took:.1f}s; RSS {before.rss_mib} -> {now.rss_mib} MiB, "
        f"threads {before.threads} -> {now.threads}"
    )
    assert now.rss - before.rss < 5 * MiB
    assert counters["connected"] == 0
    assert counters["total_accepted"] == 10_501
    assert srv.reasons() == {"eof": 1, "exit": 10_500}
    srv.stop()


def test_max_clients_plus_one_is_refused_and_everyone_else_echoes(
    echod: Callable[..., Harness],
) -> None:
    n = 1000  # the default --max-clients
    srv = echod()
    full = b"ERR server full (max 1000 clients)\n"
    with Swarm(srv.port) as swarm:
        clients = swarm.connect(n)
        swarm.echo(clients)  # all n are registered now
        extra = swarm.connect(1)
        swarm.read_to_eof(extra, timeout=10)
        assert bytes(swarm.inbox[extra[0]]) == full
        burst = swarm.connect(50)  # a burst of refusals is logged once
        swarm.read_to_eof(burst, timeout=10)
        assert all(bytes(swarm.inbox[i]) == full for i in burst)
        swarm.echo(clients, tag=b" still")  # nobody else was disturbed
        counters = srv.stats()
        assert counters["connected"] == n
        assert counters["rejected"] == 51
        srv.wait_count("client_rejected_burst_ended", 1, timeout=10)
        assert len(srv.events("client_rejected")) == 1
        assert srv.events("client_rejected_burst_ended")[0]["rejected"] == 51
        # A freed slot is usable again.
        swarm.close(clients[:1])
        srv.wait_count("connection_closed", 2)
        again = swarm.connect(1)
        swarm.echo(again)
    srv.wait_count("connection_closed", 1 + n + 1)
    srv.back_to_baseline(rss_slack=64 * MiB)
    srv.stop()
