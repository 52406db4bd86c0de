"""The systemd units in systemd/ and echod's behaviour under them.

Static checks (need only ``systemd-analyze``, no running systemd):

- ``systemd-analyze verify`` must print nothing at all. verify checks that
  ExecStart's binary exists and is executable, so the units are verified as
  copies in tmp_path whose ``/usr/local/bin/echod`` is rewritten, when that
  file does not exist, to ``shutil.which("echod")`` or else to a stub script
  in tmp_path; nothing else is changed (asserted). ``--man=no``, as in
  docs/deploy.md: verify would otherwise run ``man`` for the ``man:`` links
  in Documentation= and fail wherever systemd's man pages are missing.
- ``systemd-analyze security --offline=true`` must rate the service at an
  overall exposure of at most 2.0.

Process checks run ``python -m echod`` from this checkout the way the units
would run it: the service's exact ExecStart (with ``$ECHOD_OPTS`` expanded as
systemd does), ``$NOTIFY_SOCKET`` pointing at a datagram socket owned by the
test, and, for socket activation, a listening socket moved to fd 3 with
``LISTEN_PID`` equal to echod's pid (a small wrapper dup2()s and exec()s,
which keeps the pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from echod.config import Settings
from tests.helpers import ACTIVATE_WRAPPER, LineReader

REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO_ROOT / "systemd"
SERVICE = UNIT_DIR / "echod.service"
SOCKET = UNIT_DIR / "echod.socket"
LOGROTATE = UNIT_DIR / "echod.logrotate"
UNIT_ECHOD = "/usr/local/bin/echod"
UNIT_CONFIG = "/etc/echod/echod.toml"  # where docs/deploy.md installs systemd/echod.toml
UNIT_CONTROL = "/run/echod/control.sock"
MAX_EXPOSURE = 2.0

ANALYZE_TIMEOUT = 60.0
START_TIMEOUT = 20.0  # until READY=1 / the listening event
EVENT_TIMEOUT = 10.0
EXIT_TIMEOUT = 30.0  # echod's own shutdown deadline is 5 s

pytestmark = pytest.mark.timeout(120)


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return path


def _analyze_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0", LC_ALL="C.UTF-8")
    return env


def _unit_values(text: str, key: str) -> list[str]:
    """All values of ``key=`` in a unit file (no line continuations used)."""
    values = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(f"{key}="):
            values.append(line[len(key) + 1 :])
    return values


def _unit_value(text: str, key: str) -> str:
    values = _unit_values(text, key)
    assert len(values) == 1, f"expected exactly one {key}= line, got {values}"
    return values[0]


# ------------------------------------------------------------ static checks


def _verify_copies(tmp_path: Path) -> tuple[Path, Path]:
    """Copy the units to tmp_path with a resolvable ExecStart binary."""
    units = tmp_path / "units"
    units.mkdir()
    replacement = UNIT_ECHOD
    if not os.access(UNIT_ECHOD, os.X_OK):
        found = shutil.which("echod")
        if found is None:
            stub = tmp_path / "bin" / "echod"
            stub.parent.mkdir()
            stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m echod "$@"\n')
            stub.chmod(0o755)
            found = str(stub)
        replacement = found
    original = SERVICE.read_text()
    assert original.count(UNIT_ECHOD) == 2  # ExecStart=, ExecReload=
    service = units / "echod.service"
    service.write_text(original.replace(UNIT_ECHOD, replacement))
    socket_unit = units / "echod.socket"
    socket_unit.write_text(SOCKET.read_text())
    for unit in (service, socket_unit):
        unit.chmod(0o644)  # verify warns about executable/world-writable units
    return service, socket_unit


def _run_verify(analyze: str, *units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        env=_analyze_env(),
        check=False,
    )


def test_verify_prints_nothing(tmp_path: Path) -> None:
    analyze = _analyze()
    service, socket_unit = _verify_copies(tmp_path)
    proc = _run_verify(analyze, service, socket_unit)
    assert (proc.stdout, proc.stderr) == ("", ""), proc.stdout + proc.stderr
    assert proc.returncode == 0


def test_verify_would_complain(tmp_path: Path) -> None:
    """The check above is not vacuous: verify reports unit problems here
    (with exit status 0, hence the assertion on the output)."""
    analyze = _analyze()
    service, socket_unit = _verify_copies(tmp_path)
    service.write_text(service.read_text().replace("UMask=0077", "UMask=0077\nProtectSytem=full"))
    proc = _run_verify(analyze, service, socket_unit)
    assert "ProtectSytem" in proc.stdout + proc.stderr


def test_security_exposure(tmp_path: Path) -> None:
    analyze = _analyze()
    proc = subprocess.run(
        [analyze, "security", "--no-pager", "--offline=true", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        env=_analyze_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(
        r"Overall exposure level for echod\.service:\s*([0-9]+(?:\.[0-9]+)?)", proc.stdout
    )
    assert match, proc.stdout + proc.stderr
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, proc.stdout


def test_service_unit_requirements() -> None:
    text = SERVICE.read_text()
    assert _unit_value(text, "Type") == "notify"
    assert _unit_value(text, "ExecStart") == (
        f"{UNIT_ECHOD} --foreground --config {UNIT_CONFIG} --control-socket {UNIT_CONTROL} "
        "$ECHOD_OPTS"
    )
    # ctl exits 1 on ERR, so a broken config file makes `systemctl reload` fail.
    assert _unit_value(text, "ExecReload") == (
        f"{UNIT_ECHOD} ctl --control-socket {UNIT_CONTROL} reload"
    )
    assert _unit_value(text, "EnvironmentFile") == "-/etc/default/echod"
    assert _unit_value(text, "Restart") == "on-failure"
    # Bad flags (exit 2) fail at once; other failures hit the start limit
    # before its interval is over, so the unit ends `failed`.
    assert _unit_value(text, "RestartPreventExitStatus") == "2"
    burst = int(_unit_value(text, "StartLimitBurst"))
    restart_sec = int(_unit_value(text, "RestartSec").rstrip("s"))
    assert 1 < burst * restart_sec < int(_unit_value(text, "StartLimitIntervalSec").rstrip("s"))
    assert int(_unit_value(text, "WatchdogSec").rstrip("s")) >= 4  # 4 janitor rounds
    assert _unit_value(text, "RuntimeDirectory") == "echod"
    assert _unit_value(text, "DynamicUser") == "yes"
    assert _unit_value(text, "CapabilityBoundingSet") == ""
    stop = _unit_value(text, "TimeoutStopSec")
    assert re.fullmatch(r"\d+s?", stop) and int(stop.rstrip("s")) > 5  # > --shutdown-timeout
    assert int(_unit_value(text, "LimitNOFILE")) >= 1100  # 1000 clients + headroom
    assert int(_unit_value(text, "TasksMax")) >= 1100  # 1000 threads + headroom
    families = _unit_value(text, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    socket_text = SOCKET.read_text()
    assert _unit_value(socket_text, "Accept") == "no"
    assert int(_unit_value(socket_text, "Backlog")) == Settings().backlog
    assert _unit_value(socket_text, "ListenStream").rsplit(":", 1)[-1] == "7878"


# ------------------------------------------------------------------ logrotate


def _postrotate(pidfile: Path) -> str:
    text = LOGROTATE.read_text()
    match = re.search(r"^\s*postrotate\n(.*?)^\s*endscript", text, re.S | re.M)
    assert match, "no postrotate script"
    script = match.group(1)
    assert "/run/echod/echod.pid" in script
    return script.replace("/run/echod/echod.pid", str(pidfile))


_HUP_CATCHER = r"""
import signal, sys, time
signal.signal(signal.SIGHUP, lambda *a: (print("HUP", flush=True), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
"""


def test_logrotate_postrotate_sends_hup(tmp_path: Path) -> None:
    assert "/var/log/echod/echod.log {" in LOGROTATE.read_text()
    assert "copytruncate" not in LOGROTATE.read_text().split("{", 1)[1]
    pidfile = tmp_path / "echod.pid"
    # A stand-in daemon whose command line mentions echod, like the real one.
    proc = subprocess.Popen(
        [sys.executable, "-c", _HUP_CATCHER, "echod-stand-in"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        out = LineReader.of_pipe(proc.stdout, EVENT_TIMEOUT)
        assert out.readline() == b"ready\n"
        pidfile.write_text(f"{proc.pid}\n")
        subprocess.run(["sh", "-ec", _postrotate(pidfile)], timeout=EVENT_TIMEOUT, check=True)
        assert out.readline() == b"HUP\n"
        assert proc.wait(timeout=EVENT_TIMEOUT) == 0
    finally:
        _kill(proc)


def test_logrotate_postrotate_spares_others(tmp_path: Path) -> None:
    pidfile = tmp_path / "echod.pid"
    script = _postrotate(pidfile)
    # No pidfile, garbage, and a stale pid now used by some other program.
    subprocess.run(["sh", "-ec", script], timeout=EVENT_TIMEOUT, check=True)
    pidfile.write_text("not-a-pid\n")
    subprocess.run(["sh", "-ec", script], timeout=EVENT_TIMEOUT, check=True)
    other = subprocess.Popen(["sleep", "60"])  # SIGHUP would kill it
    try:
        pidfile.write_text(f"{other.pid}\n")
        subprocess.run(["sh", "-ec", script], timeout=EVENT_TIMEOUT, check=True)
        time.sleep(0.3)
        assert other.poll() is None
    finally:
        _kill(other)


def test_logrotate_config_parses(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate")
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    log = tmp_path / "echod.log"
    log.write_text("x\n")
    conf = tmp_path / "echod.conf"
    conf.write_text(
        LOGROTATE.read_text()
        .replace("/var/log/echod/echod.log", str(log))
        .replace("/run/echod/echod.pid", str(tmp_path / "echod.pid"))
    )
    proc = subprocess.run(
        [logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


# ------------------------------------------------------------ process checks


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for name in (
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "ECHOD_OPTS",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def echod_cmd() -> list[str]:
    """How to run this checkout's echod; skips while the CLI has not landed."""
    probe = subprocess.run(
        [sys.executable, "-c", "import echod.cli"],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        check=False,
    )
    if probe.returncode != 0 and "No module named 'echod.cli'" in probe.stderr:
        pytest.skip("echod.cli does not exist yet")
    assert probe.returncode == 0, probe.stderr
    return [sys.executable, "-m", "echod"]


def _exec_start_argv(
    unit_text: str, env: dict[str, str], key: str = "ExecStart", files: dict[str, str] | None = None
) -> list[str]:
    """ExecStart= (or ``key``) as systemd would exec it: ``$VAR`` alone in a word
    is split on whitespace, ``${VAR}`` is substituted as one word. ``files``
    maps the unit's installed paths to where they are here (default: the
    config file is the shipped systemd/echod.toml)."""
    files = {UNIT_CONFIG: str(UNIT_DIR / "echod.toml")} if files is None else files
    command = _unit_value(unit_text, key)
    for installed, here in files.items():
        command = command.replace(installed, here)
    assert not command.endswith("\\"), "line continuations are not handled"
    command = command.lstrip("-@:+!")
    assert "%" not in command, "specifiers are not handled"
    argv: list[str] = []
    for word in shlex.split(command):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv.extend(env.get(alone.group(1), "").split())
        else:
            argv.append(
                re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)
            )
    return argv


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=EXIT_TIMEOUT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _echo(port: int, line: bytes = b"hello from systemd test\n") -> socket.socket:
    """Connect, check one echoed line, return the still-open connection."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT)
    try:
        conn.sendall(line)
        assert LineReader.of_socket(conn, EVENT_TIMEOUT).readline() == line
    except BaseException:
        conn.close()
        raise
    return conn


class Notifications:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, directory: Path) -> None:
        self._tmpdir: str | None = None
        if len(str(directory)) > 80:  # sun_path holds 107 bytes
            self._tmpdir = tempfile.mkdtemp(prefix="echod-notify-")
            directory = Path(self._tmpdir)
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[str] = []  # one entry per assignment line

    def wait_for(self, wanted: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        for line in self.received:
            if wanted(line):
                return line
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout} s; got {self.received}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode("utf-8", "replace").split("\n")
            self.received.extend(lines)
            for line in lines:
                if wanted(line):
                    return line

    def close(self) -> None:
        self.sock.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    n = Notifications(tmp_path)
    try:
        yield n
    finally:
        n.close()


class Echod:
    """An echod child process whose stderr log events are collected."""

    def __init__(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()):
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,  # as under systemd: not a TTY, no console
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=pass_fds,
        )
        self.stderr: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.stderr.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._events.put(event)

    def event(self, name: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {name!r} event within {timeout} s:\n{self.output()}")
            try:
                event = self._events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"echod exited ({self.proc.returncode}):\n{self.output()}")
                continue
            if event.get("event") == name:
                return event

    def output(self) -> str:
        return "".join(self.stderr)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"echod did not exit within {EXIT_TIMEOUT} s of SIGTERM")

    def kill(self) -> None:
        _kill(self.proc)
        self._reader.join(timeout=EVENT_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process holds listening sockets for (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.timeout(120)
def test_ready_status_stopping(echod_cmd: list[str], notifications: Notifications) -> None:
    """Run the unit's exact ExecStart under a fake notify socket.

    The port is chosen before the start (the instant between closing the
    probe and echod binding it is the only race), so that the connection can
    be made the moment READY=1 arrives, proving READY=1 is not early.
    """
    port = _free_port()
    opts = f"--port {port} --control-socket none"  # later flags win
    env = _child_env()
    env["ECHOD_OPTS"] = opts
    env["NOTIFY_SOCKET"] = notifications.path
    argv = _exec_start_argv(SERVICE.read_text(), env)
    assert argv[0] == UNIT_ECHOD
    assert argv[-4:] == opts.split()
    echod = Echod([*echod_cmd, *argv[1:]], env)
    try:
        notifications.wait_for(lambda m: m == "READY=1", START_TIMEOUT, "READY=1")
        # The status line is there from the start, before any client changes the count.
        notifications.wait_for(lambda m: m == "STATUS=0 clients", EVENT_TIMEOUT, "STATUS=0")
        conn = _echo(port)  # no retry: the port must be serving already
        try:
            event = echod.event("listening", EVENT_TIMEOUT)
            assert event["port"] == port
            assert event["host"] == "127.0.0.1"
            notifications.wait_for(
                lambda m: re.fullmatch(r"STATUS=1 clients?", m) is not None,
                EVENT_TIMEOUT,
                "STATUS=1 clients",
            )
        finally:
            conn.close()
        notifications.wait_for(
            lambda m: re.fullmatch(r"STATUS=0 clients?", m) is not None,
            EVENT_TIMEOUT,
            "STATUS=0 clients",
        )
        assert echod.terminate() == 0, echod.output()
        notifications.wait_for(lambda m: m == "STOPPING=1", EVENT_TIMEOUT, "STOPPING=1")
        assert notifications.received.count("READY=1") == 1
    finally:
        echod.kill()


@pytest.mark.timeout(120)
def test_exec_reload_applies_the_file_and_fails_on_a_broken_one(
    echod_cmd: list[str], tmp_path: Path, ctl_dir: Path
) -> None:
    """ExecReload= exactly as the unit has it, against the unit's ExecStart."""
    config = tmp_path / "echod.toml"
    shutil.copy(UNIT_DIR / "echod.toml", config)
    files = {UNIT_CONFIG: str(config), UNIT_CONTROL: str(ctl_dir / "control.sock")}
    env = _child_env()
    env["ECHOD_OPTS"] = "--port 0"
    unit = SERVICE.read_text()
    echod = Echod([*echod_cmd, *_exec_start_argv(unit, env, files=files)[1:]], env)
    reload = [*echod_cmd, *_exec_start_argv(unit, env, "ExecReload", files)[1:]]
    try:
        echod.event("listening")
        config.write_text("max_clients = 3\n")
        done = subprocess.run(reload, capture_output=True, text=True, env=env, timeout=30)
        assert (done.returncode, done.stdout) == (0, "OK reloaded\n"), done.stderr
        assert echod.event("config_reloaded", EVENT_TIMEOUT)["changed"] == ["max_clients"]
        config.write_text("max_clients = -3\n")
        done = subprocess.run(reload, capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 1
        assert done.stderr == (
            f"ERR config file {config}, key max_clients: -3 is out of range (must be at least 1)\n"
        )
        assert echod.event("config_reload_failed", EVENT_TIMEOUT)["trigger"] == "operator"
        assert echod.terminate() == 0, echod.output()
    finally:
        echod.kill()


@pytest.mark.timeout(120)
def test_watchdog_pings_under_execstart(echod_cmd: list[str], notifications: Notifications) -> None:
    """With $WATCHDOG_USEC (WatchdogSec=), WATCHDOG=1 comes at half the interval."""
    env = _child_env()
    env.update(
        ECHOD_OPTS="--port 0 --control-socket none",
        NOTIFY_SOCKET=notifications.path,
        WATCHDOG_USEC="600000",  # pings every 0.3 s
    )
    argv = _exec_start_argv(SERVICE.read_text(), env)
    echod = Echod([*echod_cmd, *argv[1:]], env)
    try:
        notifications.wait_for(lambda m: m == "READY=1", START_TIMEOUT, "READY=1")
        notifications.wait_for(
            lambda _: notifications.received.count("WATCHDOG=1") >= 3,
            EVENT_TIMEOUT,
            "three WATCHDOG=1",
        )
        assert echod.terminate() == 0, echod.output()
    finally:
        echod.kill()


@pytest.fixture
def activation_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)  # systemd hands sockets over non-blocking
    try:
        yield sock
    finally:
        sock.close()


def _start_activated(
    echod_cmd: list[str], listener: socket.socket, listen_pid: str, env: dict[str, str], *extra: str
) -> Echod:
    fd = listener.fileno()
    argv = [
        sys.executable,
        "-c",
        ACTIVATE_WRAPPER,
        str(fd),
        listen_pid,
        *echod_cmd,
        "--foreground",
        "--log-format",
        "json",
        "--control-socket",
        "none",
        "--port",
        "0",  # were echod to bind its own port, the test would see another one
        *extra,
    ]
    return Echod(argv, env, pass_fds=(fd,))


def _listen_backlog(port: int) -> int | None:
    """The kernel's backlog of the listening socket on ``port`` (ss: Send-Q), if ss exists."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    out = subprocess.run(
        [ss, "-Hltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT,
        check=True,
    ).stdout.split()
    return int(out[2])


@pytest.mark.timeout(120)
def test_socket_activation_serves_fd3(
    echod_cmd: list[str], activation_socket: socket.socket, notifications: Notifications
) -> None:
    port = activation_socket.getsockname()[1]
    env = _child_env()
    env["NOTIFY_SOCKET"] = notifications.path
    assert _listen_backlog(port) in (128, None)  # as the fixture listens
    echod = _start_activated(echod_cmd, activation_socket, "self", env, "--backlog", "77")
    activation_socket.close()  # echod holds the only copy now
    try:
        event = echod.event("listening")
        assert event["port"] == port, "echod bound a port instead of serving fd 3"
        assert event.get("socket_activated", True) is True
        notifications.wait_for(lambda m: m == "READY=1", START_TIMEOUT, "READY=1")
        _echo(port).close()
        assert _listening_ports(echod.proc.pid) == {port}
        assert _listen_backlog(port) in (77, None)  # echod's --backlog, not the passer's
        assert echod.terminate() == 0, echod.output()
    finally:
        echod.kill()


@pytest.mark.timeout(120)
def test_socket_activation_ignored_for_other_pid(
    echod_cmd: list[str], activation_socket: socket.socket
) -> None:
    """LISTEN_PID names another process: echod must not take fd 3 but bind
    its own port (here --port 0, so some other port)."""
    passed = activation_socket.getsockname()[1]
    echod = _start_activated(echod_cmd, activation_socket, "1", _child_env())
    try:
        event = echod.event("listening")
        assert event["port"] != passed
        assert event.get("socket_activated", False) is False
        _echo(event["port"]).close()
        assert echod.terminate() == 0, echod.output()
    finally:
        echod.kill()
