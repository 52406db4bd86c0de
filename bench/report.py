"""The report: docs/benchmarks.md (between its results markers) and the plot.

Reads the records bench/harness.py produced (bench/out/results.json) and
writes the tables; ``python bench/run.py --report-only FILE`` regenerates the
report from a results file without measuring.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness import REPO, Point, Record, Settings, notes, problems

DOCS_MD = REPO / "docs" / "benchmarks.md"
DOCS_PNG = REPO / "docs" / "benchmarks.png"
START_MARK = "<!-- results:start -->"
END_MARK = "<!-- results:end -->"
DASH = "\u2013"  # en dash, for ranges in the report


def med(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


@dataclass
class Summary:
    runs: list[Record]

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.runs if r["status"] == "ok"]

    def lg(self, key: str) -> list[float]:
        return [float(r["loadgen"][key]) for r in self.ok]

    def field(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.ok if r.get(key) is not None]

    def other_cpu(self) -> list[float]:
        return [float(r.get("other_cpu_s", 0.0)) for r in self.ok]

    def client_cpu(self) -> list[float]:
        return [
            float(r["loadgen"]["client_cpu_user_s"] + r["loadgen"]["client_cpu_sys_s"])
            for r in self.ok
        ]


def summarize(records: list[Record]) -> dict[tuple[str, str], Summary]:
    out: dict[tuple[str, str], Summary] = {}
    for rec in records:
        out.setdefault((rec["point"], rec["server"]), Summary([])).runs.append(rec)
    return out


def remarks(runs: list[Record]) -> str:
    """Distinct problems and notes of some runs, for a table cell."""
    found = sorted({p for r in runs for p in problems(r)})
    found += sorted({f"note: {n}" for r in runs for n in notes(r)})
    return "; ".join(found).replace("|", "/") or "none"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_cpu(cpu: list[float], window: list[float]) -> str:
    if not cpu:
        return DASH
    share = med(c / w for c, w in zip(cpu, window, strict=True) if w > 0) if window else 0
    return f"{med(cpu):.2f} ({share:.0%})"


def fmt_fairness(sm: Summary) -> tuple[str, str]:
    """Per-connection lines of the median run by Jain's index, and the index's range."""
    runs = [r["loadgen"] for r in sm.ok if "jain" in r["loadgen"]]
    if not runs:
        return DASH, DASH  # results from a loadgen that did not count them
    runs.sort(key=lambda lg: float(lg["jain"]))
    mid = runs[(len(runs) - 1) // 2]
    counts = " / ".join(
        f"{mid[k]:,}" for k in ("conn_lines_min", "conn_lines_median", "conn_lines_max")
    )
    if mid["conns_starved"]:
        counts += f" ({mid['conns_starved']:,} served none)"
    jains = [float(lg["jain"]) for lg in runs]
    return counts, f"{med(jains):.3f} ({min(jains):.2f}{DASH}{max(jains):.2f})"


def fmt_cpu_per_line(sm: Summary) -> str:
    """Server CPU seconds per million lines echoed in the window (median of runs)."""
    per = [
        float(r["server_cpu_s"]) / r["loadgen"]["messages"] * 1e6
        for r in sm.ok
        if r.get("server_cpu_s") is not None and r["loadgen"]["messages"]
    ]
    return f"{med(per):.2f}" if per else DASH


def machine_info() -> list[tuple[str, str]]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    try:
        uvloop = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop = "not installed"
    cc = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cc = subprocess.run(
            ["cc", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
    rev = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        rev = git.stdout.strip() or "no commits yet"
    return [
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU model", cpu),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("uvloop", uvloop),
        ("C compiler", cc),
        ("echod revision", rev),
    ]


def point_table(
    point: Point, servers: Sequence[str], sums: dict[tuple[str, str], Summary]
) -> list[str]:
    rows = [
        f"| server | msgs/s (median) | spread (min{DASH}max) | echod ÷ this | p50 µs | p99 µs "
        "| p99.9 µs | lines per connection min / median / max | Jain's index "
        "| server CPU s (core %) | server CPU s per 10⁶ lines | client CPU s (core %) "
        "| other CPU s | problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    echod = sums.get((point.id, "echod"))
    echod_rate = med(echod.lg("messages_per_s")) if echod and echod.ok else None
    for name in servers:
        sm = sums.get((point.id, name))
        if sm is None:
            continue
        issues = remarks(sm.runs)
        if not sm.ok:
            state = "skipped" if all(r["status"] == "skipped" for r in sm.runs) else "failed"
            rows.append(f"| {name} | {state} |{' |' * 11} {issues} |")
            continue
        rates = sm.lg("messages_per_s")
        rate = med(rates)
        ratio = f"{echod_rate / rate:.2f}" if echod_rate and rate else DASH
        window = sm.lg("window_s")
        counts, jain = fmt_fairness(sm)
        rows.append(
            f"| {name} | {fmt_rate(rate)} | {fmt_rate(min(rates))}{DASH}{fmt_rate(max(rates))} "
            f"| {ratio} | {med(sm.lg('p50_us')):,.0f} | {med(sm.lg('p99_us')):,.0f} "
            f"| {med(sm.lg('p99_9_us')):,.0f} | {counts} | {jain} "
            f"| {fmt_cpu(sm.field('server_cpu_s'), window)} | {fmt_cpu_per_line(sm)} "
            f"| {fmt_cpu(sm.client_cpu(), window)} | {max(sm.other_cpu()):.2f} | {issues} |"
        )
    return rows


def idle_table(
    points: Sequence[Point], servers: Sequence[str], sums: dict[tuple[str, str], Summary]
) -> list[str]:
    head = "| server | RSS before (MiB) |"
    rule = "|---|---:|"
    for p in points:
        head += f" KiB/conn at {p.connections} (spread) | threads at {p.connections} |"
        rule += "---:|---:|"
    rows = [head + " problems |", rule + "---|"]
    for name in servers:
        cells: list[str] = []
        before: list[float] = []
        runs: list[Record] = []
        for p in points:
            sm = sums.get((p.id, name))
            if sm is None:
                cells += ["", ""]
                continue
            runs += sm.runs
            per = sm.field("kib_per_conn")
            before += sm.field("server_rss_kib_before")
            if not per:
                cells += [
                    "skipped" if all(r["status"] == "skipped" for r in sm.runs) else "failed",
                    "",
                ]
                continue
            threads = sm.field("server_threads_hold")
            cells += [
                f"{med(per):.1f} ({min(per):.1f}{DASH}{max(per):.1f})",
                f"{med(threads):.0f}" if threads else DASH,
            ]
        if not any(cells):
            continue
        base = f"{med(before) / 1024:.1f}" if before else DASH
        rows.append(f"| {name} | {base} | {' | '.join(cells)} | {remarks(runs)} |")
    return rows


def display_cmd(cmd: Sequence[str]) -> str:
    """A command as a reader would type it: `python`, paths relative to the repo."""
    words = ["python" if w == sys.executable else w.replace(f"{REPO}/", "") for w in cmd]
    return shlex.join(words)


def results_markdown(data: Record) -> str:
    """The generated part of docs/benchmarks.md, from the raw results."""
    points = [Point(**p) for p in data["points"]]
    cmds: dict[str, list[str]] = data["servers"]
    servers = list(cmds)
    records: list[Record] = data["records"]
    s = Settings(**data["settings"])
    sums = summarize(records)
    pin = (
        f"servers on CPU {s.server_cpu}, load generator on CPU {s.client_cpu}"
        if s.server_cpu is not None
        else "not pinned (fewer than 2 CPUs usable)"
    )
    lines = [
        START_MARK,
        "<!-- Generated by bench/run.py; edits between these markers are overwritten. -->",
        "",
        f"Measured {data.get('finished', 'at an unrecorded time')} by:",
        "",
        "```sh",
        data["command"],
        "```",
        "",
        f"Each point ran {data['repeat']} times per server, servers interleaved; "
        "each run starts a fresh server, "
        + (
            f"warms it with {s.prewarm:g} s on 1 connection and {s.prewarm:g} s at "
            "the point's own load, then "
            if s.prewarm > 0
            else "does not warm it up (--prewarm 0), then "
        )
        + f"measures a {s.duration:g} s window after a further {s.warmup:g} s of load. "
        "Servers:",
        "",
        *[f"- {name}: `{display_cmd(cmd)}`" for name, cmd in cmds.items()],
        "",
        "### Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in data["machine"].items()]
    lines += [
        f"| pinning | {pin} |",
        "",
        "**How to read the tables.** *msgs/s* = echoed lines per second (median "
        f"of the runs; *spread* = slowest{DASH}fastest run). *echod ÷ this* = echod's "
        "median msgs/s divided by this server's: above 1 means echod is faster. "
        "Latencies are per-line round trips seen by the client (median over runs "
        "of each run's percentile). CPU = seconds used during the window "
        "(share of one core in brackets); the client's system time includes the "
        "loopback TCP work the kernel does on its behalf. *other CPU* = the "
        "largest CPU time used by anything else during a run's window (other "
        "processes, kernel threads): if it is large the figures are disturbed. "
        "*lines per connection* = lines each connection completed in the window "
        "(fewest / median / most, from the run with the median Jain's index); "
        "*Jain's index* = (Σx)² / (n·Σx²) over those counts: 1 when every connection "
        "was served alike, 1/n when one got everything (median, and range over runs). "
        "*server CPU s per 10⁶ lines* = the server's CPU time in the window divided "
        "by the lines echoed in it; it moves less with the machine than msgs/s. "
        "*problems* lists "
        "connect failures, mismatched echoes, resets/closes and unanswered lines "
        "(should be none).",
        "",
    ]
    for p in points:
        if p.kind == "load":
            lines += [f"### {p.title}", "", *point_table(p, servers, sums), ""]
    idle = [p for p in points if p.kind == "idle"]
    if idle:
        lines += [
            "### Idle memory per connection",
            "",
            "Server RSS (VmRSS) while holding N connections that have each echoed "
            "one line, minus RSS of the same fresh server before any connection, "
            "divided by N.",
            "",
            *idle_table(idle, servers, sums),
            "",
        ]
    if DOCS_PNG.exists():
        lines += [f"![msgs/s per server and point]({DOCS_PNG.name})", ""]
    lines.append(END_MARK)
    return "\n".join(lines)


DOC_TEMPLATE = f"""# echod benchmarks

