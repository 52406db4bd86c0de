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
lock. What is counted here is counted once per connection (accepted,
refused or closed, by reason, and how long it lasted) or once per operator
message, never per line; the metrics endpoint (:mod:`echod.metrics`) only
reads :meth:`stats`.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# Upper bounds (seconds) of the connection-duration histogram: from a refused
# or scripted client (milliseconds) to the sessions an idle timeout of up to
# a day allows.
DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 6 * 3600.0, 86400.0)


class Client(Protocol):
    """What the registry needs to know about a connected client."""

    id: int
    bytes_in: int
    bytes_out: int
    lines_in: int
    lines_out: int
    started: float  # monotonic
    end_reason: str | None  # why it ended (or was refused), once it has


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
    refused: dict[str, int]  # rejected, by reason
    closed: dict[str, int]  # served clients that left, by connection_closed reason
    durations: tuple[int, ...]  # closed clients by DURATION_BUCKETS, not cumulative; + over
    duration_sum: float
    operator_messages: int  # lines pushed to clients by /send and /broadcast
    tls_handshake_failures: int = 0


@dataclass
class Totals:
    """The server-wide counters that outlive clients: what an upgrade carries over.

    :meth:`Registry.counters` gives them and :meth:`Registry.restore` takes
    them; the fields after ``uptime`` default to nothing counted, which is
    what an echod from before they were carried sends.
    """

    next_id: int
    accepted: int
    rejected: int
    gone: list[int]  # lines_in, lines_out, bytes_in, bytes_out of clients already gone
    uptime: float
    refused: dict[str, int] = field(default_factory=dict)
    closed: dict[str, int] = field(default_factory=dict)
    durations: list[int] = field(default_factory=list)  # as Stats.durations; [] = none
    duration_sum: float = 0.0
    operator_messages: int = 0
    tls_failures: int = 0


C = TypeVar("C", bound=Client)


class Registry(Generic[C]):
    """Connected clients by id, plus the server-wide counters."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._clients: dict[int, C] = {}
        self._next_id = 1
        self._accepted = 0
        self._rejected = 0
        self._tls_failures = 0
        # Traffic of clients that already left.
        self._gone = [0, 0, 0, 0]  # lines_in, lines_out, bytes_in, bytes_out
        self._refused: Counter[str] = Counter()
        self._closed: Counter[str] = Counter()
        self._durations = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self._operator_messages = 0
        self._started = time.monotonic()
        self.on_change = on_change  # called with the new count, outside the lock

    def next_id(self) -> int:
        """Reserve the next client id (ids are never reused)."""
        with self._lock:
            cid = self._next_id
            self._next_id += 1
            return cid

    def add(self, client: C, notify: bool = True) -> int:
        """Register a client; returns how many are connected now.

        ``notify=False``: a client handed over by the echod this one replaces;
        it was counted there (see :meth:`restore`), and nobody is told.
        """
        with self._lock:
            self._clients[client.id] = client
            if notify:
                self._accepted += 1
            count = len(self._clients)
        if notify and self.on_change is not None:
            self.on_change(count)
        return count

    def restore(self, totals: Totals) -> None:
        """Go on with the counters of the echod this one replaces (an upgrade).

        A duration histogram with other buckets than :data:`DURATION_BUCKETS`
        (another version's) cannot be mapped onto these, so it is left out,
        with its sum.
        """
        with self._lock:
            self._next_id = max(self._next_id, totals.next_id)
            self._accepted, self._rejected = totals.accepted, totals.rejected
            self._gone = list(totals.gone)
            self._started = time.monotonic() - totals.uptime
            self._refused = Counter(totals.refused)
            self._closed = Counter(totals.closed)
            if len(totals.durations) == len(self._durations):
                self._durations = list(totals.durations)
                self._duration_sum = totals.duration_sum
            self._operator_messages = totals.operator_messages
            self._tls_failures = totals.tls_failures

    def counters(self) -> Totals:
        """What :meth:`restore` takes."""
        with self._lock:
            return self._totals()

    def _totals(self) -> Totals:
        """A copy of the counters; under the lock."""
        return Totals(
            next_id=self._next_id,
            accepted=self._accepted,
            rejected=self._rejected,
            gone=list(self._gone),
            uptime=time.monotonic() - self._started,
            refused=dict(self._refused),
            closed=dict(self._closed),
            durations=list(self._durations),
            duration_sum=self._duration_sum,
            operator_messages=self._operator_messages,
            tls_failures=self._tls_failures,
        )

    def remove(self, client: C, refused: bool = False) -> None:
        """Unregister a client that ended; ``refused``: it was never served (a rejection).

        Either way it is counted by its ``end_reason``.
        """
        duration = time.monotonic() - client.started
        reason = client.end_reason or "unknown"
        with self._lock:
            if self._clients.pop(client.id, None) is None:
                return
            if refused:
                self._accepted -= 1
                self._rejected += 1
                self._refused[reason] += 1
            else:
                self._closed[reason] += 1
                self._durations[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
                self._duration_sum += duration
            gone = self._gone
            gone[0] += client.lines_in
            gone[1] += client.lines_out
            gone[2] += client.bytes_in
            gone[3] += client.bytes_out
            count = len(self._clients)
        if self.on_change is not None:
            self.on_change(count)

    def reject(self, reason: str) -> int:
        """Count a connection refused before it was registered; returns the total so far."""
        with self._lock:
            self._rejected += 1
            self._refused[reason] += 1
            return self._rejected

    def count_operator_messages(self, lines: int) -> None:
        with self._lock:
            self._operator_messages += lines

    def tls_failed(self) -> None:
        """Count a client whose TLS handshake failed (it is still removed as usual)."""
        with self._lock:
            self._tls_failures += 1

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
            t = self._totals()
        lines_in, lines_out, bytes_in, bytes_out = t.gone
        for c in live:
            lines_in += c.lines_in
            lines_out += c.lines_out
            bytes_in += c.bytes_in
            bytes_out += c.bytes_out
        return Stats(
            connected=len(live),
            total_accepted=t.accepted,
            rejected=t.rejected,
            lines_in=lines_in,
            lines_out=lines_out,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            uptime=t.uptime,
            refused=t.refused,
            closed=t.closed,
            durations=tuple(t.durations),
            duration_sum=t.duration_sum,
            operator_messages=t.operator_messages,
            tls_handshake_failures=t.tls_failures,
        )
