"""The client registry: the only shared mutable state in echod.

It maps client ids to live clients under one :class:`threading.Lock`. Ids
increase monotonically and are never reused (like Redis client ids). The
lock guards only the dictionary and the counters of clients that already
left; it is never held across socket I/O: callers take a :meth:`snapshot`
and talk to the clients outside the lock, so a client that stops reading
cannot slow the console, a broadcast or any other client.

Per-client traffic counters live on the client objects and are written only
by the threads that move that client's bytes; :meth:`stats` adds them up
with the totals of clients already gone, so the hot path never takes this
lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Client(Protocol):
    """What the registry needs to know about a connected client."""

    id: int
    bytes_in: int
    bytes_out: int
    lines_in: int
    lines_out: int


@dataclass(frozen=True)
class Stats:
    connected: int
    total_accepted: int
    rejected: int
    lines_in: int
    lines_out: int
    bytes_in: int
    bytes_out: int
    uptime: float


C = TypeVar("C", bound=Client)


class Registry(Generic[C]):
    """Connected clients by id, plus the server-wide counters."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._clients: dict[int, C] = {}
        self._next_id = 1
        self._accepted = 0
        self._rejected = 0
        # Traffic of clients that already left.
        self._gone = [0, 0, 0, 0]  # lines_in, lines_out, bytes_in, bytes_out
        self._started = time.monotonic()
        self.on_change = on_change  # called with the new count, outside the lock

    def next_id(self) -> int:
        """Reserve the next client id (ids are never reused)."""
        with self._lock:
            cid = self._next_id
            self._next_id += 1
            return cid

    def add(self, client: C) -> int:
        """Register a client; returns how many are connected now."""
        with self._lock:
            self._clients[client.id] = client
            self._accepted += 1
            count = len(self._clients)
        if self.on_change is not None:
            self.on_change(count)
        return count

    def remove(self, client: C, refused: bool = False) -> None:
        """Unregister a client; ``refused``: it was never served (count it as rejected)."""
        with self._lock:
            if self._clients.pop(client.id, None) is None:
                return
            if refused:
                self._accepted -= 1
                self._rejected += 1
            gone = self._gone
            gone[0] += client.lines_in
            gone[1] += client.lines_out
            gone[2] += client.bytes_in
            gone[3] += client.bytes_out
            count = len(self._clients)
        if self.on_change is not None:
            self.on_change(count)

    def reject(self) -> int:
        """Count a refused connection; returns the total refused so far."""
        with self._lock:
            self._rejected += 1
            return self._rejected

    def get(self, client_id: int) -> C | None:
        with self._lock:
            return self._clients.get(client_id)

    def snapshot(self) -> list[C]:
        """The connected clients in id order, as a list the caller owns."""
        with self._lock:
            clients = list(self._clients.values())
        return clients  # dicts keep insertion order, which is id order

    def __len__(self) -> int:
        return len(self._clients)  # a single read of a dict's size is atomic

    def stats(self) -> Stats:
        with self._lock:
            live = list(self._clients.values())
            lines_in, lines_out, bytes_in, bytes_out = self._gone
            accepted, rejected = self._accepted, self._rejected
        for c in live:
            lines_in += c.lines_in
            lines_out += c.lines_out
            bytes_in += c.bytes_in
            bytes_out += c.bytes_out
        return Stats(
            connected=len(live),
            total_accepted=accepted,
            rejected=rejected,
            lines_in=lines_in,
            lines_out=lines_out,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            uptime=time.monotonic() - self._started,
        )
