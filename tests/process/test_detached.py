"""Detached mode: the real ``echod`` (no ``--foreground``), ``echod stop``, ``echod status``.

Every daemon starts on port 0 with its pidfile and log file in a temporary
directory and ``--control-socket none`` (unless the test is about the control
socket). The starting command is run with ``subprocess.run`` and pipes for
stdout/stderr: if the daemon kept any of them open the call could not return,
so every start also checks that the daemon let go of the caller's descriptors.
The port is read from the one line the command prints on success
(``echod listening on HOST:PORT (pid N)``) and checked against the log file's
``listening`` event.

No daemon outlives its test: the ``daemons`` fixture records every pid a start
reported and SIGKILLs, by pid, any still alive at teardown. A daemon that
exited can stay a zombie here (this machine's init does not reap orphans), so
"gone" means gone or zombie (:func:`echod.pidfile.is_alive`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from echod import protocol
from echod.daemonize import DaemonDied, wait_ready
from echod.errors import StartupError
from echod.pidfile import is_alive
from tests.helpers import ROOT, TIMEOUT, Client, LineReader, roundtrip_once, wait_for

START_TIMEOUT = 3 * TIMEOUT  # the command itself waits up to 30 s for readiness
STARTED = re.compile(r"^echod listening on (?P<host>\S+):(?P<port>\d+) \(pid (?P<pid>\d+)\)$")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def echod(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m echod ARGS`` to completion (umask 022); stdout/stderr captured."""
    kwargs.setdefault("umask", 0o022)
    return subprocess.run(
        [sys.executable, "-m", "echod", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
        **kwargs,
    )


def one_line(text: str) -> str:
    """The only line of ``text`` (one sentence, no traceback)."""
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


def events(log: Path) -> list[dict[str, Any]]:
    """Every line of the log file, each parsed as one JSON object."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def wait_event(
    log: Path, name: str, where: Callable[[dict[str, Any]], bool] = lambda e: True
) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((e for e in events(log) if e["event"] == name and where(e)), None)

    found: dict[str, Any] = wait_for(find, what=f"{name!r} in {log}")
    return found


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of its fields."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def ppid_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat.rpartition(b")")[2].split()[1])


@dataclass
class Daemon:
    pid: int
    host: str
    port: int
    pidfile: Path
    log: Path
    stdout: str


class Daemons:
    """Starts detached echods; kills, by pid, whatever is left at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pids: list[int] = []

    def run(
        self, *args: str, pidfile: Path | None = None, log: Path | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """The start command with this test's defaults; records a reported pid."""
        base = [
            "--port",
            "0",
            "--control-socket",
            "none",
            "--pidfile",
            str(pidfile or self.dir / "echod.pid"),
            "--log-file",
            str(log or self.dir / "echod.log"),
        ]
        result = echod(*base, *args, **kwargs)
        match = STARTED.match(result.stdout.strip())
        if match:
            self.pids.append(int(match["pid"]))
        return result

    def start(
        self, *args: str, pidfile: Path | None = None, log: Path | None = None, **kwargs: Any
    ) -> Daemon:
        pidfile = pidfile or self.dir / "echod.pid"
        log = log or self.dir / "echod.log"
        result = self.run(*args, pidfile=pidfile, log=log, **kwargs)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        match = STARTED.match(one_line(result.stdout))
        assert match, result.stdout
        return Daemon(
            int(match["pid"]), match["host"], int(match["port"]), pidfile, log, result.stdout
        )

    def cleanup(self) -> None:
        for pid in self.pids:
            if is_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(map(is_alive, self.pids)), what=f"pids {self.pids} to be gone")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    running = Daemons(tmp_path)
    yield running
    running.cleanup()


# -- starting --------------------------------------------------------------------


def test_returns_only_once_serving_and_the_daemon_is_detached(daemons: Daemons) -> None:
    d = daemons.start()
    # No waiting, no retry: the command returned, so the port answers now.
    assert roundtrip_once(d.port) == b"ping\n"
    assert d.pidfile.read_text() == f"{d.pid}\n"
    assert d.pid != os.getpid()
    assert ppid_of(d.pid) != os.getpid()  # not our child: reparented after two forks
    assert os.getsid(d.pid) != os.getsid(0)  # its own session, so no controlling terminal
    assert os.getsid(d.pid) != d.pid  # and not its leader, so it can never get one
    assert proc_status(d.pid)["Umask"] == "0027"
    assert os.readlink(f"/proc/{d.pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{d.pid}/fd/{fd}") == "/dev/null"
    listening = wait_event(d.log, "listening")
    assert (listening["pid"], listening["port"]) == (d.pid, d.port)


def test_descriptors_inherited_from_the_caller_are_closed(daemons: Daemons) -> None:
    read_end, write_end = os.pipe()
    try:
        d = daemons.start(pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        # If the daemon still held the write end, this read would never see EOF.
        ready, _, _ = select.select([read_end], [], [], TIMEOUT)
        assert ready and os.read(read_end, 1) == b""
        inode = os.fstat(read_end).st_ino
        for name in os.listdir(f"/proc/{d.pid}/fd"):
            assert os.readlink(f"/proc/{d.pid}/fd/{name}") != f"pipe:[{inode}]"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_logs_json_lines_to_the_log_file(daemons: Daemons) -> None:
    d = daemons.start("--log-level", "debug")
    assert roundtrip_once(d.port) == b"ping\n"
    closed = wait_event(d.log, "connection_closed")
    assert closed["lines_in"] == 1
    lines = d.log.read_text().splitlines()
    assert lines and all(json.loads(line)["timestamp"] for line in lines)
    # Created before detaching, yet under the daemon's umask 027 (the caller's is 022).
    assert oct(d.log.stat().st_mode & 0o777) == oct(0o640)


def test_sighup_after_the_log_file_was_moved_opens_a_new_one(daemons: Daemons) -> None:
    d = daemons.start()
    wait_event(d.log, "listening")
    rotated = d.log.with_name("echod.log.1")
    d.log.rename(rotated)
    os.kill(d.pid, signal.SIGHUP)
    wait_event(d.log, "log_reopened")
    assert roundtrip_once(d.port) == b"ping\n"
    wait_event(d.log, "connection_closed")
    assert [e["event"] for e in events(rotated)] == ["listening"]
    assert oct(d.log.stat().st_mode & 0o777) == oct(0o640)  # created under umask 027


def test_sighup_reopens_the_log_then_reloads_a_relative_config_path(
    daemons: Daemons, tmp_path: Path
) -> None:
    # Relative on the command line: the daemon chdirs to /, so it must be made absolute.
    config = tmp_path / "echod.toml"
    config.write_text("max_clients = 4\n")
    d = daemons.start("--config", os.path.relpath(config, ROOT))
    assert wait_event(d.log, "listening")["max_clients"] == 4
    rotated = d.log.with_name("echod.log.1")
    d.log.rename(rotated)
    config.write_text("max_clients = 1\n")
    os.kill(d.pid, signal.SIGHUP)
    reloaded = wait_event(d.log, "config_reloaded")
    assert reloaded["changed"] == ["max_clients"]
    assert [e["event"] for e in events(d.log)][:2] == ["log_reopened", "config_reloaded"]
    held = Client(d.port)
    try:
        assert held.roundtrip(b"one\n") == b"one\n"
        assert roundtrip_once(d.port) == b"ERR server full (max 1 clients)\n"
    finally:
        held.close()


# A subreaper adopts the orphaned daemon, so its real exit status can be read.
SUBREAPER = r"""
import ctypes, json, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl failed")
r = subprocess.run([sys.executable, "-m", "echod", *sys.argv[1:]], capture_output=True,
                   text=True, stdin=subprocess.DEVNULL)
print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}), flush=True)
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_is_a_graceful_stop_with_exit_status_0(
    tmp_path: Path, daemons: Daemons, stop_signal: signal.Signals
) -> None:
    pidfile, log = tmp_path / "echod.pid", tmp_path / "echod.log"
    reaper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SUBREAPER,
            "--port",
            "0",
            "--control-socket",
            "none",
            "--pidfile",
            str(pidfile),
            "--log-file",
            str(log),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert reaper.stdout is not None
    lines = LineReader.of_pipe(reaper.stdout)
    try:
        started = json.loads(lines.readline(START_TIMEOUT))
        assert started["rc"] == 0, started["stderr"]
        match = STARTED.match(started["stdout"].strip())
        assert match
        pid, port = int(match["pid"]), int(match["port"])
        daemons.pids.append(pid)
        assert ppid_of(pid) == reaper.pid  # adopted by the subreaper
        client = Client(port)
        assert client.roundtrip(b"hi\n") == b"hi\n"
        os.kill(pid, stop_signal)
        assert client.read_all() == protocol.SHUTDOWN_NOTICE  # told, then closed
        client.close()
        while (reaped := json.loads(lines.readline()))["pid"] != pid:
            pass  # the intermediate processes of the double fork
        assert reaped == {"pid": pid, "exit": 0}
        reaper.wait(TIMEOUT)
        assert not pidfile.exists()
        assert wait_event(log, "stopped")["reason"] == stop_signal.name
        exited = wait_event(log, "exited")
        assert (exited["status"], exited["pidfile_removed"]) == (0, True)
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait(TIMEOUT)


def test_a_second_start_is_refused_while_one_runs(daemons: Daemons) -> None:
    d = daemons.start()
    second = daemons.run()
    assert second.returncode == 1
    assert second.stdout == ""
    assert one_line(second.stderr) == f"echod: already running (pid {d.pid})"
    assert d.pidfile.read_text() == f"{d.pid}\n"
    assert roundtrip_once(d.port) == b"ping\n"


def test_a_stale_pidfile_does_not_block_a_start(daemons: Daemons, tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(TIMEOUT)
    pidfile = tmp_path / "echod.pid"
    pidfile.write_text(f"{dead.pid}\n")  # what a SIGKILLed daemon leaves behind
    d = daemons.start()
    assert d.pid != dead.pid
    assert pidfile.read_text() == f"{d.pid}\n"


def test_a_killed_daemon_can_be_restarted_at_once(daemons: Daemons) -> None:
    first = daemons.start()
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: not is_alive(first.pid), what="the daemon to die")
    assert first.pidfile.read_text() == f"{first.pid}\n"  # left behind, but unlocked
    second = daemons.start()
    assert roundtrip_once(second.port) == b"ping\n"


# -- what is checked before detaching: one sentence on the terminal ------------------


def test_port_in_use_is_reported_on_the_terminal(daemons: Daemons, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = daemons.run("--port", str(port))
    assert result.returncode == 1
    assert result.stdout == ""
    assert one_line(result.stderr) == (
        f"echod: cannot listen on 127.0.0.1:{port}: the address is already in use"
    )
    assert not (tmp_path / "echod.pid").exists()  # released, nothing left behind
    assert wait_event(tmp_path / "echod.log", "startup_failed")


def test_an_unusable_log_file_is_reported_on_the_terminal(daemons: Daemons, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = daemons.run(log=tmp_path / "file" / "echod.log")
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("echod: cannot use log file directory ")
    assert not (tmp_path / "echod.pid").exists()


def test_an_unusable_pidfile_is_reported_on_the_terminal(daemons: Daemons, tmp_path: Path) -> None:
    (tmp_path / "echod.pid").mkdir()
    result = daemons.run()
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"echod: cannot open pidfile {tmp_path}")


def test_an_unusable_control_socket_is_reported_on_the_terminal(
    daemons: Daemons, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    result = daemons.run("--control-socket", str(tmp_path / "file" / "control.sock"))
    assert result.returncode == 1
    assert "control socket" in one_line(result.stderr)
    assert not (tmp_path / "echod.pid").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "echod: argument --port: 70000 is out of range"),
        (["--console"], "echod: --console needs --foreground"),
    ],
)
def test_bad_usage_is_exit_status_2(daemons: Daemons, args: list[str], message: str) -> None:
    result = daemons.run(*args)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(message)


# -- echod status / echod stop ------------------------------------------------------


def test_status_and_stop_exit_codes(daemons: Daemons, tmp_path: Path) -> None:
    pidfile = str(tmp_path / "echod.pid")
    status = echod("status", "--pidfile", pidfile)
    assert (status.returncode, status.stdout.strip()) == (
        3,
        f"echod is not running (no pidfile {pidfile})",
    )
    d = daemons.start()
    status = echod("status", "--pidfile", pidfile)
    assert (status.returncode, status.stdout.strip()) == (0, f"echod is running (pid {d.pid})")
    stop = echod("stop", "--pidfile", pidfile)
    assert (stop.returncode, stop.stdout.strip()) == (0, f"echod stopped (pid {d.pid})")
    assert not is_alive(d.pid)  # stop returned only once it was gone
    assert not d.pidfile.exists()
    assert wait_event(d.log, "exited")["status"] == 0
    assert echod("status", "--pidfile", pidfile).returncode == 3
    again = echod("stop", "--pidfile", pidfile)  # stopping a stopped service succeeds (LSB)
    assert (again.returncode, again.stdout.strip()) == (
        0,
        f"echod is not running (no pidfile {pidfile})",
    )


def test_stale_pidfile_is_status_1_and_stop_removes_it(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(TIMEOUT)
    pidfile = tmp_path / "echod.pid"
    pidfile.write_text(f"{dead.pid}\n")
    status = echod("status", "--pidfile", str(pidfile))
    assert status.returncode == 1
    assert "stale" in status.stdout
    stop = echod("stop", "--pidfile", str(pidfile))
    assert stop.returncode == 0
    assert not pidfile.exists()
    assert echod("status", "--pidfile", str(pidfile)).returncode == 3


LOCKER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, sys.argv[2].encode() + b"\n")
print("locked", flush=True)
time.sleep(60)
"""


def test_stop_never_signals_a_pid_that_does_not_hold_the_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "echod.pid"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(pidfile), str(bystander.pid)],
        stdout=subprocess.PIPE,
    )
    try:
        assert locker.stdout is not None
        assert LineReader.of_pipe(locker.stdout).readline() == b"locked\n"
        status = echod("status", "--pidfile", str(pidfile))
        assert status.returncode == 4
        assert "does not hold it" in status.stderr
        stop = echod("stop", "--pidfile", str(pidfile))
        assert stop.returncode == 1
        assert one_line(stop.stderr).startswith("echod: pidfile ")
        assert bystander.poll() is None  # untouched
    finally:
        for proc in (locker, bystander):
            proc.kill()
            proc.wait(TIMEOUT)


