#!/usr/bin/env python3
"""Who gets the CPU inside a server: per-thread CPU and waits during one load point.

    python bench/threads.py                          # echod and the naive server, 1000c-64B-d1
    python bench/threads.py --servers echod --points 1000c-64B-d1 --perf-sched

The throughput tables say *that* a server is unfair to some clients (a long
p99 beside a short p50, a low Jain's index); this says where its time went.
For every server it runs the same warm-up as bench/run.py, then one measured
window, and reads ``/proc/<pid>/task/*`` at the window's start and end:

- the threads that existed before any client connected (main, accept loop,
  janitor: *service threads*), each with its CPU time in the window;
- the threads created for clients: how much CPU the least, the median and
  the most busy of them used, and their voluntary and involuntary context
  switches (a voluntary switch is a sleep: in ``recv``, or waiting for the
  GIL; an involuntary one is the scheduler taking the CPU away);
- the whole process's user and kernel CPU time per echoed line (the kernel
  side is where thread-per-connection pays: a sleep and a wake-up per read);
- loadgen's fairness figures for the same window.

``--syscalls`` also counts, per echoed line, the server's system calls, its
``futex`` calls (a thread waiting for or handing over the GIL) and its
context switches during the window (``perf stat`` on tracepoints; needs
``perf`` and permission to trace).

``--perf-sched`` also records the scheduler during the window (``perf sched
record``; needs ``perf``, e.g. Debian's ``linux-perf``, and permission to
trace) and reports, over the server's threads, how long a thread that was
woken waited before it ran (*scheduling delay*: the run queue) against how
long it had slept before being woken (*sleep*: I/O or the GIL). Raw output
goes to ``bench/out/threads.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # bench/harness.py: the servers, points and load generator

RESULTS = harness.OUT / "threads.json"
PERF_DATA = harness.OUT / "perf-sched.data"
# What --syscalls counts: every system call, the GIL's futex calls, and switches.
SYSCALL_EVENTS = {
    "raw_syscalls:sys_enter": "syscalls",
    "syscalls:sys_enter_futex": "futex",
    "context-switches": "switches",
}


def task_stats(pid: int) -> dict[int, dict[str, float]]:
    """Time on CPU, time runnable but waiting for it, and context switches, per thread.

    From ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds, exact) rather than
    ``stat`` (clock ticks of 10 ms: a client thread's share of a window
    rounds to nothing) and ``status``.
    """
    out: dict[int, dict[str, float]] = {}
    tids: list[str] = []
    with contextlib.suppress(OSError):
        tids = os.listdir(f"/proc/{pid}/task")
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _slices = (int(x) for x in f.read().split())
            ctx = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ctx:
                        ctx[key] = int(value)
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[int(tid)] = {
            "cpu_s": run_ns / 1e9,
            "runqueue_s": wait_ns / 1e9,
            "voluntary": ctx["voluntary_ctxt_switches"],
            "involuntary": ctx["nonvoluntary_ctxt_switches"],
        }
    return out


def start_syscall_count(pid: int, seconds: float) -> subprocess.Popen[str]:
    events = ",".join(SYSCALL_EVENTS)
    return subprocess.Popen(
        ["perf", "stat", "-x", ",", "-e", events, "-p", str(pid), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def syscall_counts(counter: subprocess.Popen[str], timeout: float) -> dict[str, int]:
    """perf stat's CSV lines: count,unit,event,... ("<not counted>" when it could not)."""
    _, err = counter.communicate(timeout=timeout)
    counts: dict[str, int] = {}
    for line in err.splitlines():
        cols = line.split(",")
        if len(cols) > 2 and cols[2] in SYSCALL_EVENTS and cols[0].isdigit():
            counts[SYSCALL_EVENTS[cols[2]]] = int(cols[0])
    return counts


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "median": float(statistics.median(values)),
        "max": max(values),
        "sum": sum(values),
    }


