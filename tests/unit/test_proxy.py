"""The PROXY header parser, sans I/O: a table of cases fed whole, byte by byte, at random cuts.

Every case in :data:`CASES` is ``(name, versions, data, expected)``: ``data``
is everything the peer sends (header and client bytes), ``expected`` is the
:class:`Header` the parser must return (its ``rest``: every client byte after
the header) or an :class:`Invalid` reason, or :data:`NEED_DATA` for a header
that is still unfinished when ``data`` ends. Fed byte by byte, the verdict
comes at the byte that completes (or breaks) the header, and the client bytes
not yet fed then must equal the rest of the whole-feed verdict.

The v1 lines and v2 layouts follow HAProxy's doc/proxy-protocol.txt
(sections 2.1 and 2.2); :func:`v2` builds a binary header field by field.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from echod.proxy import (
    NEED_DATA,
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    Header,
    Invalid,
    ProxyParser,
    Result,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V4_ADDRS = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 56324, 7878)
V6_SRC = ipaddress.IPv6Address("2001:db8::7").packed
V6_DST = ipaddress.IPv6Address("2001:db8::1").packed
V6_ADDRS = V6_SRC + V6_DST + struct.pack("!HH", 1, 65535)


def v2(
    body: bytes = V4_ADDRS, cmd: int = 0x21, fam: int = 0x11, length: int | None = None
) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, body."""
    size = len(body) if length is None else length
    return SIG + bytes([cmd, fam]) + struct.pack("!H", size) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


SRC4, DST4 = ("192.0.2.7", 56324), ("198.51.100.1", 7878)
V4_HEADER = Header(2, SRC4, DST4, b"")
LINE4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 7878\r\n"
IPV6_MAX = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
# Section 2.1's worst case, exactly 107 bytes with its CRLF.
UNKNOWN_107 = f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode()
TCP6_104 = f"PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode()
MAX6 = (IPV6_MAX, 65535)


def bad(reason: str) -> Invalid:
    return Invalid(reason)


