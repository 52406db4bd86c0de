#!/usr/bin/env python3
"""The longest pause a client sees while echod upgrades itself under load.

    python bench/upgrade_pause.py                         # 1,000 connections
    python bench/upgrade_pause.py --connections 100 --repeat 3

bench/loadgen.c runs at depth 1 against a real echod (each connection sends
its next line once the previous one's echo is back), and one third into its
measured window ``echod ctl upgrade`` starts the next echod and hands it
every connection. loadgen checks every echoed byte (each line carries its
connection and sequence number: a lost, duplicated or reordered line is a
mismatch) and reports the longest round trip, which at depth 1 is the
longest gap between two echoes any client saw. The same run without an
upgrade, side by side, is the baseline: on a shared machine the slowest
round trip of a quiet run is not zero either.

Also reported: ``pause`` from echod's own ``upgrade_done`` event (parking the
handlers to the successor serving) and how long ``echod ctl upgrade`` took
(most of it is the new Python process starting, while everyone is served).
Writes bench/out/upgrade_pause.json. Needs a C compiler (loadgen).
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the load generator and its helpers

RESULTS = run.OUT / "upgrade_pause.json"
START_TIMEOUT = 60.0


class Echod:
    """A foreground echod with a control socket; its stderr (and its successors') parsed."""

    def __init__(self, connections: int, workdir: Path) -> None:
        self.ctl = workdir / "ctl.sock"
        cmd = [
            sys.executable,
            "-m",
            "echod",
            "--foreground",
            "--port",
            "0",
            "--control-socket",
            str(self.ctl),
            "--log-format",
            "json",
            "--max-clients",
            str(connections + 100),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=run.REPO
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = int(self.wait("listening")["port"])

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                self.events.put(json.loads(raw))
            except ValueError:
                pass

    def wait(self, name: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise run.RunError(f"echod logged no {name} within {timeout:g} s") from None
            if event.get("event") == name:
                return event

    def command(self, *words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "echod", "ctl", "--control-socket", str(self.ctl), *words],
            capture_output=True,
            text=True,
            timeout=150,
            cwd=run.REPO,
        )

    def stop(self) -> None:
        """``/shutdown`` reaches whichever echod serves now; then make sure of ours."""
        self.command("shutdown")
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def measure(
    connections: int, duration: float, upgrade: bool, workdir: Path, tag: str
) -> dict[str, Any]:
    """One loadgen run; with ``upgrade``, echod is upgraded a third into the window."""
    server = Echod(connections, workdir)
    s = run.Settings(
        duration=duration,
        warmup=1.0,
        grace=30.0,
        connect_timeout=60.0,
        idle_settle=0.0,
        server_cpu=None,
        client_cpu=None,
    )
    record: dict[str, Any] = {"connections": connections, "upgrade": upgrade}
    try:
        cmd = run.loadgen_cmd(run._load(connections), server.port, s)
        proc, reader = run.start_loadgen(cmd, s, tag, subprocess.DEVNULL)
        deadline = time.monotonic() + s.connect_timeout + s.warmup + duration + s.grace + 60
        while reader.readline(deadline) not in (None, "window-start"):
            pass
        if upgrade:
            time.sleep(duration / 3)
            started = time.monotonic()
            answer = server.command("upgrade")
            record["ctl_seconds"] = round(time.monotonic() - started, 3)
            record["answer"] = (answer.stdout or answer.stderr).strip()
            if answer.returncode != 0:
                raise run.RunError(f"upgrade failed: {record['answer']}")
            done = server.wait("upgrade_done")
            record["pause_s"] = done["pause"]
            record["parked_s"] = done["parked_in"]
            record["sent_s"] = done["sent_in"]
            record["handed_over"] = done["clients"]
        result = run.finish_loadgen(proc, reader, deadline)
    finally:
        server.stop()
    for key in ("completed_total", "mismatches", "errors", "unanswered", "p99_us", "max_us"):
        record[key] = result[key]
    return record


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=9.0, help="loadgen window, s")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    run.build_loadgen()
    run.LOGS.mkdir(parents=True, exist_ok=True)
    records = []
    workdir = Path(tempfile.mkdtemp(prefix="echod-upgrade-bench-", dir="/tmp"))
    try:
        for i in range(args.repeat):
            for upgrade in (False, True):
                tag = f"upgrade-{args.connections}c-{'up' if upgrade else 'base'}-{i}"
                print(f"{tag} ...", file=sys.stderr, flush=True)
                records.append(measure(args.connections, args.duration, upgrade, workdir, tag))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    print(
        f"\n{args.connections} connections, depth 1, 64-byte lines, "
        f"{args.duration:g} s window\n\n"
        "| run | lines echoed | wrong/lost | p99 round trip | longest round trip "
        "| echod's pause | ctl upgrade took |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in records:
        bad = r["mismatches"] + r["errors"] + r["unanswered"]
        pause = f"{r['pause_s'] * 1000:.0f} ms" if r["upgrade"] else "-"
        took = f"{r['ctl_seconds']:.2f} s" if r["upgrade"] else "-"
        print(
            f"| {'upgrade' if r['upgrade'] else 'no upgrade'} | {r['completed_total']:,} "
            f"| {bad} | {r['p99_us'] / 1000:.1f} ms | {r['max_us'] / 1000:.0f} ms "
            f"| {pause} | {took} |"
        )
    print(f"\nraw: {RESULTS.relative_to(run.REPO)}", file=sys.stderr)
    return 1 if any(r["mismatches"] or r["errors"] or r["unanswered"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
