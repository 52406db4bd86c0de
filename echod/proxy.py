"""The PROXY protocol header (versions 1 and 2), sans I/O: bytes in, a verdict out.

A load balancer that speaks the PROXY protocol (HAProxy's ``send-proxy`` and
``send-proxy-v2``, nginx's ``proxy_protocol on``) puts one header in front of
everything its client sends, saying who that client is. The reference is
HAProxy's ``doc/proxy-protocol.txt``; the rules below cite its sections. This
module only parses: it has no sockets, clocks or logging, and it never decides
whether a peer may send a header at all (that is ``--proxy-trusted``, checked
before any byte is read). The server feeds it what ``recv`` returned until it
answers something other than :data:`NEED_DATA`.

Rules:

- Never autodetect (section 5): the parser is made for the versions the
  operator enabled (``v1``, ``v2`` or ``any``) and anything else at the start
  of the connection is :class:`Invalid`. With ``any``, the first byte tells:
  ``P`` starts v1, CR starts v2's signature (section 2.2: the two formats
  cannot be confused).
- Bytes are checked as they come, so garbage is refused at its first wrong
  byte rather than when a limit is reached ("abort the connection as soon as
  possible", 2.1).
- v1 (2.1) is one US-ASCII line ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n``
  with single spaces, of at most :data:`V1_MAX` bytes including the CRLF; a
  lone CR or LF is invalid. Addresses are canonical: dotted quads without
  leading zeros, IPv6 in hex groups (the ``::ffff:a.b.c.d`` form
  ``inet_ntop`` writes is accepted too), no zone index; ports are decimal
  0..65535 without leading zeros. ``PROXY UNKNOWN`` ignores the rest of its
  line.
- v2 (2.2) is a 16-byte header (12-byte signature, version 2 and a command,
  family and transport, a big-endian length) and that many bytes of addresses
  and TLVs. ``LOCAL`` (a health check by the proxy itself) and families or
  transports echod does not route (unspecified, AF_UNIX, datagrams) keep the
  peer's own address; only TCP over IPv4 or IPv6 carries a client address.
  TLVs are checked for framing and otherwise skipped (CRC32C is optional for
  receivers and not implemented). The whole header may be at most
  :data:`V2_MAX` bytes.
- The header may arrive split over any number of reads (the spec recommends
  tolerance, 2); the caller bounds the time it waits (``--proxy-timeout``).
- Bytes after the header are the client's own: :attr:`Header.rest` carries
  them byte-exact.

After a verdict other than :data:`NEED_DATA` the parser is finished and must
not be fed again.

Error handling
--------------
Nothing raises on bad input: a malformed header is an :class:`Invalid` whose
``reason`` is a short phrase for the log. :meth:`ProxyParser.feed` raises
:class:`RuntimeError` only when called after its verdict (a caller bug).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

VERSIONS: Final[tuple[str, ...]] = ("v1", "v2", "any")

# Section 2.1: the worst case, "PROXY UNKNOWN" with two full IPv6 addresses
# and ports, is 107 bytes with its CRLF; a receiver should declare a line
# invalid when the CRLF is not within them.
V1_MAX: Final = 107
V1_PREFIX: Final = b"PROXY "
# Section 2.2: the 12-byte signature, then version and command, family and
# transport, and the length of what follows.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER: Final = 16
# The length field allows 64 KiB; nginx caps the whole header at 4096 bytes,
# room for two AF_UNIX addresses (216 bytes) and every TLV HAProxy sends (a
# unique id of up to 128 bytes, the authority, the SSL strings), and small
# enough that an unfinished header never holds much memory.
V2_MAX: Final = 4096

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_TRANSPORT_MAX = 0x2  # UNSPEC, STREAM, DGRAM; anything above is invalid
# The bytes of addresses and ports each family needs (2.2): what a shorter
# length field cannot hold is invalid.
_ADDRESS_BYTES: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_TLV_HEADER = 3  # type, then a big-endian 16-bit length
_DIGITS = frozenset(b"0123456789")
_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")


@dataclass(frozen=True, slots=True)
class NeedData:
    """Feed more bytes: the header is not complete yet (and nothing is wrong so far)."""


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Header:
    """A complete, valid header.

    ``source`` and ``destination`` are ``(address, port)`` with the address in
    :mod:`ipaddress` text form, or ``None`` when the header says to keep the
    connection's own endpoints (v1 ``UNKNOWN``, v2 ``LOCAL`` or a family
    echod does not route). ``rest``: the client's bytes that came after it.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    rest: bytes


@dataclass(frozen=True, slots=True)
class Invalid:
    """Not a header this parser accepts: close the connection without a reply."""

    reason: str


Result = NeedData | Header | Invalid


