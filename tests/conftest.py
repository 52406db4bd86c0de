"""Fixtures and pytest hooks only; the helpers they hand out are in ``tests/helpers.py``.

- ``make_server(**settings)``: an in-process :class:`EchoServer` on
  127.0.0.1, port 0, serving in a thread; stopped at teardown.
- ``server``: ``make_server()`` with the defaults.
- ``connect(port, host=...)``: a :class:`~tests.helpers.Client` whose every
  call has a timeout; closed at teardown.
- ``transport``: ``"tcp"`` here; a module that overrides it with
  ``params=["tcp", "tls"]`` runs its tests twice, the second time with
  ``make_server`` serving TLS (certificates from ``tls_kit``) and
  ``connect`` returning a :class:`tests.tlskit.TLSClient`.
- ``tls_kit``: a CA and a server certificate for the session (trustme).
- ``spawn_echod(*args)``: the real ``echod`` command as a subprocess
  (``python -m echod --foreground --port 0 --control-socket none`` + args),
  its port read from the ``listening`` log line; ended by PID at teardown.
- ``captured_logs``: structlog events of the in-process server, as dicts.
- ``ctl_dir``: a short private directory for control sockets.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from echod import logs
from echod.config import Settings
from tests.helpers import TIMEOUT, CapturedLogs, Client, EchodProcess, RunningServer
from tests.tlskit import TLSClient, TLSKit


@pytest.fixture
def ctl_dir() -> Iterator[Path]:
    """A short private directory under /tmp (sun_path is 108 bytes; pytest's are long)."""
    path = Path(tempfile.mkdtemp(prefix="echod-ctl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def captured_logs() -> Iterator[CapturedLogs]:
    captured = CapturedLogs()
    logs.configure("debug", "json", captured)
    yield captured
    logs.configure("info", "json", sys.stderr)


@pytest.fixture
def transport() -> str:
    return "tcp"


@pytest.fixture(scope="session")
def tls_kit(tmp_path_factory: pytest.TempPathFactory) -> TLSKit:
    """One CA and server certificate for the whole run (tests that change files make their own)."""
    return TLSKit(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def make_server(transport: str, tls_kit: TLSKit) -> Iterator[Callable[..., RunningServer]]:
    servers: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        base = Settings(host="127.0.0.1", port=0, control_socket=None, foreground=True)
        if transport == "tls":
            base = replace(base, tls_cert=tls_kit.cert, tls_key=tls_kit.key)
        running = RunningServer(replace(base, **overrides))
        servers.append(running)
        return running

    yield make
    for running in servers:
        running.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture
def connect(transport: str, tls_kit: TLSKit) -> Iterator[Callable[..., Client]]:
    clients: list[Client | TLSClient] = []

    def make(port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> Client:
        client: Client | TLSClient
        if transport == "tls":
            client = TLSClient(port, host, timeout, tls_kit.client_context())
        else:
            client = Client(port, host, timeout)
        clients.append(client)
        return client  # type: ignore[return-value]  # a TLSClient has the same methods

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def spawn_echod() -> Iterator[Callable[..., EchodProcess]]:
    procs: list[EchodProcess] = []

    def spawn(
        *args: str,
        env: dict[str, str] | None = None,
        default_args: bool = True,
        ready_event: str = "listening",
    ) -> EchodProcess:
        base = (
            ["--foreground", "--port", "0", "--control-socket", "none", "--log-format", "json"]
            if default_args
            else []
        )
        proc = EchodProcess([*base, *args], env=env, ready_event=ready_event)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.stop()
