"""Builders for derivative packets: replies and segments with correct lengths and checksums.

Every builder returns a fresh ``bytearray`` holding one Ethernet frame, with
IPv4 header and L4 checksums complete (wrap it in :class:`vtl.frame.Frame` to
emit it). Builders that answer a packet (ARP reply, echo reply, ICMP errors,
neighbor advertisement, TCP reset) copy its VLAN tags and send it back where
it came from (MACs swapped).

Invariants: builders never modify their input. Asking for a reply that the
input cannot have (an ARP reply to something that is not a who-has, an ICMP
error about an ICMP error or a non-first fragment) raises
:class:`~vtl.errors.PacketError`; bad arguments raise
:class:`~vtl.errors.LocalProtocolError`.

What it does not do: IP fragmentation, IPv4 options or IPv6 extension headers
in what it builds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from vtl.errors import LocalProtocolError, PacketError
from vtl.packet.addr import IPLike, MacLike, ip_bytes, mac_bytes
from vtl.packet.arp import ARP_REPLY, ARP_REQUEST
from vtl.packet.checksum import checksum, pseudo_sum_v4, pseudo_sum_v6
from vtl.packet.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6
from vtl.packet.icmp import (
    ICMP6_ADMIN_PROHIBITED,
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_ADVERT,
    ICMP6_NEIGHBOR_SOLICIT,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROBLEM,
    ICMP_ADMIN_PROHIBITED,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    NA_FLAG_OVERRIDE,
    NA_FLAG_SOLICITED,
    ND_OPT_TARGET_LLADDR,
)
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, RST, SYN, TcpOptions

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHI")
IPV4_MIN_MTU_ICMP = 576  # RFC 1812 4.3.2.3: errors up to 576 bytes
IPV6_MIN_MTU = 1280  # RFC 4443 2.4(c)
ALL_NODES_V6 = bytes.fromhex("ff020000000000000000000000000001")

OptionsLike = TcpOptions | bytes | bytearray | Sequence[tuple[str, Any]] | None


def l2_header(src_mac: MacLike, dst_mac: MacLike, ethertype: int, tags: bytes = b"") -> bytes:
    """Ethernet header (with raw VLAN ``tags`` bytes, outermost first)."""
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + bytes(tags) + ethertype.to_bytes(2, "big")


def ip_frame(src_mac: MacLike, dst_mac: MacLike, src_ip: IPLike, dst_ip: IPLike, proto: int,
             l4: bytes | bytearray, csum_field: int | None, *, ttl: int = 64, ip_id: int = 0,
             tos: int = 0, df: bool = True, tags: bytes = b"") -> bytearray:
    """Ethernet + IPv4/IPv6 (chosen by the address size) + ``l4``.

    ``csum_field`` is the offset of the L4 checksum inside ``l4`` (computed with
    the pseudo-header, except for ICMPv4), or None to leave ``l4`` as it is.
    """
    src, dst = ip_bytes(src_ip), ip_bytes(dst_ip)
    if len(src) != len(dst):
        raise LocalProtocolError("source and destination addresses of different families")
    body = bytearray(l4)
    n = len(body)
    try:
        if len(src) == 4:
            hdr = bytearray(_IP4.pack(0x45, tos, 20 + n, ip_id, 0x4000 if df else 0, ttl, proto,
                                      0, src, dst))
            struct.pack_into("!H", hdr, 10, checksum(hdr))
            pseudo = 0 if proto == 1 else pseudo_sum_v4(src, dst, proto, n)
            et = ETH_P_IP
        else:
            hdr = bytearray(_IP6.pack(0x60000000 | (tos << 20), n, proto, ttl, src, dst))
            pseudo = pseudo_sum_v6(src, dst, proto, n)
            et = ETH_P_IPV6
    except struct.error as e:
        raise LocalProtocolError(f"IP header field out of range: {e}") from e
    if csum_field is not None:
        body[csum_field : csum_field + 2] = b"\0\0"
        c = checksum(body, 0, None, pseudo)
        if proto == 17 and c == 0:
            c = 0xFFFF
        body[csum_field : csum_field + 2] = c.to_bytes(2, "big")
    return bytearray(l2_header(src_mac, dst_mac, et, tags)) + hdr + body


def _options_bytes(options: OptionsLike) -> bytes:
    if options is None:
        return b""
    if isinstance(options, TcpOptions):
        return options.encode()
    if isinstance(options, bytes | bytearray):
        if len(options) % 4 or len(options) > 40:
            raise LocalProtocolError("raw TCP options must be 4-byte aligned and <= 40 bytes")
        return bytes(options)
    opts = TcpOptions()
    for name, value in options:
        if name == "MSS":
            opts.mss = value
        elif name == "WScale":
            opts.wscale = value
        elif name == "SAckOK":
            opts.sack_permitted = True
        elif name == "SAck":
            opts.sack_blocks = tuple(value)
        elif name == "Timestamp":
            opts.timestamps = tuple(value)
        elif name in ("NOP", "EOL"):
            continue
        else:
            raise LocalProtocolError(f"unknown TCP option {name!r}")
    return opts.encode()


def tcp_segment(src_mac: MacLike, dst_mac: MacLike, src_ip: IPLike, dst_ip: IPLike, sport: int,
                dport: int, seq: int, ack: int, flags: int, window: int = 65535,
                options: OptionsLike = None, payload: bytes | bytearray | memoryview = b"", *,
                ttl: int = 64, ip_id: int = 0, urgent: int = 0, tags: bytes = b"") -> bytearray:
    """One TCP segment over IPv4 or IPv6 (by address size), checksums complete.

    ``options`` is a :class:`TcpOptions`, raw aligned bytes, or scapy-style
    ``[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval, tsecr)), ("WScale", 7)]``.
    """
    opt = _options_bytes(options)
    try:
        hdr = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                        (5 + len(opt) // 4) << 4, flags, window, 0, urgent)
    except struct.error as e:
        raise LocalProtocolError(f"TCP field out of range: {e}") from e
    return ip_frame(src_mac, dst_mac, src_ip, dst_ip, 6, hdr + opt + bytes(payload), 16,
                    ttl=ttl, ip_id=ip_id, tags=tags)


def udp_datagram(src_mac: MacLike, dst_mac: MacLike, src_ip: IPLike, dst_ip: IPLike, sport: int,
                 dport: int, payload: bytes | bytearray | memoryview = b"", *, ttl: int = 64,
                 ip_id: int = 0, tags: bytes = b"") -> bytearray:
    """One UDP datagram over IPv4 or IPv6, checksum complete (never 0)."""
    try:
        hdr = _UDP.pack(sport, dport, 8 + len(payload), 0)
    except struct.error as e:
        raise LocalProtocolError(f"UDP field out of range: {e}") from e
    return ip_frame(src_mac, dst_mac, src_ip, dst_ip, 17, hdr + bytes(payload), 6, ttl=ttl,
                    ip_id=ip_id, df=False, tags=tags)


# -- replies ----------------------------------------------------------------------


def _tags(pkt: Packet) -> bytes:
    return bytes(pkt.data[12 : 12 + 4 * pkt.ntags])


def arp_reply(request: Packet, mac: MacLike) -> bytearray:
    """``is-at``: answer a who-has for ``request.arp.tpa`` with ``mac``."""
    a = request.arp
    if a is None or a.op != ARP_REQUEST:
        raise PacketError("not an ARP request")
    mac_b = mac_bytes(mac)
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, ARP_REPLY, mac_b, a.tpa, a.sha, a.spa)
    return bytearray(l2_header(mac_b, a.sha, ETH_P_ARP, _tags(request))) + body


def arp_request(src_mac: MacLike, src_ip: IPLike, target_ip: IPLike) -> bytearray:
    """A broadcast who-has ``target_ip``."""
    m = mac_bytes(src_mac)
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, ARP_REQUEST, m, ip_bytes(src_ip, 4),
                       bytes(6), ip_bytes(target_ip, 4))
    return bytearray(l2_header(m, b"\xff" * 6, ETH_P_ARP)) + body


def icmp_echo_reply(request: Packet) -> bytearray:
    """The echo reply (ICMP or ICMPv6) to an echo request: same id, seq and data."""
    ip = request.ip
    e = request.eth
    i4, i6 = request.icmp, request.icmp6
    if i4 is not None and i4.type == ICMP_ECHO_REQUEST:
        msg, proto, t = i4, 1, ICMP_ECHO_REPLY
    elif i6 is not None and i6.type == ICMP6_ECHO_REQUEST:
        msg, proto, t = i6, 58, ICMP6_ECHO_REPLY
    else:
        raise PacketError("not an ICMP echo request")
    assert ip is not None
    body = bytearray(request.data[msg.off : msg.end])
    body[0] = t
    return ip_frame(e.dst, e.src, ip.dst, ip.src, proto, body, 2, tags=_tags(request))


def icmp_error(offending: Packet, type: int = ICMP_DEST_UNREACH,
               code: int = ICMP_ADMIN_PROHIBITED, *, rest: int = 0,
               src_ip: IPLike | None = None, src_mac: MacLike | None = None,
               rfc1812: bool = True, ttl: int = 64) -> bytearray:
    """An ICMPv4 error about ``offending``, quoting its IP header and data.

    The quote is the IP header + 8 bytes (RFC 792) or, with ``rfc1812``, as
    much as keeps the error within 576 bytes. ``rest`` is the 32-bit field after
    the checksum (e.g. the next-hop MTU for code 4). The source address
    defaults to the offending packet's destination (answering as the host it
    tried to reach), the MACs to its own, swapped.
    """
    ip = offending.ipv4
    if ip is None:
        raise PacketError("ICMP error needs an IPv4 packet to quote")
    _refuse_error_about(offending)
    d = offending.data
    quote_len = IPV4_MIN_MTU_ICMP - 20 - 8 if rfc1812 else ip.header_len + 8
    quote = bytes(d[ip.off : min(ip.end, ip.off + quote_len)])
    try:
        body = _ICMP.pack(type, code, 0, rest) + quote
    except struct.error as e:
        raise LocalProtocolError(f"ICMP field out of range: {e}") from e
    e = offending.eth
    return ip_frame(e.dst if src_mac is None else src_mac, e.src,
                    ip.dst if src_ip is None else src_ip, ip.src, 1, body, 2, ttl=ttl,
                    df=False, tags=_tags(offending))


def icmp6_error(offending: Packet, type: int = ICMP6_DEST_UNREACH,
                code: int = ICMP6_ADMIN_PROHIBITED, *, param: int = 0,
                src_ip: IPLike | None = None, src_mac: MacLike | None = None,
                hop_limit: int = 64) -> bytearray:
    """An ICMPv6 error (RFC 4443) quoting as much of ``offending`` as fits in 1280 bytes.

    ``param`` is the 32-bit field after the checksum (MTU for packet too big,
    pointer for parameter problem).
    """
    ip = offending.ipv6
    if ip is None:
        raise PacketError("ICMPv6 error needs an IPv6 packet to quote")
    _refuse_error_about(offending)
    if ip.dst[0] == 0xFF and type not in (ICMP6_PACKET_TOO_BIG, ICMP6_PARAM_PROBLEM):
        raise PacketError("no ICMPv6 error about a packet sent to a multicast address")
    quote = bytes(offending.data[ip.off : min(ip.end, ip.off + IPV6_MIN_MTU - 48)])
    try:
        body = _ICMP.pack(type, code, 0, param) + quote
    except struct.error as e:
        raise LocalProtocolError(f"ICMPv6 field out of range: {e}") from e
    e = offending.eth
    return ip_frame(e.dst if src_mac is None else src_mac, e.src,
                    ip.dst if src_ip is None else src_ip, ip.src, 58, body, 2, ttl=hop_limit,
                    tags=_tags(offending))


def unreachable(offending: Packet, code: int | None = None, **kw: Any) -> bytearray:
    """Destination unreachable for either family; admin prohibited unless ``code`` says."""
    if offending.ipv6 is not None:
        c = ICMP6_ADMIN_PROHIBITED if code is None else code
        return icmp6_error(offending, ICMP6_DEST_UNREACH, c, **kw)
    return icmp_error(offending, ICMP_DEST_UNREACH,
                      ICMP_ADMIN_PROHIBITED if code is None else code, **kw)


def _refuse_error_about(pkt: Packet) -> None:
    """RFC 1122 3.2.2 / RFC 4443 2.4(e): never an error about an error or a later fragment."""
    ip = pkt.ip
    assert ip is not None
    if ip.l4_offset is None:
        raise PacketError("no ICMP error about a non-first fragment")
    if pkt.data[0] & 1 and ip.version_number == 4:
        raise PacketError("no ICMP error about a link-layer broadcast or multicast")
    if ip.version_number == 4 and (ip.dst[0] >= 224 or ip.dst == b"\xff\xff\xff\xff"):
        raise PacketError("no ICMP error about an IP multicast or broadcast")
    l4 = pkt.icmp or pkt.icmp6
    if l4 is not None and l4.is_error:
        raise PacketError("no ICMP error about an ICMP error")


def neighbor_advertisement(solicitation: Packet, mac: MacLike, *,
                           router: bool = False) -> bytearray:
    """Answer a neighbor solicitation: ``target`` is at ``mac`` (RFC 4861 7.2.4)."""
    ip, ns = solicitation.ipv6, solicitation.icmp6
    if ip is None or ns is None or ns.type != ICMP6_NEIGHBOR_SOLICIT:
        raise PacketError("not a neighbor solicitation")
    target = ns.target
    mac_b = mac_bytes(mac)
    dad = ip.src == bytes(16)
    flags = NA_FLAG_OVERRIDE | (0 if dad else NA_FLAG_SOLICITED) | (0x80000000 if router else 0)
    body = _ICMP.pack(ICMP6_NEIGHBOR_ADVERT, 0, 0, flags) + target + \
        bytes((ND_OPT_TARGET_LLADDR, 1)) + mac_b
    dst = ALL_NODES_V6 if dad else ip.src
    dst_mac = b"\x33\x33\x00\x00\x00\x01" if dad else solicitation.eth.src
    return ip_frame(mac_b, dst_mac, target, dst, 58, body, 2, ttl=255, tags=_tags(solicitation))


def tcp_reset(pkt: Packet) -> bytearray:
    """The RST a closed port would send in answer to ``pkt`` (RFC 9293 3.10.7.1)."""
    t, ip = pkt.tcp, pkt.ip
    if t is None or ip is None:
        raise PacketError("not a TCP segment")
    if t.flags & RST:
        raise PacketError("no reset in answer to a reset")
    e = pkt.eth
    if t.flags & ACK:
        seq, ack, flags = t.ack, 0, RST
    else:
        seg_len = t.payload_len + (1 if t.flags & SYN else 0) + (t.flags & 1)
        seq, ack, flags = 0, (t.seq + seg_len) & 0xFFFFFFFF, RST | ACK
    return tcp_segment(e.dst, e.src, ip.dst, ip.src, t.dport, t.sport, seq, ack, flags, 0,
                       tags=_tags(pkt))