def test_stop_gives_up_after_its_timeout(daemons: Daemons) -> None:
    d = daemons.start()
    os.kill(d.pid, signal.SIGSTOP)  # a daemon that cannot act on SIGTERM
    try:
        stop = echod("stop", "--pidfile", str(d.pidfile), "--timeout", "0.5")
        assert stop.returncode == 1
        assert one_line(stop.stderr) == (
            f"echod: echod (pid {d.pid}) did not stop within 0.5 seconds"
        )
    finally:
        os.kill(d.pid, signal.SIGCONT)
    # The SIGTERM is pending; once it may run, the daemon stops as usual.
    wait_for(lambda: not is_alive(d.pid), what="the daemon to stop")
    assert not d.pidfile.exists()


# -- --user / --group -----------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="echod-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@ROOT_ONLY
def test_user_nobody_binds_as_root_then_serves_as_nobody(
    daemons: Daemons, shared_dir: Path
) -> None:
    run_dir, log_dir = shared_dir / "run", shared_dir / "log"
    run_dir.mkdir()
    log_dir.mkdir()
    os.chown(run_dir, 65534, 65534)  # so that nobody can remove its pidfile at exit
    d = daemons.start("--user", "nobody", pidfile=run_dir / "echod.pid", log=log_dir / "echod.log")
    status = proc_status(d.pid)
    assert status["Uid"].split() == ["65534"] * 4  # real, effective, saved, fs
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"].split() == ["65534"]  # root's groups are gone
    assert roundtrip_once(d.port) == b"ping\n"
    # logrotate with `create` moves the file and creates a new one like it.
    assert (d.log.stat().st_uid, d.log.stat().st_gid) == (65534, 65534)
    d.log.rename(log_dir / "echod.log.1")
    d.log.touch(0o640)
    os.chown(d.log, 65534, 65534)
    os.kill(d.pid, signal.SIGHUP)
    wait_event(d.log, "log_reopened")
    stop = echod("stop", "--pidfile", str(d.pidfile))
    assert stop.returncode == 0, stop.stderr
    assert not d.pidfile.exists()
    assert wait_event(d.log, "exited")["status"] == 0


