"""Builders and address swapping, checked with scapy as the oracle."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_RR, TCPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from vtl.errors import LocalProtocolError, PacketError
from vtl.packet import (
    Packet,
    arp_reply,
    from_scapy,
    icmp6_error,
    icmp_echo_reply,
    icmp_error,
    neighbor_advertisement,
    tcp_reset,
    tcp_segment,
    to_scapy,
    udp_datagram,
    unreachable,
)
from vtl.packet.tcp import ACK, PSH, RST, SYN, TcpOptions

M1, M2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
E = Ether(src=M1, dst=M2)


def checksums_ok(raw: bytes | bytearray) -> None:
    """Scapy recomputes every checksum and length: the bytes must not change."""
    s = Ether(bytes(raw))
    for layer in (IP, TCP, UDP, ICMP, ICMPv6EchoReply, ICMPv6DestUnreach, ICMPv6ND_NA):
        if layer in s:
            for f in ("chksum", "cksum", "len", "plen"):
                if f in s[layer].fields and layer not in (IPerror,):
                    delattr(s[layer], f)
    assert bytes(s) == bytes(raw)
    assert Packet(bytearray(raw)).verify_checksums()


@pytest.mark.parametrize("src,dst", [("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")])
def test_tcp_segment(src: str, dst: str) -> None:
    raw = tcp_segment(M1, M2, src, dst, 1234, 80, 1000, 2000, SYN | ACK, 29200,
                      [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (5, 6)), ("WScale", 7)],
                      b"payload")
    checksums_ok(raw)
    s = to_scapy(raw)
    t = s[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, t.window) == (1234, 80, 1000, 2000, 29200)
    assert t.flags == "SA" and bytes(t.payload) == b"payload"
    opts = dict(t.options)
    assert opts["MSS"] == 1460 and opts["WScale"] == 7 and opts["Timestamp"] == (5, 6)
    assert "SAckOK" in opts
    raw2 = tcp_segment(M1, M2, src, dst, 1, 2, 3, 4, ACK, options=TcpOptions(sack_blocks=((1, 2),)))
    assert dict(to_scapy(raw2)[TCP].options)["SAck"] == (1, 2)


def test_tcp_segment_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        tcp_segment(M1, M2, "10.0.0.1", "::1", 1, 2, 3, 4, 0)
    with pytest.raises(LocalProtocolError):
        tcp_segment(M1, M2, "10.0.0.1", "10.0.0.2", 70000, 2, 3, 4, 0)
    with pytest.raises(LocalProtocolError):
        tcp_segment(M1, M2, "10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 0, options=[("Bogus", 1)])


@pytest.mark.parametrize("src,dst", [("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")])
def test_udp_datagram(src: str, dst: str) -> None:
    raw = udp_datagram(M1, M2, src, dst, 5353, 53, b"\x12\x34\x01\x00")
    checksums_ok(raw)
    u = to_scapy(raw)[UDP]
    assert (u.sport, u.dport, u.len, bytes(u.payload)) == (5353, 53, 12, b"\x12\x34\x01\x00")


def test_arp_reply() -> None:
    req = Packet(from_scapy(Ether(src=M1, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=7)
                            / ARP(op=1, hwsrc=M1, psrc="10.0.0.1", pdst="10.0.0.254")))
    rep = to_scapy(arp_reply(req, "02:aa:bb:cc:dd:ee"))
    a = rep[ARP]
    assert rep[Dot1Q].vlan == 7 and rep.dst == M1 and rep.src == "02:aa:bb:cc:dd:ee"
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, "02:aa:bb:cc:dd:ee", "10.0.0.254",
                                                        M1, "10.0.0.1")
    with pytest.raises(PacketError):
        arp_reply(Packet(arp_reply(req, M2)), M2)
    with pytest.raises(PacketError):
        arp_reply(Packet(from_scapy(E / IP())), M2)


def test_icmp_echo_reply_v4_v6() -> None:
    req = Packet(from_scapy(E / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=3, seq=4)
                            / Raw(b"abc")))
    raw = icmp_echo_reply(req)
    checksums_ok(raw)
    s = to_scapy(raw)
    assert s[IP].src == "10.0.0.2" and s[ICMP].type == 0 and s[ICMP].id == 3
    assert bytes(s[ICMP].payload) == b"abc"
    req6 = Packet(from_scapy(E / IPv6(src="::1", dst="::2") / ICMPv6EchoRequest(id=3, data=b"z")))
    s6 = to_scapy(icmp_echo_reply(req6))
    assert s6[IPv6].dst == "::1" and s6[ICMPv6EchoReply].id == 3
    checksums_ok(bytes(s6))
    with pytest.raises(PacketError):
        icmp_echo_reply(Packet(from_scapy(E / IP() / UDP())))


def test_icmp_error_quotes_per_rfc792_and_rfc1812() -> None:
    off = Packet(from_scapy(E / IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption_RR()])
                            / TCP(sport=1, dport=22) / Raw(b"x" * 1000)))
    short = to_scapy(icmp_error(off, 3, 13, rfc1812=False))
    quoted = bytes(short[ICMP].payload)
    assert len(quoted) == off.ipv4.header_len + 8
    assert short[ICMP].type == 3 and short[ICMP].code == 13 and short[IP].src == "10.0.0.2"
    long_raw = icmp_error(off, 3, 13)
    s = to_scapy(long_raw)
    assert len(long_raw) - 14 == 576 and s[IPerror].src == "10.0.0.1"
    assert s[TCPerror].dport == 22
    assert Packet(long_raw).verify_checksums()
    err = Packet(long_raw)
    with pytest.raises(PacketError):
        icmp_error(err)  # no error about an error
    frag = Packet(from_scapy(E / IP(frag=5) / Raw(b"x" * 16)))
    with pytest.raises(PacketError):
        icmp_error(frag)
    with pytest.raises(PacketError):
        icmp6_error(off)


def test_icmp6_error_fits_1280() -> None:
    off = Packet(from_scapy(E / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(dport=9)
                            / Raw(b"x" * 3000)))
    raw = unreachable(off, 4)
    assert len(raw) - 14 == 1280
    s = to_scapy(raw)
    assert s[ICMPv6DestUnreach].code == 4 and s[IPv6].dst == "2001:db8::1"
    assert Packet(raw).verify_checksums()
    small = Packet(from_scapy(E / IPv6() / UDP() / Raw(b"x")))
    assert len(icmp6_error(small)) == 14 + 40 + 8 + 40 + 9
    assert to_scapy(unreachable(Packet(from_scapy(E / IP() / UDP()))))[ICMP].code == 13


def test_neighbor_advertisement() -> None:
    ns = Packet(from_scapy(Ether(src=M1, dst="33:33:ff:00:00:02")
                           / IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255)
                           / ICMPv6ND_NS(tgt="fe80::2") / ICMPv6NDOptSrcLLAddr(lladdr=M1)))
    raw = neighbor_advertisement(ns, M2)
    s = to_scapy(raw)
    na = s[ICMPv6ND_NA]
    assert na.tgt == "fe80::2" and na.S == 1 and na.O == 1 and na.R == 0
    assert s[ICMPv6NDOptDstLLAddr].lladdr == M2 and s[IPv6].dst == "fe80::1"
    assert s[IPv6].src == "fe80::2" and s[IPv6].hlim == 255 and s.dst == M1
    assert Packet(raw).verify_checksums()
    orig = Ether(bytes(s))
    del orig[ICMPv6ND_NA].cksum
    assert bytes(orig) == bytes(raw)


def test_tcp_reset() -> None:
    syn = Packet(tcp_segment(M1, M2, "10.0.0.1", "10.0.0.2", 1111, 80, 100, 0, SYN))
    r = to_scapy(tcp_reset(syn))[TCP]
    assert r.flags == "RA" and r.ack == 101 and r.seq == 0 and r.dport == 1111
    data = Packet(tcp_segment(M1, M2, "10.0.0.1", "10.0.0.2", 1111, 80, 100, 555, ACK | PSH,
                              payload=b"abc"))
    r = to_scapy(tcp_reset(data))[TCP]
    assert r.flags == "R" and r.seq == 555
    with pytest.raises(PacketError):
        tcp_reset(Packet(tcp_segment(M1, M2, "10.0.0.1", "10.0.0.2", 1, 2, 3, 4, RST)))


@pytest.mark.parametrize("ip", [IP(src="10.0.0.1", dst="10.0.0.2"), IPv6(src="::1", dst="::2")])
@pytest.mark.parametrize("l4", [TCP(sport=1, dport=2), UDP(sport=1, dport=2)])
def test_swap_is_checksum_neutral(ip, l4) -> None:
    raw = from_scapy(E / Dot1Q(vlan=3) / ip / l4 / Raw(b"data!"))
    p = Packet(raw)
    p.swap()
    s = to_scapy(raw)
    assert s.src == M2 and s.dst == M1 and s[l4.__class__].sport == 2
    assert s[ip.__class__].src == ip.dst
    checksums_ok(raw)
