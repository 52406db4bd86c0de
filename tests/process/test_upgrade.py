"""``echod ctl upgrade`` / SIGUSR2 with real echod processes and real clients.

Every test starts a real ``echod``, connects real TCP clients on loopback,
upgrades it, and checks what each client gets, byte for byte, from the old
process and then from the new one; plus the failure path (a broken
successor), two upgrades in a row, a detached echod (pidfile, ``echod
status``/``stop``) and the systemd notifications. The successors are started
by the echod under test; the teardown ends them by the pid ``upgrade_done``
named.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from echod.pidfile import is_alive
from tests.helpers import ROOT, TIMEOUT, Client, EchodProcess, Samples, scrape, value, wait_for

pytestmark = pytest.mark.timeout(120)

UPGRADE_RE = re.compile(r"OK upgraded pid (\d+) -> (\d+)")


def run_echod(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Done:
    proc = subprocess.run(
        [sys.executable, "-m", "echod", *args],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    return Done(proc.returncode, proc.stdout, proc.stderr)


class Done:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err


def ctl(sock: Path, *args: str) -> Done:
    return run_echod("ctl", "--control-socket", str(sock), *args)


class Upgrades:
    """Starts echod, upgrades it, and ends every process it started at teardown."""

    def __init__(self, ctl_dir: Path) -> None:
        self.sock = ctl_dir / "run" / "control.sock"
        self.procs: list[EchodProcess] = []
        self.pids: set[int] = set()

    def start(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> EchodProcess:
        proc = EchodProcess(
            [
                "--foreground",
                "--port",
                "0",
                "--control-socket",
                str(self.sock),
                "--log-format",
                "json",
                *args,
            ],
            env=env,
            cwd=cwd,
        )
        self.procs.append(proc)
        return proc

    def upgrade(self) -> tuple[int, int]:
        done = ctl(self.sock, "upgrade")
        assert done.status == 0, done.err
        match = UPGRADE_RE.fullmatch(done.out.strip())
        assert match, done.out
        old, new = int(match.group(1)), int(match.group(2))
        self.pids.add(new)
        return old, new

    def list_ids(self) -> list[int]:
        done = ctl(self.sock, "list")
        assert done.status == 0, done.err
        return [int(m) for m in re.findall(r"^id=(\d+) ", done.out, re.M)]

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        for pid in self.pids:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def upgrades(ctl_dir: Path) -> Iterator[Upgrades]:
    ups = Upgrades(ctl_dir)
    yield ups
    ups.close()


def fill(client: Client, lines: int) -> bytes:
    """Send ``lines`` long lines without reading (a thread: it blocks once echod stalls)."""
    data = b"".join(b"%06d " % i + b"y" * 1000 + b"\n" for i in range(lines))
    threading.Thread(target=client.sock.sendall, args=(data,), daemon=True).start()
    return data


def test_upgrade_hands_over_idle_mid_line_and_slow_clients(upgrades: Upgrades) -> None:
    old = upgrades.start("--send-timeout", "60", "--line-timeout", "60")
    idle = [Client(old.port) for _ in range(5)]
    for i, c in enumerate(idle):
        assert c.roundtrip(b"idle %d\n" % i) == b"idle %d\n" % i
    mid = [Client(old.port) for _ in range(5)]
    for i, c in enumerate(mid):
        c.send(b"begun %d, " % i)
    slow = [Client(old.port, rcvbuf=4096) for _ in range(3)]
    sent = [fill(c, 3000) for c in slow]  # ~3 MB each: more than the kernel buffers hold
    ids = wait_for(lambda: (lambda ids: ids if len(ids) == 13 else None)(upgrades.list_ids()))
    before = ctl(upgrades.sock, "list").out

    old_pid, new_pid = upgrades.upgrade()
    assert old_pid == old.pid and new_pid != old.pid
    assert old.proc.wait(TIMEOUT) == 0  # the old echod exits once the new one serves
    done = old.wait_event("upgrade_done")
    assert done["pid"] == new_pid and done["clients"] == 13 and done["pause"] < 10

    assert upgrades.list_ids() == ids
    after = ctl(upgrades.sock, "list").out
    for row in before.splitlines()[1:4]:  # the idle ones: the same counters
        cid = row.split()[0]
        assert re.search(rf"^{cid} .*lines_in=1 ", after, re.M), (row, after)
    for i, c in enumerate(idle):
        assert c.roundtrip(b"again %d\n" % i) == b"again %d\n" % i
    for i, c in enumerate(mid):
        c.send(b"ended\n")
        assert c.readline() == b"begun %d, ended\n" % i
    for c, data in zip(slow, sent, strict=True):
        assert c.read_exactly(len(data)) == data  # queued before, delivered after, once
        assert c.roundtrip(b"awake\n") == b"awake\n"
    assert Client(old.port).roundtrip(b"newcomer\n") == b"newcomer\n"


def test_chat_relays_arrive_exactly_once_across_an_upgrade(upgrades: Upgrades) -> None:
    old = upgrades.start("--chat")
    talker = Client(old.port)
    listeners = [Client(old.port) for _ in range(8)]
    wait_for(lambda: len(upgrades.list_ids()) == 9)
    lines = 300
    stop = threading.Event()

    def talk() -> None:
        for i in range(lines):
            assert talker.roundtrip(b"line %d\n" % i) == b"line %d\n" % i
            if i == lines // 3:
                started.set()
            if stop.is_set():
                return

    started = threading.Event()
    thread = threading.Thread(target=talk, daemon=True)
    thread.start()
    started.wait(TIMEOUT)
    upgrades.upgrade()  # while the talker talks
    thread.join(60)
    stop.set()
    assert not thread.is_alive()
    expected = b"".join(b"client 1: line %d\n" % i for i in range(lines))
    for c in listeners:
        assert c.read_exactly(len(expected)) == expected
    old.proc.wait(TIMEOUT)


def _broken_copy(tmp_path: Path) -> Path:
    """A copy of the echod package, importable with PYTHONPATH, to break later."""
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "echod", pkg / "echod")
    return pkg


def test_a_successor_that_cannot_start_leaves_the_old_one_serving(
    upgrades: Upgrades, tmp_path: Path
) -> None:
    pkg = _broken_copy(tmp_path)
    env = {"PYTHONPATH": str(pkg)}
    old = upgrades.start("--line-timeout", "60", env=env, cwd=tmp_path)
    client = Client(old.port)
    assert client.roundtrip(b"before\n") == b"before\n"
    client.send(b"half ")
    # The install is broken after echod started: the next start cannot import it.
    (pkg / "echod" / "handover.py").write_text("def broken(:\n")
    done = run_echod("ctl", "--control-socket", str(upgrades.sock), "upgrade", cwd=tmp_path)
    assert done.status == 1
    assert done.err.startswith("ERR upgrade failed: SyntaxError"), done.err
    failed = old.wait_event("upgrade_failed")
    assert "SyntaxError" in failed["detail"]
    client.send(b"line\n")
    assert client.readline() == b"half line\n"
    assert client.roundtrip(b"still here\n") == b"still here\n"
    assert Client(old.port).roundtrip(b"new client\n") == b"new client\n"
    assert old.proc.poll() is None


def test_a_config_file_made_invalid_fails_the_upgrade_and_changes_nothing(
    upgrades: Upgrades, tmp_path: Path
) -> None:
    """The new echod reads the same --config; broken just before, it refuses to start,
    and its own sentence is the answer."""
    config = tmp_path / "echod.toml"
    config.write_text("max_clients = 50\n")
    old = upgrades.start("--config", str(config))
    client = Client(old.port)
    assert client.roundtrip(b"before\n") == b"before\n"
    config.write_text("max_clients = 0\n")
    done = ctl(upgrades.sock, "upgrade")
    assert done.status == 1
    assert done.err.startswith(f"ERR upgrade failed: config file {config}"), done.err
    assert "max_clients" in done.err, done.err
    assert client.roundtrip(b"unharmed\n") == b"unharmed\n"
    assert old.wait_event("upgrade_failed")["detail"] in done.err
    config.write_text("max_clients = 60\n")  # fixed: the next upgrade works
    upgrades.upgrade()
    assert client.roundtrip(b"after\n") == b"after\n"
    assert "max_clients=60" in ctl(upgrades.sock, "stats").out


def test_two_upgrades_in_a_row_and_sigusr2(upgrades: Upgrades) -> None:
    old = upgrades.start()
    clients = [Client(old.port) for _ in range(10)]
    for c in clients:
        assert c.roundtrip(b"0\n") == b"0\n"
    ids = upgrades.list_ids()
    _, first = upgrades.upgrade()
    for c in clients:
        assert c.roundtrip(b"1\n") == b"1\n"
    first_old, second = upgrades.upgrade()
    assert first_old == first
    for c in clients:
        assert c.roundtrip(b"2\n") == b"2\n"
    os.kill(second, signal.SIGUSR2)  # as nginx and gunicorn do it
    third = int(
        old.wait_event("upgrade_done", where=lambda e: e["pid"] not in (first, second), timeout=90)[
            "pid"
        ]
    )
    upgrades.pids.add(third)
    wait_for(lambda: not is_alive(second), timeout=30)
    for c in clients:
        assert c.roundtrip(b"3\n") == b"3\n"
    assert upgrades.list_ids() == ids
    stats = ctl(upgrades.sock, "stats").out
    assert "total_accepted=10" in stats and "lines_in=40" in stats, stats
    assert ctl(upgrades.sock, "shutdown").status == 0
    wait_for(lambda: not is_alive(third), timeout=30)


def test_refusal_close_and_duration_counters_carry_over(upgrades: Upgrades) -> None:
    # The counters of connections that ended before the upgrade: metrics and /stats.
    old = upgrades.start("--metrics-listen", "127.0.0.1:0", "--deny", "127.0.0.9")
    port = int(old.wait_event("metrics_listening")["port"])
    for _ in range(3):
        c = Client(old.port)
        c.send(b"exit\n")
        assert c.readline() == b"bye\n"
        c.close()
    denied = Client(old.port, source="127.0.0.9")
    assert denied.readline() == b"ERR access denied\n"
    denied.close()
    held = Client(old.port)
    assert held.roundtrip(b"held\n") == b"held\n"

    def ended(samples: Samples) -> tuple[float, ...]:
        return (
            value(samples, "echod_connections_closed_total", reason="exit"),
            value(samples, "echod_connections_refused_total", reason="access_denied"),
            value(samples, "echod_connection_duration_seconds_count"),
            value(samples, "echod_connections_accepted_total"),
        )

    wait_for(lambda: ended(scrape(port)[1]) == (3, 1, 3, 4), what="the counts before")
    upgrades.upgrade()
    assert held.roundtrip(b"still\n") == b"still\n"  # served by the successor now
    assert ended(scrape(port)[1]) == (3, 1, 3, 4)  # the same port, the successor's counts
    assert "refused_access_denied=1\n" in ctl(upgrades.sock, "stats").out
    held.send(b"exit\n")
    assert held.readline() == b"bye\n"
    wait_for(lambda: ended(scrape(port)[1]) == (4, 1, 4, 4), what="the successor counting on")


def test_detached_upgrade_then_status_and_stop(upgrades: Upgrades, tmp_path: Path) -> None:
    pidfile = tmp_path / "echod.pid"
    log = tmp_path / "echod.log"
    started = run_echod(
        "--port",
        "0",
        "--pidfile",
        str(pidfile),
        "--log-file",
        str(log),
        "--control-socket",
        str(upgrades.sock),
    )
    assert started.status == 0, started.err
    match = re.search(r":(\d+) \(pid (\d+)\)", started.out)
    assert match, started.out
    port, old_pid = int(match.group(1)), int(match.group(2))
    upgrades.pids.add(old_pid)
    client = Client(port)
    assert client.roundtrip(b"before\n") == b"before\n"
    old, new = upgrades.upgrade()
    assert old == old_pid
    wait_for(lambda: not is_alive(old_pid), timeout=30)
    assert pidfile.read_text().strip() == str(new)
    status = run_echod("status", "--pidfile", str(pidfile))
    assert status.status == 0 and f"pid {new}" in status.out, (status.out, status.err)
    assert client.roundtrip(b"after\n") == b"after\n"
    stopped = run_echod("stop", "--pidfile", str(pidfile))
    assert stopped.status == 0 and f"pid {new}" in stopped.out, stopped.err
    assert not is_alive(new)
    assert client.read_all() == b"Server shutting down\n"
    assert not pidfile.exists()
    assert not upgrades.sock.exists()
    text = log.read_text()
    assert '"upgrade_done"' in text and f'"upgraded_from": {old_pid}' in text


class Notify:
    """A stand-in for systemd's notify socket that records who sent what (SO_PASSCRED)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.got: list[tuple[int, str]] = []

    def wait(self, wanted: Callable[[int, str], bool], what: str) -> tuple[int, str]:
        deadline = time.monotonic() + 60
        while True:
            for pid, line in self.got:
                if wanted(pid, line):
                    return pid, line
            left = deadline - time.monotonic()
            assert left > 0, f"no {what}; got {self.got}"
            self.sock.settimeout(left)
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(
                struct.unpack("3i", raw)[0]
                for level, kind, raw in anc
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            self.got += [(pid, line) for line in data.decode().split("\n")]


def test_systemd_main_pid_follows_the_upgrade(upgrades: Upgrades, ctl_dir: Path) -> None:
    """O, still the main pid, names S (NotifyAccess=main suffices); then S says READY=1."""
    notify = Notify(ctl_dir / "notify")
    old = upgrades.start(env={"NOTIFY_SOCKET": str(notify.path)})
    notify.wait(lambda pid, line: pid == old.pid and line == "READY=1", "READY=1 from the old")
    _, new = upgrades.upgrade()
    main = notify.wait(lambda pid, line: line.startswith("MAINPID="), "MAINPID=")
    assert main == (old.pid, f"MAINPID={new}")
    ready = notify.wait(lambda pid, line: pid == new and line == "READY=1", "READY=1 from S")
    assert notify.got.index(main) < notify.got.index(ready)
    assert (old.pid, "STOPPING=1") not in notify.got  # the service does not stop
    notify.sock.close()


def test_proxy_clients_keep_their_address_and_count_towards_their_limit(
    upgrades: Upgrades,
) -> None:
    """PROXY-header clients: the new echod knows them by the address the header named,
    does not read a header again, and counts them towards --max-per-source."""
    old = upgrades.start(
        *("--proxy-protocol", "v1", "--proxy-trusted", "127.0.0.0/8", "--max-per-source", "1")
    )
    client = Client(old.port)
    assert client.roundtrip(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7878\r\nhi\n") == b"hi\n"
    listed = ctl(upgrades.sock, "list").out
    assert "addr=192.0.2.7:5555" in listed, listed
    upgrades.upgrade()
    listed = ctl(upgrades.sock, "list").out
    assert "addr=192.0.2.7:5555" in listed and "via=127.0.0.1:" in listed, listed
    # The line after the upgrade is a line, not a PROXY header read again.
    assert client.roundtrip(b"after\n") == b"after\n"
    # The same source again: over its limit of one, counted in the new echod.
    second = Client(old.port)
    second.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5556 7878\r\n")
    assert second.readline() == b"ERR too many connections from your address (max 1)\n"
