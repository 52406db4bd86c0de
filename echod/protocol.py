"""The echod line protocol, sans I/O: bytes in, events out.

This module knows the wire format and nothing else: no sockets, threads,
clocks or logging. The server feeds it whatever ``recv`` returned and acts on
the events it gets back, so every case can be tested by feeding bytes whole
and byte by byte (see ``tests/unit/test_protocol.py``). docs/protocol.md is
the reference for users; this docstring is the one for the code.

Rules:

- A line ends in LF; CRLF is accepted. Bytes are never decoded.
- Each complete line is echoed byte-exact, line ending included. All complete
  lines a single ``feed`` brings are coalesced into one :class:`Echo`, so the
  server answers a pipelined burst with one send. Such a burst is checked
  with a few C-level calls rather than line by line when it provably holds
  no exit line and no overlong line (see :meth:`LineProtocol.feed`).
- A line may carry at most ``max_line`` bytes before its line ending. The
  limit is enforced on unfinished data too: the buffer never holds more than
  ``max_line`` bytes plus a pending CR, whatever the peer sends.
- A line whose content, stripped of ASCII whitespace, is ``exit`` in any case
  is not echoed; it ends the session with :data:`BYE`.
- At end of input, bytes after the last LF are treated as a final line.

After a terminal event (:class:`Exit`, :class:`LineTooLong`,
:class:`EndOfInput`) the protocol is finished and must not be fed again.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_LINE = 1024
# The last byte before the LF of a line that means exit: the word's last
# letter, or whitespace that bytes.strip() removes (a CR among it).
_EXIT_ENDS = frozenset(b"tT \t\r\x0b\x0c")

BYE = b"bye\n"
SHUTDOWN_NOTICE = b"Server shutting down\n"


def error_line(reason: str) -> bytes:
    """The one line a client gets before the server closes on an error."""
    return b"ERR " + reason.encode("ascii", "replace") + b"\n"


def line_too_long(max_line: int) -> bytes:
    return error_line(f"line too long (max {max_line} bytes)")


def server_says(text: bytes) -> bytes:
    """An operator message as the client sees it."""
    return b"Server says: " + text + b"\n"


def is_exit(line: bytes) -> bool:
    """True for a line (with or without its ending) that means ``exit``."""
    return line.strip().lower() == b"exit"


@dataclass(slots=True)  # not frozen: it is made for every read, and frozen init costs 2x
class Echo:
    """Complete lines to send back as they are; ``lines`` counts them."""

    data: bytes
    lines: int


@dataclass(frozen=True, slots=True)
class Exit:
    """The peer asked to leave: reply :data:`BYE` and close."""

    reply: bytes = BYE


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A line exceeded the limit: send ``reply`` and close."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class EndOfInput:
    """The peer closed its sending side and everything was answered."""


Event = Echo | Exit | LineTooLong | EndOfInput


class LineProtocol:
    """The state of one connection's input: at most one unfinished line."""

    __slots__ = ("_buf", "finished", "max_line")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self._buf = b""
        self.finished = False  # True after a terminal event; then feed no more

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held back (never above max_line + 1)."""
        return len(self._buf)

    @property
    def unfinished(self) -> bytes:
        """The unfinished line itself (what :meth:`restore` takes back)."""
        return self._buf

    def feed(self, data: bytes) -> list[Event]:
        """Take bytes from the peer; return what to do about them, in order.

        Three paths, cheapest first. One whole line (one line in flight):
        a length check and the exit pre-test, O(1). Several lines: proved
        to hold no exit line (a lower-cased copy has no ``exit`` in it) and
        no overlong line (the read is no longer than one line may be, or
        :meth:`_lines_fit` says so in one step per ``max_line`` bytes), then
        echoed whole: a few C-level calls, however many lines. Otherwise
        :meth:`_walk` looks at the lines one by one and stops at the first
        one that ends the session.
        """
        if self.finished:
            raise RuntimeError("feed() after the protocol finished")
        buf = self._buf + data if self._buf else data
        limit = self.max_line
        end = len(buf)
        nl = buf.find(b"\n")
        if nl < 0:
            return self._hold(buf, [])
        if nl == end - 1:
            # The pre-test leaves is_exit() only the lines of four bytes or
            # more that end in t, T or whitespace.
            if nl > limit and (nl > limit + 1 or buf[nl - 1] != 0x0D):
                return self._stop(buf, 0, 0, LineTooLong(line_too_long(limit)))
            if nl >= 4 and buf[nl - 1] in _EXIT_ENDS and is_exit(buf):
                return self._stop(buf, 0, 0, Exit())
            self._buf = b""
            return [Echo(buf, 1)]
        if buf.lower().find(b"exit") < 0 and (end <= limit + 1 or self._lines_fit(buf)):
            # The bytes after the last LF hold no LF, so count() sees only complete lines.
            lines = buf.count(b"\n")
            if buf[-1] == 0x0A:
                self._buf = b""
                return [Echo(buf, lines)]
            last = buf.rfind(b"\n") + 1
            return self._hold(buf[last:], [Echo(buf[:last], lines)])
        return self._walk(buf)

    def _lines_fit(self, buf: bytes) -> bool:
        """True if no complete line of ``buf`` is over the limit (False may be wrong).

        Jumps from line start to the last LF within ``max_line + 1`` bytes of
        it: one step per ``max_line`` bytes, not one per line. A line of
        ``max_line`` bytes plus CR is legal but answers False, and the walk
        then decides.
        """
        window = self.max_line + 1
        rfind = buf.rfind
        last = rfind(b"\n")
        start = 0
        while start <= last:
            nl = rfind(b"\n", start, start + window)
            if nl < 0:
                return False
            start = nl + 1
        return True

    def _walk(self, buf: bytes) -> list[Event]:
        """Line by line, with O(1) work for each besides find()."""
        limit = self.max_line
        find = buf.find
        end = len(buf)
        start = 0  # where the first line not yet looked at begins
        lines = 0
        while start < end:
            nl = find(b"\n", start)
            if nl < 0:
                break
            size = nl - start  # the content, and its CR if the line ends in CRLF
            if size > limit and (size > limit + 1 or buf[nl - 1] != 0x0D):
                return self._stop(buf, start, lines, LineTooLong(line_too_long(limit)))
            if size >= 4 and buf[nl - 1] in _EXIT_ENDS and is_exit(buf[start:nl]):
                return self._stop(buf, start, lines, Exit())
            lines += 1
            start = nl + 1
        if start == end:
            self._buf = b""
            return [Echo(buf, lines)] if lines else []
        events: list[Event] = [Echo(buf[:start], lines)] if lines else []
        return self._hold(buf[start:], events)

    def restore(self, pending: bytes) -> None:
        """Take over an unfinished line another echod held (an upgrade's hand-over).

        Raises ValueError for bytes this protocol could not have held: a
        complete line, or more than the limit allows.
        """
        if self.finished or self._buf:
            raise ValueError("restore() needs a fresh protocol")
        if b"\n" in pending or len(pending) > self.max_line + 1:
            raise ValueError("not an unfinished line within the limit")
        if len(pending) == self.max_line + 1 and pending[-1] != 0x0D:
            raise ValueError("not an unfinished line within the limit")
        self._buf = pending

    def end_of_input(self) -> list[Event]:
        """The peer closed its sending side: answer the unfinished line, then end."""
        if self.finished:
            raise RuntimeError("end_of_input() after the protocol finished")
        self.finished = True
        tail, self._buf = self._buf, b""
        if not tail:
            return [EndOfInput()]
        if is_exit(tail):
            return [Exit()]
        return [Echo(tail, 1), EndOfInput()]

    def _hold(self, tail: bytes, events: list[Event]) -> list[Event]:
        """Keep an unfinished line, unless it already broke the limit."""
        limit = self.max_line
        # limit bytes of content plus a CR whose LF has not arrived yet.
        if len(tail) > limit + 1 or (len(tail) == limit + 1 and tail[-1] != 0x0D):
            self.finished = True
            self._buf = b""
            events.append(LineTooLong(line_too_long(limit)))
            return events
        self._buf = tail
        return events

    def _stop(self, buf: bytes, end: int, lines: int, final: Event) -> list[Event]:
        """Echo the ``lines`` complete lines before ``end``, then stop with ``final``."""
        self.finished = True
        self._buf = b""
        return [Echo(buf[:end], lines), final] if lines else [final]
