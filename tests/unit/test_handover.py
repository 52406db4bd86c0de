"""The hand-over wire format: frames, descriptors in batches, state round trips, bad input."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from echod import handover
from echod.handover import Channel, ClientState, HandoverError, ServerState
from echod.registry import DURATION_BUCKETS, Totals


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = Channel(a, send_timeout=5.0), Channel(b, send_timeout=5.0)
    yield ours, theirs
    ours.close()
    theirs.close()


def _client(cid: int, fd: int, **kw: object) -> ClientState:
    base: dict[str, object] = {
        "id": cid,
        "fd": fd,
        "peer": f"127.0.0.1:{40000 + cid}",
        "age": 12.25,
        "idle": 3.5,
        "line_age": None,
        "stalled": None,
    }
    base.update(kw)
    return ClientState(**base)  # type: ignore[arg-type]


def _state(clients: list[ClientState], fds: int) -> ServerState:
    return ServerState(
        pid=4242,
        listener=0,
        control=1,
        pidfile=None,
        metrics=None,
        totals=Totals(
            next_id=max((c.id for c in clients), default=0) + 1,
            accepted=len(clients) + 7,
            rejected=3,
            gone=[10, 11, 12, 13],
            uptime=99.5,
            refused={"server_full": 2, "denied": 1},
            closed={"exit": 5, "eof": 2},
            durations=[1, 2, 0, 0, 4] + [0] * (len(DURATION_BUCKETS) - 4),
            duration_sum=321.5,
            operator_messages=9,
            tls_failures=1,
        ),
        socket_activated=False,
        clients=clients,
        admission_refused={"access_denied": 4},
    )


def test_frames_round_trip(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    ours.send({"type": "hello", "version": handover.VERSION, "pid": 1})
    ours.send({"type": "ready", "pid": 2})
    assert theirs.recv(5.0, "hello") == {"type": "hello", "version": handover.VERSION, "pid": 1}
    assert theirs.recv(5.0)["pid"] == 2


def test_state_and_many_descriptors_round_trip(pair: tuple[Channel, Channel]) -> None:
    """More descriptors than one message may carry (SCM_MAX_FD), and every byte kind."""
    ours, theirs = pair
    count = handover.FDS_PER_MESSAGE * 2 + 17
    pipes = [os.pipe() for _ in range((count + 1) // 2)]
    fds = [fd for p in pipes for fd in p][:count]
    clients = [
        _client(
            i + 1,
            i + 2,
            pending=bytes([i % 256]) * (i % 7) + b"\r" * (i % 2),
            queued=[(b"\x00\xff line %d\n" % i, 1)] * (i % 3),
            line_age=None if i % 2 else 0.75,
            stalled=1.5 if i % 5 == 0 else None,
            bytes_in=i,
            lines_out=2 * i,
        )
        for i in range(count - 2)
    ]
    state = _state(clients, count)
    try:
        handover.send_state(ours, state, fds)
        got, received = handover.recv_state(theirs, 10.0)
        try:
            assert got == state
            assert len(received) == count
            # Each received descriptor is the same file as the one sent, in order.
            for sent, taken in zip(fds, received, strict=True):
                assert os.fstat(sent).st_ino == os.fstat(taken).st_ino
                assert not os.get_inheritable(taken)  # close-on-exec, like every echod fd
        finally:
            handover.close_fds(received)
    finally:
        handover.close_fds(fds)


def test_a_state_without_the_later_counters_is_taken_with_none_counted() -> None:
    # What an echod from before refusals, closes and durations were carried sends.
    message = handover.encode_state(_state([], 2))
    for key in ("refused", "closed", "durations", "duration_sum", "operator_messages"):
        del message[key]
    del message["tls_failures"], message["admission_refused"]
    state = handover.decode_state(message, 2)
    assert state.admission_refused == {}
    totals = state.totals
    assert (totals.accepted, totals.gone) == (7, [10, 11, 12, 13])
    assert (totals.refused, totals.closed, totals.durations) == ({}, {}, [])
    assert (totals.duration_sum, totals.operator_messages, totals.tls_failures) == (0.0, 0, 0)


def test_counts_by_reason_must_be_an_object_of_numbers() -> None:
    message = handover.encode_state(_state([], 2))
    for bad in ([["exit", 1]], {"exit": "many"}):
        with pytest.raises(HandoverError, match="malformed hand-over state"):
            handover.decode_state({**message, "closed": bad}, 2)


def test_version_mismatch_is_refused(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    message = {**handover.encode_state(_state([], 1)), "version": handover.VERSION + 1}
    r, w = os.pipe()
    try:
        ours.send_fds([r])
        ours.send({**message, "fd_count": 1})
        with pytest.raises(HandoverError, match="version"):
            handover.recv_state(theirs, 5.0)
    finally:
        os.close(r)
        os.close(w)


def test_check_version() -> None:
    handover.check_version({"version": handover.VERSION})
    with pytest.raises(HandoverError, match="speaks hand-over version None"):
        handover.check_version({})


def test_bad_descriptor_index_is_refused() -> None:
    message = handover.encode_state(_state([_client(1, 5)], 2))
    with pytest.raises(HandoverError, match="descriptor index"):
        handover.decode_state(message, 2)


def test_duplicate_descriptor_index_is_refused() -> None:
    message = handover.encode_state(_state([_client(1, 1)], 2))  # 1 is the control socket's
    with pytest.raises(HandoverError, match="descriptor index"):
        handover.decode_state(message, 2)


def test_malformed_state_is_one_sentence() -> None:
    message = handover.encode_state(_state([_client(1, 2)], 3))
    del message["clients"][0]["peer"]
    with pytest.raises(HandoverError, match="malformed hand-over state"):
        handover.decode_state(message, 3)
    message = handover.encode_state(_state([_client(1, 2, pending=b"x")], 3))
    message["clients"][0]["pending"] = "not base64!"
    with pytest.raises(HandoverError, match="bad base64"):
        handover.decode_state(message, 3)


def test_eof_timeout_and_garbage(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    with pytest.raises(HandoverError, match="did not answer in time"):
        theirs.recv(0.05)
    ours.sock.sendall(struct.pack(">I", 5) + b"nope!")
    with pytest.raises(HandoverError, match="not JSON"):
        theirs.recv(1.0)
    ours.sock.sendall(struct.pack(">I", 2) + b"[]")
    with pytest.raises(HandoverError, match="no type"):
        theirs.recv(1.0)
    ours.sock.sendall(struct.pack(">I", handover.MAX_FRAME + 1))
    with pytest.raises(HandoverError, match="too long"):
        theirs.recv(1.0)


def test_unexpected_frame_and_error_frame(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    ours.send({"type": "ready", "pid": 1})
    with pytest.raises(HandoverError, match="expected a hello frame"):
        theirs.recv(1.0, "hello")
    ours.send({"type": "error", "message": "config file broken"})
    with pytest.raises(HandoverError, match="config file broken"):
        theirs.recv(1.0, "hello")


def test_peer_gone_midway(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    payload = json.dumps({"type": "hello"}).encode()
    ours.sock.sendall(struct.pack(">I", len(payload)) + payload[:3])
    ours.sock.close()
    with pytest.raises(HandoverError, match="closed the hand-over channel"):
        theirs.recv(1.0)


def test_announced_descriptors_that_never_came(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    ours.send({"type": "fds", "count": 3})  # no SCM_RIGHTS attached
    with pytest.raises(HandoverError, match="did not come"):
        handover.recv_state(theirs, 1.0)
