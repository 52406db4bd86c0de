#!/usr/bin/env python3
"""Reference server: the asyncio_protocol.py server, unchanged, under uvloop.

Exits with status 77 ("skipped") and a message on stderr when uvloop cannot be
imported, so the runner reports it as skipped rather than failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from asyncio_protocol import parse_args, serve

SKIP_EXIT = 77


def main() -> int:
    args = parse_args()
    try:
        import uvloop
    except ImportError as err:
        print(f"uvloop_protocol: skipped: uvloop is not importable ({err})", file=sys.stderr)
        return SKIP_EXIT
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