CASES: list[tuple[str, str, bytes, Result]] = [
    # -- version 1 -----------------------------------------------------------------------
    ("v1 tcp4", "v1", LINE4, Header(1, SRC4, DST4, b"")),
    ("v1 tcp4 under any", "any", LINE4, Header(1, SRC4, DST4, b"")),
    ("v1 client bytes after", "v1", LINE4 + b"hello\r\nx", Header(1, SRC4, DST4, b"hello\r\nx")),
    (
        "v1 tcp6",
        "v1",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n",
        Header(1, ("2001:db8::7", 1), ("2001:db8::1", 65535), b""),
    ),
    ("v1 tcp6 at 104 bytes", "v1", TCP6_104, Header(1, MAX6, MAX6, b"")),
    (
        "v1 tcp6 v4-mapped (inet_ntop's form)",
        "v1",
        b"PROXY TCP6 ::ffff:192.0.2.7 ::1 80 81\r\n",
        Header(1, ("::ffff:c000:207", 80), ("::1", 81), b""),
    ),
    (
        "v1 tcp6 uppercase hex",
        "v1",
        b"PROXY TCP6 2001:DB8::A ::1 0 0\r\n",
        Header(1, ("2001:db8::a", 0), ("::1", 0), b""),
    ),
    ("v1 unknown short", "v1", b"PROXY UNKNOWN\r\nhi\n", Header(1, None, None, b"hi\n")),
    ("v1 unknown anything after", "v1", b"PROXY UNKNOWN x y z\r\n", Header(1, None, None, b"")),
    ("v1 unknown at 107 bytes", "v1", UNKNOWN_107, Header(1, None, None, b"")),
    ("v1 108 bytes", "v1", UNKNOWN_107[:-2] + b"f\r\n", bad("v1 line longer than 107 bytes")),
    (
        "v1 no crlf in 107",
        "v1",
        b"PROXY UNKNOWN " + b"a" * 200,
        bad("v1 line longer than 107 bytes"),
    ),
    ("v1 lf only", "v1", b"PROXY UNKNOWN\n", bad("v1 line does not end in CRLF")),
    ("v1 cr only", "v1", b"PROXY UNKNOWN\rX", bad("v1 line has a CR without LF")),
    ("v1 cr inside", "v1", b"PROXY TCP4\r 1.2.3.4\r\n", bad("v1 line has a CR without LF")),
    ("v1 lowercase", "v1", b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", bad("not a PROXY v1 header")),
    ("v1 no space", "v1", b"PROXYTCP4\r\n", bad("not a PROXY v1 header")),
    (
        "v1 two spaces",
        "v1",
        b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        bad("v1 line is not PROXY TCP4|TCP6|UNKNOWN with 4 fields"),
    ),
    (
        "v1 bad family",
        "v1",
        b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
        bad("v1 line is not PROXY TCP4|TCP6|UNKNOWN with 4 fields"),
    ),
    (
        "v1 missing port",
        "v1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
        bad("v1 line is not PROXY TCP4|TCP6|UNKNOWN with 4 fields"),
    ),
    (
        "v1 trailing space",
        "v1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
        bad("v1 line is not PROXY TCP4|TCP6|UNKNOWN with 4 fields"),
    ),
    (
        "v1 leading zero in address",
        "v1",
        b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n",
        bad("v1 line has a bad IPv4 address"),
    ),
    (
        "v1 octet 256",
        "v1",
        b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
        bad("v1 line has a bad IPv4 address"),
    ),
    (
        "v1 three octets",
        "v1",
        b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n",
        bad("v1 line has a bad IPv4 address"),
    ),
    (
        "v1 tcp4 with ipv6",
        "v1",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        bad("v1 line has a bad IPv4 address"),
    ),
    (
        "v1 tcp6 with ipv4",
        "v1",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        bad("v1 line has a bad IPv6 address"),
    ),
    (
        "v1 tcp6 with zone",
        "v1",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        bad("v1 line has a bad IPv6 address"),
    ),
    (
        "v1 tcp6 two ::",
        "v1",
        b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
        bad("v1 line has a bad IPv6 address"),
    ),
    (
        "v1 port 65536",
        "v1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
        bad("v1 line has a bad port"),
    ),
    (
        "v1 port leading zero",
        "v1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
        bad("v1 line has a bad port"),
    ),
    ("v1 port sign", "v1", b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", bad("v1 line has a bad port")),
    (
        "v1 port 0",
        "v1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 0 2\r\n",
        Header(1, ("1.2.3.4", 0), ("1.2.3.4", 2), b""),
    ),
    ("v1 under v2 only", "v2", LINE4, bad("not a PROXY v2 header")),
    ("v1 unfinished", "v1", LINE4[:-1], NEED_DATA),
    # -- version 2 -----------------------------------------------------------------------
    ("v2 tcp4", "v2", v2(), V4_HEADER),
    ("v2 tcp4 under any", "any", v2(), V4_HEADER),
    ("v2 client bytes after", "v2", v2() + b"PROXY hi\n", Header(2, SRC4, DST4, b"PROXY hi\n")),
    (
        "v2 tcp6",
        "v2",
        v2(V6_ADDRS, fam=0x21),
        Header(2, ("2001:db8::7", 1), ("2001:db8::1", 65535), b""),
    ),
    (
        "v2 with TLVs",
        "v2",
        v2(V4_ADDRS + tlv(0x05, b"x" * 128) + tlv(0x04, b"") + tlv(0x20, b"\x01" + b"\0" * 4)),
        V4_HEADER,
    ),
    (
        "v2 local, no addresses",
        "v2",
        v2(b"", cmd=0x20, fam=0x00) + b"x",
        Header(2, None, None, b"x"),
    ),
    (
        "v2 local ignores its block",
        "v2",
        v2(V4_ADDRS + b"\xff", cmd=0x20),
        Header(2, None, None, b""),
    ),
    ("v2 proxy unspec", "v2", v2(b"", fam=0x00), Header(2, None, None, b"")),
    ("v2 proxy unix", "v2", v2(b"/s" + b"\0" * 214, fam=0x31), Header(2, None, None, b"")),
    ("v2 proxy udp4 keeps the peer", "v2", v2(fam=0x12), Header(2, None, None, b"")),
    (
        "v2 bad signature",
        "v2",
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + V4_ADDRS,
        bad("bad PROXY v2 signature"),
    ),
    ("v2 version 1", "v2", v2(cmd=0x11), bad("PROXY v2 header with version 1")),
    ("v2 version 3", "v2", v2(cmd=0x31), bad("PROXY v2 header with version 3")),
    ("v2 command 2", "v2", v2(cmd=0x22), bad("PROXY v2 header with command 2")),
    ("v2 family 4", "v2", v2(fam=0x41), bad("PROXY v2 header with family/transport 0x41")),
    ("v2 transport 3", "v2", v2(fam=0x13), bad("PROXY v2 header with family/transport 0x13")),
    (
        "v2 short ipv4 block",
        "v2",
        v2(V4_ADDRS[:11]),
        bad("PROXY v2 address block shorter than its family needs"),
    ),
    (
        "v2 ipv6 needs 36",
        "v2",
        v2(V4_ADDRS, fam=0x21),
        bad("PROXY v2 address block shorter than its family needs"),
    ),
    ("v2 truncated TLV", "v2", v2(V4_ADDRS + b"\x05\x00"), bad("PROXY v2 TLVs overrun the header")),
    (
        "v2 TLV overrun",
        "v2",
        v2(V4_ADDRS + tlv(5, b"abc")[:-1]),
        bad("PROXY v2 TLVs overrun the header"),
    ),
    (
        "v2 at the length limit",
        "v2",
        v2(V4_ADDRS + tlv(0x04, b"\0" * (V2_MAX - 16 - 12 - 3))) + b"z",
        Header(2, SRC4, DST4, b"z"),
    ),
    (
        "v2 over the length limit",
        "v2",
        v2(V4_ADDRS, length=V2_MAX - 15),
        bad("PROXY v2 header longer than 4096 bytes"),
    ),
    ("v2 unfinished", "v2", v2()[:-1], NEED_DATA),
    ("v2 unfinished header", "v2", v2()[:15], NEED_DATA),
    ("v2 under v1 only", "v1", v2(), bad("not a PROXY v1 header")),
    # -- neither -------------------------------------------------------------------------
    ("http", "any", b"GET / HTTP/1.0\r\n\r\n", bad("not a PROXY v1 or v2 header")),
    ("tls", "any", b"\x16\x03\x01\x00\xa5", bad("not a PROXY v1 or v2 header")),
    ("plain line", "v2", b"hello\n", bad("not a PROXY v2 header")),
    ("nothing yet", "any", b"", NEED_DATA),
]


def feed_all(versions: str, chunks: list[bytes]) -> tuple[Result, bytes]:
    """Feed chunks until a verdict; returns it and the bytes not fed."""
    parser = ProxyParser(versions)
    result: Result = NEED_DATA
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not NEED_DATA:
            assert parser.finished
            return result, b"".join(chunks[i + 1 :])
    return result, b""


def joined(result: Result, unfed: bytes) -> Result:
    """The verdict as if the unfed bytes had come in the header's read."""
    if isinstance(result, Header):
        return Header(result.version, result.source, result.destination, result.rest + unfed)
    return result


IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "versions", "data", "expected"), CASES, ids=IDS)
def test_whole(name: str, versions: str, data: bytes, expected: Result) -> None:
    assert feed_all(versions, [data]) == (expected, b"")


