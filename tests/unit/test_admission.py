"""Admission control, pure: normalization, the allow/deny matcher, per-source counts and rates.

The matcher is checked against :func:`reference`, a deliberately plain model
of the rules (look at every entry, keep the longest matches, deny wins a
tie), on lists hypothesis draws from a small address space so that entries
overlap. Rates and bounded tables run on a fake clock: nothing here sleeps.
"""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echod.admission import (
    REASONS,
    AccessList,
    Admission,
    Admitted,
    BurstLog,
    IPAddress,
    IPNetwork,
    Policy,
    Rate,
    Refused,
    TokenBucket,
    normalize,
    parse_entry,
    parse_source_prefix,
    read_entries,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ip(text: str) -> IPAddress:
    return normalize(text)


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_entry(t) for t in texts)


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("::FFFF:C000:0207", "192.0.2.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("fe80::1%eth0", "fe80::1"),
        ("::1", "::1"),
        ("::192.0.2.7", "::c000:207"),  # IPv4-compatible (deprecated), not mapped: stays IPv6
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert str(normalize(text)) == expected


def test_normalize_refuses_a_name() -> None:
    with pytest.raises(ValueError):
        normalize("localhost")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        (" 2001:db8::/32 ", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:192.0.2.7", "192.0.2.7/32"),
        ("::/0", "::/0"),
    ],
)
def test_parse_entry(text: str, expected: str) -> None:
    assert str(parse_entry(text)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
        ("example.com", "'example.com' is not an IP address or CIDR network"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or CIDR network"),
        ("", "'' is not an IP address or CIDR network"),
    ],
)
def test_parse_entry_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_entry(text)
    assert str(err.value) == message


def test_read_entries(tmp_path: Path) -> None:
    path = tmp_path / "allow"
    path.write_text("# office\n10.0.0.0/8   # the LAN\n\n   \n2001:db8::1\n")
    assert [str(n) for n in read_entries(path)] == ["10.0.0.0/8", "2001:db8::1/128"]


def test_read_entries_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "deny"
    path.write_text("10.0.0.0/8\n# fine\n10.0.0.1/8\n")
    with pytest.raises(ValueError) as err:
        read_entries(path)
    assert str(err.value) == (
        f"{path}, line 3: '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"
    )


def test_read_entries_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read .*missing: No such file or directory"):
        read_entries(tmp_path / "missing")


# -- the matcher ------------------------------------------------------------------------------


def reference(allow: list[IPNetwork], deny: list[IPNetwork], address: IPAddress) -> bool:
    """The rules, plainly: every entry is looked at; longest match wins; deny wins a tie."""
    matches = [(n.prefixlen, False) for n in deny if address in n]
    matches += [(n.prefixlen, True) for n in allow if address in n]
    if not matches:
        return not allow
    longest = max(length for length, _ in matches)
    return all(verdict for length, verdict in matches if length == longest)


# A small space, so that drawn entries overlap and nest: 10.0.0.0/22 and 2001:db8::/118.
v4_nets = st.builds(
    lambda value, length: ipaddress.IPv4Network((0x0A000000 + value, length), strict=False),
    st.integers(0, 1023),
    st.integers(20, 32),
)
v6_nets = st.builds(
    lambda value, length: ipaddress.IPv6Network((0x20010DB8 << 96 | value, length), strict=False),
    st.integers(0, 1023),
    st.integers(114, 128),
)
any_nets: st.SearchStrategy[IPNetwork] = st.one_of(v4_nets, v6_nets)
addresses: st.SearchStrategy[IPAddress] = st.one_of(
    st.integers(0, 1023).map(lambda v: ipaddress.IPv4Address(0x0A000000 + v)),
    st.integers(0, 1023).map(lambda v: ipaddress.IPv6Address(0x20010DB8 << 96 | v)),
    st.just(ipaddress.IPv4Address("192.0.2.1")),
)


@settings(max_examples=300)
@given(st.lists(any_nets, max_size=12), st.lists(any_nets, max_size=12), st.lists(addresses))
def test_matcher_agrees_with_the_reference(
    allow: list[IPNetwork], deny: list[IPNetwork], probes: list[IPAddress]
) -> None:
    access = AccessList(allow, deny)
    for address in probes:
        assert access.allows(address) == reference(allow, deny, address), address


@pytest.mark.parametrize(
    ("allow", "deny", "address", "allowed"),
    [
        ((), (), "192.0.2.1", True),
        (("10.0.0.0/8",), (), "192.0.2.1", False),  # an allow list: match one or be denied
        (("10.0.0.0/8",), (), "10.1.2.3", True),
        (("10.0.0.0/8",), ("10.1.0.0/16",), "10.1.2.3", False),  # more specific deny
        (("10.1.2.3",), ("10.1.0.0/16",), "10.1.2.3", True),  # more specific allow
        (("10.0.0.0/8",), ("10.0.0.0/8",), "10.1.2.3", False),  # a tie: deny wins
        ((), ("10.0.0.0/8",), "192.0.2.1", True),  # deny only: the rest is allowed
        (("::/0",), (), "192.0.2.1", False),  # families do not mix
        (("0.0.0.0/0",), ("2001:db8::/32",), "2001:db8::1", False),
        (("2001:db8::/64",), (), "2001:db8::ffff", True),
    ],
)
def test_matcher_examples(
    allow: tuple[str, ...], deny: tuple[str, ...], address: str, allowed: bool
) -> None:
    assert AccessList(nets(*allow), nets(*deny)).allows(ip(address)) is allowed


