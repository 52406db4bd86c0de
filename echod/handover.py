"""The hand-over wire format: one echod's state and sockets, passed to its successor.

Design
------
An upgrade (:mod:`echod.upgrade`) starts the next echod with one end of a
Unix stream socketpair; this module is what travels over it. It knows no
threads and no servers: records in, bytes and descriptors out, and back.

Every message is a *frame*: a 4-byte big-endian length, then that many bytes
of UTF-8 JSON, an object with a ``type``. Descriptors travel as
``SCM_RIGHTS`` ancillary data attached to the first byte of a small ``fds``
frame that says how many it carries, in batches of at most
:data:`FDS_PER_MESSAGE` (the kernel refuses more than ``SCM_MAX_FD`` = 253 in
one message). Descriptors keep their order, so the state refers to each one
by its index in the whole sequence. Bytes (an unfinished line, queued
output) are base64 in the JSON.

The conversation, successor (S) and running echod (O)::

    S -> O  hello {version, pid}       S parsed its arguments and config file
    O -> S  fds {count} ...            listener, control socket, pidfile, clients
    O -> S  state {version, ...}       the server's counters and every client's state
    S -> O  ready {pid}                S serves every client now
    O -> S  commit {}                  O has let go (and told systemd S is the main pid)

Versions: both sides send :data:`VERSION`; a side that gets another one stops
before anything is paused (O) or adopted (S). A new version is needed
whenever a field changes meaning; fields may be added without one (readers
ignore what they do not know and default what is missing).

Times travel as *ages* (seconds before the sending moment), never as
``time.monotonic()`` readings: each process's monotonic clock has its own
origin in principle, and ages are what the timeouts need.

Error handling
--------------
Every function raises :class:`HandoverError` with one sentence: the peer
closed the channel, a frame is malformed or too long, a deadline passed, the
kernel truncated the descriptors. Descriptors received before an error are
closed, never leaked into the receiving process.
"""

from __future__ import annotations

import array
import base64
import json
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from echod.registry import Totals

VERSION = 1
# SCM_MAX_FD (include/net/scm.h) is 253 descriptors per sendmsg; stay below it.
FDS_PER_MESSAGE = 250
# The largest frame a reader accepts: the state of the most clients echod
# allows, each with a full unfinished line and MAX_QUEUED long lines queued,
# is far below this; a larger length is a corrupt or hostile channel.
MAX_FRAME = 1 << 30
_LENGTH = struct.Struct(">I")
_FD_SIZE = array.array("i").itemsize

# Environment variables that make a starting echod a successor: the channel's
# descriptor, and the descriptor of the real stderr (its fd 2 is a pipe to O
# until it is ready, so that O can report why it failed).
CHANNEL_ENV = "ECHOD_HANDOVER_FD"
STDERR_ENV = "ECHOD_HANDOVER_STDERR"


class HandoverError(Exception):
    """The hand-over channel failed; the message is one sentence."""


@dataclass
class ClientState:
    """One client, as the successor needs it to go on where the old echod stopped."""

    id: int
    fd: int  # index into the descriptors sent
    peer: str
    age: float  # seconds since the client connected
    idle: float  # seconds since its last input
    line_age: float | None  # seconds since its unfinished line began, if any
    stalled: float | None  # seconds since a send to it could not finish, if any
    bytes_in: int = 0
    bytes_out: int = 0
    lines_in: int = 0
    lines_out: int = 0
    pending: bytes = b""  # the unfinished line the protocol holds
    queued: list[tuple[bytes, int]] = field(default_factory=list)  # (data, lines) to send
    via: str | None = None  # the proxy, when a PROXY header named the client (then peer)
    admitted: bool = False  # counted by admission control (towards its source's limit)


@dataclass
class ServerState:
    """Everything the successor takes over; descriptors are indexes into the sequence sent."""

    pid: int  # the old echod's
    listener: int
    control: int | None
    pidfile: int | None
    metrics: int | None
    totals: Totals  # sent flat, as the keys of the state itself
    socket_activated: bool
    clients: list[ClientState] = field(default_factory=list)
    admission_refused: dict[str, int] = field(default_factory=dict)  # for /stats


