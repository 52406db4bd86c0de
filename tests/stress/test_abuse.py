"""Abuse: slowloris, a huge line, a client that never reads, resets and half-closes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.helpers import LineReader, flood_until_stalled, wait_for
from tests.stress.stresskit import (
    Harness,
    MiB,
    PeakWatch,
    Swarm,
    control,
    linger0,
)

pytestmark = pytest.mark.slow


class Roundtripper(threading.Thread):
    """A well-behaved client echoing a line every ``interval`` until stopped.

    In chat mode it skips relayed lines. ``failures`` collects anything
    unexpected; ``count`` says how many round trips succeeded.
    """

    def __init__(self, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.interval = interval
        self.count = 0
        self.failures: list[str] = []
        self.received: list[bytes] = []
        self._halt = threading.Event()
        self._reader = LineReader.of_socket(self.sock, 5)

    def readline(self) -> bytes:
        line = self._reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("server closed")
        return line

    def run(self) -> None:
        while not self._halt.is_set():
            line = b"normal %d\n" % self.count
            try:
                self.sock.sendall(line)
                while True:
                    got = self.readline()
                    if got == line:
                        break
                    self.received.append(got)
            except OSError as err:
                self.failures.append(repr(err))
                return
            self.count += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.sock.close()


def test_slowloris_trickling_clients_are_cut_by_the_line_timeout(
    echod: Callable[..., Harness],
) -> None:
    n, line_timeout = 1000, 3.0
    srv = echod("--line-timeout", str(line_timeout), "--max-clients", str(n + 1))
    normal = Roundtripper(srv.port)
    normal.start()
    cut_at: dict[int, float] = {}
    with Swarm(srv.port) as swarm:
        clients = swarm.connect(n)
        start = time.monotonic()
        next_byte = start
        while len(cut_at) < n and time.monotonic() - start < line_timeout + 10:
            if time.monotonic() >= next_byte:  # one byte a second on every live client
                for i in clients:
                    if i not in cut_at:
                        try:
                            swarm.socks[i].send(b"x")
                        except OSError:
                            pass  # the server closed it already; reading will tell
                next_byte += 1.0
            swarm.pump(0.05)
            now = time.monotonic()
            for i in clients:
                if i not in cut_at and swarm.eof[i]:
                    cut_at[i] = now - start
        counts_during = normal.count
        assert len(cut_at) == n, f"{n - len(cut_at)} trickling clients still connected"
        wrong = [i for i in clients if bytes(swarm.inbox[i]) != b"ERR line timeout\n"]
        assert not wrong, f"{len(wrong)} got {bytes(swarm.inbox[wrong[0]])!r}"
    first, last = min(cut_at.values()), max(cut_at.values())
    print(
        f"\nslowloris: {n} cut between {first:.2f}s and {last:.2f}s; the normal client "
        f"made {counts_during} round trips meanwhile"
    )
    assert first >= line_timeout - 0.1  # an absolute deadline from the first byte, not sooner
    assert last <= line_timeout + 3.0  # janitor tick plus scheduling, far below "forever"
    assert not normal.failures, normal.failures
    assert counts_during > 0
    srv.wait_count("connection_closed", n, reason="line_timeout", timeout=10)
    counters = srv.stats()
    assert (counters["connected"], counters["total_accepted"]) == (1, 1 + 1 + n)
    after_storm = normal.count
    wait_for(lambda: normal.count >= after_storm + 5, what="round trips after the storm")
    normal.stop()
    assert not normal.failures, normal.failures
    srv.back_to_baseline(rss_slack=32 * MiB)
    srv.stop()


@pytest.mark.parametrize("max_line", [1024, 1 << 20])
def test_256_mib_without_a_newline(echod: Callable[..., Harness], max_line: int) -> None:
    """With the default limit and with the largest one: the buffer is bounded by the limit."""
    srv = echod("--max-line", str(max_line))
    total = 256 * MiB
    chunk = b"x" * MiB
    sent = 0
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    received: list[bytes] = []

    def reader() -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                received.append(data)
        except OSError:
            return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    with PeakWatch(srv.pid, 0.01) as peak:
        try:
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed on us, as it should
        thread.join(10)
    sock.close()
    assert b"".join(received) == b"ERR line too long (max %d bytes)\n" % max_line
    srv.wait_count("connection_closed", 1, reason="line_too_long")
    growth = peak.rss - srv.baseline.rss
    print(
        f"\n256 MiB: client sent {sent / MiB:.1f} MiB before the close; "
        f"server RSS grew by {growth / MiB:.2f} MiB at most"
    )
    assert sent < total  # it was cut off, not read to the end
    assert growth < 4 * MiB + 3 * max_line  # a few MiB, plus the line buffer and its copies
    srv.back_to_baseline(rss_slack=4 * MiB + 3 * max_line)
    srv.stop()


def test_a_client_that_never_reads_is_dropped_as_slow_reader(echod: Callable[..., Harness]) -> None:
    send_timeout = 2.0
    srv = echod("--chat", "--send-timeout", str(send_timeout))
    normal = Roundtripper(srv.port)
    normal.start()
    hog = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up sooner
    hog_sent = [0]

    def flood() -> None:
        """Lines to echo (and relay) as fast as the server takes them; never read."""
        hog_sent[0] = flood_until_stalled([hog], dropped_ok=True) // 1000

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    answers: list[str] = []
    deadline = time.monotonic() + 30
    # While the hog stalls: the operator keeps broadcasting (more for the hog to
    # not read) and reading the counters, and both must answer every time.
    while not srv.events("connection_closed", reason="slow_reader"):
        assert time.monotonic() < deadline, "the hog was never dropped"
        answers.append(control(srv.ctl, "/broadcast tick", timeout=5))
        answers.append(control(srv.ctl, "/stats", timeout=5))
        srv.pump(0.1)
    dropped = srv.events("connection_closed", reason="slow_reader")[0]
    print(
        f"\nslow reader: sent {hog_sent[0]} lines, dropped after {dropped['duration']}s; "
        f"{len(answers)} operator answers and {normal.count} round trips meanwhile"
    )
    assert all(a.startswith("OK") for a in answers), [a for a in answers if not a.startswith("OK")]
    assert len(answers) >= 4
    before = normal.count
    wait_for(lambda: normal.count >= before + 5, what="round trips after the drop")
    normal.stop()
    assert not normal.failures, normal.failures
    assert any(line.startswith(b"Server says: tick") for line in normal.received)
    assert len(srv.events("connection_closed", reason="slow_reader")) == 1
    flooder.join(10)
    hog.close()
    srv.wait_count("connection_closed", 3)
    srv.back_to_baseline(rss_slack=16 * MiB)
    srv.stop()


def test_resets_and_half_closes(echod: Callable[..., Harness]) -> None:
    srv = echod()
    witness = Roundtripper(srv.port)  # must not notice anything below
    witness.start()
    base_in = srv.stats()["bytes_in"]

    # Reset mid-line: the server holds half a line when the RST arrives.
    mid_line = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    mid_line.sendall(b"half a li")
    wait_for(lambda: srv.stats()["bytes_in"] - base_in >= 9, what="the half line to arrive")
    linger0(mid_line)
    mid_line.close()
    srv.wait_count("connection_closed", 1, reason="reset")

    # Reset mid-send: the server is blocked sending echoes the client does not read.
    mid_send = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    mid_send.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mid_send.setblocking(False)
    sent = flood_until_stalled([mid_send])
    linger0(mid_send)
    mid_send.close()
    srv.wait_count("connection_closed", 2, reason="reset")

    # Half-close after 100 lines: all 100 echoes arrive, then the close.
    lines = b"".join(b"line %d\n" % i for i in range(100))
    half = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    for i in range(100):
        half.sendall(b"line %d\n" % i)
    half.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := half.recv(65536):
        got += chunk
    half.close()
    assert got == lines

    # 1,000 lines in one send: all echoed, in order.
    many = b"".join(b"pipelined %d\n" % i for i in range(1000))
    pipe = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    pipe.sendall(many)
    got = b""
    while len(got) < len(many):
        chunk = pipe.recv(65536)
        assert chunk, "closed early"
        got += chunk
    assert got == many
    pipe.close()

    srv.wait_count("connection_closed", 3, reason="eof")  # warm-up, half-close, pipelined
    counts = witness.count
    wait_for(lambda: witness.count >= counts + 5, what="the witness to keep echoing")
    witness.stop()
    assert not witness.failures, witness.failures
    srv.wait_count("connection_closed", 6)
    assert srv.reasons() == {"eof": 4, "reset": 2}, srv.reasons()
    print(f"\nresets: mid-send client got {sent} bytes into the server before its RST")
    srv.back_to_baseline(rss_slack=16 * MiB)
    srv.stop()
