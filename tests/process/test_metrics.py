"""The Prometheus endpoint of the real echod, scraped over HTTP after real traffic.

Every figure asserted is counted by hand from the traffic the test makes;
the scrape is parsed with prometheus_client's own parser, as a Prometheus
server would read it.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from echod import __version__
from tests.helpers import (
    TIMEOUT,
    Client,
    EchodProcess,
    ctl,
    echod_command,
    roundtrip_once,
    scrape,
    value,
)

pytestmark = pytest.mark.timeout(60)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_metrics_after_real_traffic(
    spawn_echod: Callable[..., EchodProcess], ctl_dir: Path, tmp_path: Path
) -> None:
    sock = ctl_dir / "control.sock"
    config = tmp_path / "echod.toml"
    config.write_text("max_clients = 2\n")
    echod = spawn_echod(
        *("--config", str(config), "--control-socket", str(sock)),
        *("--metrics-listen", "127.0.0.1:0", "--deny", "127.0.0.9"),
    )
    port = echod.wait_event("metrics_listening")["port"]
    _, before = scrape(port)
    assert value(before, "echod_connections_accepted_total") == 0
    assert value(before, "echod_connections_closed_total", reason="kicked") == 0  # known: 0

    # a: three lines and exit (11 bytes in; 6 echoed + "bye\n" out).
    a = Client(echod.port)
    a.send(b"a\nb\nc\nexit\n")
    assert [a.readline() for _ in range(4)] == [b"a\n", b"b\n", b"c\n", b"bye\n"]
    assert a.readline() == b""
    a.close()
    denied = Client(echod.port, source="127.0.0.9")
    assert denied.readline() == b"ERR access denied\n"
    denied.close()
    echod.wait_event("client_refused")
    # b and c: one line each, then held; d is refused (max_clients = 2).
    b, c = Client(echod.port), Client(echod.port)
    assert b.roundtrip(b"b1\n") == b"b1\n"
    assert c.roundtrip(b"c1\n") == b"c1\n"
    assert roundtrip_once(echod.port) == b"ERR server full (max 2 clients)\n"
    assert ok(ctl(sock, "broadcast", "hi")) == "OK sent to 2 clients\n"  # 16 bytes each
    assert b.readline() == c.readline() == b"Server says: hi\n"
    _, held = scrape(port)
    assert value(held, "echod_connections_active") == 2
    b.close()  # eof
    echod.wait_event("connection_closed", where=lambda e: e["reason"] == "eof")
    ok(ctl(sock, "kick", "4"))  # c (the denied client had id 3), without a last line
    assert c.readline() == b""
    c.close()
    echod.wait_event("connection_closed", where=lambda e: e["reason"] == "kicked")
    config.write_text("max_clients = 5\n")
    ok(ctl(sock, "reload"))

    text, after = scrape(port)
    assert value(after, "echod_connections_active") == 0
    assert value(after, "echod_connections_accepted_total") == 3
    assert value(after, "echod_connections_refused_total", reason="server_full") == 1
    assert value(after, "echod_connections_refused_total", reason="access_denied") == 1
    assert value(after, "echod_connections_refused_total", reason="out_of_threads") == 0
    closed = {
        labels[0][1]: n
        for (name, labels), n in after.items()
        if name == "echod_connections_closed_total" and n
    }
    assert closed == {"exit": 1, "eof": 1, "kicked": 1}
    assert value(after, "echod_bytes_received_total") == 11 + 3 + 3
    # The denied client's ERR line was sent too (it had a connection, unlike a full server's).
    assert value(after, "echod_bytes_sent_total") == 6 + 4 + 18 + 3 + 3 + 2 * 16
    assert value(after, "echod_lines_received_total") == 3 + 1 + 1  # exit is no echoed line
    assert value(after, "echod_lines_sent_total") == 4 + 1 + 1 + 1 + 2
    assert value(after, "echod_operator_messages_total") == 2
    assert value(after, "echod_connection_duration_seconds_count") == 3
    assert value(after, "echod_connection_duration_seconds_bucket", le="+Inf") == 3
    assert 0 < value(after, "echod_connection_duration_seconds_sum") < 3 * TIMEOUT
    assert value(after, "echod_max_clients") == 5  # the reloaded setting
    assert value(after, "echod_build_info", version=__version__) == 1
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "process_open_fds") > 0
    # No per-client label anywhere: only reasons, buckets and the version.
    labels = {key for name, lbls in after if name.startswith("echod_") for key, _ in lbls}
    assert labels == {"reason", "le", "version"}
    assert "peer" not in text and "client=" not in text


def test_bad_metrics_addresses_are_one_sentence(tmp_path: Path) -> None:
    def start(listen: str) -> subprocess.CompletedProcess[str]:
        flags = ["--foreground", "--port", "0", "--control-socket", "none"]
        return echod_command(*flags, "--metrics-listen", listen)

    bad = start("9100")
    assert (bad.returncode, bad.stderr) == (
        2,
        "echod: argument --metrics-listen: '9100' is not HOST:PORT (such as 127.0.0.1:9100)"
        " (see 'echod --help')\n",
    )
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        taken = start(f"127.0.0.1:{port}")
    assert taken.returncode == 1
    assert taken.stderr == (
        f"echod: --metrics-listen: cannot listen on 127.0.0.1:{port}: "
        "the address is already in use\n"
    )
