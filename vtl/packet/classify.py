"""Packet class queries: is it TCP, a SYN, an ARP who-has, a DNS query...

Each query takes a :class:`~vtl.packet.packet.Packet` and answers with a
bool, parsing only the layers it needs. An absent layer answers False; a
malformed layer that must be read raises :class:`~vtl.errors.PacketError`
(as every accessor does).
"""

from __future__ import annotations

from vtl.packet.arp import ARP_REPLY, ARP_REQUEST
from vtl.packet.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6
from vtl.packet.icmp import (
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_ADVERT,
    ICMP6_NEIGHBOR_SOLICIT,
    ICMP6_ROUTER_SOLICIT,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
)
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, RST, SYN

DNS_PORT = 53


def is_broadcast(pkt: Packet) -> bool:
    """Destination MAC is ff:ff:ff:ff:ff:ff."""
    return pkt.data[0:6] == b"\xff\xff\xff\xff\xff\xff"


def is_multicast(pkt: Packet) -> bool:
    """Destination MAC is a group address (broadcast included)."""
    return bool(pkt.data[0] & 1)


def is_vlan(pkt: Packet) -> bool:
    return pkt.ntags > 0


def is_arp(pkt: Packet) -> bool:
    return pkt.ethertype == ETH_P_ARP


def is_ipv4(pkt: Packet) -> bool:
    return pkt.ethertype == ETH_P_IP


def is_ipv6(pkt: Packet) -> bool:
    return pkt.ethertype == ETH_P_IPV6


def is_ip_fragment(pkt: Packet) -> bool:
    ip = pkt.ip
    return ip is not None and ip.is_fragment


def is_tcp(pkt: Packet) -> bool:
    return pkt.tcp is not None


def is_udp(pkt: Packet) -> bool:
    return pkt.udp is not None


def is_icmp(pkt: Packet) -> bool:
    return pkt.icmp is not None


def is_icmp6(pkt: Packet) -> bool:
    return pkt.icmp6 is not None


def _tcp_flags(pkt: Packet) -> int:
    t = pkt.tcp
    return -1 if t is None else t.flags


def is_tcp_syn(pkt: Packet) -> bool:
    """A connection request: SYN without ACK (and without RST)."""
    f = _tcp_flags(pkt)
    return f >= 0 and f & (SYN | ACK | RST) == SYN


def is_syn_ack(pkt: Packet) -> bool:
    f = _tcp_flags(pkt)
    return f >= 0 and f & (SYN | ACK | RST) == SYN | ACK


def is_rst(pkt: Packet) -> bool:
    f = _tcp_flags(pkt)
    return f >= 0 and bool(f & RST)


def is_fin(pkt: Packet) -> bool:
    f = _tcp_flags(pkt)
    return f >= 0 and bool(f & FIN)


def is_pure_ack(pkt: Packet) -> bool:
    """ACK only (no SYN/FIN/RST) and no data."""
    t = pkt.tcp
    return t is not None and t.flags & (SYN | FIN | RST | ACK) == ACK and t.payload_len == 0


def is_arp_request(pkt: Packet) -> bool:
    """ARP who-has."""
    a = pkt.arp
    return a is not None and a.op == ARP_REQUEST


def is_arp_reply(pkt: Packet) -> bool:
    a = pkt.arp
    return a is not None and a.op == ARP_REPLY


def is_gratuitous_arp(pkt: Packet) -> bool:
    """ARP whose sender and target protocol addresses are the same."""
    a = pkt.arp
    return a is not None and a.spa == a.tpa


def is_icmp_echo_request(pkt: Packet) -> bool:
    i = pkt.icmp
    return i is not None and i.type == ICMP_ECHO_REQUEST and i.code == 0


def is_icmp_echo_reply(pkt: Packet) -> bool:
    i = pkt.icmp
    return i is not None and i.type == ICMP_ECHO_REPLY


def is_icmp_error(pkt: Packet) -> bool:
    i = pkt.icmp
    if i is not None:
        return i.is_error
    i6 = pkt.icmp6
    return i6 is not None and i6.is_error


def is_icmp6_echo_request(pkt: Packet) -> bool:
    i = pkt.icmp6
    return i is not None and i.type == ICMP6_ECHO_REQUEST


def is_icmp6_echo_reply(pkt: Packet) -> bool:
    i = pkt.icmp6
    return i is not None and i.type == ICMP6_ECHO_REPLY


def is_ipv6_neighbor_solicitation(pkt: Packet) -> bool:
    i = pkt.icmp6
    return i is not None and i.type == ICMP6_NEIGHBOR_SOLICIT


def is_ipv6_neighbor_advertisement(pkt: Packet) -> bool:
    i = pkt.icmp6
    return i is not None and i.type == ICMP6_NEIGHBOR_ADVERT


def is_ipv6_router_solicitation(pkt: Packet) -> bool:
    i = pkt.icmp6
    return i is not None and i.type == ICMP6_ROUTER_SOLICIT


def _dns_flags_byte(pkt: Packet, port_side: str) -> int | None:
    """Byte 2 of the DNS header (QR, opcode, AA, TC, RD) if on port 53, else None."""
    l4 = pkt.udp
    prefix = 0
    if l4 is None:
        l4 = pkt.tcp
        prefix = 2  # DNS over TCP: 2-byte length first
        if l4 is None:
            return None
    if getattr(l4, port_side) != DNS_PORT:
        return None
    pos = l4.payload_offset + prefix + 2
    if pos >= l4.end:
        return None
    return pkt.data[pos]


def is_dns_query(pkt: Packet) -> bool:
    """UDP or TCP to port 53 with the DNS header's QR bit clear."""
    b = _dns_flags_byte(pkt, "dport")
    return b is not None and not b & 0x80


def is_dns_response(pkt: Packet) -> bool:
    """UDP or TCP from port 53 with the QR bit set."""
    b = _dns_flags_byte(pkt, "sport")
    return b is not None and bool(b & 0x80)


def is_dhcp(pkt: Packet) -> bool:
    """UDP between ports 67 and 68 (DHCPv4)."""
    u = pkt.udp
    return u is not None and {u.sport, u.dport} <= {67, 68}
