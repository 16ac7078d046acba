"""Parse scapy-built frames with vtl.packet and compare every field with scapy's."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from vtl.errors import LocalProtocolError, PacketError
from vtl.frame import Frame
from vtl.packet import Packet, ip_str, mac_str, parse
from vtl.packet.tcp import TcpOptions, timestamp_option

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def P(s) -> Packet:  # noqa: N802
    return Packet(bytearray(bytes(s)))


def test_ethernet_ipv4_tcp_fields() -> None:
    s = E / IP(src="10.0.0.1", dst="10.0.0.2", ttl=33, id=4242, tos=0xB8, flags="DF") / TCP(
        sport=1234, dport=80, seq=0xDEADBEEF, ack=7, flags="PA", window=1000, urgptr=3
    ) / Raw(b"hello")
    p = P(s)
    s = E.__class__(bytes(s))
    assert mac_str(p.eth.src) == s.src and mac_str(p.eth.dst) == s.dst and p.eth.type == 0x0800
    ip, t = p.ipv4, p.tcp
    assert p.ip is ip and p.ipv6 is None and p.arp is None and p.udp is None and p.icmp is None
    assert ip_str(ip.src) == s[IP].src and ip_str(ip.dst) == s[IP].dst
    assert (ip.ttl, ip.id, ip.tos, ip.dscp, ip.ecn) == (33, 4242, 0xB8, 0xB8 >> 2, 0)
    assert (ip.df, ip.mf, ip.frag_offset, ip.ihl, ip.version) == (1, 0, 0, 5, 4)
    assert ip.total_length == s[IP].len and ip.checksum == s[IP].chksum and ip.proto == 6
    assert (t.sport, t.dport, t.seq, t.ack, t.window, t.urgent) == (1234, 80, 0xDEADBEEF, 7,
                                                                    1000, 3)
    assert t.flags == int(s[TCP].flags) and t.flag_psh and t.flag_ack and not t.flag_syn
    assert t.checksum == s[TCP].chksum and t.data_offset == 5
    assert bytes(t.payload) == b"hello" and bytes(p.payload) == b"hello"
    assert p.l3_offset == 14 and p.l4_offset == 34
    assert p.verify_checksums()
    assert ip.get("ttl") == 33 and t.get("dport") == 80
    assert ip.addrs == (ip.src, ip.dst) and t.ports == (1234, 80)
    assert ip.as_dict()["src"] == ip.src
    assert "TCP" in repr(p)


def test_padding_is_not_payload() -> None:
    raw = bytearray(bytes(E / IP() / UDP(sport=1, dport=2) / Raw(b"ab")))
    raw += bytes(60 - len(raw))
    p = Packet(raw)
    assert bytes(p.udp.payload) == b"ab" and p.udp.end == len(raw) - (60 - 44)


def test_ip_options() -> None:
    s = E / IP(options=[IPOption_RR(routers=["1.2.3.4"])]) / UDP() / Raw(b"x")
    p = P(s)
    assert p.ipv4.ihl == 7 and p.ipv4.header_len == 28
    assert p.ipv4.options == bytes(s[IP])[20:28]
    opts = p.ipv4.iter_options()
    assert opts[0][0] == 7 and b"\x01\x02\x03\x04" in opts[0][1]
    assert p.udp is not None and p.l4_offset == 14 + 28


def test_vlan_and_qinq() -> None:
    s = E / Dot1AD(vlan=100, prio=5) / Dot1Q(vlan=200, dei=1) / IP() / UDP(dport=53)
    p = P(s)
    tags = p.vlan_tags
    assert [(t.tpid, t.vid, t.pcp, t.dei) for t in tags] == [(0x88A8, 100, 5, 0),
                                                             (0x8100, 200, 0, 1)]
    assert tags[1].inner_type == 0x0800 and p.ethertype == 0x0800 and p.l3_offset == 22
    assert p.udp.dport == 53
    tags[0].vid = 4000
    assert Ether(bytes(p.data))[Dot1AD].vlan == 4000
    with pytest.raises(LocalProtocolError):
        tags[0].vid = 5000


def test_arp() -> None:
    s = E / ARP(op=1, hwsrc="02:00:00:00:00:01", psrc="10.0.0.1", pdst="10.0.0.9")
    a = P(s).arp
    assert (a.op, mac_str(a.sha), ip_str(a.spa), ip_str(a.tpa)) == (1, "02:00:00:00:00:01",
                                                                    "10.0.0.1", "10.0.0.9")
    assert a.htype == 1 and a.ptype == 0x0800 and a.tha == bytes(6)


def test_tcp_options_parse_and_build() -> None:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123, 456)), ("NOP", None),
            ("WScale", 7), ("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))]
    t = P(E / IP() / TCP(flags="S", options=opts)).tcp
    o = t.options
    assert (o.mss, o.wscale, o.sack_permitted, o.timestamps) == (1460, 7, True, (123, 456))
    assert o.sack_blocks == ((10, 20), (30, 40))
    assert t.option_offset(2) == t.off + 20
    enc = o.encode()
    assert len(enc) % 4 == 0 and TcpOptions.decode(enc) == o
    back = TCP(bytes(TCP(dataofs=5 + len(enc) // 4) / Raw(b""))[:20] + enc)
    assert dict((k, v) for k, v in back.options if k != "NOP")["MSS"] == 1460
    with pytest.raises(LocalProtocolError):
        TcpOptions(sack_blocks=((1, 2),) * 5, mss=1).encode()


def test_timestamps_alone_take_the_aligned_fast_path_both_ways() -> None:
    """NOP, NOP, TS (most segments): encoded and decoded as the general code does, and a
    value out of range is still a clear error."""
    o = TcpOptions(timestamps=(0xFFFFFFFF, 7))
    enc = o.encode()
    assert enc == bytes((1, 1, 8, 10)) + bytes.fromhex("ffffffff00000007")
    assert enc == timestamp_option(0xFFFFFFFF, 7)
    assert TcpOptions.decode(enc) == o
    scapy_opts = TCP(bytes(TCP(dataofs=8) / Raw(b""))[:20] + enc).options
    assert dict(scapy_opts)["Timestamp"] == (0xFFFFFFFF, 7)
    # the same 12 bytes in another layout go the general way (TS first, then two NOPs)
    other = bytes((8, 10)) + bytes.fromhex("0000000100000002") + bytes((1, 1))
    assert TcpOptions.decode(other) == TcpOptions(timestamps=(1, 2))
    with pytest.raises(LocalProtocolError):
        TcpOptions(timestamps=(1 << 32, 0)).encode()


def test_ipv6_extension_walk_and_tcp() -> None:
    s = (E / IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=9) / IPv6ExtHdrHopByHop()
         / IPv6ExtHdrRouting(addresses=["2001:db8::3"]) / IPv6ExtHdrDestOpt()
         / IPv6ExtHdrFragment(offset=0, m=0, id=5) / AH(nh=6, payloadlen=4, icv=b"\0" * 12)
         / TCP(sport=5, dport=6) / Raw(b"data"))
    raw = bytes(s)
    p = Packet(bytearray(raw))
    ip = p.ipv6
    assert p.ip is ip and p.ipv4 is None
    assert [e.type for e in ip.ext_headers] == [0, 43, 60, 44, 51]
    assert ip.l4_proto == 6 and ip_str(ip.src) == "2001:db8::1" and ip.hop_limit == 9
    assert ip.ttl == 9 and ip.next_header == 0 and ip.payload_length == len(raw) - 54
    assert p.tcp.sport == 5 and bytes(p.payload) == b"data"
    assert ip.is_fragment and p.l4_offset == len(raw) - 24


def test_ipv6_later_fragment_has_no_l4() -> None:
    p = P(E / IPv6() / IPv6ExtHdrFragment(offset=10, nh=6) / Raw(b"x" * 24))
    assert p.tcp is None and p.l4_offset is None and p.ipv6.is_fragment
    p4 = P(E / IP(frag=3, proto=6) / Raw(b"x" * 24))
    assert p4.tcp is None and p4.l4_offset is None and bytes(p4.payload) == b"x" * 24


def test_icmp_and_icmp6() -> None:
    p = P(E / IP() / SICMP(type=8, id=7, seq=9) / Raw(b"ping"))
    assert (p.icmp.type, p.icmp.code, p.icmp.id, p.icmp.seq) == (8, 0, 7, 9)
    assert bytes(p.icmp.body) == b"ping" and p.verify_checksums()
    p6 = P(E / IPv6(src="fe80::1", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="fe80::2")
           / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:01"))
    i = p6.icmp6
    assert i.type == 135 and ip_str(i.target) == "fe80::2"
    assert i.nd_lladdr() == bytes.fromhex("020000000001") and p6.verify_checksums()
    pe = P(E / IPv6() / ICMPv6EchoRequest(id=1, seq=2))
    assert (pe.icmp6.type, pe.icmp6.id, pe.icmp6.seq) == (128, 1, 2)


def test_frame_input_and_bytes_input() -> None:
    raw = bytes(E / IP() / TCP())
    assert Packet(Frame(raw)).tcp is not None
    assert parse(raw).tcp is not None and parse(memoryview(raw)).ipv4 is not None


def test_absent_and_malformed_layers() -> None:
    p = P(Ether(type=0x88CC) / Raw(b"lldp"))
    assert (p.ip, p.arp, p.tcp, p.udp, p.icmp, p.icmp6, p.payload, p.l4_offset) == (None,) * 8
    with pytest.raises(PacketError):
        Packet(bytearray(10))
    bad = bytearray(bytes(E / IP() / TCP()))
    bad[14] = 0x44  # ihl 4
    with pytest.raises(PacketError):
        Packet(bad).ip  # noqa: B018
    bad = bytearray(bytes(E / IP() / TCP()))[:-4]
    with pytest.raises(PacketError):
        Packet(bad).tcp  # noqa: B018


def test_get_set_by_name_and_bad_values() -> None:
    p = P(E / IP() / UDP())
    p.ipv4.set("ttl", 5)
    assert p.ipv4.ttl == 5
    with pytest.raises(LocalProtocolError):
        p.ipv4.set("nope", 1)
    with pytest.raises(LocalProtocolError):
        p.ipv4.ttl = 256
    with pytest.raises(LocalProtocolError):
        p.udp.sport = -1
    with pytest.raises(LocalProtocolError):
        p.ipv4.src = "not an address"
    p.ipv4.src = "1.2.3.4"
    p.eth.dst = "ff:ff:ff:ff:ff:ff"
    assert p.eth.is_broadcast and p.eth.is_multicast and ip_str(p.ipv4.src) == "1.2.3.4"
