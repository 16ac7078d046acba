"""vtl.addrclass: default classes, embedded IPv4, legacy literals, allow/deny longest prefix."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from vtl.addrclass import (
    DEFAULT_POLICY,
    LOCALHOST,
    OWN,
    PORT_ZERO,
    AddressPolicy,
    conflicts,
    literal,
    parse_prefix,
    refusal,
    unwrap,
)

V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


def in_net(net: str) -> st.SearchStrategy:
    n = ipaddress.ip_network(net)
    return st.integers(0, n.num_addresses - 1).map(lambda i: n.network_address + i)


REFUSED_CLASSES = [
    ("0.0.0.0/8", "unspecified"), ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/5", "reserved"), ("::/128", "unspecified"), ("::1/128", "loopback"),
    ("fe80::/10", "link-local"), ("ff00::/8", "multicast"),
]


@pytest.mark.parametrize(("net", "label"), REFUSED_CLASSES)
@given(data=st.data())
def test_every_address_of_a_default_class_is_refused(net: str, label: str,
                                                     data: st.DataObject) -> None:
    addr = data.draw(in_net(net))
    assert DEFAULT_POLICY.check(addr) == label
    assert DEFAULT_POLICY.check(str(addr)) == label


def test_broadcast_and_class_e() -> None:
    assert DEFAULT_POLICY.check("255.255.255.255") == "broadcast"
    assert DEFAULT_POLICY.check("255.255.255.254") == "reserved"
    assert DEFAULT_POLICY.check("240.0.0.1") == "reserved"


@given(V4)
def test_ipv4_mapped_compat_siit_and_nat64_forms_are_judged_as_their_ipv4(
        a: ipaddress.IPv4Address) -> None:
    n = int(a)
    forms = [ipaddress.IPv6Address((0xFFFF << 32) | n),  # ::ffff:a.b.c.d
             ipaddress.IPv6Address((0xFFFF << 48) | n),  # ::ffff:0:a.b.c.d
             ipaddress.IPv6Address((0x64FF9B << 96) | n)]  # 64:ff9b::a.b.c.d
    if n > 1:
        forms.append(ipaddress.IPv6Address(n))  # ::a.b.c.d (deprecated compatible)
    for form in forms:
        assert unwrap(form) == a
        assert DEFAULT_POLICY.check(form) == DEFAULT_POLICY.check(a)


def test_named_embedded_examples() -> None:
    assert DEFAULT_POLICY.check("::ffff:127.0.0.1") == "loopback"
    assert DEFAULT_POLICY.check("::ffff:169.254.169.254") == "link-local"
    assert DEFAULT_POLICY.check("::127.0.0.1") == "loopback"
    assert DEFAULT_POLICY.check("64:ff9b::a9fe:a9fe") == "link-local"
    assert DEFAULT_POLICY.check("::ffff:8.8.8.8") is None
    assert unwrap(ipaddress.ip_address("::1")) == ipaddress.ip_address("::1")
    assert DEFAULT_POLICY.check("::1") == "loopback"  # not 0.0.0.1


# mostly addresses outside every class (random 128-bit integers are often tiny, i.e.
# IPv4-compatible forms of 0.x.x.x, and would be filtered out), plus anything at all
REACHABLE = st.one_of(
    st.integers(0x01000000, 0x7EFFFFFF).map(ipaddress.IPv4Address),
    st.integers(0x80000000, 0xDFFFFFFF).map(ipaddress.IPv4Address),
    st.integers(0x2000 << 112, (0x4000 << 112) - 1).map(ipaddress.IPv6Address),
    V4, V6)


@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(REACHABLE)
def test_an_address_outside_every_class_may_be_reached(a) -> None:
    u = unwrap(a)
    assume(not (u.is_loopback or u.is_link_local or u.is_multicast or u.is_unspecified))
    assume(not (u.version == 4 and (int(u) >> 24 == 0 or int(u) >> 28 == 0xF)))
    assert DEFAULT_POLICY.check(a) is None


def test_ordinary_addresses_pass() -> None:
    for a in ("10.1.2.3", "192.168.1.1", "8.8.8.8", "2001:db8::1", "fd00::1", "100.64.0.1"):
        assert DEFAULT_POLICY.check(a) is None, a


# -- literals as the C library reads them ----------------------------------------------

def test_legacy_ipv4_forms_are_addresses_not_names() -> None:
    for text in ("127.1", "0x7f.1", "2130706433", "017700000001", "0x7f000001", "127.0.1",
                 "127.0.0.1 trailing", "[::1]", "::ffff:127.0.0.1"):
        a = literal(text)
        assert a is not None, text
        assert DEFAULT_POLICY.check(a) == "loopback", text
    for text in ("example.com", "127.0.0.1.", " 127.0.0.1", "1.2.3.4.5", "08.1.1.1",
                 "256.1.1.1", "1.2.3.4294967296", "", "x127.1", "1.2.3.0x", "0x", "1..2"):
        assert literal(text) is None, text


@settings(max_examples=1000)
@example("0x")
@example("1.2.3.0x")
@example("0377.0xff.1.1")
@example("1.16777216")
@example("1.2.3.4\tjunk")
@given(st.text(alphabet="0123456789xXabcdefABCDEF. \t", max_size=24))
def test_legacy_parser_agrees_with_inet_aton(text: str) -> None:
    try:
        want = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        want = None
    except ValueError:  # embedded NUL etc.
        return
    got = literal(text)
    if got is not None and got.version == 6:
        return
    assert got == want, text


def test_v6_scope_and_brackets() -> None:
    assert DEFAULT_POLICY.check(literal("fe80::1%eth0")) == "link-local"
    assert literal("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")


# -- refusal(): ports and names --------------------------------------------------------

def test_port_zero_and_out_of_range_ports_are_refused() -> None:
    assert refusal("192.0.2.1", 0) == PORT_ZERO
    assert refusal("192.0.2.1", 65536) == "port 65536"
    assert refusal("192.0.2.1", 80) is None


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "localhost.", "a.localhost",
                                  "x.y.LocalHost."])
def test_localhost_names_are_refused(name: str) -> None:
    assert refusal(name, 80) == LOCALHOST


@pytest.mark.parametrize("name", ["localhost.example", "notlocalhost", "example.com",
                                  "mylocalhost"])
def test_other_names_are_not_judged(name: str) -> None:
    assert refusal(name, 80) is None


# -- operator lists and own addresses --------------------------------------------------

def test_allow_punches_a_hole_and_deny_widens() -> None:
    p = AddressPolicy(deny=["10.0.0.0/8", "fd00::/8"], allow=["169.254.169.254", "10.1.0.0/16"])
    assert p.check("169.254.169.254") is None
    assert p.check("169.254.169.253") == "link-local"
    assert p.check("10.2.3.4") == "bridge.deny 10.0.0.0/8"
    assert p.check("10.1.3.4") is None
    assert p.check("::ffff:10.2.3.4") == "bridge.deny 10.0.0.0/8"
    assert p.check("fd00::1") == "bridge.deny fd00::/8"
    assert p.check("11.0.0.1") is None


def test_operator_beats_a_default_class_at_equal_length() -> None:
    assert AddressPolicy(allow=["127.0.0.0/8"]).check("127.0.0.1") is None
    assert AddressPolicy(allow=["::1/128"]).check("::1") is None


def test_own_addresses_and_an_allow_of_exactly_them() -> None:
    p = AddressPolicy(allow=["192.0.2.0/24"]).with_own(["192.0.2.7/32", "2001:db8::7"])
    assert p.check("192.0.2.7") == OWN
    assert p.check("192.0.2.8") is None
    assert p.check("2001:db8::7") == OWN
    opened = AddressPolicy(allow=["192.0.2.7"]).with_own(["192.0.2.7/32"])
    assert opened.check("192.0.2.7") is None
    # an own address inside a default class keeps the class's name
    assert AddressPolicy(own=["127.0.0.1", "fe80::1"]).check("127.0.0.1") == "loopback"
    assert AddressPolicy(own=["127.0.0.1", "fe80::1"]).check("fe80::1") == "link-local"
    anyip = AddressPolicy().with_own([ipaddress.ip_network("198.51.100.0/24")])
    assert anyip.check("198.51.100.99") == OWN
    assert anyip.with_own([]).check("198.51.100.99") is None


PREFIXES = st.one_of(
    st.tuples(V4, st.integers(0, 32)).map(
        lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
    st.tuples(V6, st.integers(0, 128)).map(
        lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
)


def _reference(addr, deny, allow, own) -> bool:
    """Refused? By brute force: the longest matching prefix over every list; at equal
    length operator over own over default, deny over allow."""
    a = unwrap(addr)
    best = None
    from vtl.addrclass import DEFAULT_CLASSES

    cands = [(ipaddress.ip_network(p), 0, False) for _, p in DEFAULT_CLASSES]
    cands += [(p, 1, False) for p in own]
    cands += [(p, 2, False) for p in deny] + [(p, 2, True) for p in allow]
    for net, rank, allowed in cands:
        if net.version == a.version and a in net:
            k = (net.prefixlen, rank, not allowed)
            if best is None or k > best[0]:
                best = (k, allowed)
    return best is not None and not best[1]


@given(st.lists(PREFIXES, max_size=6), st.lists(PREFIXES, max_size=6),
       st.lists(PREFIXES, max_size=3), st.lists(st.one_of(V4, V6), min_size=1, max_size=8))
def test_longest_prefix_matches_a_brute_force_reference(deny, allow, own, addrs) -> None:
    allow = [p for p in allow if p not in set(deny)]
    p = AddressPolicy(deny, allow, own)
    probes = list(addrs) + [n.network_address for n in deny + allow + own]
    for a in probes:
        assert (p.check(a) is not None) == _reference(a, deny, allow, own), (a, p)


# -- parsing config prefixes -----------------------------------------------------------

def test_parse_prefix() -> None:
    assert parse_prefix("10.0.0.0/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_prefix("169.254.169.254") == ipaddress.ip_network("169.254.169.254/32")
    assert parse_prefix("fd00::/8") == ipaddress.ip_network("fd00::/8")
    with pytest.raises(ValueError, match="is not an IP prefix"):
        parse_prefix("x")
    with pytest.raises(ValueError, match=r"host bits set \(did you mean 10.0.0.0/8\?\)"):
        parse_prefix("10.0.0.1/8")
    with pytest.raises(ValueError, match="not an IP prefix"):
        parse_prefix(3)  # type: ignore[arg-type]


def test_conflicts() -> None:
    a, b = parse_prefix("10.0.0.0/8"), parse_prefix("10.0.0.0/16")
    assert conflicts([a], [a, b]) == [a]
    assert conflicts([a], [b]) == []
