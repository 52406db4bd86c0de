"""Network clients for tests/process/nspawn.py, run inside a machine's network namespace.

Usage: ``netclient.py MODE PORT``, on 127.0.0.1. Every socket call has a
timeout; a failure is one line on stderr and exit status 1.

- ``echo``: connect once (no retry), send a line, expect it back, print ``ok``.
- ``hold``: like ``echo``, print ``echoed``, then print everything the server
  sends until it closes (e.g. ``Server shutting down``), then ``EOF``.
- ``storm``: connect, echo, close, again and again until stdin closes (or
  :data:`STORM_MAX` connections / :data:`STORM_SECONDS`); print ``started``
  after the first, then one JSON line: connections made, how many were told
  ``Server shutting down`` (an echod stopping while they were connected:
  served, not refused) and the failures (refused, reset, no answer).
- ``listen``: hold 127.0.0.1:PORT open (print ``listening``) until stdin closes.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

TIMEOUT = 10.0
LINE = b"hello from the machine\n"
SHUTDOWN = b"Server shutting down\n"
STORM_MAX = 5000
STORM_SECONDS = 60.0


def _echo_once(port: int, shutdown_ok: bool = False) -> tuple[socket.socket, bool]:
    """Connect, send LINE, read it back; the connection and whether echod said it stops.

    With ``shutdown_ok``, ``Server shutting down`` in place of the echo or
    after it is no error (an echod stopping while the client was connected);
    anything else than the echo raises ConnectionError.
    """
    conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        conn.sendall(LINE)
        got = b""
        while not got.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {got!r}")
            got += chunk
        if got != LINE and not (shutdown_ok and got in (SHUTDOWN, LINE + SHUTDOWN)):
            raise ConnectionError(f"expected {LINE!r}, got {got!r}")
    except BaseException:
        conn.close()
        raise
    return conn, got != LINE


def _stdin_closed(timeout: float) -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and not sys.stdin.readline()


def main(mode: str, port: int) -> None:
    if mode == "echo":
        _echo_once(port)[0].close()
        print("ok")
    elif mode == "hold":
        conn, _ = _echo_once(port)
        print("echoed", flush=True)
        conn.settimeout(60.0)
        while chunk := conn.recv(4096):
            sys.stdout.write(chunk.decode("utf-8", "replace"))
        print("EOF")
    elif mode == "storm":
        made, told_shutdown, failures = 0, 0, []
        deadline = time.monotonic() + STORM_SECONDS
        while made < STORM_MAX and time.monotonic() < deadline:
            try:
                conn, stopping = _echo_once(port, shutdown_ok=True)
                conn.close()
                told_shutdown += stopping
            except OSError as err:
                failures.append(f"{type(err).__name__}: {err}")
            made += 1
            if made == 1:
                print("started", flush=True)
            if _stdin_closed(0):
                break
        result = {"connections": made, "told_shutdown": told_shutdown, "failures": failures}
        print(json.dumps(result))
    elif mode == "listen":
        with socket.create_server(("127.0.0.1", port)):
            print("listening", flush=True)
            _stdin_closed(STORM_SECONDS)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]))
    except OSError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
