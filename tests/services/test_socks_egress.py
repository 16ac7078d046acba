"""socks refuses what the bridge's egress policy refuses by default, before asking the proxy:
loopback, link-local, unspecified, multicast, broadcast/class E (IPv4 and IPv6, embedded
IPv4 forms too), port 0, and ``localhost`` names that a fake address stands for."""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.message
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP, Ether
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from vtl.services.socks import Socks, SocksOptions

from vtl import CONSUMED, Direction, Frame
from vtl.testing import FakeContext

G_MAC, GW = "02:00:00:00:00:01", "02:00:5e:00:00:01"
G_IP, G_IP6 = "10.0.0.1", "fd00::1"
UP = Direction.TO_UPLINK


def make(**options: Any) -> tuple[Socks, FakeContext]:
    ctx = FakeContext("socks")
    return Socks(SocksOptions(proxy="socks5://127.0.0.1:1080", gateway_mac=GW, **options),
                 ctx), ctx


def syn(dst: str, dport: int = 80) -> Frame:
    ip = IPv6(src=G_IP6, dst=dst) if ":" in dst else IP(src=G_IP, dst=dst)
    return Frame(bytes(Ether(src=G_MAC, dst=GW) / ip / TCP(sport=40000, dport=dport,
                                                             flags="S", seq=1000)))


def emitted(ctx: FakeContext) -> list[Ether]:
    frames = [Ether(bytes(f.data)) for f, _ in ctx.emitted]
    ctx.emitted.clear()
    return frames


def refused_with_admin_prohibited(dst: str, dport: int = 80) -> None:
    s, ctx = make()
    assert s.process(syn(dst, dport), UP, 0.0) is CONSUMED
    assert ctx.streams == [], "the proxy must not be asked"
    [reply] = emitted(ctx)
    if ":" in dst:
        assert reply.haslayer(ICMPv6DestUnreach) and reply[ICMPv6DestUnreach].code == 1
    else:
        assert (reply[ICMP].type, reply[ICMP].code) == (3, 13)
    assert ctx.extra("refused_destination") == 1


def test_loopback_link_local_and_metadata_are_refused() -> None:
    for dst in ("127.0.0.1", "127.9.9.9", "::1", "169.254.169.254", "fe80::1",
                "::ffff:127.0.0.1", "0.0.0.0", "::"):
        refused_with_admin_prohibited(dst)


def test_port_zero_is_refused_not_raised() -> None:
    refused_with_admin_prohibited("10.199.0.2", 0)
    refused_with_admin_prohibited("fd00::2", 0)


def test_multicast_broadcast_and_class_e_are_refused_silently() -> None:
    for dst in ("224.0.0.1", "239.1.2.3", "255.255.255.255", "240.0.0.1", "ff02::1"):
        s, ctx = make()
        assert s.process(syn(dst), UP, 0.0) is CONSUMED
        assert ctx.streams == [] and emitted(ctx) == [], dst
        assert ctx.extra("refused_destination") == 1


def test_an_ordinary_destination_still_goes_to_the_proxy() -> None:
    s, ctx = make()
    s.process(syn("192.0.2.80"), UP, 0.0)
    [stream] = ctx.streams
    assert (stream.request.host, stream.request.port) == ("192.0.2.80", 80)
    assert ctx.extra("refused_destination") == 0


def fake_address(s: Socks, ctx: FakeContext, name: str) -> str:
    q = Ether(src=G_MAC, dst=GW) / IP(src=G_IP, dst="10.0.0.53") / UDP(sport=5353, dport=53) \
        / DNS(id=1, rd=1, qd=DNSQR(qname=name, qtype="A"))
    s.process(Frame(bytes(q)), UP, 0.0)
    [reply] = emitted(ctx)
    msg = dns.message.from_wire(bytes(reply[UDP].payload))
    return msg.answer[0][0].address


def test_a_fake_address_for_a_localhost_name_is_refused() -> None:
    for name in ("localhost", "db.localhost", "Admin.LocalHost."):
        s, ctx = make(dns="fake-ip")
        addr = fake_address(s, ctx, name)
        s.process(syn(addr), UP, 0.1)
        assert ctx.streams == [], name
        [reply] = emitted(ctx)
        assert (reply[ICMP].type, reply[ICMP].code) == (3, 13)
        assert ctx.extra("refused_destination") == 1
    s, ctx = make(dns="fake-ip")
    s.process(syn(fake_address(s, ctx, "localhost.example.org")), UP, 0.1)
    assert ctx.streams[0].request.host == "localhost.example.org"


LOOPBACK4 = st.integers(0, 2**24 - 1).map(lambda i: str(ipaddress.IPv4Address(0x7F000000 + i)))
LINK_LOCAL4 = st.integers(0, 2**16 - 1).map(
    lambda i: str(ipaddress.IPv4Address(0xA9FE0000 + i)))
LINK_LOCAL6 = st.integers(0, 2**118 - 1).map(
    lambda i: str(ipaddress.IPv6Address((0xFE80 << 112) + i)))


@settings(max_examples=60, deadline=None)
@given(st.one_of(LOOPBACK4, LINK_LOCAL4, LINK_LOCAL6),
       st.integers(0, 65535).filter(lambda p: p != 53))  # 53: answered locally (below)
def test_no_loopback_or_link_local_destination_reaches_the_proxy(dst: str, port: int) -> None:
    s, ctx = make()
    s.process(syn(dst, port), UP, 0.0)
    assert ctx.streams == []
    assert ctx.extra("refused_destination") == 1


def test_dns_over_tcp_to_a_loopback_resolver_is_still_answered_locally() -> None:
    s, ctx = make()
    s.process(syn("127.0.0.53", 53), UP, 0.0)
    [synack] = emitted(ctx)
    assert synack[TCP].flags == "SA"  # VTL's own DNS answers; nothing reaches the host
    assert ctx.streams == [] and ctx.extra("refused_destination") == 0
