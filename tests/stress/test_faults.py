"""Faults: out of descriptors, out of threads, a too-low open-files limit at start-up."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.stress.stresskit import Harness, MiB, Swarm, open_fds, sample

pytestmark = pytest.mark.slow

OUT_OF_RESOURCES = b"ERR server out of resources, try again later\n"
BUSY = b"ERR server busy, try again later\n"


def nofile(limit: int) -> Callable[[], None]:
    """A preexec_fn: the child starts with soft = hard = ``limit`` open files."""

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return lower


def cpu_share(pid: int, seconds: float) -> float:
    """The fraction of one core the process used over ``seconds`` (wall clock)."""
    before, start = sample(pid).cpu, time.monotonic()
    time.sleep(seconds)
    return (sample(pid).cpu - before) / (time.monotonic() - start)


def classify(swarm: Swarm, which: range) -> tuple[list[int], list[int], list[int]]:
    """(echoed, refused with a line, still waiting) among ``which``."""
    echoed, refused, waiting = [], [], []
    for i in which:
        got = bytes(swarm.inbox[i])
        if got == b"hello from %d\n" % i:
            echoed.append(i)
        elif got.startswith(b"ERR"):
            refused.append(i)
        else:
            waiting.append(i)
    return echoed, refused, waiting


def test_out_of_descriptors_backs_off_and_recovers(echod: Callable[..., Harness]) -> None:
    limit = 64
    srv = echod(preexec_fn=nofile(limit))
    warning = srv.events("nofile_limit_low")
    assert warning and warning[0]["soft"] == limit, "no start-up warning about the low limit"
    spare = limit - open_fds(srv.pid)
    with Swarm(srv.port) as swarm:
        clients = swarm.connect(spare + 60)  # the kernel queues what echod cannot accept
        lines = {i: b"hello from %d\n" % i for i in clients}
        swarm.send(lines.__getitem__, clients)
        swarm.read_until(lambda i: len(swarm.inbox[i]) > 0, clients[: spare - 2], 10)
        swarm.pump(0.5)
        srv.wait_count("out_of_resources", 1, timeout=5)

        def someone_told() -> bool:
            swarm.pump(0.05)
            return bool(classify(swarm, clients)[1])

        # The reserve descriptor trick works before an operator comes: the
        # accept loop closes its reserve for a moment at each pause, to tell one
        # queued client, and a control accept landing in that moment takes the
        # slot (the operator is served, the reserve cannot be reopened).
        wait_for(someone_told, timeout=5, what="a queued client told it cannot be served")
        # Exhausted, with clients still queued: the accept loop must sleep, not spin.
        # An operator waits on the control socket meanwhile: its accept loop
        # fails the same way, backs off every 0.5 s and must log once, not on
        # every retry (four in these 2 s). Two operators, for the same reason:
        # if the first one's accept takes such a slot, the second one's fails.
        with socket.socket(socket.AF_UNIX) as operator, socket.socket(socket.AF_UNIX) as other:
            operator.connect(srv.ctl)
            other.connect(srv.ctl)
            srv.wait_count("control_accept_failed", 1, timeout=5)
            share = cpu_share(srv.pid, 2.0)
            swarm.pump(0.1)
            srv.pump(0.1)
        assert len(srv.events("control_accept_failed")) == 1
        echoed, refused, waiting = classify(swarm, clients)
        print(
            f"\nEMFILE: {spare} spare descriptors; {len(echoed)} served, {len(refused)} "
            f"refused with a line, {len(waiting)} queued; CPU while exhausted "
            f"{share:.1%} of a core; fds {open_fds(srv.pid)}/{limit}"
        )
        assert share < 0.2
        assert len(srv.events("out_of_resources")) == 1  # rate-limited: once, not per attempt
        assert refused, "nobody was told (the reserve descriptor trick)"
        assert all(bytes(swarm.inbox[i]) == OUT_OF_RESOURCES for i in refused)
        assert waiting, "the test must keep clients queued while it measures"
        assert len(echoed) >= spare - 8  # everything that fitted was served
        # Resources come back: queued clients are served within a second or two.
        swarm.close(echoed[:10])
        start = time.monotonic()

        def served_again() -> bool:
            # Until the handlers of the ten have closed their sockets, the
            # accept loop may still refuse the head of the queue with a line.
            swarm.pump(0.05)
            return sum(bytes(swarm.inbox[i]) == lines[i] for i in waiting) >= 5

        wait_for(served_again, timeout=2, what="five queued clients served again")
        print(f"served again {time.monotonic() - start:.2f}s after 10 clients left")
        assert all(bytes(swarm.inbox[i]) in (lines[i], OUT_OF_RESOURCES, b"") for i in waiting)
    ended = srv.wait_count("out_of_resources_ended", 1)[0]
    assert ended["refused"] >= len(refused)
    assert srv.events("out_of_resources")[0]["resource"] == "descriptors"
    # Not ==: the ten freed descriptors are taken again at once, so a second
    # shortage can begin right after the first ended.
    assert srv.stats()["rejected"] >= ended["refused"]
    srv.wait_count("connection_closed", len(echoed) + 5)
    wait_for(lambda: open_fds(srv.pid) < limit - 20, what="descriptors to be released")
    with Swarm(srv.port) as fresh:  # and new ones too
        fresh.echo(fresh.connect(5))
    srv.back_to_baseline(rss_slack=8 * MiB)
    assert not [
        e
        for e in srv.proc.events
        if e.get("level") == "error"
        and e["event"] not in ("out_of_resources", "control_accept_failed")
    ]
    srv.stop()


PIDS_ROOT = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A cgroup v1 pids controller group of our own, removed afterwards."""
    if not os.access(PIDS_ROOT / "cgroup.procs", os.W_OK):
        pytest.skip(
            "needs a writable cgroup v1 pids controller (root) to limit threads; "
            "RLIMIT_NPROC does not apply to root"
        )
    group = PIDS_ROOT / f"echod-stress-{os.getpid()}"
    group.mkdir()
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (PIDS_ROOT / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it exited meanwhile
        group.rmdir()


def test_out_of_threads_backs_off_and_recovers(
    echod: Callable[..., Harness], pids_cgroup: Path
) -> None:
    srv = echod()
    (pids_cgroup / "cgroup.procs").write_text(str(srv.pid))
    room = 20
    current = int((pids_cgroup / "pids.current").read_text())
    (pids_cgroup / "pids.max").write_text(str(current + room))
    with Swarm(srv.port) as swarm:
        clients = swarm.connect(room + 60)
        lines = {i: b"hello from %d\n" % i for i in clients}
        swarm.send(lines.__getitem__, clients)
        srv.wait_count("out_of_resources", 1, timeout=5)
        swarm.read_until(lambda i: len(swarm.inbox[i]) > 0, clients[:room], 10)
        share = cpu_share(srv.pid, 2.0)
        swarm.pump(0.1)
        echoed, refused, waiting = classify(swarm, clients)
        print(
            f"\nthreads: room for {room}; {len(echoed)} served, {len(refused)} refused, "
            f"{len(waiting)} queued; CPU while exhausted {share:.1%} of a core"
        )
        assert share < 0.2
        assert len(srv.events("out_of_resources")) == 1
        assert refused
        assert all(bytes(swarm.inbox[i]) == BUSY for i in refused), {
            bytes(swarm.inbox[i]) for i in refused
        }
        assert waiting
        assert len(echoed) == room
        (pids_cgroup / "pids.max").write_text("max")  # resources come back
        start = time.monotonic()
        swarm.read_until(lambda i: len(swarm.inbox[i]) > 0, waiting, 2)
        print(f"served again {time.monotonic() - start:.2f}s after the limit was lifted")
        assert [bytes(swarm.inbox[i]) for i in waiting] == [lines[i] for i in waiting]
    ended = srv.wait_count("out_of_resources_ended", 1)[0]
    assert ended["refused"] >= len(refused)
    assert srv.events("out_of_resources")[0]["resource"] == "threads"
    # Not ==: the control session that reads /stats needs a thread too, so
    # near the limit a shortage can end and start again between two reads.
    assert srv.stats()["rejected"] >= ended["refused"]
    srv.back_to_baseline(rss_slack=8 * MiB)
    srv.stop()


def test_open_files_limit_is_raised_at_start_up(echod: Callable[..., Harness]) -> None:
    def low_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 8192))

    srv = echod(preexec_fn=low_soft)
    soft = next(
        line.split()[3]
        for line in Path(f"/proc/{srv.pid}/limits").read_text().splitlines()
        if line.startswith("Max open files")
    )
    assert soft == "8192"
    assert not srv.events("nofile_limit_low")
    srv.stop()