def test_a_mapped_client_matches_ipv4_entries() -> None:
    access = AccessList(nets("192.0.2.0/24"), ())
    assert access.allows(normalize("::ffff:192.0.2.7"))
    assert not access.allows(normalize("::ffff:198.51.100.7"))


# -- per-source counts ---------------------------------------------------------------------


def test_per_source_limit_and_release() -> None:
    adm = Admission(Policy(max_per_source=2))
    a, b = adm.admit(ip("127.0.0.2")), adm.admit(ip("127.0.0.2"))
    assert isinstance(a, Admitted) and isinstance(b, Admitted)
    refused = adm.admit(ip("127.0.0.2"))
    assert refused == Refused("per_source", b"ERR too many connections from your address (max 2)\n")
    assert isinstance(adm.admit(ip("127.0.0.3")), Admitted)  # another source
    adm.release(a)
    assert isinstance(adm.admit(ip("127.0.0.2")), Admitted)  # the freed slot
    assert adm.refused["per_source"] == 1


def test_ipv6_sources_are_grouped_by_64() -> None:
    adm = Admission(Policy(max_per_source=1))
    assert isinstance(adm.admit(ip("2001:db8:0:1::1")), Admitted)
    assert isinstance(adm.admit(ip("2001:db8:0:1:ffff::9")), Refused)  # same /64
    assert isinstance(adm.admit(ip("2001:db8:0:2::1")), Admitted)


def test_source_prefix_groups_ipv4_networks() -> None:
    adm = Admission(Policy(max_per_source=1, source_prefix=(24, 128)))
    assert isinstance(adm.admit(ip("192.0.2.1")), Admitted)
    assert isinstance(adm.admit(ip("::ffff:192.0.2.200")), Refused)  # mapped: same /24
    assert isinstance(adm.admit(ip("192.0.3.1")), Admitted)
    assert isinstance(adm.admit(ip("2001:db8::1")), Admitted)
    assert isinstance(adm.admit(ip("2001:db8::2")), Admitted)  # /128: every address alone


def test_access_is_checked_first_and_counted() -> None:
    adm = Admission(Policy(allow=nets("127.0.0.0/8"), max_per_source=1))
    assert adm.admit(ip("192.0.2.1")) == Refused("access_denied", b"ERR access denied\n")
    assert adm.refused == dict.fromkeys(REASONS, 0) | {"access_denied": 1}
    assert adm.groups() == 0  # a denied address takes no table entry


def test_release_twice_never_goes_negative() -> None:
    adm = Admission(Policy(max_per_source=1))
    ticket = adm.admit(ip("127.0.0.2"))
    assert isinstance(ticket, Admitted)
    adm.release(ticket)
    adm.release(ticket)
    assert adm.connections(ip("127.0.0.2")) == 0
    assert isinstance(adm.admit(ip("127.0.0.2")), Admitted)
    assert isinstance(adm.admit(ip("127.0.0.2")), Refused)


def test_nothing_is_tracked_without_limits() -> None:
    adm = Admission(Policy(allow=nets("127.0.0.0/8")))
    assert adm.admit(ip("127.0.0.2")) == Admitted(None)
    assert adm.groups() == 0


def test_concurrent_admits_and_releases_balance() -> None:
    adm = Admission(Policy(max_per_source=1_000_000))
    sources = [ip(f"127.0.0.{i}") for i in range(2, 10)]

    def churn() -> None:
        for n in range(2000):
            ticket = adm.admit(sources[n % len(sources)])
            assert isinstance(ticket, Admitted)
            adm.release(ticket)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert adm.groups() == 0


# -- connect rate --------------------------------------------------------------------------


def test_connect_rate_burst_then_refill() -> None:
    clock = Clock()
    adm = Admission(Policy(connect_rate=Rate(3, 1.5)), clock)  # bursts of 3, one per 0.5 s
    source = ip("127.0.0.2")
    tickets = [adm.admit(source) for _ in range(3)]
    assert all(isinstance(t, Admitted) for t in tickets)
    assert adm.admit(source) == Refused(
        "connect_rate", b"ERR connecting too fast, try again later\n"
    )
    assert isinstance(adm.admit(ip("127.0.0.3")), Admitted)  # another group has its own bucket
    clock.now += 0.49
    assert isinstance(adm.admit(source), Refused)
    clock.now += 0.02
    assert isinstance(adm.admit(source), Admitted)
    assert isinstance(adm.admit(source), Refused)
    assert adm.refused["connect_rate"] == 3


