"""Who may connect: address normalization, allow/deny lists, per-source limits and rates.

This module decides, for one client address, whether echod serves it; it
keeps the per-source state that decision needs. It has no sockets and no
logging: the server calls :meth:`Admission.admit` from the client's handler
thread once it knows the client's address (after the PROXY header, if any)
and :meth:`Admission.release` however the connection ends. Times come from an
injectable clock, so every rule is tested without sleeping.

Rules (the flags are in README.md):

- **Addresses are normalized** (:func:`normalize`): an IPv4-mapped IPv6
  address (``::ffff:192.0.2.7``, what a dual-stack listener reports for an
  IPv4 client) is that IPv4 address for the lists, the limits and the logs.
  List entries in the mapped form are normalized the same way.
- **Allow/deny** (:class:`AccessList`, like nginx's stream access module and
  ncat's ``--allow``/``--deny``, but order-free like xinetd): entries from the
  flags and the files form one list. When several match, the longest prefix
  wins; at equal length deny wins. With any allow entry in the list, an
  address that matches nothing is denied; without one, it is allowed.
  A lookup costs one dict probe per distinct prefix length in the list, not
  one test per entry.
- **Per-source groups** (``--source-prefix V4:V6``): clients are counted by
  network, /32 for IPv4 and /64 for IPv6 by default (one IPv6 host usually
  holds a /64, so a per-address limit would be no limit). ``--max-per-source``
  bounds the connections a group holds at once; ``--max-connect-rate N/S`` is
  a token bucket per group: bursts of N, refilled at N per S seconds, one
  token per attempt that passed the access list.
- Checks run in this order: the access list, the connect rate, the
  per-source count. A connection refused by the count still spent a token:
  it was an attempt like any other, and a client hammering at its limit is
  connecting too fast.
- **Bounded tables**: a group's entry goes when its last connection does and
  its bucket is full again. Entries without connections wait in an idle queue
  in the order they became idle; each :meth:`Admission.admit` drops the ones
  at its head that are full, and once the queue holds
  :data:`MAX_IDLE_GROUPS`, the oldest is dropped anyway (its client regains a
  full burst: the only cost of a flood of new sources is leniency). Groups
  with connections are bounded by the connections themselves.

All state lives behind one :class:`threading.Lock`; nothing blocks while it
is held. :class:`BurstLog` (one per server) decides which refusals are worth
a log line.

Error handling
--------------
:func:`parse_entry` and :func:`read_entries` raise :class:`ValueError` with a
sentence naming the bad entry (and the file and line number); the CLI turns it
into a usage error. Nothing else here raises on input from the network.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Clock = Callable[[], float]

REASONS: Final = ("access_denied", "per_source", "connect_rate", "proxy_untrusted", "proxy_header")
DEFAULT_SOURCE_PREFIX: Final = (32, 64)
# Idle groups kept for their partly spent rate buckets. 10,000 entries are
# about 2 MB; a flood of more distinct sources than that within one refill
# period only makes the oldest of them forget their history.
MAX_IDLE_GROUPS: Final = 10_000
# Burst summarizing: more refusals than this per second for one reason are
# summarized once a second instead of logged one by one, so a flood cannot
# fill the disk (the figure).
LOG_PER_SECOND: Final = 20

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def normalize(address: str | IPAddress) -> IPAddress:
    """The address as echod sees it: IPv4-mapped IPv6 becomes IPv4, the zone goes.

    Raises :class:`ValueError` for text that is not an address.
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def parse_entry(text: str) -> IPNetwork:
    """One allow/deny entry: an address or a network in CIDR form.

    Host bits set under the prefix (``10.0.0.1/8``) are an error, not silently
    masked: in an access list that is nearly always a typo.
    """
    text = text.strip()
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or CIDR network") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None
    # ::ffff:10.0.0.0/104 is 10.0.0.0/8: clients are normalized the same way.
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        v4 = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, network.prefixlen - 96))
    return network


def read_entries(path: str | Path) -> list[IPNetwork]:
    """The entries of an allow or deny file: one per line, ``#`` comments, blank lines.

    Raises :class:`ValueError` naming the file and line of a bad entry, or
    saying why the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"cannot read {path}: {reason}") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        try:
            entries.append(parse_entry(line))
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {err}") from None
    return entries


class AccessList:
    """Allow and deny entries; :meth:`allows` applies the module docstring's rules."""

    __slots__ = ("_tables", "has_allow", "size")

    def __init__(self, allow: Iterable[IPNetwork] = (), deny: Iterable[IPNetwork] = ()) -> None:
        # Per family (4, 6): prefix length -> network address as int -> allowed?
        # Lengths longest first, so the first hit is the most specific.
        tables: dict[int, dict[int, dict[int, bool]]] = {4: {}, 6: {}}
        self.size = 0
        self.has_allow = False
        for verdict, networks in ((True, allow), (False, deny)):
            for net in networks:
                by_len = tables[net.version].setdefault(net.prefixlen, {})
                key = int(net.network_address)
                # deny wins a tie: an allow never overwrites a deny
                by_len[key] = by_len.get(key, True) and verdict
                self.size += 1
                self.has_allow |= verdict
        bits = {4: 32, 6: 128}
        self._tables = {
            version: [(bits[version] - n, table[n]) for n in sorted(table, reverse=True)]
            for version, table in tables.items()
        }

    def allows(self, address: IPAddress) -> bool:
        """Whether a (normalized) address may connect."""
        value = int(address)
        for shift, table in self._tables[address.version]:
            verdict = table.get(value >> shift << shift)
            if verdict is not None:
                return verdict
        return not self.has_allow