@ROOT_ONLY
def test_user_nobody_with_a_root_owned_pidfile_directory_empties_it(
    daemons: Daemons, shared_dir: Path
) -> None:
    d = daemons.start(
        "--user", "nobody", pidfile=shared_dir / "echod.pid", log=shared_dir / "echod.log"
    )
    assert proc_status(d.pid)["Uid"].split() == ["65534"] * 4
    assert echod("stop", "--pidfile", str(d.pidfile)).returncode == 0
    assert wait_event(d.log, "exited")["pidfile_removed"] is False
    assert d.pidfile.read_text() == ""  # could not remove it: emptied and unlocked
    status = echod("status", "--pidfile", str(d.pidfile))
    assert (status.returncode, status.stdout.strip()) == (3, "echod is not running")
    again = daemons.start("--user", "nobody", pidfile=d.pidfile, log=d.log)
    assert roundtrip_once(again.port) == b"ping\n"


@ROOT_ONLY
def test_group_alone_changes_only_the_group(daemons: Daemons, shared_dir: Path) -> None:
    d = daemons.start(
        "--group", "nogroup", pidfile=shared_dir / "echod.pid", log=shared_dir / "echod.log"
    )
    status = proc_status(d.pid)
    assert status["Uid"].split() == ["0"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""


# As root, become nobody *after* importing: python lives under /root (mode 0700),
# which nobody could not even read. encodings.idna is imported lazily by getaddrinfo.
AS_NOBODY = r"""
import os, sys
import encodings.idna, echod.cli, echod.daemonize, echod.pidfile, echod.privileges
# Python's stdlib may live where nobody cannot read it (pyenv under /root):
# exercise the lazy imports argparse makes (shutil, gettext) while still root.
echod.cli.build_parser().format_help()
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
sys.exit(echod.cli.main(sys.argv[1:]))
"""


@ROOT_ONLY
def test_user_without_root_is_a_clear_error(shared_dir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            AS_NOBODY,
            "--port",
            "0",
            "--control-socket",
            "none",
            "--user",
            "nobody",
            "--pidfile",
            str(shared_dir / "echod.pid"),
            "--log-file",
            str(shared_dir / "echod.log"),
        ],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "echod: --user and --group need echod to be started "
        "as root (it binds, then switches to that user)"
    )
    assert not (shared_dir / "echod.pid").exists()


