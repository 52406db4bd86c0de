"""The line protocol, sans I/O: a table of cases, each fed whole, byte by byte and at random cuts.

Every case in :data:`CASES` is ``(name, chunks, expected output, expected end)``:

- ``chunks``: what the peer sends, one ``feed`` per item; :data:`EOF` means the
  peer closed its sending side (``end_of_input``).
- ``expected output``: every byte the server answers, concatenated (echoes,
  ``bye``, the ``ERR`` line).
- ``expected end``: ``"open"`` (the connection goes on), ``"eof"``, ``"exit"`` or
  ``"too_long"``.

To add a case, add a row. Whole-chunk and byte-by-byte feeding are run for
every row; hypothesis cuts every row at random points, and checks arbitrary
streams against :func:`reference`, a deliberately naive model of docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echod import protocol
from echod.protocol import (
    BYE,
    DEFAULT_MAX_LINE,
    SHUTDOWN_NOTICE,
    Echo,
    EndOfInput,
    Event,
    Exit,
    LineProtocol,
    LineTooLong,
)


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


EOF: Final = _Eof()
Chunk = bytes | _Eof

ERR_1024 = b"ERR line too long (max 1024 bytes)\n"
A1023, A1024, A1025 = b"a" * 1023, b"a" * 1024, b"a" * 1025

# feed() has three paths: one whole line; several lines checked at once (no
# "exit" anywhere in the read, and no line can be over the limit); and the
# walk over the lines one by one. Bursts larger than max_line + 1 are checked
# at once by jumping max_line + 1 bytes at a time; a burst holding "exit" in
# any case, or a line of max_line bytes plus CR, takes the walk. The same
# bytes fed byte by byte take the one-line path.
LINES_300 = b"".join(b"%03d" % i + b"x" * 196 + b"\n" for i in range(300))  # 200 bytes each
FIVE = LINES_300[: 5 * 200]  # 1000 bytes: five lines

CASES: list[tuple[str, list[Chunk], bytes, str]] = [
    # -- plain echo ------------------------------------------------------------------------
    ("one line", [b"hello\n"], b"hello\n", "open"),
    ("crlf", [b"hello\r\n"], b"hello\r\n", "open"),
    ("empty line", [b"\n"], b"\n", "open"),
    ("empty crlf line", [b"\r\n"], b"\r\n", "open"),
    ("many empty lines", [b"\n\n\r\n\n"], b"\n\n\r\n\n", "open"),
    ("pipelined", [b"a\nbb\r\nccc\n"], b"a\nbb\r\nccc\n", "open"),
    ("split line", [b"hel", b"lo", b"\n"], b"hello\n", "open"),
    ("split crlf", [b"hello\r", b"\n"], b"hello\r\n", "open"),
    ("unfinished line held", [b"hello"], b"", "open"),
    ("line then unfinished", [b"a\nbc"], b"a\n", "open"),
    ("pipelined then unfinished", [b"a\nbb\nccc"], b"a\nbb\n", "open"),
    (
        "pipelined exit-like lines",
        [b"exited\nno exit\nEXIT!\n"],
        b"exited\nno exit\nEXIT!\n",
        "open",
    ),
    ("pipelined exit in the middle", [b"a\n EXIT\r\nb\n"], b"a\n" + BYE, "exit"),
    ("pipelined unfinished exit", [b"a\nb\nexit"], b"a\nb\n", "open"),
    ("lone cr is data", [b"a\rb\n"], b"a\rb\n", "open"),
    ("double cr", [b"a\r\r\n"], b"a\r\r\n", "open"),
    ("nul bytes", [b"\x00\x00a\x00\n"], b"\x00\x00a\x00\n", "open"),
    ("invalid utf-8", [b"\xff\xfe\xc3\x28\x80\n"], b"\xff\xfe\xc3\x28\x80\n", "open"),
    (
        "all byte values",
        [bytes(b for b in range(256) if b != 10) + b"\n"],
        bytes(b for b in range(256) if b != 10) + b"\n",
        "open",
    ),
    ("utf-8 text", ["héllo wörld ✓\n".encode()], "héllo wörld ✓\n".encode(), "open"),
    # -- end of input --------------------------------------------------------------------
    ("eof after lines", [b"a\n", EOF], b"a\n", "eof"),
    ("eof at once", [EOF], b"", "eof"),
    ("trailing bytes at eof", [b"a\nrest", EOF], b"a\nrest", "eof"),
    ("trailing cr at eof", [b"rest\r", EOF], b"rest\r", "eof"),
    ("trailing nul at eof", [b"\x00", EOF], b"\x00", "eof"),
    ("trailing max line at eof", [A1024, EOF], A1024, "eof"),
    ("trailing max line and cr at eof", [A1024 + b"\r", EOF], A1024 + b"\r", "eof"),
    # -- the limit: 1024 bytes before the line ending ------------------------------------
    ("1023 lf", [A1023 + b"\n"], A1023 + b"\n", "open"),
    ("1023 crlf", [A1023 + b"\r\n"], A1023 + b"\r\n", "open"),
    ("1024 lf", [A1024 + b"\n"], A1024 + b"\n", "open"),
    ("1024 crlf", [A1024 + b"\r\n"], A1024 + b"\r\n", "open"),
    ("1025 lf", [A1025 + b"\n"], ERR_1024, "too_long"),
    ("1025 crlf", [A1025 + b"\r\n"], ERR_1024, "too_long"),
    ("1025 no ending yet", [A1025], ERR_1024, "too_long"),
    ("1024 then cr then lf", [A1024 + b"\r", b"\n"], A1024 + b"\r\n", "open"),
    ("1024 then cr, lf, more", [A1024, b"\r", b"\nnext\n"], A1024 + b"\r\nnext\n", "open"),
    ("1024 cr then data", [A1024 + b"\r", b"x"], ERR_1024, "too_long"),
    ("1024 cr then cr", [A1024 + b"\r", b"\r"], ERR_1024, "too_long"),
    ("1024 cr cr lf", [A1024 + b"\r\r\n"], ERR_1024, "too_long"),
    ("1025 ending in cr", [A1024 + b"x\r"], ERR_1024, "too_long"),
    ("huge line", [b"z" * 100_000], ERR_1024, "too_long"),
    ("too long after lines", [b"a\nb\n" + A1025 + b"\nc\n"], b"a\nb\n" + ERR_1024, "too_long"),
    ("too long ignores the rest", [A1025 + b"\n", b"more\n"], ERR_1024, "too_long"),
    ("too long held line", [b"ok\n" + A1024, b"b"], b"ok\n" + ERR_1024, "too_long"),
    # -- exit ----------------------------------------------------------------------------
    ("exit", [b"exit\n"], BYE, "exit"),
    ("exit crlf upper padded", [b" EXIT \r\n"], BYE, "exit"),
    ("exit mixed case tabs", [b"\tExIt\t\n"], BYE, "exit"),
    ("exit at eof", [b"exit", EOF], BYE, "exit"),
    ("exit with spaces at eof", [b"  eXiT \r", EOF], BYE, "exit"),
    ("exit after lines", [b"a\nb\nexit\nc\n"], b"a\nb\n" + BYE, "exit"),
    ("exit ignores later chunks", [b"exit\n", b"c\n"], BYE, "exit"),
    ("exited is echoed", [b"exited\n"], b"exited\n", "open"),
    ("exit inside a line is echoed", [b"no exit\n"], b"no exit\n", "open"),
    ("ex it is echoed", [b"ex it\n"], b"ex it\n", "open"),
    ("exit with nul is echoed", [b"exit\x00\n"], b"exit\x00\n", "open"),
    ("exit split", [b"ex", b"it", b"\r", b"\n"], BYE, "exit"),
    ("exit and line before", [b"line\nexit"], b"line\n", "open"),
    ("exit after 1024", [A1024 + b"\nexit\n"], A1024 + b"\n" + BYE, "exit"),
    # -- long bursts: feed()'s line-by-line path must agree with the fast path -------------
    ("burst over the limit", [LINES_300], LINES_300, "open"),
    ("burst with exit in the middle", [FIVE + b"exit\n" + FIVE], FIVE + BYE, "exit"),
    (
        "burst with padded exit in the middle",
        [FIVE + FIVE + b" Exit\r\n" + FIVE],
        FIVE + FIVE + BYE,
        "exit",
    ),
    (
        "burst with long line in the middle",
        [FIVE + FIVE + A1025 + b"\n" + FIVE],
        FIVE + FIVE + ERR_1024,
        "too_long",
    ),
    (
        "burst with long crlf line in the middle",
        [FIVE + A1025 + b"\r\n" + FIVE],
        FIVE + ERR_1024,
        "too_long",
    ),
    (
        "burst with max lines",
        [(A1024 + b"\n") * 3 + (A1024 + b"\r\n") * 2],
        (A1024 + b"\n") * 3 + (A1024 + b"\r\n") * 2,
        "open",
    ),
    (
        "burst with exit-like lines",
        [FIVE + b"exited\n xit\nexit!\n" + FIVE],
        FIVE + b"exited\n xit\nexit!\n" + FIVE,
        "open",
    ),
    ("burst then unfinished long tail", [FIVE + FIVE + A1025], FIVE + FIVE + ERR_1024, "too_long"),
    ("burst then eof tail", [FIVE + FIVE + b"tail", EOF], FIVE + FIVE + b"tail", "eof"),
    ("burst then unfinished tail", [FIVE + FIVE + b"tail"], FIVE + FIVE, "open"),
    (
        "burst of max lines then one over",
        [(A1024 + b"\n") * 3 + A1025 + b"\n"],
        (A1024 + b"\n") * 3 + ERR_1024,
        "too_long",
    ),
]


def run(chunks: Iterable[Chunk], max_line: int = DEFAULT_MAX_LINE) -> tuple[bytes, str]:
    """Feed ``chunks``; check the invariants after every step; return (output, end)."""
    proto = LineProtocol(max_line)
    out: list[bytes] = []
    for chunk in chunks:
        if proto.finished:
            break  # the server stops reading after a terminal event
        events = proto.end_of_input() if isinstance(chunk, _Eof) else proto.feed(chunk)
        check_events(events, proto)
        out.extend(reply_of(e) for e in events)
        # The buffer bound: never more than the limit plus a pending CR.
        assert proto.pending <= max_line + 1
        if proto.finished:
            assert proto.pending == 0
            return b"".join(out), end_of(events[-1])
    return b"".join(out), "open"


def reply_of(event: Event) -> bytes:
    if isinstance(event, Echo):
        return event.data
    if isinstance(event, Exit | LineTooLong):
        return event.reply
    return b""


def end_of(event: Event) -> str:
    return {Exit: "exit", LineTooLong: "too_long", EndOfInput: "eof"}[type(event)]


def check_events(events: list[Event], proto: LineProtocol) -> None:
    """Shape of one feed's answer: echoes of whole lines, at most one terminal event, last."""
    for i, event in enumerate(events):
        if isinstance(event, Echo):
            assert event.data, "empty Echo"
            newlines = event.data.count(b"\n")
            # Whole lines only, except the final unterminated line at end of input.
            if event.data.endswith(b"\n"):
                assert event.lines == newlines
            else:
                assert event.lines == newlines + 1
                assert proto.finished
        else:
            assert i == len(events) - 1, f"terminal event {event} is not last"
            assert proto.finished
    echoes = [e for e in events if isinstance(e, Echo)]
    assert len(echoes) <= 1, "complete lines of one feed are coalesced into one Echo"