def test_a_refused_connection_still_spends_a_token() -> None:
    clock = Clock()
    adm = Admission(Policy(max_per_source=1, connect_rate=Rate(2, 10)), clock)
    assert isinstance(adm.admit(ip("127.0.0.2")), Admitted)
    assert adm.admit(ip("127.0.0.2")).reason == "per_source"  # type: ignore[union-attr]
    assert adm.admit(ip("127.0.0.2")).reason == "connect_rate"  # type: ignore[union-attr]


def test_an_idle_group_goes_once_its_bucket_is_full() -> None:
    clock = Clock()
    adm = Admission(Policy(connect_rate=Rate(2, 2)), clock)
    ticket = adm.admit(ip("127.0.0.2"))
    assert isinstance(ticket, Admitted)
    adm.release(ticket)
    assert adm.groups() == 1  # no connection, but a token spent: kept
    clock.now += 0.99
    assert adm.groups() == 1
    clock.now += 0.02
    assert adm.groups() == 0


def test_idle_groups_are_bounded() -> None:
    clock = Clock()
    adm = Admission(Policy(connect_rate=Rate(1, 3600)), clock, max_idle_groups=100)
    for i in range(1000):
        ticket = adm.admit(ipaddress.IPv4Address(0x0A000000 + i))
        assert isinstance(ticket, Admitted)
        adm.release(ticket)
    assert adm.groups() <= 101
    held = [adm.admit(ipaddress.IPv4Address(0x0B000000 + i)) for i in range(300)]
    assert all(isinstance(t, Admitted) for t in held)
    assert adm.groups() <= 300 + 101  # groups with connections are never dropped
    assert adm.connections(ipaddress.IPv4Address(0x0B000000)) == 1


def test_token_bucket_wait_for() -> None:
    bucket = TokenBucket(2, 4.0, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.wait_for(0.0) == pytest.approx(0.25)
    assert bucket.wait_for(0.25) == 0.0
    assert bucket.refill(100.0) == 2  # never above capacity


# -- parsing the flags ---------------------------------------------------------------------


def test_rate_parse() -> None:
    assert Rate.parse("10/1") == Rate(10, 1.0)
    assert Rate.parse("100/0.5") == Rate(100, 0.5)
    for text in ("10", "0/1", "10/0", "x/1", "10/-1", "10/nan", "/"):
        with pytest.raises(ValueError, match="is not a rate"):
            Rate.parse(text)


def test_source_prefix_parse() -> None:
    assert parse_source_prefix("32:64") == (32, 64)
    assert parse_source_prefix("24:48") == (24, 48)
    for text in ("32", "33:64", "32:129", "a:b", "-1:64"):
        with pytest.raises(ValueError, match="is not a source prefix"):
            parse_source_prefix(text)


# -- log bursts ----------------------------------------------------------------------------


def test_burst_log_summarizes_beyond_20_a_second() -> None:
    clock = Clock()
    log = BurstLog(clock)
    logged = [log.should_log("per_source") for _ in range(50)]
    assert logged == [True] * 20 + [False] * 30
    assert log.should_log("access_denied")  # each reason has its own budget
    assert log.summaries() == []  # at most once a second
    clock.now += 1.0
    assert log.summaries() == [("per_source", 30)]
    assert log.summaries() == []
    assert log.should_log("per_source")  # a new window


def test_set_policy_applies_to_the_next_connect_and_keeps_what_is_held() -> None:
    clock = Clock()
    adm = Admission(Policy(max_per_source=2, connect_rate=Rate(1, 60.0)), clock)
    held = adm.admit(ip("127.0.0.2"))
    assert isinstance(held, Admitted)
    assert isinstance(adm.admit(ip("127.0.0.2")), Refused)  # the burst of 1 is spent
    # A reload: a deny list, one connection per source, and a new rate (a full bucket).
    adm.set_policy(Policy(deny=nets("127.0.0.3"), max_per_source=1, connect_rate=Rate(5, 1.0)))
    refused = adm.admit(ip("127.0.0.3"))
    assert isinstance(refused, Refused) and refused.reason == "access_denied"
    over = adm.admit(ip("127.0.0.2"))  # not the rate (new bucket): the held one counts
    assert isinstance(over, Refused) and over.reason == "per_source"
    assert over.line == b"ERR too many connections from your address (max 1)\n"
    adm.release(held)
    assert isinstance(adm.admit(ip("127.0.0.2")), Admitted)
    adm.set_policy(Policy())  # everything off: nothing tracked, everyone served
    assert all(isinstance(adm.admit(ip("127.0.0.2")), Admitted) for _ in range(10))


def test_refusal_counts_carry_over_and_go_on() -> None:
    # An upgrade: the successor starts from the old echod's counts.
    adm = Admission(Policy(deny=(parse_entry("127.0.0.9"),)))
    adm.restore_refused({"access_denied": 3, "per_source": 1, "from_a_later_version": 5})
    assert isinstance(adm.admit(normalize("127.0.0.9")), Refused)
    assert adm.refused == {**dict.fromkeys(REASONS, 0), "access_denied": 4, "per_source": 1}