@pytest.mark.parametrize(("name", "versions", "data", "expected"), CASES, ids=IDS)
def test_byte_by_byte(name: str, versions: str, data: bytes, expected: Result) -> None:
    result, unfed = feed_all(versions, [data[i : i + 1] for i in range(len(data))])
    assert joined(result, unfed) == expected


@given(st.data())
def test_random_cuts(data: st.DataObject) -> None:
    _name, versions, raw, expected = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    result, unfed = feed_all(versions, chunks)
    assert joined(result, unfed) == expected


@pytest.mark.parametrize(
    ("versions", "data", "bad_at"),
    [
        ("any", b"GET / HTTP/1.0\r\n", 0),
        ("v1", b"PROXY\tTCP4", 5),
        ("v1", b"PROXY UNKNOWN\n", 13),
        ("v2", SIG[:7] + b"X", 7),
        ("v2", SIG + b"\x11", 12),
        ("v2", SIG + b"\x21\x51", 13),
        ("v2", SIG + b"\x21\x11\xff\xff", 15),
    ],
)
def test_refused_at_the_first_wrong_byte(versions: str, data: bytes, bad_at: int) -> None:
    """Garbage is refused as soon as it shows, not when a limit or a timeout is reached."""
    parser = ProxyParser(versions)
    for i in range(bad_at):
        assert parser.feed(data[i : i + 1]) is NEED_DATA, i
    assert isinstance(parser.feed(data[bad_at : bad_at + 1]), Invalid)


def test_a_v1_line_is_refused_at_byte_107_without_crlf() -> None:
    parser = ProxyParser("v1")
    assert parser.feed(UNKNOWN_107[:-1]) is NEED_DATA  # 106 bytes: still may end in CRLF
    assert parser.feed(b"x") == Invalid(f"v1 line longer than {V1_MAX} bytes")


def test_feeding_after_the_verdict_is_a_caller_bug() -> None:
    parser = ProxyParser("any")
    assert isinstance(parser.feed(LINE4), Header)
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_unknown_versions_setting_is_refused() -> None:
    with pytest.raises(ValueError):
        ProxyParser("v3")


def test_signature_constant_is_the_spec_bytes() -> None:
    assert bytes.fromhex("0D0A0D0A000D0A515549540A") == V2_SIGNATURE