def perf_sched_summary(pid: int) -> dict[str, Any]:
    """Scheduling delay against sleep time for ``pid``'s threads, from perf sched timehist."""
    # The per-event table: time cpu task[tid/pid] wait sch_delay run (ms).
    wait: list[float] = []
    delay: list[float] = []
    done_events = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(PERF_DATA), "--pid", str(pid)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    for line in done_events.stdout.splitlines():
        cols = line.split()
        if len(cols) < 6 or not cols[0][0].isdigit():
            continue
        with contextlib.suppress(ValueError):
            wait.append(float(cols[-3]))
            delay.append(float(cols[-2]))

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    return {
        "switches": len(delay),
        "sched_delay_ms": {q: pct(delay, p) for q, p in (("p50", 0.5), ("p99", 0.99))}
        | {"max": max(delay, default=0.0)},
        "sleep_ms": {q: pct(wait, p) for q, p in (("p50", 0.5), ("p99", 0.99))}
        | {"max": max(wait, default=0.0)},
    }


def measure(
    point: harness.Point,
    spec: harness.ServerSpec,
    s: harness.Settings,
    perf: bool,
    syscalls: bool,
) -> dict[str, Any]:
    tag = f"threads_{spec.name}_{point.id}"
    server = harness.Server(spec, s.server_cpu, tag)
    rec: dict[str, Any] = {"server": spec.name, "point": point.id}
    try:
        port = server.wait_port()
        time.sleep(0.3)
        service = set(task_stats(server.pid))  # before any client: main, accept, janitor
        rec["prewarm"] = harness.warm_up(point, server, port, s, tag)
        proc, reader = harness.start_loadgen(
            harness.loadgen_cmd(point, port, s), s, tag, subprocess.DEVNULL
        )
        deadline = time.monotonic() + s.connect_timeout + s.warmup + s.duration + s.grace + 10
        before: dict[int, dict[str, float]] = {}
        recorder: subprocess.Popen[bytes] | None = None
        counter: subprocess.Popen[str] | None = None
        times = (0.0, 0.0)
        while (line := reader.readline(deadline)) is not None:
            if line == "window-start":
                before = task_stats(server.pid)
                times = harness.proc_times(server.pid)
                if syscalls:
                    counter = start_syscall_count(server.pid, s.duration)
                if perf:
                    recorder = subprocess.Popen(
                        [
                            "perf",
                            "sched",
                            "record",
                            "-o",
                            str(PERF_DATA),
                            "--",
                            "sleep",
                            str(s.duration),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            elif line == "window-end":
                after = task_stats(server.pid)
                user, kernel = harness.proc_times(server.pid)
                rec["user_s"], rec["kernel_s"] = user - times[0], kernel - times[1]
                break
        rec["loadgen"] = harness.finish_loadgen(proc, reader, deadline)
        if counter is not None:
            rec["per_window"] = syscall_counts(counter, s.duration + 30)
        if recorder is not None:
            recorder.wait(timeout=s.duration + 30)
            rec["perf_sched"] = perf_sched_summary(server.pid)
    finally:
        rec["server_stop"] = server.stop()
    delta = {
        tid: {k: after[tid][k] - before.get(tid, {}).get(k, 0.0) for k in after[tid]}
        for tid in after
    }
    handlers = {tid: d for tid, d in delta.items() if tid not in service}
    rec["service_threads"] = {
        ("main" if tid == server.pid else str(tid)): delta[tid] for tid in service if tid in delta
    }
    rec["handler_threads"] = len(handlers)
    # A client thread that does not exist yet at the window's start is a
    # connection loadgen has opened that the server has not accepted yet.
    rec["client_threads_at_start"] = len(set(before) - service)
    rec["client_threads_at_end"] = len(set(after) - service)
    for key in ("cpu_s", "runqueue_s", "voluntary", "involuntary"):
        rec[f"handler_{key}"] = spread([d[key] for d in handlers.values()])
    return rec


def show(rec: dict[str, Any]) -> None:
    lg = rec["loadgen"]
    print(
        f"\n{rec['server']} at {rec['point']}: {lg['messages_per_s']:,.0f} msg/s, "
        f"p50 {lg['p50_us']:,.0f} µs, p99 {lg['p99_us']:,.0f} µs, "
        f"p99.9 {lg['p99_9_us']:,.0f} µs"
    )
    print(
        f"  lines per connection {lg['conn_lines_min']:,} / {lg['conn_lines_median']:,} / "
        f"{lg['conn_lines_max']:,}, served none {lg['conns_starved']}, "
        f"Jain's index {lg['jain']:.3f}"
    )
    lines = lg["messages"]
    if lines and "user_s" in rec:
        print(
            f"  per line: user {rec['user_s'] / lines * 1e6:.2f} µs, "
            f"kernel {rec['kernel_s'] / lines * 1e6:.2f} µs"
            + "".join(
                f", {name} {count / lines:.3f}" for name, count in rec.get("per_window", {}).items()
            )
        )
    for name, d in rec["service_threads"].items():
        print(
            f"  service thread {name}: {d['cpu_s']:.3f} s CPU, "
            f"{d['runqueue_s']:.3f} s runnable but waiting, "
            f"{d['voluntary']:.0f} voluntary / {d['involuntary']:.0f} involuntary switches"
        )
    print(
        f"  client threads: {rec['client_threads_at_start']} at the window's start, "
        f"{rec['client_threads_at_end']} at its end, for {lg['connections']} connections"
    )
    if rec["handler_threads"]:
        c, v, i = rec["handler_cpu_s"], rec["handler_voluntary"], rec["handler_involuntary"]
        q = rec["handler_runqueue_s"]
        print(
            f"  {rec['handler_threads']} client threads: CPU s min {c['min']:.4f} / "
            f"median {c['median']:.4f} / max {c['max']:.4f} (sum {c['sum']:.2f}); "
            f"runnable but waiting s {q['min']:.4f} / {q['median']:.4f} / {q['max']:.4f} "
            f"(sum {q['sum']:.2f}); "
            f"voluntary switches {v['min']:.0f} / {v['median']:.0f} / {v['max']:.0f}; "
            f"involuntary {i['min']:.0f} / {i['median']:.0f} / {i['max']:.0f}"
        )
    if "perf_sched" in rec:
        p = rec["perf_sched"]
        print(
            f"  perf sched: {p['switches']:,} switch-ins; scheduling delay ms "
            f"p50 {p['sched_delay_ms']['p50']:.3f} p99 {p['sched_delay_ms']['p99']:.3f} "
            f"max {p['sched_delay_ms']['max']:.1f}; sleep before wake-up ms "
            f"p50 {p['sleep_ms']['p50']:.3f} p99 {p['sleep_ms']['p99']:.3f} "
            f"max {p['sleep_ms']['max']:.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--servers", default="echod,naive_socketserver")
    ap.add_argument("--points", default="1000c-64B-d1")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--prewarm", type=float, default=1.0)
    ap.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="load before the window, after the connections are open, s (default 1, "
        "as in bench/run.py); a long one shows the steady state after every client "
        "was accepted",
    )
    ap.add_argument("--perf-sched", action="store_true", help="also record the scheduler")
    ap.add_argument(
        "--syscalls",
        action="store_true",
        help="also count system calls, futex calls and context switches per line",
    )
    ap.add_argument("--echod-cmd", default=harness.DEFAULT_ECHOD_CMD)
    args = ap.parse_args(argv)
    if (args.perf_sched or args.syscalls) and shutil.which("perf") is None:
        sys.exit("perf not found: install it (Debian: apt-get install linux-perf)")
    table = harness.server_table(args.echod_cmd)
    servers = harness.pick(args.servers, list(table), "servers")
    points = [
        harness.ALL_POINTS[p] for p in harness.pick(args.points, list(harness.ALL_POINTS), "points")
    ]
    harness.build_loadgen()
    usable = os.sched_getaffinity(0)
    pinned = {0, 1} <= usable
    s = harness.Settings(
        duration=args.duration,
        warmup=args.warmup,
        grace=5.0,
        connect_timeout=15.0,
        idle_settle=0.0,
        server_cpu=1 if pinned else None,
        client_cpu=0 if pinned else None,
        prewarm=args.prewarm,
    )
    records = []
    for point in points:
        for name in servers:
            rec = measure(point, table[name], s, args.perf_sched, args.syscalls)
            show(rec)
            records.append(rec)
    RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nraw: {RESULTS.relative_to(harness.REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
