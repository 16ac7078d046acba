"""vtl.flow: flow keys read off packets, and bounded flow tables (limits, aging, eviction)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, Ether
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP

from vtl import FlowKey, FlowTable, LocalProtocolError, Packet


def key_of(p) -> FlowKey | None:
    return FlowKey.of(Packet(bytearray(bytes(p))))


def test_key_of_tcp_udp_and_str() -> None:
    k = key_of(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80))
    assert k == FlowKey.tcp("10.0.0.1", 40000, "10.0.0.2", 80)
    assert str(k) == "tcp 10.0.0.1:40000 -> 10.0.0.2:80"
    u = key_of(Ether() / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5353, dport=53))
    assert u is not None and (u.version, u.proto, u.sport, u.dport) == (6, 17, 5353, 53)
    assert str(u) == "udp [fd00::1]:5353 -> [fd00::2]:53"
    assert u.src_ip == "fd00::1" and u.dst_ip == "fd00::2"


def test_key_of_non_ip_is_none_and_other_protocols_have_no_ports() -> None:
    assert FlowKey.of(Packet(bytearray(bytes(Ether() / ARP())))) is None
    k = key_of(Ether() / IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / (b"x" * 8))
    assert k is not None and (k.proto, k.sport, k.dport) == (47, 0, 0)
    assert str(k) == "47 10.0.0.1 -> 10.0.0.2"


def test_echo_and_its_reply_have_reversed_keys() -> None:
    req = key_of(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=77))
    rep = key_of(Ether() / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0, id=77))
    assert req is not None and rep == req.reversed() and req.sport == 77
    req6 = key_of(Ether() / IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=9))
    rep6 = key_of(Ether() / IPv6(src="fd00::2", dst="fd00::1") / ICMPv6EchoReply(id=9))
    assert req6 is not None and rep6 == req6.reversed()


def test_tcp_key_refuses_mixed_families() -> None:
    with pytest.raises(LocalProtocolError):
        FlowKey.tcp("10.0.0.1", 1, "fd00::1", 2)


addrs = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 65535)


@given(addrs, ports, addrs, ports, st.sampled_from([6, 17, 1]))
def test_reversed_and_canonical(src: bytes, sp: int, dst: bytes, dp: int, proto: int) -> None:
    k = FlowKey(4, proto, src, sp, dst, dp)
    assert k.reversed().reversed() == k
    assert k.canonical() == k.reversed().canonical()
    assert hash(k.canonical()) == hash(k.reversed().canonical())


def test_table_is_bounded_and_lru_evicts_the_least_recently_touched() -> None:
    gone: list[tuple] = []
    t: FlowTable[str, int] = FlowTable(3, on_evict=lambda k, v, why: gone.append((k, v, why)))
    for i, k in enumerate("abc"):
        assert t.put(k, i, float(i))
    t.touch("a", 5.0)  # b is now the oldest
    assert t.put("d", 3, 6.0)
    assert len(t) == 3 and "b" not in t and gone == [("b", 1, "evicted")]
    assert t.stats() == {"entries": 3, "inserted": 4, "expired": 0, "evicted": 1, "refused": 0}


def test_refuse_policy_keeps_what_it_has() -> None:
    t: FlowTable[str, int] = FlowTable(2, evict="refuse", timeout=10.0)
    assert t.put("a", 1, 0.0) and t.put("b", 2, 0.0)
    assert not t.put("c", 3, 1.0)
    assert "c" not in t and t.counters.refused == 1
    assert t.put("a", 9, 2.0)  # replacing is not inserting
    assert t.get("a") == 9
    assert t.put("c", 3, 10.5)  # b expired (idle since 0.0): room made
    assert t.counters.expired == 1 and "b" not in t


def test_aging_per_entry_timeouts_and_poll_at() -> None:
    expired: list[str] = []
    t: FlowTable[str, int] = FlowTable(10, timeout=5.0,
                                       on_evict=lambda k, v, why: expired.append(k))
    t.put("short", 1, 0.0, timeout=1.0)
    t.put("default", 2, 0.0)
    t.put("forever", 3, 0.0, timeout=None)
    assert t.poll_at() == 1.0
    assert t.get("short", 0.5) == 1 and t.get("short", 1.0) is None  # due: gone on read
    assert expired == ["short"]
    t.touch("default", 3.0)
    assert t.deadline("default") == 8.0 and t.poll_at() == 8.0
    assert t.expire(7.9) == 0 and t.expire(8.0) == 1
    assert t.poll_at() is None and list(t) == ["forever"] and t.expires_at("forever") > 1e300


def test_rank_orders_eviction() -> None:
    t: FlowTable[str, int] = FlowTable(2)
    t.put("assured", 1, 0.0, rank=1)
    t.put("new", 2, 5.0, rank=0)
    t.put("newer", 3, 6.0, rank=0)  # the lowest rank goes first, though touched later
    assert set(t) == {"assured", "newer"}


def test_bad_arguments_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        FlowTable(0)
    with pytest.raises(LocalProtocolError):
        FlowTable(1, evict="random")  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.sampled_from(["put", "touch", "pop", "expire"]),
                          st.integers(0, 40), st.sampled_from([None, 1.0, 3.0]),
                          st.integers(0, 2)), max_size=200),
       st.integers(1, 8), st.sampled_from(["lru", "refuse"]))
def test_table_never_exceeds_its_bound_and_agrees_with_a_model(ops, cap, policy) -> None:
    """Against a plain-dict model: same keys, never more than cap, deadlines honoured."""
    t: FlowTable[int, int] = FlowTable(cap, timeout=2.0, evict=policy)
    model: dict[int, float] = {}  # key -> deadline
    now = 0.0
    for op, key, timeout, step in ops:
        now += step * 0.5
        for k in [k for k, d in model.items() if d <= now]:  # what is due may be gone
            if k not in t:
                del model[k]
        if op == "put":
            ok = t.put(key, key, now, timeout=timeout)
            if ok:
                model[key] = now + timeout if timeout is not None else float("inf")
            else:
                assert policy == "refuse" and key not in model and len(t) == cap
        elif op == "touch":
            if t.touch(key, now):
                to = t._where[key].timeout
                model[key] = now + to if to is not None else float("inf")
        elif op == "pop":
            t.pop(key)
            model.pop(key, None)
        else:
            t.expire(now)
            for k in [k for k, d in model.items() if d <= now]:
                del model[k]
        model = {k: d for k, d in model.items() if k in t}  # evictions
        assert len(t) <= cap
        assert set(t) == set(model)
        for k, d in model.items():
            assert t.get(k, now) is None if d <= now else t.get(k, now) == k
            if d <= now:
                del model[k]
                break
