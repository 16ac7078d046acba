"""Tests of the fake-ip pool used by the ``socks`` service's DNS (sans-IO, explicit clock)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vtl.services.socks.fakeip import FakeIpPool, PoolExhausted

from vtl.errors import VTLError


def test_defaults_start_after_the_network_address():
    pool = FakeIpPool()
    assert pool.address("example.com", 4, 0.0) == "198.18.0.1"
    assert pool.address("example.org", 4, 0.0) == "198.18.0.2"
    assert pool.address("example.com", 6, 0.0) == "fd98:18::1"
    assert pool.address("example.org", 6, 0.0) == "fd98:18::2"


def test_stable_while_in_use():
    pool = FakeIpPool()
    a = pool.address("a.example", 4, 0.0)
    pool.address("b.example", 4, 1.0)
    assert pool.address("a.example", 4, 500.0) == a
    assert pool.name(a, 1000.0) == "a.example"


@pytest.mark.parametrize("spelling", ["Example.COM", "example.com.", "EXAMPLE.com.", "example.com"])
def test_names_are_normalised(spelling):
    pool = FakeIpPool()
    first = pool.address("example.com", 4, 0.0)
    assert pool.address(spelling, 4, 1.0) == first
    assert pool.name(first, 2.0) == "example.com"


def test_idna_is_left_as_sent():
    pool = FakeIpPool()
    a = pool.address("xn--bcher-kva.example.", 4, 0.0)
    assert pool.name(a, 0.0) == "xn--bcher-kva.example"
    # a non-ASCII spelling is another name: nothing is IDNA-encoded here, and only
    # ASCII letters are lower-cased
    b = pool.address("Bücher.example", 4, 0.0)
    assert b != a
    assert pool.name(b, 0.0) == "bücher.example"


def test_reverse_lookup_packed_and_text():
    pool = FakeIpPool()
    a4 = pool.address("four.example", 4, 0.0)
    a6 = pool.address("six.example", 6, 0.0)
    assert pool.name(ipaddress.ip_address(a4).packed, 1.0) == "four.example"
    assert pool.name(a4, 1.0) == "four.example"
    assert pool.name(ipaddress.ip_address(a6).packed, 1.0) == "six.example"
    assert pool.name("FD98:18:0::1", 1.0) == "six.example"
    assert pool.name("198.18.0.2", 1.0) is None  # inside, not allocated
    assert pool.name("10.0.0.1", 1.0) is None  # outside
    assert pool.name(b"\x01\x02\x03", 1.0) is None
    assert pool.name("not an address", 1.0) is None


def test_contains():
    pool = FakeIpPool()
    assert pool.contains("198.18.0.0")
    assert pool.contains("198.19.255.255")
    assert pool.contains(bytes([198, 19, 1, 2]))
    assert not pool.contains("198.20.0.0")
    assert not pool.contains("198.17.255.255")
    assert pool.contains("fd98:18::ffff")
    assert not pool.contains("fd98:19::1")
    assert pool.contains(ipaddress.ip_address("fd98:18::5").packed)
    assert not pool.contains(b"\x00" * 5)
    assert not pool.contains("")
    assert not pool.contains("garbage")


def test_first_and_last_addresses_are_skipped():
    pool = FakeIpPool("10.9.0.0/29", "fd00::/125", ttl=1)
    got = [pool.address(f"n{i}", 4, 0.0) for i in range(6)]
    assert got == [f"10.9.0.{i}" for i in range(1, 7)]
    got6 = [pool.address(f"n{i}", 6, 0.0) for i in range(6)]
    assert got6 == [f"fd00::{i}" for i in range(1, 7)]
    with pytest.raises(PoolExhausted):
        pool.address("seventh", 4, 0.0)


def test_recycles_least_recently_used_after_hold():
    pool = FakeIpPool("10.9.0.0/30", "fd00::/126", ttl=10)  # two usable addresses each
    a = pool.address("a", 4, 0.0)
    b = pool.address("b", 4, 1.0)
    pool.name(a, 5.0)  # a is now more recently used than b
    with pytest.raises(PoolExhausted) as exc:
        pool.address("c", 4, 20.9)  # b used at 1.0: 19.9 s < 2 * ttl
    assert isinstance(exc.value, VTLError)
    assert "10.9.0.0/30" in str(exc.value)
    c = pool.address("c", 4, 21.0)  # exactly 2 * ttl after b's last use
    assert c == b
    assert pool.name(b, 21.0) == "c"
    assert pool.address("a", 4, 21.0) == a  # a survived
    assert pool.report()["v4"]["recycled"] == 1
    # c (given out at 21.0, before a was touched at 21.0) is now the least recently used
    assert pool.address("b", 4, 41.0) == c
    assert pool.name(a, 41.0) == "a"


def test_exhaustion_leaves_existing_entries_working():
    pool = FakeIpPool("10.9.0.0/30", "fd00::/126", ttl=60)
    a = pool.address("a", 4, 0.0)
    pool.address("b", 4, 0.0)
    for t in (1.0, 50.0, 119.0):
        with pytest.raises(PoolExhausted):
            pool.address("c", 4, t)
    assert pool.address("a", 4, 119.5) == a
    assert pool.name(a, 119.5) == "a"
    # the v6 pool is independent
    assert pool.address("c", 6, 1.0) == "fd00::1"


def test_v6_exhaustion_and_recycling():
    pool = FakeIpPool("10.9.0.0/29", "fd00::/126", ttl=5)
    assert pool.address("x", 6, 0.0) == "fd00::1"
    assert pool.address("y", 6, 0.0) == "fd00::2"
    with pytest.raises(PoolExhausted):
        pool.address("z", 6, 9.0)
    assert pool.address("z", 6, 10.0) == "fd00::1"
    assert pool.name("fd00::1", 10.0) == "z"
    assert pool.name("fd00::2", 10.0) == "y"


def test_name_lookup_keeps_entry_alive():
    pool = FakeIpPool("10.9.0.0/30", "fd00::/126", ttl=10)
    a = pool.address("a", 4, 0.0)
    pool.address("b", 4, 0.0)
    # the VM keeps connecting to a's address: it must not be recycled
    pool.name(a, 30.0)
    assert pool.address("c", 4, 30.0) != a
    assert pool.name(a, 31.0) == "a"


def test_max_entries_bounds_memory():
    pool = FakeIpPool(ttl=0, max_entries=3)
    addrs = [pool.address(f"n{i}.example", 4, float(i)) for i in range(10)]
    assert set(addrs) == {"198.18.0.1", "198.18.0.2", "198.18.0.3"}
    report = pool.report()["v4"]
    assert report["in_use"] == 3 and report["capacity"] == 3
    assert pool.name(addrs[-1], 10.0) == "n9.example"
    assert pool.name(addrs[0], 10.0) != "n0.example"


def test_report():
    pool = FakeIpPool()
    pool.address("a", 4, 0.0)
    pool.address("a", 6, 0.0)
    pool.address("b", 6, 0.0)
    r = pool.report()
    assert r["v4"] == {"network": "198.18.0.0/15", "in_use": 1, "capacity": 131070,
                       "recycled": 0}
    assert r["v6"]["in_use"] == 2
    assert r["v6"]["capacity"] == 1 << 17


@pytest.mark.parametrize(("v4", "v6", "words"), [
    ("198.18.0.0/33", "fd98:18::/64", "IPv4"),
    ("nonsense", "fd98:18::/64", "nonsense"),
    ("198.18.0.1/15", "fd98:18::/64", "host bits"),
    ("fd98:18::/64", "fd98:18::/64", "is an IPv6 network"),
    ("198.18.0.0/15", "198.18.0.0/15", "is an IPv4 network"),
    ("10.0.0.0/31", "fd98:18::/64", "too small"),
    ("10.0.0.0/32", "fd98:18::/64", "too small"),
    ("198.18.0.0/15", "fd98:18::/127", "too small"),
    ("198.18.0.0/15", "fd98:18::/129", "IPv6"),
    ("", "fd98:18::/64", "IPv4"),
])
def test_bad_pools_raise_value_error(v4, v6, words):
    with pytest.raises(ValueError) as exc:
        FakeIpPool(v4, v6)
    assert words in str(exc.value)


@pytest.mark.parametrize("kwargs", [{"ttl": -1}, {"ttl": 1.5}, {"max_entries": 0}])
def test_bad_numbers_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        FakeIpPool(**kwargs)


def test_bad_arguments():
    pool = FakeIpPool()
    with pytest.raises(ValueError):
        pool.address("a", 5, 0.0)
    with pytest.raises(ValueError):
        pool.address(".", 4, 0.0)
    with pytest.raises(ValueError):
        pool.address("", 4, 0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.floats(0, 3)), max_size=60))
def test_mapping_is_consistent(ops):
    """Whatever the order of uses, a name's address maps back to it, no two names
    share an address, and only the usable addresses are handed out."""
    pool = FakeIpPool("10.9.0.0/29", "fd00::/125", ttl=1)
    now = 0.0
    held: dict[str, str] = {}
    for name, dt in ops:
        now += dt
        try:
            addr = pool.address(name, 4, now)
        except PoolExhausted:
            continue
        assert addr not in ("10.9.0.0", "10.9.0.7")
        assert pool.contains(addr)
        held = {n: a for n, a in held.items() if a != addr}
        held[name] = addr
        for n, a in held.items():
            assert pool.name(a, now) == n
        assert len(set(held.values())) == len(held)