# -- the readiness pipe between the daemon and the starting command ---------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_ready_after_pid_and_ok(pipe: tuple[int, int], tmp_path: Path) -> None:
    r, w = pipe
    os.write(w, b"pid 4242\nok ::1 7878\n")
    started = wait_ready(r, TIMEOUT, tmp_path / "log")
    assert (started.pid, started.address) == (4242, "[::1]:7878")


def test_the_daemons_sentence_is_the_error(pipe: tuple[int, int], tmp_path: Path) -> None:
    r, w = pipe
    os.write(w, b"pid 4242\nerr cannot switch to nobody: Operation not permitted\n")
    with pytest.raises(StartupError, match=r"^cannot switch to nobody: Operation not permitted$"):
        wait_ready(r, TIMEOUT, tmp_path / "log")


def test_a_pipe_closed_without_a_word_means_the_daemon_died(
    pipe: tuple[int, int], tmp_path: Path
) -> None:
    r, w = pipe
    os.write(w, b"pid 4242\n")
    os.close(w)
    with pytest.raises(
        DaemonDied,
        match=r"^the daemon \(pid 4242\) exited during start-up; "
        rf"see {tmp_path}/log$",
    ):
        wait_ready(r, TIMEOUT, tmp_path / "log")


def test_no_answer_in_time_is_an_error(pipe: tuple[int, int], tmp_path: Path) -> None:
    r, _ = pipe
    with pytest.raises(StartupError, match=r"^the daemon was not serving within 0.2 seconds"):
        wait_ready(r, 0.2, tmp_path / "log")
