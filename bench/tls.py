#!/usr/bin/env python3
"""The TLS point: echod over TLS against asyncio streams with ``ssl=``, and echod's TLS ÷ plain.

    python bench/tls.py              # 100 connections, 64 B lines, 1 in flight; --repeat 5
    python bench/tls.py --smoke      # CI: a few seconds; checks every byte, never speed

Three servers, interleaved in every repetition so drift hits each alike, in
the same run: ``echod-tls`` (echod with ``--tls-cert``/``--tls-key``),
``asyncio_streams_tls`` (bench/servers/asyncio_streams_tls.py) and ``echod``
over plain TCP at the same point. The client is bench/loadgen.c built with
``-DLOADGEN_TLS`` (Debian's libssl-dev) as bench/out/loadgen-tls, run with
``--tls``: every connection completes its TLS handshake in the connect
phase, before the warm-up and the window, so the figures are the
encrypted session's, not the handshakes'. Why loadgen speaks TLS itself
rather than going through a TLS-terminating front: a front (socat, HAProxy)
would add its own encryption and a second hop to every round trip and
measure mostly itself. The certificate is a throwaway ECDSA P-256 one made
by the ``openssl`` command into bench/out/tls/ (loadgen does not verify it).

Ratios are per repetition (echod-tls ÷ asyncio TLS, echod-tls ÷ echod plain
in the same repetition), then the median; the target is echod-tls ≥ 1.0x
asyncio TLS. Results: a Markdown table on stdout, raw records in
bench/out/tls.json. Machine, pinning and the other flags as in bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # bench/harness.py: servers, load generator, measurement
from report import DASH

CERT_DIR = harness.OUT / "tls"
RESULTS = harness.OUT / "tls.json"
POINT = harness.Point("100c-64B-d1-tls", "load", 100, 64, 1, tls=True)
PLAIN_POINT = harness.Point("100c-64B-d1", "load", 100, 64, 1)
SMOKE_POINT = harness.Point("10c-64B-d1-tls", "load", 10, 64, 1, tls=True)
SMOKE_PLAIN = harness.Point("10c-64B-d1", "load", 10, 64, 1)


def make_certificate() -> tuple[Path, Path]:
    CERT_DIR.mkdir(parents=True, exist_ok=True)
    cert, key = CERT_DIR / "cert.pem", CERT_DIR / "key.pem"
    cmd = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "2", "-subj", "/CN=localhost",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=harness.BUILD_TIMEOUT)
    if done.returncode != 0:
        sys.exit(f"cannot make the benchmark certificate ({shlex.join(cmd)}):\n{done.stderr}")
    return cert, key


def build_loadgen_tls() -> None:
    harness.OUT.mkdir(parents=True, exist_ok=True)
    cmd = ["cc", "-O2", "-Wall", "-Wextra", "-DLOADGEN_TLS", "-o", str(harness.LOADGEN_TLS),
           str(harness.LOADGEN_SRC), "-lssl", "-lcrypto"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=harness.BUILD_TIMEOUT)
    if done.returncode != 0:
        sys.exit(f"building loadgen with TLS failed (needs libssl-dev):\n{done.stderr}")


def servers(echod_cmd: str, cert: Path, key: Path) -> list[tuple[harness.ServerSpec, bool]]:
    """(server, speaks TLS), in the order of the first repetition."""
    echod = tuple(shlex.split(echod_cmd))
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    script = harness.BENCH / "servers" / "asyncio_streams_tls.py"
    asyncio_cmd = (sys.executable, str(script), "--host", harness.HOST, "--port", "0", "--cert",
                   str(cert), "--key", str(key))  # fmt: skip
    return [
        (harness.ServerSpec("echod-tls", (*echod, *tls), ("stderr-json", "proc")), True),
        (harness.ServerSpec("asyncio_streams_tls", asyncio_cmd, ("stdout",)), True),
        (harness.ServerSpec("echod", echod, ("stderr-json", "proc")), False),
    ]


def rate(rec: harness.Record) -> float:
    return float(rec["loadgen"]["messages_per_s"])


def per_cpu(rec: harness.Record) -> float:
    """Lines per second of the server's own CPU time: what a busy machine steals does not count."""
    return float(rec["loadgen"]["messages"]) / max(float(rec.get("server_cpu_s", 0.0)), 1e-9)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="a few seconds; correctness only")
    ap.add_argument("--repeat", type=int, help="repetitions (default 5; smoke 1)")
    ap.add_argument("--duration", type=float, help="measured window, s (default 3; smoke 0.5)")
    ap.add_argument("--warmup", type=float, help="warm-up, s (default 1; smoke 0.2)")
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU for servers (default 1)")
    ap.add_argument("--client-cpu", type=int, default=0, help="CPU for loadgen (default 0)")
    ap.add_argument("--echod-cmd", default=harness.DEFAULT_ECHOD_CMD, help="as in bench/run.py")
    args = ap.parse_args(argv)
    smoke = args.smoke
    s = harness.Settings(
        duration=args.duration or (0.5 if smoke else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.2 if smoke else 1.0),
        grace=2.0,
        connect_timeout=15.0,
        idle_settle=0.0,
        server_cpu=args.server_cpu,
        client_cpu=args.client_cpu,
        prewarm=0.1 if smoke else 1.0,  # warm, as bench/run.py measures (harness.warm_up)
    )
    repeat = args.repeat or (1 if smoke else 5)
    harness.build_loadgen()
    build_loadgen_tls()
    cert, key = make_certificate()
    table = servers(args.echod_cmd, cert, key)
    records: list[harness.Record] = []
    failed = False
    for rep in range(repeat):
        order = table[rep % len(table) :] + table[: rep % len(table)]
        for spec, tls in order:
            point = (
                (SMOKE_POINT if tls else SMOKE_PLAIN) if smoke else (POINT if tls else PLAIN_POINT)
            )
            rec = harness.run_one(point, spec, rep, s)
            trouble = harness.problems(rec)
            rec["problems"] = trouble
            records.append(rec)
            shown = f"{rate(rec):,.0f} msgs/s" if rec["status"] == "ok" else rec["status"]
            print(f"r{rep} {spec.name}: {shown} {'; '.join(trouble)}", file=sys.stderr)
            failed |= rec["status"] != "ok" or bool(trouble)
    RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    if failed:
        print(f"some runs failed or were wrong; see {RESULTS}", file=sys.stderr)
        return 1
    if smoke:
        return 0
    print(f"{POINT.connections} connections, 64-byte lines, 1 in flight, {repeat} repetitions\n")
    print("| server | msgs/s, median (range) | msgs per server CPU second, median |")
    print("|---|---:|---:|")
    for spec, _ in table:
        mine = [r for r in records if r["server"] == spec.name]
        rates = [rate(r) for r in mine]
        low, high = min(rates), max(rates)
        print(
            f"| {spec.name} | {statistics.median(rates):,.0f} ({low:,.0f}{DASH}{high:,.0f}) "
            f"| {statistics.median(per_cpu(r) for r in mine):,.0f} |"
        )
    for other in ("asyncio_streams_tls", "echod"):
        for label, measure in (("msgs/s", rate), ("per CPU second", per_cpu)):
            ratios = []
            for rep in range(repeat):
                pair = {r["server"]: measure(r) for r in records if r["rep"] == rep}
                ratios.append(pair["echod-tls"] / pair[other])
            print(
                f"\nechod-tls ÷ {other}, {label}: median {statistics.median(ratios):.2f}x "
                f"(per repetition: {', '.join(f'{x:.2f}' for x in ratios)})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
