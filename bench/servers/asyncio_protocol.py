#!/usr/bin/env python3
"""Reference server: a low-level asyncio.Protocol line echo.

Buffers what arrives, writes all complete lines back with one
``transport.write`` per ``data_received``, and stops reading while the
transport's write buffer is above its high-water mark. Prints
``listening <port>`` once it accepts connections and exits on SIGTERM/SIGINT.
``uvloop_protocol.py`` runs this very class under uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import cast

MAX_PENDING = 64 * 1024  # same bound as the streams server's reader limit


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        end = self.buf.rfind(b"\n") + 1
        if end:
            self.transport.write(bytes(self.buf[:end]))
            del self.buf[:end]
        elif len(self.buf) > MAX_PENDING:
            self.transport.close()  # an endless line: do not buffer without bound

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # peer is not reading its echoes

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(EchoProtocol, host, port, backlog=4096)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