def bytewise(chunks: Sequence[Chunk]) -> list[Chunk]:
    out: list[Chunk] = []
    for chunk in chunks:
        if isinstance(chunk, _Eof):
            out.append(chunk)
        else:
            out.extend(chunk[i : i + 1] for i in range(len(chunk)))
    return out


def whole(chunks: Sequence[Chunk]) -> list[Chunk]:
    """All data in one feed, then EOF if the case has one."""
    data = b"".join(c for c in chunks if isinstance(c, bytes))
    return [data, *[c for c in chunks if isinstance(c, _Eof)]]


IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "chunks", "expected", "end"), CASES, ids=IDS)
def test_case_as_chunked(name: str, chunks: list[Chunk], expected: bytes, end: str) -> None:
    assert run(chunks) == (expected, end)


@pytest.mark.parametrize(("name", "chunks", "expected", "end"), CASES, ids=IDS)
def test_case_whole(name: str, chunks: list[Chunk], expected: bytes, end: str) -> None:
    assert run(whole(chunks)) == (expected, end)


@pytest.mark.parametrize(("name", "chunks", "expected", "end"), CASES, ids=IDS)
def test_case_byte_by_byte(name: str, chunks: list[Chunk], expected: bytes, end: str) -> None:
    assert run(bytewise(chunks)) == (expected, end)