# -- encoding -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise HandoverError("malformed hand-over state: bytes field is not a string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeError):
        raise HandoverError("malformed hand-over state: bad base64") from None


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise TypeError("counts by reason are not an object")
    return {str(k): int(v) for k, v in value.items()}


def encode_state(state: ServerState) -> dict[str, Any]:
    out = asdict(state)
    out.update(out.pop("totals"))
    out["clients"] = [
        {
            **asdict(c),
            "pending": _b64(c.pending),
            "queued": [[_b64(data), lines] for data, lines in c.queued],
        }
        for c in state.clients
    ]
    return {"type": "state", "version": VERSION, **out}


def decode_state(message: dict[str, Any], fd_count: int) -> ServerState:
    """The inverse of :func:`encode_state`; checks every descriptor index."""
    try:
        clients = [
            ClientState(
                id=int(c["id"]),
                fd=int(c["fd"]),
                peer=str(c["peer"]),
                age=float(c["age"]),
                idle=float(c["idle"]),
                line_age=None if c.get("line_age") is None else float(c["line_age"]),
                stalled=None if c.get("stalled") is None else float(c["stalled"]),
                bytes_in=int(c.get("bytes_in", 0)),
                bytes_out=int(c.get("bytes_out", 0)),
                lines_in=int(c.get("lines_in", 0)),
                lines_out=int(c.get("lines_out", 0)),
                pending=_unb64(c.get("pending", "")),
                queued=[(_unb64(d), int(n)) for d, n in c.get("queued", [])],
                via=None if c.get("via") is None else str(c["via"]),
                admitted=bool(c.get("admitted", False)),
            )
            for c in message["clients"]
        ]
        state = ServerState(
            pid=int(message["pid"]),
            listener=int(message["listener"]),
            control=None if message.get("control") is None else int(message["control"]),
            pidfile=None if message.get("pidfile") is None else int(message["pidfile"]),
            metrics=None if message.get("metrics") is None else int(message["metrics"]),
            totals=Totals(
                next_id=int(message["next_id"]),
                accepted=int(message["accepted"]),
                rejected=int(message["rejected"]),
                gone=[int(x) for x in message["gone"]][:4],
                uptime=float(message["uptime"]),
                # Not sent by an echod from before they were carried over.
                refused=_counts(message.get("refused", {})),
                closed=_counts(message.get("closed", {})),
                durations=[int(x) for x in message.get("durations", [])],
                duration_sum=float(message.get("duration_sum", 0.0)),
                operator_messages=int(message.get("operator_messages", 0)),
                tls_failures=int(message.get("tls_failures", 0)),
            ),
            socket_activated=bool(message.get("socket_activated", False)),
            clients=clients,
            admission_refused=_counts(message.get("admission_refused", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise HandoverError(f"malformed hand-over state: {err}") from None
    indexes = [
        state.listener,
        state.control,
        state.pidfile,
        state.metrics,
        *(c.fd for c in clients),
    ]
    used = [i for i in indexes if i is not None]
    if any(not 0 <= i < fd_count for i in used) or len(set(used)) != len(used):
        raise HandoverError("malformed hand-over state: bad descriptor index")
    if len(state.totals.gone) != 4:
        raise HandoverError("malformed hand-over state: gone needs 4 counters")
    return state


def check_version(message: dict[str, Any]) -> None:
    version = message.get("version")
    if version != VERSION:
        raise HandoverError(
            f"the other echod speaks hand-over version {version}, this one {VERSION}"
        )


# -- the channel ------------------------------------------------------------------


class Channel:
    """Frames and descriptors over one end of a Unix stream socketpair.

    Every receive takes a ``timeout``; a send blocks at most :attr:`send_timeout`.
    Descriptors that arrive are queued in order and handed out by
    :meth:`take_fds`.
    """

    def __init__(self, sock: socket.socket, send_timeout: float = 10.0) -> None:
        self.sock = sock
        self.send_timeout = send_timeout
        self._buf = bytearray()
        self._fds: list[int] = []

    # -- sending --

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        frame = _LENGTH.pack(len(payload)) + payload
        self.sock.settimeout(self.send_timeout)
        try:
            if fds:
                sent = socket.send_fds(self.sock, [frame], list(fds))
                frame = frame[sent:]
            if frame:
                self.sock.sendall(frame)
        except OSError as err:
            raise HandoverError(f"cannot send to the other echod: {err.strerror or err}") from None

    def send_fds(self, fds: Sequence[int]) -> None:
        """Send descriptors in batches the kernel accepts."""
        for start in range(0, len(fds), FDS_PER_MESSAGE):
            batch = fds[start : start + FDS_PER_MESSAGE]
            self.send({"type": "fds", "count": len(batch)}, batch)

    # -- receiving --

    def recv(self, timeout: float, expect: str | None = None) -> dict[str, Any]:
        """The next frame as an object; with ``expect``, it must be of that type."""
        deadline = time.monotonic() + timeout
        header = self._read(_LENGTH.size, deadline)
        (length,) = _LENGTH.unpack(header)
        if length > MAX_FRAME:
            raise HandoverError(f"hand-over frame too long ({length} bytes)")
        try:
            message = json.loads(self._read(length, deadline))
        except (ValueError, UnicodeError):
            raise HandoverError("malformed hand-over frame (not JSON)") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise HandoverError("malformed hand-over frame (no type)")
        if message["type"] == "error" and expect != "error":
            raise HandoverError(str(message.get("message", "unknown error")))
        if expect is not None and message["type"] != expect:
            raise HandoverError(f"expected a {expect} frame, got {message['type']!r}")
        return message

    def take_fds(self, message: dict[str, Any]) -> list[int]:
        """The descriptors an ``fds`` frame announced (they came with its first byte)."""
        n = message.get("count")
        if not isinstance(n, int) or n < 1 or len(self._fds) < n:
            raise HandoverError("a hand-over frame announced descriptors that did not come")
        fds = self._fds[:n]
        del self._fds[:n]
        return fds

    def _read(self, n: int, deadline: float) -> bytes:
        buf = self._buf
        # Never ask for more than this frame needs, so descriptors attached to
        # a later frame are not taken with this one.
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandoverError("the other echod did not answer in time")
            self.sock.settimeout(remaining)
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    n - len(buf),
                    socket.CMSG_SPACE(FDS_PER_MESSAGE * _FD_SIZE),
                    socket.MSG_CMSG_CLOEXEC,  # like every descriptor echod opens
                )
            except TimeoutError:
                raise HandoverError("the other echod did not answer in time") from None
            except OSError as err:
                raise HandoverError(
                    f"the hand-over channel failed: {err.strerror or err}"
                ) from None
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[: len(raw) - (len(raw) % _FD_SIZE)])
                    self._fds += fds.tolist()
            if flags & socket.MSG_CTRUNC:
                raise HandoverError("the kernel truncated the descriptors handed over")
            if not data:
                raise HandoverError("the other echod closed the hand-over channel")
            buf += data
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def close(self) -> None:
        close_fds(self._fds)
        self._fds = []
        self.sock.close()


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed: nothing to release


def send_state(channel: Channel, state: ServerState, fds: Sequence[int]) -> None:
    """O's side: every descriptor, then the state that refers to them by index."""
    channel.send_fds(fds)
    channel.send({**encode_state(state), "fd_count": len(fds)})


def recv_state(channel: Channel, timeout: float) -> tuple[ServerState, list[int]]:
    """S's side of :func:`send_state`: the state and the descriptors, in order.

    The descriptors are the caller's to close; on any error they are closed here.
    """
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    try:
        while True:
            message = channel.recv(max(0.0, deadline - time.monotonic()))
            if message["type"] == "fds":
                fds += channel.take_fds(message)
                continue
            if message["type"] != "state":
                raise HandoverError(f"expected the state, got {message['type']!r}")
            check_version(message)
            if int(message.get("fd_count", -1)) != len(fds):
                raise HandoverError("the hand-over lost descriptors on the way")
            return decode_state(message, len(fds)), fds
    except BaseException:
        close_fds(fds)
        raise