@dataclass(frozen=True, slots=True)
class Rate:
    """``--max-connect-rate N/SECONDS``: bursts of ``count``, refilled over ``seconds``."""

    count: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        count, slash, seconds = text.partition("/")
        try:
            rate = cls(int(count), float(seconds)) if slash else None
        except ValueError:
            rate = None
        if rate is None or rate.count < 1 or not rate.seconds > 0:
            raise ValueError(
                f"{text!r} is not a rate: give N/SECONDS, such as 10/1 or 100/60 (N >= 1)"
            )
        return rate


def parse_source_prefix(text: str) -> tuple[int, int]:
    """``--source-prefix V4:V6``, such as ``32:64``."""
    v4, colon, v6 = text.partition(":")
    try:
        prefix = (int(v4), int(v6)) if colon else None
    except ValueError:
        prefix = None
    if prefix is None or not (0 <= prefix[0] <= 32 and 0 <= prefix[1] <= 128):
        raise ValueError(
            f"{text!r} is not a source prefix: give V4:V6 lengths, such as 32:64 (0..32 and 0..128)"
        )
    return prefix


class TokenBucket:
    """Up to ``capacity`` tokens, refilled at ``per_second``; not locked (callers lock).

    Also the per-connection ``--max-line-rate`` budget, taken by the handler
    thread alone.
    """

    __slots__ = ("capacity", "level", "per_second", "updated")

    def __init__(self, capacity: float, per_second: float, now: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> float:
        """The tokens available ``now`` (never above capacity)."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
            self.updated = now
        return self.level

    def take(self, now: float, tokens: float = 1.0) -> bool:
        if self.refill(now) >= tokens:
            self.level -= tokens
            return True
        return False

    def wait_for(self, now: float, tokens: float = 1.0) -> float:
        """Seconds until ``tokens`` are available (0 if they are now)."""
        missing = tokens - self.refill(now)
        return max(0.0, missing / self.per_second)


GroupKey = tuple[int, int]  # (IP version, network address as int)


@dataclass(slots=True)
class _Group:
    connections: int = 0
    bucket: TokenBucket | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """Serve the client; hand ``group`` back to :meth:`Admission.release` when it goes."""

    group: GroupKey | None


@dataclass(frozen=True, slots=True)
class Refused:
    """Do not serve: send ``line`` (if any), close, and log ``reason``."""

    reason: str
    line: bytes


@dataclass(frozen=True, slots=True)
class Policy:
    """The admission settings, as the server's settings give them."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    max_per_source: int = 0
    source_prefix: tuple[int, int] = DEFAULT_SOURCE_PREFIX
    connect_rate: Rate | None = None


def refusal_line(reason: str, max_per_source: int = 0) -> bytes:
    """The one line a refused client is told (PROXY refusals get none)."""
    text = {
        "access_denied": "access denied",
        "per_source": f"too many connections from your address (max {max_per_source})",
        "connect_rate": "connecting too fast, try again later",
    }.get(reason)
    return b"" if text is None else b"ERR " + text.encode("ascii") + b"\n"


class Admission:
    """The admission state of one server; see the module docstring."""

    def __init__(
        self, policy: Policy, clock: Clock = time.monotonic, max_idle_groups: int = MAX_IDLE_GROUPS
    ) -> None:
        self.clock = clock
        self.max_idle_groups = max_idle_groups
        self.refused = dict.fromkeys(REASONS, 0)  # by reason, for /stats
        self._lock = threading.Lock()
        self._groups: dict[GroupKey, _Group] = {}
        self._idle: OrderedDict[GroupKey, None] = OrderedDict()  # groups without connections
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Decide by ``policy`` from now on (a reload); the connections held stay counted.

        The lists and the per-source limit apply to the next connect. A
        changed connect rate gives every tracked group a full bucket at the
        new rate (or none). A changed ``source_prefix`` groups the next
        connects anew; connections held are released from the group they
        were counted in.
        """
        access = AccessList(policy.allow, policy.deny)
        v4, v6 = policy.source_prefix
        with self._lock:
            old = getattr(self, "policy", None)
            self.policy = policy
            self.access = access
            self._shifts = {4: 32 - v4, 6: 128 - v6}
            self._tracking = bool(policy.max_per_source or policy.connect_rate)
            if old is not None and old.connect_rate != policy.connect_rate:
                rate, now = policy.connect_rate, self.clock()
                for group in self._groups.values():
                    group.bucket = (
                        None
                        if rate is None
                        else TokenBucket(rate.count, rate.count / rate.seconds, now)
                    )

    def group_of(self, address: IPAddress) -> GroupKey:
        shift = self._shifts[address.version]
        return address.version, int(address) >> shift << shift

    def admit(self, address: IPAddress) -> Admitted | Refused:
        """Decide for one (normalized) client address; count a refusal by its reason."""
        if self.access.size and not self.access.allows(address):
            return self.refuse("access_denied")
        if not self._tracking:
            return Admitted(None)
        key = self.group_of(address)
        policy = self.policy
        with self._lock:
            now = self.clock()
            self._expire(now)
            group = self._group(key, now)
            if group.bucket is not None and not group.bucket.take(now):
                reason = "connect_rate"
            elif policy.max_per_source and group.connections >= policy.max_per_source:
                reason = "per_source"
            else:
                group.connections += 1
                self._idle.pop(key, None)
                return Admitted(key)
            if not group.connections:
                self._idle[key] = None
                self._idle.move_to_end(key)
            self.refused[reason] += 1
        return Refused(reason, refusal_line(reason, policy.max_per_source))

    def restore_refused(self, counts: dict[str, int]) -> None:
        """Go on with the refusal counts of the echod this one replaces (an upgrade).

        Reasons this version does not know are left out.
        """
        with self._lock:
            for reason, count in counts.items():
                if reason in self.refused:
                    self.refused[reason] = count

    def adopt(self, address: IPAddress) -> Admitted:
        """Count a client another echod admitted and handed over (an upgrade).

        No rule is applied: the client is served already and stays, whatever
        the new settings say; it counts towards its source's limit from now on.
        """
        if not self._tracking:
            return Admitted(None)
        key = self.group_of(address)
        with self._lock:
            self._group(key, self.clock()).connections += 1
            self._idle.pop(key, None)
        return Admitted(key)

    def _group(self, key: GroupKey, now: float) -> _Group:
        """The group of ``key``, made (with its rate bucket) if new; under the lock."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
            rate = self.policy.connect_rate
            if rate is not None:
                group.bucket = TokenBucket(rate.count, rate.count / rate.seconds, now)
        return group

    def refuse(self, reason: str) -> Refused:
        """Count a refusal decided elsewhere too (the PROXY ones) and say what to send."""
        with self._lock:
            self.refused[reason] += 1
        return Refused(reason, refusal_line(reason, self.policy.max_per_source))

    def release(self, admitted: Admitted) -> None:
        """A connection admitted earlier ended (any way at all). Call once per admit."""
        key = admitted.group
        if key is None:
            return
        with self._lock:
            group = self._groups.get(key)
            if group is None or group.connections <= 0:
                return  # released twice: a caller bug, but never a negative count
            group.connections -= 1
            if not group.connections:
                self._idle[key] = None
                self._expire(self.clock())

    def groups(self) -> int:
        """Source groups tracked now (``source_groups`` in ``/stats``)."""
        with self._lock:
            now = self.clock()
            for key in list(self._idle):
                self._drop_if_full(key, now)
            return len(self._groups)

    def connections(self, address: IPAddress) -> int:
        """Connections the address's group holds now."""
        with self._lock:
            group = self._groups.get(self.group_of(address))
            return group.connections if group is not None else 0

    def _expire(self, now: float) -> None:
        """Drop idle groups at the head of the queue that are full again, and over the bound."""
        idle = self._idle
        while idle:
            key = next(iter(idle))
            if len(idle) > self.max_idle_groups:
                del idle[key]
                del self._groups[key]
            elif not self._drop_if_full(key, now):
                return

    def _drop_if_full(self, key: GroupKey, now: float) -> bool:
        bucket = self._groups[key].bucket
        if bucket is not None and bucket.refill(now) < bucket.capacity:
            return False
        del self._idle[key]
        del self._groups[key]
        return True


class BurstLog:
    """Which ``client_refused`` events to log: :data:`LOG_PER_SECOND` per reason a second.

    :meth:`should_log` answers for one refusal; those beyond the budget of
    their reason's one-second window are counted, and :meth:`summaries` (the
    janitor calls it every tick) hands the counts over at most once a second:
    the ``client_refused_burst`` events. Locked, since handler threads refuse
    concurrently.
    """

    def __init__(self, clock: Clock = time.monotonic, per_second: int = LOG_PER_SECOND) -> None:
        self.clock = clock
        self.per_second = per_second
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # reason -> window start, logged
        self._unlogged: dict[str, int] = {}
        self._summarized = clock()

    def should_log(self, reason: str) -> bool:
        now = self.clock()
        with self._lock:
            start, logged = self._windows.get(reason, (now, 0))
            if now - start >= 1.0:
                start, logged = now, 0
            if logged < self.per_second:
                self._windows[reason] = (start, logged + 1)
                return True
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return False

    def summaries(self) -> list[tuple[str, int]]:
        """``(reason, count)`` of the refusals not logged since the last summary."""
        now = self.clock()
        with self._lock:
            if now - self._summarized < 1.0 or not self._unlogged:
                return []
            self._summarized = now
            out = list(self._unlogged.items())
            self._unlogged.clear()
        return out
