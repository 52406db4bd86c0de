"""Connection.notice: how the janitor turns the handler's counters into times.

The handler thread reads no clock; these tests play its part (feed the
protocol, bump the counters) and then take the janitor's look at chosen times.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator

import pytest

from echod.connection import ClientThread, Connection
from tests.helpers import TIMEOUT


@pytest.fixture
def conn() -> Iterator[Connection]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield Connection(ours, "peer", 1, send_timeout=1.0, max_line=64)


def arrive(conn: Connection, data: bytes) -> None:
    """What the handler does with one read, minus the echo."""
    conn.bytes_in += len(data)
    for event in conn.proto.feed(data):
        conn.lines_in += getattr(event, "lines", 0)


def test_nothing_arrives_nothing_changes(conn: Connection) -> None:
    conn.notice(conn.started + 50)
    assert conn.last_active == conn.started
    assert conn.line_started is None


def test_input_makes_the_client_active_when_noticed(conn: Connection) -> None:
    arrive(conn, b"hello\n")
    conn.notice(10.0)
    assert (conn.last_active, conn.line_started) == (10.0, None)
    conn.notice(20.0)  # silent since
    assert conn.last_active == 10.0


def test_an_unfinished_line_keeps_its_first_noticed_time(conn: Connection) -> None:
    arrive(conn, b"hel")
    conn.notice(10.0)
    assert conn.line_started == 10.0
    arrive(conn, b"lo")  # trickling does not move the deadline
    conn.notice(11.0)
    assert (conn.last_active, conn.line_started) == (11.0, 10.0)


def test_a_finished_line_restarts_the_clock_for_the_next(conn: Connection) -> None:
    arrive(conn, b"first")
    conn.notice(10.0)
    arrive(conn, b" line\nsecond")  # finished one line, began another, between two looks
    conn.notice(12.0)
    assert conn.line_started == 12.0
    arrive(conn, b" line\n")
    conn.notice(13.0)
    assert conn.line_started is None


def test_client_thread_is_alive_until_its_target_returns() -> None:
    release = threading.Event()
    ran = threading.Event()

    def target() -> None:
        ran.set()
        release.wait(TIMEOUT)

    thread = ClientThread(target)
    assert ran.wait(TIMEOUT)
    assert thread.is_alive()
    thread.join(0.01)  # bounded: returns with the thread still running
    assert thread.is_alive()
    release.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    thread.join(0)  # joining an ended thread returns at once, any number of times


def test_client_thread_ends_even_if_its_target_raises() -> None:
    reported: list[BaseException | None] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: reported.append(u.exc_value)

    def target() -> None:
        raise ValueError("boom")

    try:
        thread = ClientThread(target)
        thread.join(TIMEOUT)
    finally:
        sys.unraisablehook = hook
    assert not thread.is_alive()
    assert [type(e) for e in reported] == [ValueError]


def test_a_last_line_queued_while_another_thread_sends_is_not_cut_off() -> None:
    # A kick (or a timeout, or shutdown) ends the connection while another
    # thread holds the write lock: end() can only queue its line, and the
    # lock's holder sends it on release. end() must not shut the writing
    # side meanwhile, or that send fails and the line is lost.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = Connection(ours, "peer", 1, send_timeout=1.0, max_line=64)
        assert conn._wlock.acquire(False)  # another thread is sending
        try:
            assert conn.end(b"Server says: bye\n", "kicked")
        finally:
            conn._wlock.release()
        conn.flush()  # what the holder does after its release (Connection.send)
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(100) == b"Server says: bye\n"
        # The reading side is shut: the handler's recv returns at once.
        ours.settimeout(TIMEOUT)
        assert ours.recv(100) == b""
        assert conn.end_reason == "kicked"


def test_a_parked_connection_is_shut_both_ways_when_ended() -> None:
    # No handler is left to send the FIN for it, even with a line queued.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = Connection(ours, "peer", 1, send_timeout=1.0, max_line=64)
        conn.parked = True
        assert conn._wlock.acquire(False)
        try:
            assert conn.end(b"Server shutting down\n", "shutdown")
        finally:
            conn._wlock.release()
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(100) == b""