@pytest.mark.parametrize(("name", "chunks", "expected", "end"), CASES, ids=IDS)
def test_case_matches_reference(name: str, chunks: list[Chunk], expected: bytes, end: str) -> None:
    """The table and the naive model agree, so the model is worth checking against."""
    data = b"".join(c for c in chunks if isinstance(c, bytes))
    assert reference(data, DEFAULT_MAX_LINE, eof=EOF in chunks) == (expected, end)


@pytest.mark.parametrize(("name", "chunks", "expected", "end"), CASES, ids=IDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, 1 << 20), max_size=40))
def test_case_at_random_cuts(
    name: str, chunks: list[Chunk], expected: bytes, end: str, cuts: list[int]
) -> None:
    stream = b"".join(c for c in chunks if isinstance(c, bytes))
    pieces: list[Chunk] = list(split_at(stream, cuts))
    if EOF in chunks:
        pieces.append(EOF)
    assert run(pieces) == (expected, end)


# -- a naive model of docs/protocol.md ---------------------------------------------------


def reference(data: bytes, max_line: int, eof: bool) -> tuple[bytes, str]:
    """What the server must answer to ``data``, written for clarity, not speed."""
    out = b""
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            tail = data[pos:]
            # An unfinished line that can no longer end within the limit.
            if len(tail) > max_line + 1 or (len(tail) == max_line + 1 and not tail.endswith(b"\r")):
                return out + protocol.line_too_long(max_line), "too_long"
            if not eof:
                return out, "open"
            if not tail:
                return out, "eof"
            if tail.strip().lower() == b"exit":
                return out + BYE, "exit"
            return out + tail, "eof"
        content = data[pos:nl]
        if content.endswith(b"\r"):
            content = content[:-1]
        if len(content) > max_line:
            return out + protocol.line_too_long(max_line), "too_long"
        if content.strip().lower() == b"exit":
            return out + BYE, "exit"
        out += data[pos : nl + 1]
        pos = nl + 1


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [p for p in pieces if p]


