"""Upgrades at scale: 1,000 clients in every state, and an upgrade under loadgen's load.

Real echod processes, real clients on loopback; every byte each client gets
is compared with what it must get, exactly once and in order.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from echod.pidfile import is_alive
from tests.helpers import ROOT, TIMEOUT, wait_for
from tests.stress.stresskit import Harness, Swarm, control

sys.path.insert(0, str(ROOT / "bench"))
import upgrade_pause  # type: ignore[import-not-found]  # bench/: loadgen around an upgrade

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def successors() -> Iterator[set[int]]:
    """Pids of the echods our echods started; ended at teardown."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def list_ids(ctl: str) -> list[int]:
    return [int(m) for m in re.findall(r"^id=(\d+) ", control(ctl, "/list"), re.M)]


def small_window(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def upgrade(srv: Harness, successors: set[int]) -> dict[str, Any]:
    answer = control(srv.ctl, "/upgrade", timeout=110)
    match = re.fullmatch(r"OK upgraded pid (\d+) -> (\d+)", answer)
    assert match, answer
    successors.add(int(match.group(2)))
    done: dict[str, Any] = srv.proc.wait_event("upgrade_done", timeout=30)
    assert srv.proc.proc.wait(TIMEOUT) == 0  # the old echod exits once the new one serves
    return done


def operator_lines(ctl: str, lines: list[str]) -> None:
    """Many operator commands on one control connection; every one must be OK."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as op:
        op.settimeout(30)
        op.connect(ctl)
        sender = threading.Thread(target=op.sendall, args=("".join(lines).encode(),))
        sender.start()
        answers = b""
        while answers.count(b"\n\n") < len(lines):
            chunk = op.recv(65536)
            assert chunk, "the control socket closed"
            answers += chunk
        sender.join(TIMEOUT)
    assert answers.count(b"OK sent") == len(lines), answers[-300:]


def test_1000_chat_clients_idle_mid_line_and_not_reading_survive_an_upgrade(
    echod: Callable[..., Harness], successors: set[int]
) -> None:
    srv = echod(
        *("--max-clients", "1100", "--send-timeout", "100", "--line-timeout", "100"),
        *("--chat", "--max-line", "65536"),
    )
    with Swarm(srv.port) as swarm:
        everyone = list(swarm.connect(990))
        talker0, talker1, mid = everyone[0], everyone[1], everyone[2:202]
        finishing = mid[:20]
        quiet = [small_window(srv.port) for _ in range(10)]  # they never read
        wait_for(lambda: srv.stats()["connected"] == 1000, timeout=60, what="1,000 clients")
        ids = list_ids(srv.ctl)
        assert len(ids) == 1000
        cid = dict(zip(everyone, ids, strict=False))  # swarm index -> client id
        quiet_ids = ids[990:]
        # More operator output for the quiet ones than the kernel holds (loopback
        # send buffers grow to 4 MiB): the rest queues in echod.
        text = "q" * 60000
        says = [f"{n} {text}" for n in range(70)]
        operator_lines(srv.ctl, [f"/send {c} {line}\n" for c in quiet_ids for line in says])
        # Chat before the upgrade, read by everyone; unfinished lines.
        before = b"".join(b"before %d\n" % n for n in range(5))
        swarm.send(lambda i: before, [talker0])
        relay_before = before.replace(b"before", b"client %d: before" % cid[talker0])
        swarm.read_until(
            lambda i: len(swarm.inbox[i]) >= len(before if i == talker0 else relay_before),
            everyone,
            60,
            "chat relays",
        )
        swarm.send(lambda i: b"part-%d " % i, mid)

        done = upgrade(srv, successors)
        assert done["clients"] == 1000
        assert done["unfinished"] == len(mid)
        assert done["queued"] > 0, "no output was queued for the quiet clients"
        print(f"\n1,000 chat clients: pause {done['pause']} s, {done['queued']} lines queued")
        assert list_ids(srv.ctl) == ids

        after = b"".join(b"after %d\n" % n for n in range(5))
        swarm.send(lambda i: after, [talker1])
        swarm.send(lambda i: b"end\n", finishing)
        relay_after = after.replace(b"after", b"client %d: after" % cid[talker1]).splitlines(
            keepends=True
        )
        ended = {i: b"client %d: part-%d end\n" % (cid[i], i) for i in finishing}
        for i in everyone:
            head = before if i == talker0 else relay_before
            own = (after.splitlines(keepends=True) if i == talker1 else []) + (
                [b"part-%d end\n" % i] if i in finishing else []
            )
            relays = (relay_after if i != talker1 else []) + [
                line for j, line in ended.items() if j != i
            ]
            size = len(head) + sum(map(len, own)) + sum(map(len, relays))

            def got_all(k: int, n: int = size) -> bool:
                return len(swarm.inbox[k]) >= n

            swarm.read_until(got_all, [i], 60, "all lines")
            inbox = bytes(swarm.inbox[i])
            assert len(inbox) == size and inbox.startswith(head), (i, inbox[-300:])
            rest = inbox[len(head) :].splitlines(keepends=True)
            assert [x for x in rest if not x.startswith(b"client ")] == own, i
            got = [x for x in rest if x.startswith(b"client ")]
            assert sorted(got) == sorted(relays), i  # each once
            assert [x for x in got if x in relay_after] == (relay_after if i != talker1 else [])
        # The quiet ones: their 70 lines once and in order, and every relay once.
        want_says = [b"Server says: %s\n" % line.encode() for line in says]
        want_relays = sorted(
            relay_before.splitlines(keepends=True) + relay_after + list(ended.values())
        )
        size = sum(map(len, want_says)) + sum(map(len, want_relays))
        for c, sock in zip(quiet_ids, quiet, strict=True):
            lines = read_exactly(sock, size).splitlines(keepends=True)
            assert [x for x in lines if x.startswith(b"Server says")] == want_says, c
            assert sorted(x for x in lines if x.startswith(b"client ")) == want_relays, c
            sock.close()
    srv.assert_no_traceback()


def test_a_handler_waiting_for_slow_readers_at_scale(
    echod: Callable[..., Harness], successors: set[int]
) -> None:
    """Plain echo: 1,000 clients, ten of them flooding without reading (queued echoes)."""
    srv = echod("--max-clients", "1100", "--send-timeout", "100", "--line-timeout", "100")
    with Swarm(srv.port) as swarm:
        clients = list(swarm.connect(990))
        swarm.echo(clients)
        flooders = [small_window(srv.port) for _ in range(10)]
        data = b"".join(b"%06d " % i + b"z" * 1000 + b"\n" for i in range(3000))
        threads = [threading.Thread(target=f.sendall, args=(data,), daemon=True) for f in flooders]
        for t in threads:
            t.start()
        swarm.send(lambda i: b"unfinished %d" % i, clients[:300])
        wait_for(lambda: srv.stats()["connected"] == 1000, timeout=60)
        ids = list_ids(srv.ctl)
        done = upgrade(srv, successors)
        assert done["clients"] == 1000 and done["unfinished"] >= 300  # flooders may be too
        print(f"\n1,000 clients: pause {done['pause']} s, {done['queued']} lines queued")
        assert list_ids(srv.ctl) == ids
        for f in flooders:
            assert read_exactly(f, len(data)) == data
        swarm.send(lambda i: b"\n", clients[:300])
        start = {i: len(swarm.inbox[i]) for i in clients[:300]}
        swarm.read_until(
            lambda i: len(swarm.inbox[i]) - start[i] >= len(b"unfinished %d\n" % i),
            clients[:300],
        )
        for i in clients[:300]:
            assert bytes(swarm.inbox[i][start[i] :]) == b"unfinished %d\n" % i
        swarm.echo(clients, tag=b" after the upgrade")


def test_an_upgrade_under_load_loses_no_byte(tmp_path: Path, successors: set[int]) -> None:
    """loadgen at 100 connections checks every echoed line across the upgrade."""
    # A long window: starting the new Python takes seconds on a busy machine,
    # and the hand-over must fall inside the window to be measured.
    upgrade_pause.harness.build_loadgen()  # a fresh clone has none (main() builds it too)
    record = upgrade_pause.measure(100, 12.0, True, tmp_path, "stress-upgrade-100c")
    print(f"\n{record}")
    assert record["handed_over"] >= 100
    assert record["completed_total"] > 0
    assert record["mismatches"] == 0 and record["errors"] == 0 and record["unanswered"] == 0
