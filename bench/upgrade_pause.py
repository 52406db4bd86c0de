#!/usr/bin/env python3
"""The longest pause a client sees while echod upgrades itself under load.

    python bench/upgrade_pause.py                         # 1,000 paced clients
    python bench/upgrade_pause.py --flat-out --connections 100 --repeat 3

Paced (the default): every client sends a line every ``--interval`` seconds
(staggered) and checks each echo; the figure is the longest gap between two
echoes any client saw (without an upgrade it is about the interval). Paced,
the machine is not saturated, so the gap is the upgrade's pause rather than
the queueing of a machine at its limit; the same run without an upgrade,
side by side, is the baseline.

Flat out (``--flat-out``):

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
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # bench/harness.py: the load generator and its helpers

RESULTS = harness.OUT / "upgrade_pause.json"
START_TIMEOUT = 60.0
CONNECT_TIMEOUT = 60.0


def paced(
    port: int, clients: int, interval: float, duration: float, during: Any = None
) -> dict[str, Any]:
    """``clients`` connections each echoing a numbered line every ``interval`` s.

    ``during`` (if given) is called once, a third into ``duration``, in a
    thread. Returns the longest gap between two echoes on any connection, the
    99th percentile of the per-connection longest gaps, and the lines checked.
    """
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection((harness.HOST, port), timeout=CONNECT_TIMEOUT)
        sock.setblocking(False)
        socks.append(sock)
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    inbox = [b""] * clients
    sent = [0] * clients
    echoed = [0] * clients
    last = [0.0] * clients
    gap = [0.0] * clients
    start = time.monotonic()
    due = [start + interval * i / clients for i in range(clients)]  # staggered
    for i in range(clients):
        last[i] = due[i]
    end = start + duration
    worker = None
    wrong = 0
    while True:
        now = time.monotonic()
        if during is not None and worker is None and now >= start + duration / 3:
            worker = threading.Thread(target=during)
            worker.start()
        if now >= end:
            break
        for i in range(clients):
            if due[i] <= now and sent[i] == echoed[i]:  # one line in flight at most
                socks[i].send(b"%d %d\n" % (i, sent[i]))
                sent[i] += 1
                due[i] += interval
        for key, _ in sel.select(0.005):
            i = key.data
            chunk = socks[i].recv(65536)
            if not chunk:
                raise harness.RunError(f"client {i} was disconnected")
            inbox[i] += chunk
            t = time.monotonic()
            while b"\n" in inbox[i]:
                line, _, inbox[i] = inbox[i].partition(b"\n")
                wrong += line != b"%d %d" % (i, echoed[i])
                echoed[i] += 1
                gap[i] = max(gap[i], t - last[i])
                last[i] = t
    if worker is not None:
        worker.join(150)
    for sock in socks:
        sock.close()
    sel.close()
    ordered = sorted(gap)
    return {
        "longest_gap_s": round(ordered[-1], 4),
        "p99_longest_gap_s": round(ordered[int(0.99 * (clients - 1))], 4),
        "lines": sum(echoed),
        "wrong": wrong,
    }


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
            cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=harness.REPO
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
                raise harness.RunError(f"echod logged no {name} within {timeout:g} s") from None
            if event.get("event") == name:
                return event

    def command(self, *words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "echod", "ctl", "--control-socket", str(self.ctl), *words],
            capture_output=True,
            text=True,
            timeout=150,
            cwd=harness.REPO,
        )

    def stop(self) -> None:
        """``/shutdown`` reaches whichever echod serves now; then make sure of ours."""
        self.command("shutdown")
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def measure_paced(
    connections: int, interval: float, duration: float, upgrade: bool, workdir: Path
) -> dict[str, Any]:
    """One paced run; with ``upgrade``, echod is upgraded a third into it."""
    server = Echod(connections, workdir)
    record: dict[str, Any] = {"connections": connections, "upgrade": upgrade, "mode": "paced"}

    def upgrade_now() -> None:
        answer = server.command("upgrade")
        record["answer"] = (answer.stdout or answer.stderr).strip()
        if answer.returncode == 0:
            done = server.wait("upgrade_done")
            record.update(pause_s=done["pause"], handed_over=done["clients"])

    try:
        record.update(
            paced(server.port, connections, interval, duration, upgrade_now if upgrade else None)
        )
    finally:
        server.stop()
    if upgrade and "pause_s" not in record:
        raise harness.RunError(f"upgrade failed: {record.get('answer')}")
    return record


def measure(
    connections: int, duration: float, upgrade: bool, workdir: Path, tag: str
) -> dict[str, Any]:
    """One loadgen run; with ``upgrade``, echod is upgraded a third into the window."""
    server = Echod(connections, workdir)
    s = harness.Settings(
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
        cmd = harness.loadgen_cmd(harness.load_point(connections), server.port, s)
        proc, reader = harness.start_loadgen(cmd, s, tag, subprocess.DEVNULL)
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
                raise harness.RunError(f"upgrade failed: {record['answer']}")
            done = server.wait("upgrade_done")
            record["pause_s"] = done["pause"]
            record["parked_s"] = done["parked_in"]
            record["sent_s"] = done["sent_in"]
            record["handed_over"] = done["clients"]
        result = harness.finish_loadgen(proc, reader, deadline)
        if upgrade and record["handed_over"] < result["connections"]:
            raise harness.RunError(
                f"only {record['handed_over']} of {result['connections']} connections were "
                "handed over: the upgrade ended after loadgen's window; use a longer --duration"
            )
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
    ap.add_argument("--duration", type=float, default=9.0, help="measured run, s")
    ap.add_argument("--interval", type=float, default=0.25, help="paced: s between lines")
    ap.add_argument("--flat-out", action="store_true", help="loadgen at depth 1 instead")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    harness.LOGS.mkdir(parents=True, exist_ok=True)
    records = []
    workdir = Path(tempfile.mkdtemp(prefix="echod-upgrade-bench-", dir="/tmp"))
    try:
        if args.flat_out:
            harness.build_loadgen()
        else:  # a descriptor per client, here as in echod
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for i in range(args.repeat):
            for upgrade in (False, True):
                tag = f"upgrade-{args.connections}c-{'up' if upgrade else 'base'}-{i}"
                print(f"{tag} ...", file=sys.stderr, flush=True)
                if args.flat_out:
                    rec = measure(args.connections, args.duration, upgrade, workdir, tag)
                else:
                    rec = measure_paced(
                        args.connections, args.interval, args.duration, upgrade, workdir
                    )
                records.append(rec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    if not args.flat_out:
        print(
            f"\n{args.connections} clients, each a line every {args.interval:g} s, "
            f"{args.duration:g} s\n\n| run | lines echoed | wrong | longest gap between two "
            "echoes | 99th pct of per-client longest gaps | echod's pause |\n"
            "|---|---:|---:|---:|---:|---:|"
        )
        for r in records:
            pause = f"{r['pause_s'] * 1000:.0f} ms" if r["upgrade"] else "-"
            print(
                f"| {'upgrade' if r['upgrade'] else 'no upgrade'} | {r['lines']:,} "
                f"| {r['wrong']} | {r['longest_gap_s'] * 1000:.0f} ms "
                f"| {r['p99_longest_gap_s'] * 1000:.0f} ms | {pause} |"
            )
        print(f"\nraw: {RESULTS.relative_to(harness.REPO)}", file=sys.stderr)
        return 1 if any(r["wrong"] for r in records) else 0
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
    print(f"\nraw: {RESULTS.relative_to(harness.REPO)}", file=sys.stderr)
    return 1 if any(r["mismatches"] or r["errors"] or r["unanswered"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
