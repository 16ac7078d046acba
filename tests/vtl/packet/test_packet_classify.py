"""Class queries on scapy-built frames."""

from __future__ import annotations

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from vtl.packet import Packet, classify

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def q(s) -> dict[str, bool]:
    p = Packet(bytearray(bytes(s)))
    return {name: getattr(classify, name)(p) for name in dir(classify) if name.startswith("is_")}


def true_of(s) -> set[str]:
    return {k for k, v in q(s).items() if v}


def test_tcp_classes() -> None:
    assert true_of(E / IP() / TCP(flags="S")) == {"is_ipv4", "is_tcp", "is_tcp_syn"}
    assert true_of(E / IP() / TCP(flags="SA")) == {"is_ipv4", "is_tcp", "is_syn_ack"}
    assert true_of(E / IP() / TCP(flags="RA")) == {"is_ipv4", "is_tcp", "is_rst"}
    assert true_of(E / IPv6() / TCP(flags="FA")) == {"is_ipv6", "is_tcp", "is_fin"}
    assert true_of(E / IP() / TCP(flags="A")) == {"is_ipv4", "is_tcp", "is_pure_ack"}


def test_arp_classes() -> None:
    b = Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
    assert true_of(b / ARP(op=1, psrc="10.0.0.1", pdst="10.0.0.2")) == {
        "is_arp", "is_arp_request", "is_broadcast", "is_multicast"}
    assert true_of(E / Dot1Q(vlan=3) / ARP(op=2, psrc="10.0.0.1", pdst="10.0.0.1")) == {
        "is_arp", "is_arp_reply", "is_gratuitous_arp", "is_vlan"}


def test_icmp_classes() -> None:
    assert true_of(E / IP() / ICMP()) == {"is_ipv4", "is_icmp", "is_icmp_echo_request"}
    assert true_of(E / IP() / ICMP(type=0)) == {"is_ipv4", "is_icmp", "is_icmp_echo_reply"}
    assert "is_icmp_error" in true_of(E / IP() / ICMP(type=3) / IP() / UDP())
    assert true_of(E / IPv6() / ICMPv6EchoRequest()) == {"is_ipv6", "is_icmp6",
                                                        "is_icmp6_echo_request"}
    m = Ether(src="02:00:00:00:00:01", dst="33:33:ff:00:00:02")
    assert true_of(m / IPv6() / ICMPv6ND_NS(tgt="::2")) == {
        "is_ipv6", "is_icmp6", "is_ipv6_neighbor_solicitation", "is_multicast"}
    assert "is_ipv6_neighbor_advertisement" in true_of(E / IPv6() / ICMPv6ND_NA())


def test_dns_classes() -> None:
    query = DNS(rd=1, qd=DNSQR(qname="example.com"))
    assert "is_dns_query" in true_of(E / IP() / UDP(sport=5000, dport=53) / query)
    resp = DNS(qr=1, qd=DNSQR(qname="example.com"))
    got = true_of(E / IP() / UDP(sport=53, dport=5000) / resp)
    assert "is_dns_response" in got and "is_dns_query" not in got
    tcp_query = bytes(query)
    tcp_payload = len(tcp_query).to_bytes(2, "big") + tcp_query
    assert "is_dns_query" in true_of(E / IP() / TCP(dport=53, flags="PA") / tcp_payload)
    assert "is_dns_query" not in true_of(E / IP() / UDP(dport=53))  # no DNS header
    assert "is_dhcp" in true_of(E / IP() / UDP(sport=68, dport=67))