_TOKENS = [
    b"a",
    b"b",
    b"\x00",
    b"\xff",
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b"exit",
    b"EXIT",
    b"Exit",
    b"xit",
    b"e",
]


@settings(max_examples=300, deadline=None)
@given(
    max_line=st.integers(1, 12),
    tokens=st.lists(st.sampled_from(_TOKENS), max_size=80),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    eof=st.booleans(),
)
def test_any_stream_any_cuts_matches_reference(
    max_line: int, tokens: list[bytes], cuts: list[int], eof: bool
) -> None:
    data = b"".join(tokens)
    chunks: list[Chunk] = list(split_at(data, cuts))
    if eof:
        chunks.append(EOF)
    assert run(chunks, max_line) == reference(data, max_line, eof)


def _valid_line(max_line: int) -> st.SearchStrategy[bytes]:
    content = st.binary(max_size=max_line).map(lambda b: b.replace(b"\n", b"."))
    ending = st.sampled_from([b"\n", b"\r\n"])
    return (
        st.tuples(content, ending)
        .map(lambda t: t[0] + t[1])
        .filter(lambda line: line.strip().lower() != b"exit")
    )


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_valid_lines_any_chunks_echo_equals_input(data: st.DataObject) -> None:
    """For any stream of valid lines cut into arbitrary chunks, the echo equals the input."""
    max_line = data.draw(st.sampled_from([1, 2, 7, 64, DEFAULT_MAX_LINE]), label="max_line")
    lines = data.draw(st.lists(_valid_line(max_line), max_size=30), label="lines")
    stream = b"".join(lines)
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=30), label="cuts")
    assert run(split_at(stream, cuts), max_line) == (stream, "open")
    assert run([*split_at(stream, cuts), EOF], max_line) == (stream, "eof")


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), max_line=st.integers(1, 40))
def test_buffer_bound_for_any_input(data: bytes, max_line: int) -> None:
    """Whatever arrives, the protocol holds at most max_line + 1 bytes."""
    proto = LineProtocol(max_line)
    for i in range(len(data)):
        if proto.finished:
            break
        proto.feed(data[i : i + 1])
        assert proto.pending <= max_line + 1


