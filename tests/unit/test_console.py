"""Unit tests for echod.console: the stdin console on pipes.

The console reads and writes pipes here (so it takes the ``os.read`` path);
the terminal path, with readline, is driven under a pseudo-terminal in
tests/process/test_consoles.py. The interpreter behind it is the real one,
on the registry of :mod:`tests.unit.test_commands`' rig.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from echod.admission import Admission, Policy
from echod.console import StdinConsole
from echod.errors import UpgradeFailed
from echod.reload import Outcome, ReloadError
from tests.unit.test_commands import TIMEOUT, Rig, make_rig, rig

pytestmark = pytest.mark.timeout(60)
__all__ = ["make_rig", "rig"]  # fixtures, used by name


class FakeService:
    """What StdinConsole takes from the service."""

    def __init__(self, rig: Rig) -> None:
        self.registry = rig.registry
        self.settings = rig.settings
        self.admission = Admission(Policy())
        self.stops: list[str] = []

    def request_stop(self, reason: str) -> None:
        self.stops.append(reason)

    def reload(self, trigger: str) -> Outcome:
        raise ReloadError("no config file here")

    def upgrade(self) -> str:
        raise UpgradeFailed("not in this test")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def run_console(rig: Rig, data: bytes) -> tuple[str, FakeService]:
    """Run a console on pipes: feed ``data``, close its stdin, return what it printed."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    service = FakeService(rig)
    try:
        console = StdinConsole(service, stdin_fd=in_r, stdout_fd=out_w)
        console.start()
        os.write(in_w, data)
        os.close(in_w)
        in_w = -1
        assert console.thread is not None
        console.thread.join(TIMEOUT)
        assert not console.thread.is_alive(), "end of input must end the console"
        os.close(out_w)
        out_w = -1
        return _read_all(out_r).decode(), service
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_stdin_console_answers_and_ends_at_end_of_input(rig: Rig, captured_logs: Any) -> None:
    a = rig.add()
    out, service = run_console(rig, b"/list\nhello everyone\n\n/send 99 x\n")
    lines = out.splitlines()
    assert lines[0] == "OK 1 client"
    assert lines[1].startswith(f"id={a.conn.id} ")
    assert lines[2:] == ["OK sent to 1 client", "ERR no client 99 (see /list)"]
    assert a.readline() == b"Server says: hello everyone\n"
    assert service.stops == []  # end of input ends the console, not the server
    assert captured_logs.named("console_closed")
    assert captured_logs.named("operator_command")[0]["source"] == "console"


def test_stdin_console_answers_a_last_line_without_newline(rig: Rig) -> None:
    out, _ = run_console(rig, b"/list")
    assert out == "OK 0 clients\n"


def test_stdin_console_shutdown_requests_a_stop(rig: Rig) -> None:
    out, service = run_console(rig, b"/shutdown\n")
    assert out == "OK shutting down\n"
    assert service.stops == ["operator"]


def test_stdin_console_refuses_an_endless_line_and_goes_on(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_line=10)
    a = rig.add()
    endless = b"x" * 5000 + b"\n"
    out, _ = run_console(rig, endless + b"/broadcast ok\n")
    assert out.splitlines() == [
        "ERR command too long (operator text is at most 10 bytes)",
        "OK sent to 1 client",
    ]
    assert a.readline() == b"Server says: ok\n"


def test_stdin_console_stops_reading_when_its_output_is_gone(rig: Rig, captured_logs: Any) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # nobody will ever read the answers: writing fails with EPIPE
    try:
        console = StdinConsole(FakeService(rig), stdin_fd=in_r, stdout_fd=out_w)
        console.start()
        os.write(in_w, b"/list\n")
        assert console.thread is not None
        console.thread.join(TIMEOUT)  # stdin is still open: only the failed write ends it
        assert not console.thread.is_alive()
        assert captured_logs.named("console_error")
    finally:
        for fd in (in_r, in_w, out_w):
            os.close(fd)
