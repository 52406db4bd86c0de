#!/usr/bin/env python3
"""Reference server: asyncio streams, the idiomatic high-level asyncio echo.

``async for line in reader`` with the default 64 KiB reader limit, one
``write`` + ``drain`` per line. Prints ``listening <port>`` once it accepts
connections and exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async for line in reader:
            writer.write(line)
            await writer.drain()
    except (ConnectionError, ValueError):
        pass  # reset by peer, or a line longer than the reader limit
    finally:
        writer.close()


async def serve(host: str, port: int, context: ssl.SSLContext | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        handle, host, port, backlog=4096, limit=64 * 1024, ssl=context
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