# -- the rest of the module's surface ------------------------------------------------------


def test_limits_other_than_1024() -> None:
    assert run([b"12345678\n"], 8) == (b"12345678\n", "open")
    assert run([b"12345678\r\n"], 8) == (b"12345678\r\n", "open")
    assert run([b"123456789\n"], 8) == (b"ERR line too long (max 8 bytes)\n", "too_long")
    assert run([b"x\n"], 1) == (b"x\n", "open")
    # A line of the limit plus CR inside a burst longer than the limit.
    assert run([b"a\n12345678\r\nb\n"], 8) == (b"a\n12345678\r\nb\n", "open")
    assert run([b"a\n123456789\nb\n"], 8) == (
        b"a\nERR line too long (max 8 bytes)\n",
        "too_long",
    )
    assert run([b"xy"], 1) == (b"ERR line too long (max 1 bytes)\n", "too_long")


def test_pending_reaches_exactly_limit_plus_cr() -> None:
    proto = LineProtocol(1024)
    assert proto.feed(A1024) == []
    assert proto.pending == 1024
    assert proto.feed(b"\r") == []
    assert proto.pending == 1025
    assert proto.feed(b"\n") == [Echo(A1024 + b"\r\n", 1)]
    assert proto.pending == 0


def test_pipelined_lines_are_one_echo() -> None:
    proto = LineProtocol()
    assert proto.feed(b"a\nb\nc\nd") == [Echo(b"a\nb\nc\n", 3)]
    assert proto.feed(b"\n") == [Echo(b"d\n", 1)]


def test_terminal_events() -> None:
    assert LineProtocol().feed(b"a\nexit\n") == [Echo(b"a\n", 1), Exit()]
    assert LineProtocol().feed(A1025) == [LineTooLong(ERR_1024)]
    proto = LineProtocol()
    proto.feed(b"x")
    assert proto.end_of_input() == [Echo(b"x", 1), EndOfInput()]


def test_no_feed_after_finish() -> None:
    proto = LineProtocol()
    proto.feed(b"exit\n")
    assert proto.finished
    with pytest.raises(RuntimeError):
        proto.feed(b"a\n")
    with pytest.raises(RuntimeError):
        proto.end_of_input()


def test_max_line_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LineProtocol(0)


def test_wire_texts() -> None:
    assert BYE == b"bye\n"
    assert SHUTDOWN_NOTICE == b"Server shutting down\n"
    assert protocol.line_too_long(1024) == ERR_1024
    assert protocol.error_line("server full") == b"ERR server full\n"
    assert protocol.server_says(b"hi there") == b"Server says: hi there\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"exit", True),
        (b"EXIT\n", True),
        (b" Exit \r\n", True),
        (b"\texit\x0b\x0c", True),
        (b"exited", False),
        (b"exi", False),
        (b"e x i t", False),
        (b"exit\x00", False),
        (b"", False),
    ],
)
def test_is_exit(line: bytes, expected: bool) -> None:
    assert protocol.is_exit(line) is expected


# -- restore: an unfinished line handed over by an upgrade ----------------------


def test_restore_continues_the_unfinished_line() -> None:
    proto = LineProtocol(8)
    proto.restore(b"half")
    assert proto.unfinished == b"half"
    assert proto.feed(b" way\n") == [Echo(b"half way\n", 1)]


def test_restore_keeps_a_line_at_the_limit_and_its_cr() -> None:
    proto = LineProtocol(4)
    proto.restore(b"abcd\r")
    assert proto.feed(b"\n") == [Echo(b"abcd\r\n", 1)]


@pytest.mark.parametrize("pending", [b"a\nb", b"x" * 5, b"abcde"])
def test_restore_refuses_what_the_protocol_could_not_hold(pending: bytes) -> None:
    with pytest.raises(ValueError):
        LineProtocol(4).restore(pending)


def test_restore_needs_a_fresh_protocol() -> None:
    proto = LineProtocol(8)
    proto.feed(b"abc")
    with pytest.raises(ValueError):
        proto.restore(b"x")
