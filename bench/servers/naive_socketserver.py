#!/usr/bin/env python3
"""Reference server: the textbook thread-per-connection socketserver echo.

Deliberately naive: one thread per client, a buffered reader, an unbuffered
writer, no line-length limit, no logging. Prints ``listening <port>`` once it
accepts connections and exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socketserver
import sys
from types import FrameType


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The only deviation from the defaults: the stock backlog of 5 makes the
    # kernel drop/reset connections when 1000 clients connect at once, which
    # would measure the backlog rather than the server.
    request_queue_size = 4096


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with Server((args.host, args.port), EchoHandler) as server:
        print(f"listening {server.server_address[1]}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