class ProxyParser:
    """The header of one connection, fed as it arrives."""

    __slots__ = ("_buf", "_version", "finished", "versions")

    def __init__(self, versions: str = "any") -> None:
        if versions not in VERSIONS:
            raise ValueError(f"versions must be one of {', '.join(VERSIONS)}")
        self.versions = versions
        self._buf = b""
        self._version = 0  # 1 or 2 once the first byte said which
        self.finished = False

    def feed(self, data: bytes) -> Result:
        """Take the next bytes of the connection; see the module docstring."""
        if self.finished:
            raise RuntimeError("feed() after the header was parsed")
        buf = self._buf = self._buf + data
        if not buf:
            return NEED_DATA
        if not self._version:
            first = buf[0]
            if first == V1_PREFIX[0] and self.versions != "v2":
                self._version = 1
            elif first == V2_SIGNATURE[0] and self.versions != "v1":
                self._version = 2
            else:
                return self._done(Invalid(f"not a PROXY {self._expected()} header"))
        result = self._v1(buf) if self._version == 1 else self._v2(buf)
        return result if result is NEED_DATA else self._done(result)

    def _expected(self) -> str:
        return {"v1": "v1", "v2": "v2", "any": "v1 or v2"}[self.versions]

    def _done(self, result: Result) -> Result:
        self.finished = True
        self._buf = b""
        return result

    # -- version 1 --------------------------------------------------------------

    def _v1(self, buf: bytes) -> Result:
        head = buf[: len(V1_PREFIX)]
        if not V1_PREFIX.startswith(head):
            return Invalid("not a PROXY v1 header")
        lf = buf.find(b"\n", 0, V1_MAX)
        if lf < 0:
            if len(buf) >= V1_MAX:
                return Invalid(f"v1 line longer than {V1_MAX} bytes")
            if 0 <= buf.find(b"\r") < len(buf) - 1:  # a CR already followed by something else
                return Invalid("v1 line has a CR without LF")
            return NEED_DATA
        if buf[lf - 1] != 0x0D:
            return Invalid("v1 line does not end in CRLF")
        if buf.find(b"\r", 0, lf - 1) >= 0:
            return Invalid("v1 line has a CR without LF")
        line, rest = buf[: lf - 1], buf[lf + 1 :]
        parsed = _parse_v1(line)
        if isinstance(parsed, Invalid):
            return parsed
        source, destination = parsed
        return Header(1, source, destination, rest)

    # -- version 2 --------------------------------------------------------------

    def _v2(self, buf: bytes) -> Result:
        sig = buf[: len(V2_SIGNATURE)]
        if not V2_SIGNATURE.startswith(sig):
            return Invalid("bad PROXY v2 signature")
        if len(buf) > 12:
            version, command = buf[12] >> 4, buf[12] & 0x0F
            if version != 2:
                return Invalid(f"PROXY v2 header with version {version}")
            if command not in (_LOCAL, _PROXY):
                return Invalid(f"PROXY v2 header with command {command}")
        if len(buf) > 13:
            family, transport = buf[13] >> 4, buf[13] & 0x0F
            if family not in _ADDRESS_BYTES or transport > _TRANSPORT_MAX:
                return Invalid(f"PROXY v2 header with family/transport 0x{buf[13]:02x}")
        if len(buf) < V2_HEADER:
            return NEED_DATA
        (length,) = struct.unpack_from("!H", buf, 14)
        if V2_HEADER + length > V2_MAX:
            return Invalid(f"PROXY v2 header longer than {V2_MAX} bytes")
        end = V2_HEADER + length
        if len(buf) < end:
            return NEED_DATA
        command, family, transport = buf[12] & 0x0F, buf[13] >> 4, buf[13] & 0x0F
        if command == _LOCAL:
            # The receiver "must use the real connection endpoints and discard
            # the protocol block including the family", whatever the length.
            return Header(2, None, None, buf[end:])
        used = _ADDRESS_BYTES[family]
        if length < used:
            return Invalid("PROXY v2 address block shorter than its family needs")
        if not _tlvs_framed(buf, V2_HEADER + used, end):
            return Invalid("PROXY v2 TLVs overrun the header")
        source = destination = None
        if transport == _STREAM and family in (_AF_INET, _AF_INET6):
            source, destination = _v2_addresses(buf, family)
        return Header(2, source, destination, buf[end:])


def _parse_v1(line: bytes) -> tuple[tuple[str, int] | None, tuple[str, int] | None] | Invalid:
    """The fields of a v1 line without its CRLF; ``(None, None)`` for UNKNOWN."""
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return None, None  # "the receiver must ignore anything presented before the CRLF"
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        return Invalid("v1 line is not PROXY TCP4|TCP6|UNKNOWN with 4 fields")
    v6 = fields[1] == b"TCP6"
    src, dst = _v1_address(fields[2], v6), _v1_address(fields[3], v6)
    sport, dport = _v1_port(fields[4]), _v1_port(fields[5])
    if src is None or dst is None:
        return Invalid(f"v1 line has a bad {'IPv6' if v6 else 'IPv4'} address")
    if sport is None or dport is None:
        return Invalid("v1 line has a bad port")
    return (src, sport), (dst, dport)


def _v1_address(text: bytes, v6: bool) -> str | None:
    if not text:
        return None
    try:
        if v6:
            # Hex groups and colons, or inet_ntop's ::ffff:a.b.c.d; never a zone.
            if not set(text) <= _IPV6_CHARS:
                return None
            return str(ipaddress.IPv6Address(text.decode("ascii")))
        # IPv4Address takes only four decimal numbers without leading zeros.
        if not set(text) <= _DIGITS | {0x2E}:
            return None
        return str(ipaddress.IPv4Address(text.decode("ascii")))
    except ValueError:
        return None


def _v1_port(text: bytes) -> int | None:
    if not text or not set(text) <= _DIGITS or (len(text) > 1 and text[0] == 0x30):
        return None
    port = int(text)
    return port if port <= 0xFFFF else None


def _v2_addresses(buf: bytes, family: int) -> tuple[tuple[str, int], tuple[str, int]]:
    size = 4 if family == _AF_INET else 16
    at = V2_HEADER
    src = ipaddress.ip_address(buf[at : at + size])
    dst = ipaddress.ip_address(buf[at + size : at + 2 * size])
    sport, dport = struct.unpack_from("!HH", buf, at + 2 * size)
    return (str(src), sport), (str(dst), dport)


def _tlvs_framed(buf: bytes, start: int, end: int) -> bool:
    """True when the TLVs between ``start`` and ``end`` tile it exactly."""
    at = start
    while at < end:
        if end - at < _TLV_HEADER:
            return False
        (size,) = struct.unpack_from("!H", buf, at + 1)
        at += _TLV_HEADER + size
    return at == end
