#!/usr/bin/env python3
"""Reference server: asyncio streams over TLS (``start_server(..., ssl=context)``).

asyncio_streams.py's server, given a context; asyncio terminates TLS with memory
BIOs in its event loop, as echod does in each handler thread, so the two
are compared doing the same work. Needs ``--cert`` and ``--key``. Prints
``listening <port>`` once it accepts connections and exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys

from asyncio_streams import serve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
