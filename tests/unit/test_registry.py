"""Unit tests for echod.registry: ids, membership, counters, and the lock discipline.

The registry is generic over what it stores, so these tests register plain
records; the server's real Connection objects are covered by the
integration tests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from echod.registry import DURATION_BUCKETS, Registry

pytestmark = pytest.mark.timeout(30)


@dataclass
class Rec:
    id: int
    bytes_in: int = 0
    bytes_out: int = 0
    lines_in: int = 0
    lines_out: int = 0
    started: float = field(default_factory=time.monotonic)
    end_reason: str | None = None


def new(reg: Registry[Rec], **counters: int) -> Rec:
    rec = Rec(reg.next_id())
    for name, value in counters.items():
        setattr(rec, name, value)
    reg.add(rec)
    return rec


def test_ids_start_at_one_and_increase() -> None:
    reg: Registry[Rec] = Registry()
    assert [reg.next_id() for _ in range(3)] == [1, 2, 3]


def test_ids_are_never_reused() -> None:
    reg: Registry[Rec] = Registry()
    first = new(reg)
    reg.remove(first)
    second = new(reg)
    assert second.id > first.id
    assert reg.get(first.id) is None
    assert reg.get(second.id) is second


def test_add_get_remove_len() -> None:
    reg: Registry[Rec] = Registry()
    a, b = new(reg), new(reg)
    assert len(reg) == 2
    assert reg.get(a.id) is a and reg.get(b.id) is b
    assert reg.get(999) is None
    reg.remove(a)
    assert len(reg) == 1 and reg.get(a.id) is None


def test_snapshot_is_in_id_order_and_owned_by_the_caller() -> None:
    reg: Registry[Rec] = Registry()
    recs = [new(reg) for _ in range(5)]
    snap = reg.snapshot()
    assert [r.id for r in snap] == [r.id for r in recs]
    snap.clear()  # the caller's list: the registry is unaffected
    reg.remove(recs[0])
    assert [r.id for r in reg.snapshot()] == [r.id for r in recs[1:]]


def test_removing_twice_counts_traffic_once() -> None:
    reg: Registry[Rec] = Registry()
    rec = new(reg, bytes_in=10, bytes_out=20, lines_in=1, lines_out=2)
    reg.remove(rec)
    reg.remove(rec)
    s = reg.stats()
    assert (s.bytes_in, s.bytes_out, s.lines_in, s.lines_out) == (10, 20, 1, 2)


def test_stats_add_live_and_departed_clients() -> None:
    reg: Registry[Rec] = Registry()
    gone = new(reg, bytes_in=5, bytes_out=6, lines_in=1, lines_out=1)
    live = new(reg, bytes_in=100, bytes_out=200, lines_in=3, lines_out=4)
    reg.remove(gone)
    live.bytes_in += 1  # counters move on the client objects; stats read them live
    assert reg.reject("server_full") == 1
    assert reg.reject("server_full") == 2
    s = reg.stats()
    assert s.connected == 1
    assert s.total_accepted == 2
    assert s.rejected == 2
    assert (s.bytes_in, s.bytes_out) == (106, 206)
    assert (s.lines_in, s.lines_out) == (4, 5)
    assert s.uptime >= 0


def test_a_refused_client_counts_as_rejected_not_accepted() -> None:
    # The accept loop registers a client before its thread starts; if the
    # thread cannot start, the client was never served.
    reg: Registry[Rec] = Registry()
    new(reg)
    refused = new(reg)
    refused.end_reason = "out_of_threads"
    reg.remove(refused, refused=True)
    s = reg.stats()
    assert (s.connected, s.total_accepted, s.rejected) == (1, 1, 1)
    assert s.refused == {"out_of_threads": 1} and s.closed == {}
    assert sum(s.durations) == 0  # never served: no duration


def test_refusals_closes_and_durations_are_counted_by_reason() -> None:
    reg: Registry[Rec] = Registry()
    reg.reject("server_full")
    reg.reject("server_full")
    reg.reject("out_of_descriptors")
    now = time.monotonic()
    # Durations of 0.5 s, 30 s and 2 days: buckets le=1, le=60 and the overflow.
    for reason, age in (("eof", 0.5), ("exit", 30.0), ("eof", 2 * 86400.0)):
        rec = new(reg)
        rec.started, rec.end_reason = now - age, reason
        reg.remove(rec)
    reg.count_operator_messages(1)
    reg.count_operator_messages(3)
    s = reg.stats()
    assert s.refused == {"server_full": 2, "out_of_descriptors": 1}
    assert s.rejected == 3
    assert s.closed == {"eof": 2, "exit": 1}
    bounds = (*DURATION_BUCKETS, float("inf"))
    assert {bounds[i]: n for i, n in enumerate(s.durations) if n} == {
        1.0: 1,
        60.0: 1,
        float("inf"): 1,
    }
    assert 2 * 86400 + 30.5 <= s.duration_sum < 2 * 86400 + 31.5
    assert s.operator_messages == 4


def test_counters_carry_over_to_another_registry() -> None:
    # An upgrade: the successor's registry goes on from the old one's counters.
    old: Registry[Rec] = Registry()
    old.reject("server_full")
    rec = new(old, lines_in=3, bytes_in=30)
    rec.started, rec.end_reason = time.monotonic() - 30.0, "exit"
    old.remove(rec)
    old.count_operator_messages(2)
    old.tls_failed()
    live = new(old)
    successor: Registry[Rec] = Registry()
    totals = old.counters()
    successor.restore(totals)
    successor.add(live, notify=False)
    a, b = old.stats(), successor.stats()
    assert b.refused == a.refused == {"server_full": 1}
    assert b.closed == a.closed == {"exit": 1}
    assert b.durations == a.durations and b.duration_sum == a.duration_sum
    assert (b.operator_messages, b.tls_handshake_failures) == (2, 1)
    assert (b.total_accepted, b.rejected, b.lines_in, b.bytes_in) == (2, 1, 3, 30)
    assert b.uptime >= totals.uptime  # goes on from the old one's
    assert successor.next_id() == old.next_id()


def test_a_histogram_with_other_buckets_is_not_carried_over() -> None:
    reg: Registry[Rec] = Registry()
    totals = reg.counters()
    totals.durations, totals.duration_sum = [1] * (len(DURATION_BUCKETS) + 3), 9.0
    totals.closed = {"eof": 1}
    reg.restore(totals)
    s = reg.stats()
    assert sum(s.durations) == 0 and s.duration_sum == 0.0  # not mapped onto these buckets
    assert s.closed == {"eof": 1}


def test_uptime_grows() -> None:
    reg: Registry[Rec] = Registry()
    first = reg.stats().uptime
    threading.Event().wait(0.02)
    assert reg.stats().uptime > first


def test_on_change_gets_counts_and_runs_outside_the_lock() -> None:
    reg: Registry[Rec] = Registry()
    seen: list[tuple[int, bool]] = []

    def changed(count: int) -> None:
        # The lock is a plain Lock: if it were held here, this would fail.
        free = reg._lock.acquire(blocking=False)
        if free:
            reg._lock.release()
        seen.append((count, free))

    reg.on_change = changed
    a = new(reg)
    new(reg)
    reg.remove(a)
    reg.remove(a)  # already gone: no change, no call
    assert seen == [(1, True), (2, True), (1, True)]


def test_concurrent_add_and_remove_keep_ids_unique_and_totals_exact() -> None:
    reg: Registry[Rec] = Registry()
    threads, per_thread = 8, 200
    ids: list[int] = []
    ids_lock = threading.Lock()

    def churn() -> None:
        mine = []
        for _ in range(per_thread):
            rec = new(reg, bytes_in=1, lines_in=1)
            mine.append(rec.id)
            reg.remove(rec)
        with ids_lock:
            ids.extend(mine)

    workers = [threading.Thread(target=churn) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
        assert not w.is_alive()
    total = threads * per_thread
    assert len(set(ids)) == total
    s = reg.stats()
    assert s.connected == 0 and len(reg) == 0
    assert s.total_accepted == total
    assert s.bytes_in == total and s.lines_in == total
