#!/usr/bin/env python3
"""Benchmark echod against reference Python line-echo servers.

    python bench/run.py            # full matrix; writes bench/out/results.json,
                                   # docs/benchmarks.md and docs/benchmarks.png
    python bench/run.py --smoke    # CI: a few seconds; checks every byte was
                                   # echoed, never checks speed

Each server runs pinned to one CPU, the C load generator (bench/loadgen.c) to
another. Every point is repeated (--repeat) with the servers interleaved, so
drift of the machine during the run hits every server alike. See
bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import (
    ALL_POINTS,
    DEFAULT_ECHOD_CMD,
    DISTURBED_SHARE,
    LOGS,
    OUT,
    POINTS,
    REPO,
    SMOKE_POINTS,
    Record,
    Settings,
    build_loadgen,
    disturbed,
    machine_busy_s,
    notes,
    pick,
    problems,
    run_one,
    server_table,
)
from report import machine_info, write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="quick correctness run for CI (exit 1 unless every byte echoed)",
    )
    ap.add_argument("--servers", help="comma-separated subset of servers (see --list)")
    ap.add_argument("--points", help="comma-separated subset of points (see --list)")
    ap.add_argument("--list", action="store_true", help="list servers and points, then exit")
    ap.add_argument("--repeat", type=int, help="runs per point and server (default 2; smoke 1)")
    ap.add_argument("--duration", type=float, help="measured window, s (default 3; smoke 0.5)")
    ap.add_argument(
        "--warmup", type=float, help="warm-up before the window, s (default 1; smoke 0.2)"
    )
    ap.add_argument(
        "--prewarm",
        type=float,
        help="length of each of the two warm-up loads every server gets before a "
        "timed run (1 connection, then the point's own), s; 0 skips them "
        "(default 1; smoke 0.1)",
    )
    ap.add_argument(
        "--grace",
        type=float,
        help="bound on collecting outstanding echoes after the window, s; a "
        "healthy server needs milliseconds (default 5; smoke 10)",
    )
    ap.add_argument(
        "--connect-timeout",
        type=float,
        default=15.0,
        help="bound on opening all connections of a point, s (default 15)",
    )
    ap.add_argument(
        "--idle-settle",
        type=float,
        help="wait before sampling RSS of idle connections, s (default 1; smoke 0.2)",
    )
    ap.add_argument(
        "--retry-disturbed",
        type=int,
        default=2,
        metavar="N",
        help="re-measure a run up to N times when other work used over "
        f"{DISTURBED_SHARE * 100:.0f}%% of a core during its window; keep the least "
        "disturbed (default 2; smoke 0)",
    )
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU for servers (default 1)")
    ap.add_argument("--client-cpu", type=int, default=0, help="CPU for loadgen (default 0)")
    ap.add_argument(
        "--echod-cmd",
        default=DEFAULT_ECHOD_CMD,
        help="command that starts echod in the foreground on a free port and "
        "logs a JSON 'listening' event with the port to stderr "
        "(echod-quiet appends --log-level warning)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="raw results file (default bench/out/results.json; smoke: bench/out/smoke.json)",
    )
    ap.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="only regenerate docs/benchmarks.{md,png} from a results file",
    )
    ap.add_argument(
        "--no-docs",
        action="store_true",
        help="do not write docs/benchmarks.md and docs/benchmarks.png",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    table = server_table(args.echod_cmd)
    if args.report_only:
        write_report(json.loads(args.report_only.read_text()))
        return 0
    if args.list:
        for spec in table.values():
            print(f"server {spec.name}: {shlex.join(spec.cmd)}")
        for p in ALL_POINTS.values():
            print(f"point {p.id}: {p.title}{' (smoke)' if p in SMOKE_POINTS else ''}")
        return 0
    smoke = args.smoke
    default_points = [p.id for p in (SMOKE_POINTS if smoke else POINTS)]
    point_ids = pick(args.points, list(ALL_POINTS), "points") if args.points else default_points
    points = [ALL_POINTS[i] for i in point_ids]
    servers = pick(args.servers, list(table), "servers")
    repeat = args.repeat if args.repeat is not None else (1 if smoke else 2)
    # Smoke never judges speed, so a disturbed run is as good as any.
    retries = 0 if smoke else args.retry_disturbed
    if repeat < 1:
        sys.exit("--repeat must be at least 1")

    usable = os.sched_getaffinity(0)
    pinned = {args.server_cpu, args.client_cpu} <= usable and args.server_cpu != args.client_cpu
    if not pinned:
        print(
            f"warning: CPUs {args.server_cpu}/{args.client_cpu} not both usable "
            f"({sorted(usable)}): running unpinned",
            file=sys.stderr,
        )
    s = Settings(
        duration=args.duration if args.duration is not None else (0.5 if smoke else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.2 if smoke else 1.0),
        grace=args.grace if args.grace is not None else (10.0 if smoke else 5.0),
        connect_timeout=args.connect_timeout,
        idle_settle=args.idle_settle if args.idle_settle is not None else (0.2 if smoke else 1.0),
        server_cpu=args.server_cpu if pinned else None,
        client_cpu=args.client_cpu if pinned else None,
        prewarm=args.prewarm if args.prewarm is not None else (0.1 if smoke else 1.0),
    )
    busy0 = machine_busy_s()
    time.sleep(0.5)
    if (busy := (machine_busy_s() - busy0) / 0.5) > 0.25:
        print(
            f"warning: the machine is already busy ({busy:.1f} CPUs in use): "
            "figures will be disturbed",
            file=sys.stderr,
        )
    command = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    build_loadgen()
    machine = dict(machine_info())
    if LOGS.is_dir():  # logs of the previous run would only confuse
        for old in LOGS.iterdir():
            if old.suffix in (".stdout", ".stderr"):
                old.unlink()

    records: list[Record] = []
    total = repeat * len(points) * len(servers)
    started = time.monotonic()
    n = 0
    # A server that could not start (or skipped) is not retried: that would
    # cost the start-up timeout once per point for nothing.
    unavailable: dict[str, Record] = {}
    for rep in range(1, repeat + 1):
        for point in points:
            # Rotate the order each repeat so no server always runs first.
            shift = (rep - 1) % len(servers)
            for name in servers[shift:] + servers[:shift]:
                n += 1
                print(
                    f"[{n}/{total}] {point.label} {name} rep {rep} ... ",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
                if name in unavailable:
                    prev = unavailable[name]
                    rec = {
                        "point": point.id,
                        "server": name,
                        "rep": rep,
                        "status": prev["status"],
                        "error": f"not run: {prev['error']}",
                    }
                else:
                    rec = run_one(point, table[name], rep, s)
                    if rec["status"] == "skipped" or rec.get("start_failed"):
                        unavailable[name] = rec
                    latest = rec
                    for attempt in range(2, retries + 2):
                        if not disturbed(latest):
                            break
                        print(
                            f"{progress_note(latest)}; disturbed (other CPU "
                            f"{latest['other_cpu_s']:.2f} s), attempt {attempt} ... ",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
                        latest = run_one(point, table[name], rep, s)
                        latest["attempt"] = attempt
                        if latest["status"] != "ok" or (
                            latest.get("other_cpu_s", 0.0) < rec.get("other_cpu_s", 0.0)
                        ):
                            rec = latest  # a failure always surfaces
                    if latest is not rec:
                        print(
                            f"{progress_note(latest)}; keeping attempt "
                            f"{rec.get('attempt', 1)} ... ",
                            end="",
                            file=sys.stderr,
                        )
                records.append(rec)
                print(progress_note(rec), file=sys.stderr, flush=True)

    out = args.out or OUT / ("smoke.json" if smoke else "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    data: Record = {
        "command": command,
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": s.__dict__,
        "repeat": repeat,
        "machine": machine,
        "points": [p.__dict__ for p in points],
        "servers": {name: list(table[name].cmd) for name in servers},
        "records": records,
    }
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"raw results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out} "
        f"({time.monotonic() - started:.0f} s)",
        file=sys.stderr,
    )

    if not smoke and not args.no_docs:
        write_report(data)

    failures = [(r, issue) for r in records for issue in problems(r)]
    for r, issue in failures:
        print(f"FAIL {r['point']} {r['server']} rep {r['rep']}: {issue}", file=sys.stderr)
    skipped = sorted({r["server"] for r in records if r["status"] == "skipped"})
    if skipped:
        print(f"skipped: {', '.join(skipped)}", file=sys.stderr)
    if smoke:
        print("smoke: " + ("FAILED" if failures else "every byte echoed"), file=sys.stderr)
    return 1 if failures else 0


def progress_note(rec: Record) -> str:
    if rec["status"] != "ok":
        return f"{rec['status']}: {rec.get('error', '')}"
    lg = rec["loadgen"]
    issues = problems(rec) + notes(rec)
    note = (
        f"{rec['kib_per_conn']:.1f} KiB/conn"
        if "kib_per_conn" in rec
        else f"{lg['messages_per_s']:,.0f} msg/s"
    )
    return note + (f"  [{'; '.join(issues)}]" if issues else "")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # servers and loadgen were stopped on the way out
        sys.exit("interrupted")