How echod compares with reference Python line-echo servers on one machine.
Produced by `python bench/run.py`; `bench/README.md` explains the method and
every figure. The runner regenerates only the part between the results
markers and keeps the rest of this file as it is.

{START_MARK}
{END_MARK}

## What was tried

_Placeholder: record here what was changed in echod to move these figures,
with before/after numbers, and what did not help._
"""


def write_markdown(block: str) -> None:
    DOCS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS_MD.read_text() if DOCS_MD.exists() else DOC_TEMPLATE
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(END_MARK) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS_MD.write_text(text)


def write_plot(points: Sequence[Point], servers: Sequence[str], records: list[Record]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    sums = summarize(records)
    load = [p for p in points if p.kind == "load"]
    idle = [p for p in points if p.kind == "idle"]
    panels = [
        (load, "messages_per_s", f"echoed lines per second (median, min{DASH}max bars)"),
        (idle, "kib_per_conn", "idle RSS per connection (KiB)"),
    ]
    panels = [pn for pn in panels if pn[0]]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.5 * len(panels)), squeeze=False)
    for ax, (pts, key, ylabel) in zip(axes[:, 0], panels, strict=True):
        width = 0.8 / max(1, len(servers))
        for i, name in enumerate(servers):
            xs, ys, lo, hi = [], [], [], []
            for j, p in enumerate(pts):
                sm = sums.get((p.id, name))
                vals = (sm.lg(key) if key == "messages_per_s" else sm.field(key)) if sm else []
                if vals:
                    m = med(vals)
                    xs.append(j + (i - (len(servers) - 1) / 2) * width)
                    ys.append(m)
                    lo.append(m - min(vals))
                    hi.append(max(vals) - m)
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
        ax.set_xticks(range(len(pts)), [p.label for p in pts])
        heights = [bar.get_height() for bar in ax.patches if bar.get_height() > 0]
        if key == "messages_per_s" and heights and max(heights) > 20 * min(heights):
            ax.set_yscale("log")  # pipelined points run an order of magnitude faster
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncols=3)
    fig.tight_layout()
    DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_PNG, dpi=100)
    plt.close(fig)
    return True


def write_report(data: Record) -> None:
    points = [Point(**p) for p in data["points"]]
    write_plot(points, list(data["servers"]), data["records"])
    write_markdown(results_markdown(data))
    print(f"report: {DOCS_MD.relative_to(REPO)}, {DOCS_PNG.relative_to(REPO)}", file=sys.stderr)
