"""Parking handler threads for a hand-over (echod.pause), with real sockets in-process.

Each test parks the handlers of a real EchoServer where no byte they hold is
lost (blocked in recv, flooding, waiting for a slow reader), then either gives
the clients back to the same server (resume) or hands them to a second
server in the same process, the way an upgrade hands them to a new echod,
and checks every byte each client gets.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from echod import pause
from echod.connection import Connection
from echod.pause import PauseTimeout
from echod.server import EchoHandler
from tests.helpers import TIMEOUT, Client, RunningServer, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def wake_handler() -> Iterator[None]:
    old = signal.getsignal(pause.WAKE_SIGNAL)
    pause.install_wake_handler()
    yield
    signal.signal(pause.WAKE_SIGNAL, old)


def test_blocked_readers_park_and_resume_without_losing_a_byte(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    running = make_server()
    clients = [connect(running.port) for _ in range(40)]
    for i, c in enumerate(clients):
        assert c.roundtrip(b"hi %d\n" % i) == b"hi %d\n" % i
    for c in clients[::2]:
        c.send(b"unfinished ")  # mid-line when the pause comes
    wait_for(lambda: sum(c.proto.pending for c in running.registry.snapshot()) == 20 * 11)
    parked = running.server.pause_clients(5.0)
    assert len(parked) == 40
    assert all(not c.thread.is_alive() for c in parked if c.thread is not None)
    for c in clients:
        c.send(b"sent while paused\n")  # waits in the kernel's buffer meanwhile
    running.server.resume()
    for i, c in enumerate(clients):
        expected = (b"unfinished " if i % 2 == 0 else b"") + b"sent while paused\n"
        assert c.readline() == expected
        assert c.roundtrip(b"after\n") == b"after\n"


def test_a_client_that_never_stops_sending_is_parked_after_one_read(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    running = make_server()
    client = connect(running.port)
    line = b"0123456789abcdef" * 4 + b"\n"
    total = 20000
    received = bytearray()

    def read() -> None:
        while len(received) < total * len(line):
            chunk = client.sock.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sender = threading.Thread(target=client.send, args=(line * total,), daemon=True)
    sender.start()
    wait_for(lambda: len(received) > 1000)
    parked = running.server.pause_clients(5.0)
    assert len(parked) == 1
    running.server.resume()
    sender.join(TIMEOUT)
    reader.join(TIMEOUT)
    assert bytes(received) == line * total


def _fill_until_stalled(running: RunningServer, client: Client) -> bytes:
    """Send without reading until the server's handler waits for us to read."""
    sent = bytearray()
    block = b"x" * 1000 + b"\n"
    conn = wait_for(running.registry.snapshot, what="a client registered")[-1]
    deadline = time.monotonic() + TIMEOUT
    while conn.stalled_since is None or not conn._out:
        assert time.monotonic() < deadline, "the handler never stalled"
        try:
            n = client.sock.send(block, socket.MSG_DONTWAIT)
        except BlockingIOError:
            time.sleep(0.01)  # our send buffer is full too: the server reads no more
            continue
        sent += block[:n]
        if n < len(block):
            sent += block[n:]
            client.sock.sendall(block[n:])  # whole lines only, so every one is answered
    return bytes(sent)


def test_a_handler_waiting_for_a_slow_reader_parks_with_its_queue(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    running = make_server(send_timeout=30.0)
    client = Client(running.port, rcvbuf=4096)
    sent = _fill_until_stalled(running, client)
    parked = running.server.pause_clients(5.0)
    assert len(parked) == 1 and parked[0]._out  # the unsent answer waits in its queue
    running.server.resume()
    client.half_close()
    assert client.read_all() == sent  # every byte once, in order, then EOF


def test_a_handler_that_cannot_park_times_out_and_everyone_is_served_again(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    """A handler stuck where no signal reaches it (here: sleeping) fails the pause."""
    stuck = threading.Event()

    class Sleepy(EchoHandler):
        def handle(self) -> None:
            if self.request.id == 1:
                stuck.set()
                time.sleep(3)  # CPython resumes sleep() after EINTR
            super().handle()

    running = make_server()
    running.server.RequestHandlerClass = Sleepy
    sleepy = connect(running.port)
    stuck.wait(TIMEOUT)
    others = [connect(running.port) for _ in range(3)]
    for c in others:
        assert c.roundtrip(b"ok\n") == b"ok\n"
    with pytest.raises(PauseTimeout, match="1 of 4"):
        running.server.pause_clients(0.5)
    for c in others:  # resumed: served, and accepting again
        assert c.roundtrip(b"still\n") == b"still\n"
    assert connect(running.port).roundtrip(b"new\n") == b"new\n"
    assert sleepy.roundtrip(b"late\n") == b"late\n"


def test_hand_over_to_another_server_keeps_ids_lines_queues_and_clocks(
    make_server: Callable[..., RunningServer], connect: Callable[..., Client]
) -> None:
    """What an upgrade does, in one process: A parks, B adopts duplicates of the sockets."""
    old = make_server(line_timeout=3.0, send_timeout=30.0)
    slow = Client(old.port, rcvbuf=4096)
    sent = _fill_until_stalled(old, slow)
    idle, mid = connect(old.port), connect(old.port)
    assert idle.roundtrip(b"x\n") == b"x\n"
    mid.send(b"begun ")
    wait_for(lambda: (c := old.registry.get(3)) is not None and c.proto.pending == 6)
    time.sleep(1.5)  # the unfinished line ages on the old server (noticed a tick late)
    parked = old.server.pause_clients(5.0)
    now = time.monotonic()
    states = [(c.state(0, now), socket.socket(fileno=os.dup(c.sock.fileno()))) for c in parked]
    assert [s.id for s, _ in states] == [1, 2, 3]
    assert states[2][0].pending == b"begun " and states[2][0].line_age is not None
    assert states[2][0].line_age >= 1.0
    new = make_server(line_timeout=3.0, send_timeout=30.0)
    cfg = new.settings
    gate = new.server.adopt(
        [
            Connection.restore(s, sock, cfg.send_timeout, cfg.max_line, new.server.pause, now)
            for s, sock in states
        ]
    )
    old.server.let_go()
    gate.set()
    assert [c.id for c in new.registry.snapshot()] == [1, 2, 3]
    assert idle.roundtrip(b"y\n") == b"y\n"
    slow.half_close()
    assert slow.read_all() == sent
    # The line timeout counts from when the line began on the old server.
    assert mid.readline() == b"ERR line timeout\n"
    ended = time.monotonic()
    assert ended - now < 3.0 - 0.5, "the line's age was not carried over"
