"""The benchmark harness: points, servers, processes and one measurement.

bench/run.py (the command line) and bench/instructions.py (instruction
counts under callgrind) both drive servers through this module; bench/report.py
turns its records into docs/benchmarks.md. bench/README.md explains the
method and every figure.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
OUT = BENCH / "out"
LOGS = OUT / "logs"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = OUT / "loadgen"
LOADGEN_TLS = OUT / "loadgen-tls"  # built by bench/tls.py, with -DLOADGEN_TLS
HOST = "127.0.0.1"
SKIP_EXIT = 77  # a server exits with this when it cannot run here (uvloop missing)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 5.0
BUILD_TIMEOUT = 60.0
SETTLE_TIMEOUT = 10.0  # for a server's warm-up clients' threads to end
# A run during which everything else used more than this share of one core
# is measured again (--retry-disturbed); the least disturbed attempt is kept.
DISTURBED_SHARE = 0.10
CLIENT_BOUND_SHARE = 0.90

DEFAULT_ECHOD_CMD = shlex.join(
    [
        sys.executable,
        "-m",
        "echod",
        "--foreground",
        "--host",
        HOST,
        "--port",
        "0",
        "--log-format",
        "json",
        "--control-socket",
        "none",
        "--max-clients",
        "10000",
    ]
)
ALLOW_100 = BENCH / "allow-100.txt"
ADMISSION_FLAGS = (
    "--allow-file",
    str(ALLOW_100),
    "--max-per-source",
    "20000",
    "--max-connect-rate",
    "20000/1",
)
REFERENCE_SERVERS = ("naive_socketserver", "asyncio_streams", "asyncio_protocol", "uvloop_protocol")

Record = dict[str, Any]


# --------------------------------------------------------------------------- matrix


@dataclass(frozen=True)
class Point:
    id: str
    kind: Literal["load", "idle"]
    connections: int
    line_size: int = 64  # bytes per line including the "\n"
    depth: int = 1  # lines in flight per connection
    tls: bool = False  # loadgen --tls (bench/tls.py)

    @property
    def label(self) -> str:
        if self.kind == "idle":
            return f"idle {self.connections}c"
        return f"{self.connections}c {self.line_size}B d{self.depth}"

    @property
    def title(self) -> str:
        if self.kind == "idle":
            return f"Idle memory, {self.connections} connections"
        conns = "connection" if self.connections == 1 else "connections"
        return (
            f"{self.connections} {conns}, {self.line_size}-byte lines, "
            f"{self.depth} in flight per connection"
        )


def load_point(c: int, size: int = 64, depth: int = 1) -> Point:
    return Point(f"{c}c-{size}B-d{depth}", "load", c, size, depth)


def idle_point(c: int) -> Point:
    return Point(f"idle-{c}c", "idle", c)


POINTS = (
    load_point(1),
    load_point(10),
    load_point(100),
    load_point(1000),
    load_point(100, 1024),
    load_point(100, 64, 16),
    idle_point(1000),
    idle_point(5000),
)
# Smoke: small lines, the longest legal line (1024 bytes + "\n") with
# pipelining, and a handful of held connections.
SMOKE_POINTS = (load_point(10), load_point(20, 1025, 4), idle_point(200))
ALL_POINTS = {p.id: p for p in (*POINTS, *SMOKE_POINTS)}


PortSource = Literal["stdout", "stderr-json", "proc"]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    cmd: tuple[str, ...]
    # Where the port is announced: a "listening <port>" line on stdout, a JSON
    # event {"event": "listening", "port": N} on stderr, or (fallback) the
    # process's own listening socket found through /proc.
    port_from: tuple[PortSource, ...]


def server_table(echod_cmd: str) -> dict[str, ServerSpec]:
    echod = tuple(shlex.split(echod_cmd))
    table = {
        "echod": ServerSpec("echod", echod, ("stderr-json", "proc")),
        # Same daemon without info logging: shows what logging costs. Its
        # "listening" event is info-level, hence the /proc fallback.
        "echod-quiet": ServerSpec(
            "echod-quiet", (*echod, "--log-level", "warning"), ("stderr-json", "proc")
        ),
        # Admission control on: a 100-entry allow list (the load generator's
        # 127.0.0.1 matches one), per-source limits and connect rates; the
        # issue's target is at least 0.97x plain echod at 100 connections.
        "echod-admission": ServerSpec(
            "echod-admission",
            (*echod, *ADMISSION_FLAGS),
            ("stderr-json", "proc"),
        ),
    }
    for name in REFERENCE_SERVERS:
        script = BENCH / "servers" / f"{name}.py"
        table[name] = ServerSpec(
            name, (sys.executable, str(script), "--host", HOST, "--port", "0"), ("stdout",)
        )
    return table


# --------------------------------------------------------------------------- processes


class RunError(Exception):
    """One measurement could not be taken."""


class StartError(RunError):
    """The server never started listening."""


class Skipped(Exception):
    """The server cannot run on this machine (e.g. uvloop is not installed)."""


PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def child_setup(cpu: int | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        # Die with the runner even if it is killed outright: no orphan servers.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


def proc_times(pid: int) -> tuple[float, float]:
    """utime and stime of all threads of `pid`, in seconds (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of all threads of `pid`, in seconds."""
    return sum(proc_times(pid))


def machine_busy_s() -> float:
    """CPU seconds spent on anything but idle/iowait, all CPUs, since boot."""
    with open("/proc/stat") as f:
        cols = f.readline().split()  # cpu user nice system idle iowait irq softirq steal
    return sum(int(cols[i]) for i in (1, 2, 3, 6, 7, 8)) / CLK_TCK


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and thread count from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_kib"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value)
    return out


def listening_ports(pid: int) -> list[int]:
    """TCP ports on which process `pid` has a socket in LISTEN state."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: list[int] = []
    if not inodes:
        return ports  # no sockets yet: spare reading the (possibly long) tables
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ports.append(int(cols[1].rpartition(":")[2], 16))
    return ports


def stop_process(proc: subprocess.Popen[Any], timeout: float = SERVER_STOP_TIMEOUT) -> str:
    """SIGTERM, then SIGKILL if needed; returns how it ended."""
    if proc.poll() is not None:
        return f"exited {proc.returncode} before stop"
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
        return f"exit {code} after SIGTERM in {time.monotonic() - t0:.1f} s"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return f"SIGKILL: still running {timeout:g} s after SIGTERM"


class LineReader:
    """Reads lines from a pipe with a deadline (a hung child cannot block us)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""

    def readline(self, deadline: float) -> str | None:
        """The next line without its newline; None at EOF; TimeoutError at deadline."""
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if self.buf:
                    line, self.buf = self.buf, b""
                    return line.decode(errors="replace")
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Server:
    """One server under test, started fresh for one measurement."""

    def __init__(self, spec: ServerSpec, cpu: int | None, tag: str) -> None:
        self.spec = spec
        LOGS.mkdir(parents=True, exist_ok=True)
        self.out_path = LOGS / f"{tag}.stdout"
        self.err_path = LOGS / f"{tag}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            # Output goes to files, not pipes: a server that logs a lot must
            # never stall because nobody drains its pipe.
            self.proc = subprocess.Popen(
                spec.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=REPO,
                preexec_fn=child_setup(cpu),
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def wait_port(self, timeout: float = SERVER_START_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for source in self.spec.port_from:
                port = self._find_port(source)
                if port is not None:
                    return port
            code = self.proc.poll()
            if code is not None:
                if code == SKIP_EXIT:
                    raise Skipped(tail(self.err_path, 1))
                raise StartError(f"exited {code} before listening: {tail(self.err_path)}")
            time.sleep(0.02)
        raise StartError(f"no listening port within {timeout:g} s: {tail(self.err_path)}")

    def _find_port(self, source: PortSource) -> int | None:
        if source == "proc":
            ports = listening_ports(self.pid)
            return ports[0] if len(ports) == 1 else None
        try:
            path = self.out_path if source == "stdout" else self.err_path
            text = path.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if source == "stdout":
                words = line.split()
                if len(words) == 2 and words[0] == "listening" and words[1].isdigit():
                    return int(words[1])
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(event, dict)
                and event.get("event") == "listening"
                and isinstance(event.get("port"), int)
            ):
                return int(event["port"])
        return None

    def stop(self) -> str:
        return stop_process(self.proc)


# --------------------------------------------------------------------------- measuring


@dataclass
class Settings:
    duration: float
    warmup: float
    grace: float
    connect_timeout: float
    idle_settle: float
    server_cpu: int | None
    client_cpu: int | None
    # Seconds of each of the two warm-up loads a server gets before a timed
    # run (see warm_up); 0 skips them.
    prewarm: float = 0.0


def loadgen_cmd(point: Point, port: int, s: Settings) -> list[str]:
    return [
        str(LOADGEN_TLS if point.tls else LOADGEN),
        *(["--tls"] if point.tls else []),
        "--host",
        HOST,
        "--port",
        str(port),
        "--connections",
        str(point.connections),
        "--line-size",
        str(point.line_size),
        "--depth",
        str(point.depth),
        "--duration",
        str(s.duration),
        "--warmup",
        str(s.warmup),
        "--grace",
        str(s.grace),
        "--connect-timeout",
        str(s.connect_timeout),
    ]


def start_loadgen(
    cmd: list[str], s: Settings, tag: str, stdin: int
) -> tuple[subprocess.Popen[bytes], LineReader]:
    LOGS.mkdir(parents=True, exist_ok=True)  # callers may not have started a Server
    with open(LOGS / f"{tag}.loadgen.stderr", "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=child_setup(s.client_cpu),
            start_new_session=True,
        )
    assert proc.stdout is not None
    return proc, LineReader(proc.stdout)


def finish_loadgen(proc: subprocess.Popen[bytes], reader: LineReader, deadline: float) -> Record:
    """Read loadgen's JSON result, then reap it."""
    result: Record | None = None
    while (line := reader.readline(deadline)) is not None:
        if line.startswith("{"):
            result = json.loads(line)
    try:
        code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as err:
        raise RunError("loadgen did not exit in time") from err
    if code != 0 or result is None:
        raise RunError(f"loadgen exited {code} without a result")
    return result


def measure_load(point: Point, server: Server, port: int, s: Settings, tag: str) -> Record:
    proc, reader = start_loadgen(loadgen_cmd(point, port, s), s, tag, subprocess.DEVNULL)
    deadline = time.monotonic() + s.connect_timeout + s.warmup + s.duration + s.grace + 10.0
    rec: Record = {}
    try:
        # loadgen announces its measured window so server CPU covers exactly it.
        while (line := reader.readline(deadline)) is not None:
            if line == "window-start":
                rec["server_cpu_start_s"] = proc_cpu_s(server.pid)
                rec["machine_busy_start_s"] = machine_busy_s()
            elif line == "window-end":
                rec["server_cpu_s"] = proc_cpu_s(server.pid) - rec.get(
                    "server_cpu_start_s", proc_cpu_s(server.pid)
                )
                rec["machine_busy_s"] = machine_busy_s() - rec.get(
                    "machine_busy_start_s", machine_busy_s()
                )
                status = proc_status(server.pid)
                rec["server_rss_kib_load"] = status.get("rss_kib")
                rec["server_threads_load"] = status.get("threads")
                break
        rec["loadgen"] = finish_loadgen(proc, reader, deadline)
    except TimeoutError as err:
        raise RunError("loadgen produced no result in time") from err
    finally:
        if proc.poll() is None:
            stop_process(proc, 1.0)
    rec.pop("server_cpu_start_s", None)
    rec.pop("machine_busy_start_s", None)
    lg = rec["loadgen"]
    if "machine_busy_s" in rec and "server_cpu_s" in rec:
        # Whatever else ran during the window (other processes, the runner,
        # kernel threads): a large value means the figures are disturbed.
        rec["other_cpu_s"] = max(
            0.0,
            rec["machine_busy_s"]
            - rec["server_cpu_s"]
            - lg["client_cpu_user_s"]
            - lg["client_cpu_sys_s"],
        )
    return rec


def measure_idle(point: Point, server: Server, port: int, s: Settings, tag: str) -> Record:
    time.sleep(0.3)  # let the fresh server finish starting before the baseline
    before = proc_status(server.pid)
    hold = 2 * s.connect_timeout + s.idle_settle + 30  # loadgen's own safety bound
    cmd = [*loadgen_cmd(point, port, s), "--mode", "idle", "--hold", str(hold)]
    proc, reader = start_loadgen(cmd, s, tag, subprocess.PIPE)
    deadline = time.monotonic() + 2 * s.connect_timeout + 10.0
    rec: Record = {
        "server_rss_kib_before": before.get("rss_kib"),
        "server_threads_before": before.get("threads"),
    }
    try:
        line = reader.readline(deadline)
        if line != "ready":
            raise RunError(f"loadgen idle mode did not get ready (got {line!r})")
        time.sleep(s.idle_settle)
        held = proc_status(server.pid)
        rec["server_rss_kib_hold"] = held.get("rss_kib")
        rec["server_threads_hold"] = held.get("threads")
        assert proc.stdin is not None
        proc.stdin.close()  # tells loadgen to close its connections and report
        rec["loadgen"] = finish_loadgen(proc, reader, time.monotonic() + 15.0)
    except TimeoutError as err:
        raise RunError("loadgen idle mode timed out") from err
    finally:
        if proc.poll() is None:
            stop_process(proc, 1.0)
    conns = rec["loadgen"]["connections"]
    if conns and rec["server_rss_kib_before"] is not None and rec["server_rss_kib_hold"]:
        rec["kib_per_conn"] = (rec["server_rss_kib_hold"] - rec["server_rss_kib_before"]) / conns
    return rec


def warm_up(point: Point, server: Server, port: int, s: Settings, tag: str) -> list[Record]:
    """Bring a fresh server to its steady state before it is timed.

    A freshly started asyncio server on the default event loop serves its
    first load at a third to a half of its steady rate, and threaded servers
    and uvloop do not, so timing cold processes compares start-up effects,
    not servers (bench/README.md has the figures). Every server gets the
    same: one run on a single connection, then one at the point's own
    connection count and depth, ``s.prewarm`` seconds each. Both are checked
    like any run, so a server that breaks while warming up fails the point.
    Then it waits (up to SETTLE_TIMEOUT) until a threaded server has ended
    the threads of the warm-up's clients, so they do not compete with the
    timed run's.
    """
    threads = proc_status(server.pid).get("threads", 0)
    results: list[Record] = []
    quick = replace(s, duration=s.prewarm, warmup=0.0)
    single = replace(load_point(1, point.line_size), tls=point.tls)
    for n, warm in enumerate((single, point)):
        proc, reader = start_loadgen(
            loadgen_cmd(warm, port, quick), s, f"{tag}.prewarm{n}", subprocess.DEVNULL
        )
        deadline = time.monotonic() + s.connect_timeout + s.prewarm + s.grace + 10.0
        try:
            lg = finish_loadgen(proc, reader, deadline)
        except TimeoutError as err:
            raise RunError("loadgen produced no result in time while warming up") from err
        finally:
            if proc.poll() is None:
                stop_process(proc, 1.0)
        found = problems({"status": "ok", "loadgen": lg})
        if found:
            raise RunError(f"while warming up on {warm.label}: {'; '.join(found)}")
        results.append({"point": warm.id, "messages_per_s": lg["messages_per_s"]})
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while proc_status(server.pid).get("threads", 0) > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    return results


def run_one(point: Point, spec: ServerSpec, rep: int, s: Settings) -> Record:
    tag = f"{spec.name}_{point.id}_r{rep}"
    rec: Record = {"point": point.id, "server": spec.name, "rep": rep, "status": "ok"}
    server = Server(spec, s.server_cpu, tag)
    try:
        port = server.wait_port()
        rec["port"] = port
        if point.kind == "idle":
            # RSS is measured against the untouched server: no warm-up.
            rec.update(measure_idle(point, server, port, s, tag))
        else:
            if s.prewarm > 0:
                rec["prewarm"] = warm_up(point, server, port, s, tag)
            rec.update(measure_load(point, server, port, s, tag))
        if server.proc.poll() is not None:
            raise RunError(
                f"server exited {server.proc.returncode} during the run: {tail(server.err_path)}"
            )
    except Skipped as err:
        rec.update(status="skipped", error=str(err))
    except StartError as err:
        rec.update(status="failed", error=str(err), start_failed=True)
    except (RunError, OSError, ValueError) as err:
        rec.update(status="failed", error=str(err))
    finally:
        rec["loadavg_1m"] = loadavg()
        rec["server_stop"] = server.stop()
    return rec


def loadavg() -> float:
    """1-minute load average: well above the CPU count means the runs competed."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def problems(rec: Record) -> list[str]:
    """Correctness problems of one measurement (speed is never judged)."""
    if rec["status"] == "skipped":
        return []
    if rec["status"] != "ok":
        return [rec.get("error", "failed")]
    lg = rec["loadgen"]
    found = [
        f"{lg[key]} {key.replace('_', ' ')}"
        for key in ("connect_failures", "mismatches", "errors", "unanswered")
        if lg[key]
    ]
    # Lines echoed at any time (warm-up, window, drain): a starved server may
    # finish none inside a short window and still echo every byte.
    if lg["completed_total"] <= 0:
        found.append("no lines echoed")
    if lg["mode"] == "idle" and lg["messages"] != lg["connections"]:
        found.append(f"{lg['messages']} of {lg['connections']} idle connections echoed")
    return found


def notes(rec: Record) -> list[str]:
    """Worth reporting, but not a failure of the echo itself."""
    found = []
    stop = rec.get("server_stop", "")
    if stop and not stop.startswith("exit 0"):
        found.append(f"server stop: {stop}")
    lg = rec.get("loadgen")
    if lg and lg["mode"] == "load" and lg["window_s"] > 0:
        client = (lg["client_cpu_user_s"] + lg["client_cpu_sys_s"]) / lg["window_s"]
        if client > CLIENT_BOUND_SHARE:
            found.append(
                f"loadgen used over {CLIENT_BOUND_SHARE:.0%} of its core: "
                "the figure may be limited by the client"
            )
    return found


def disturbed(rec: Record) -> bool:
    """Did other work take a noticeable share of the CPUs during the window?"""
    if rec["status"] != "ok" or rec["loadgen"]["mode"] != "load":
        return False
    return bool(rec.get("other_cpu_s", 0.0) > DISTURBED_SHARE * rec["loadgen"]["window_s"])


def build_loadgen() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = ["cc", "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(LOADGEN_SRC)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        sys.exit(f"cannot build loadgen ({shlex.join(cmd)}): {err}")
    if done.returncode != 0:
        sys.exit(f"building loadgen failed:\n{done.stderr}")
    if done.stderr.strip():
        print(done.stderr, file=sys.stderr)


def pick(names: str | None, table: Sequence[str], what: str) -> list[str]:
    if names is None:
        return list(table)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in table]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(table)}")
    return chosen
