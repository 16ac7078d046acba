"""Property tests: random and mutated frames through every parser, accessor, query,
builder and offload helper raise nothing but PacketError."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from vtl.errors import PacketError
from vtl.frame import Frame, VnetHeader
from vtl.packet import build, classify, complete_offloads, pop_vlan, prepare_offloads, push_vlan
from vtl.packet.packet import Packet

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
SEEDS = [bytes(s) for s in (
    E / IP(options=[IPOption_RR()]) / TCP(flags="S", options=[("MSS", 1460), ("SAckOK", b""),
                                                             ("Timestamp", (1, 2)),
                                                             ("WScale", 7)]) / Raw(b"x" * 20),
    E / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IP() / UDP(dport=53) / Raw(b"\x12\x34\x01\x00" + b"q" * 8),
    E / IP() / TCP(dport=53) / Raw(b"\x00\x10\x12\x34\x01\x00"),
    E / IP() / ICMP() / Raw(b"ping"),
    E / IP() / ICMP(type=3) / IP() / UDP(),
    E / ARP(),
    E / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrFragment() / TCP(),
    E / IPv6(src="fe80::1") / ICMPv6ND_NS(tgt="fe80::2") / ICMPv6NDOptSrcLLAddr(),
    E / IPv6() / ICMPv6EchoRequest(data=b"abc"),
    E / IPv6(src="::") / ICMPv6ND_NS(tgt="fe80::2"),
)]
QUERIES = [f for name, f in inspect.getmembers(classify, inspect.isfunction)
           if name.startswith("is_")]


def attempt(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except PacketError:
        return None


def exercise(raw: bytes, vnet: VnetHeader | None = None) -> None:
    try:
        p = Packet(Frame(bytearray(raw), vnet))
    except PacketError:
        return
    repr(p)
    attempt(lambda: p.payload)
    attempt(lambda: p.l4_offset)
    attempt(lambda: p.l4_proto)
    for name in ("eth", "vlan_tags", "arp", "ip", "ipv4", "ipv6", "l4", "tcp", "udp", "icmp",
                 "icmp6"):
        v = attempt(getattr, p, name)
        for view in v if isinstance(v, list) else [v]:
            if view is not None:
                view.as_dict()
                repr(view)
    ip = attempt(lambda: p.ip)
    if ip is not None:
        attempt(ip.pseudo_sum)
        attempt(lambda: ip.is_fragment)
        attempt(lambda: ip.payload_len)
        if ip.version_number == 4:
            attempt(ip.iter_options)
        else:
            attempt(lambda: ip.ext_headers)
    l4 = attempt(lambda: p.l4)
    if l4 is not None:
        attempt(l4.verify_checksum)
        if p.tcp is not None:
            attempt(lambda: p.tcp.options)
            attempt(p.tcp.option_offset, 8)
        if p.icmp6 is not None:
            attempt(lambda: p.icmp6.target)
            attempt(p.icmp6.nd_lladdr)
    for q in QUERIES:
        attempt(q, p)
    for b in (lambda: build.arp_reply(p, "02:00:00:00:00:09"), lambda: build.icmp_echo_reply(p),
              lambda: build.icmp_error(p), lambda: build.icmp6_error(p),
              lambda: build.unreachable(p), lambda: build.tcp_reset(p),
              lambda: build.neighbor_advertisement(p, "02:00:00:00:00:09")):
        out = attempt(b)
        if out is not None:
            assert Packet(out).verify_checksums()
    attempt(p.verify_checksums)
    attempt(p.swap)
    attempt(p.fix_checksums)
    if ip is not None and attempt(lambda: p.l4) is not None:
        attempt(ip.set_src, ip.src)
        if hasattr(l4, "set_sport"):
            attempt(l4.set_sport, 7)
    f = Frame(bytearray(raw), vnet)
    attempt(complete_offloads, f)
    attempt(prepare_offloads, Frame(bytearray(raw)), 100)
    f = Frame(bytearray(raw), vnet)
    attempt(push_vlan, f, 5)
    attempt(pop_vlan, f)
    attempt(pop_vlan, f)


vnets = st.one_of(st.none(), st.builds(
    VnetHeader, st.integers(0, 3), st.sampled_from([0, 1, 3, 4, 5, 0x81, 7]),
    st.integers(0, 200), st.integers(0, 2000), st.integers(0, 200), st.integers(0, 40)))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), vnets)
def test_random_bytes(raw: bytes, vnet: VnetHeader | None) -> None:
    exercise(raw, vnet)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 7)),
                                        max_size=4),
       st.integers(0, 400), vnets)
def test_mutated_frames(seed: bytes, flips: list[tuple[int, int]], cut: int,
                        vnet: VnetHeader | None) -> None:
    raw = bytearray(seed)
    for pos, bit in flips:
        raw[pos % len(raw)] ^= 1 << bit
    exercise(bytes(raw[: max(0, len(raw) - cut % (len(raw) + 1))] if cut % 3 == 0 else raw), vnet)


@given(st.sampled_from(SEEDS), st.integers(0, 100))
def test_truncation_everywhere(seed: bytes, n: int) -> None:
    exercise(seed[: n % (len(seed) + 1)])
