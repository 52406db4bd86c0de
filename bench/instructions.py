#!/usr/bin/env python3
"""User-space instructions per echoed line, counted by valgrind's callgrind.

    python bench/instructions.py                      # echod and the naive socketserver
    python bench/instructions.py --points 10c-64B-d1,10c-1024B-d1 --top 12

Throughput on a shared machine moves by ±25 % from one run to the next; an
instruction count does not: callgrind counts the instructions a process
executes, whatever else the machine is doing. It does not count the kernel
(system calls, scheduling, the loopback TCP work), which is most of a
server's time per line here, so a ratio of instructions is not a ratio of
speed: it is the part of the cost that the server's own code decides, and
the figure to watch when changing the hot path.

Each server is started under callgrind with instrumentation off, so start-up
is not counted; instrumentation is switched on, the load generator runs one
point, and the counts are dumped and divided by the lines echoed. Servers
run 20-50 times slower under valgrind, so the points use few connections.
``--top N`` also lists the N functions (C level: the interpreter, libc)
with the most instructions per line, the quickest way to see where a
change went. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # bench/harness.py: the servers, points and load generator

CG_DIR = harness.OUT / "callgrind"
RESULTS = harness.OUT / "instructions.json"
START_TIMEOUT = 120.0  # python under valgrind takes seconds to import
DEFAULT_POINTS = "10c-64B-d1,10c-1024B-d1"
EXTRA_POINTS = {
    "10c-1024B-d1": harness.load_point(10, 1024),
    "10c-64B-d16": harness.load_point(10, 64, 16),
}


def callgrind_cmd(spec: harness.ServerSpec, tag: str) -> harness.ServerSpec:
    cmd = (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={CG_DIR / tag}.%p",
        f"--log-file={CG_DIR / tag}.valgrind.log",
        *spec.cmd,
    )
    return harness.ServerSpec(spec.name, cmd, spec.port_from)


def total_instructions(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise harness.RunError(f"no totals in {dump}")


def top_functions(dump: Path, lines: int, n: int) -> list[tuple[str, float]]:
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*?)(?: \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = m.group(2).rsplit(":", 1)[-1]
            rows.append((name, int(m.group(1).replace(",", "")) / lines))
    return rows[:n]


def measure(
    point: harness.Point, spec: harness.ServerSpec, s: harness.Settings, top: int
) -> dict[str, object]:
    tag = f"{point.id}-{spec.name}"
    for old in CG_DIR.glob(f"{tag}.*"):
        old.unlink()
    server = harness.Server(callgrind_cmd(spec, tag), None, f"instructions-{tag}")
    try:
        port = server.wait_port(START_TIMEOUT)
        subprocess.run(
            ["callgrind_control", "--instr=on", str(server.pid)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        proc, reader = harness.start_loadgen(
            harness.loadgen_cmd(point, port, s), s, tag, subprocess.DEVNULL
        )
        result = harness.finish_loadgen(
            proc,
            reader,
            time.monotonic() + s.duration + s.warmup + s.grace + s.connect_timeout + 10,
        )
        subprocess.run(
            ["callgrind_control", "--dump", str(server.pid)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    finally:
        server.stop()
    dumps = sorted(CG_DIR.glob(f"{tag}.{server.pid}.*"))
    if not dumps:
        raise harness.RunError(f"callgrind wrote no dump for {tag}")
    lines = int(result["completed_total"])
    if lines == 0 or result["mismatches"] or result["errors"]:
        raise harness.RunError(
            f"{tag}: {lines} lines echoed, {result['mismatches']} mismatches, "
            f"{result['errors']} errors"
        )
    return {
        "point": point.id,
        "server": spec.name,
        "lines": lines,
        "instructions_per_line": total_instructions(dumps[0]) / lines,
        "top": top_functions(dumps[0], lines, top) if top else [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--servers",
        default="echod,naive_socketserver",
        help="comma-separated servers, as in bench/run.py --list",
    )
    ap.add_argument("--points", default=DEFAULT_POINTS, help="comma-separated load points")
    ap.add_argument("--duration", type=float, default=4.0, help="load window, s (default 4)")
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest functions")
    ap.add_argument(
        "--echod-cmd",
        default=harness.DEFAULT_ECHOD_CMD,
        help="how to start echod (see bench/run.py)",
    )
    args = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install valgrind (apt-get install valgrind)")
    table = harness.server_table(args.echod_cmd)
    points_known = {**harness.ALL_POINTS, **EXTRA_POINTS}
    servers = harness.pick(args.servers, list(table), "servers")
    points = [points_known[p] for p in harness.pick(args.points, list(points_known), "points")]
    if any(p.kind != "load" for p in points):
        sys.exit("only load points can be counted")
    harness.build_loadgen()
    CG_DIR.mkdir(parents=True, exist_ok=True)
    s = harness.Settings(
        duration=args.duration,
        warmup=0.2,
        grace=30.0,
        connect_timeout=30.0,
        idle_settle=0.0,
        server_cpu=None,
        client_cpu=None,
    )
    records = []
    for point in points:
        for name in servers:
            print(f"{point.id} {name} ...", end=" ", file=sys.stderr, flush=True)
            rec = measure(point, table[name], s, args.top)
            print(f"{rec['instructions_per_line']:,.0f} instructions per line", file=sys.stderr)
            records.append(rec)
    RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    for point in points:
        rows = [r for r in records if r["point"] == point.id]
        base = next((r for r in rows if r["server"] == "echod"), rows[0])
        print(
            f"\n{point.id}: user-space instructions per echoed line "
            f"(this ÷ {base['server']} above 1: {base['server']} executes fewer)\n"
        )
        print(f"| server | instructions per line | this ÷ {base['server']} |\n|---|---:|---:|")
        for r in rows:
            ipl = float(r["instructions_per_line"])  # type: ignore[arg-type]
            ratio = ipl / float(base["instructions_per_line"])  # type: ignore[arg-type]
            print(f"| {r['server']} | {ipl:,.0f} | {ratio:.2f} |")
        for r in rows:
            if r["top"]:
                print(f"\n{r['server']}, costliest functions (instructions per line):")
                for name, ipl in r["top"]:  # type: ignore[attr-defined]
                    print(f"  {ipl:8,.0f}  {name}")
    print(f"\nraw: {RESULTS.relative_to(harness.REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
