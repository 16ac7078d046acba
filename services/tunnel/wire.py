"""The tunnel's wire formats and in-place frame edits, kept apart from its logic.

- VXLAN (RFC 7348): an 8-byte header ``flags(8) reserved(24) VNI(24) reserved(8)``;
  the I flag (0x08) says the VNI is valid; other bits are sent as zero and
  ignored on receipt. The outer UDP/IP headers are the host's (the bridge's
  datagram socket).
- In-place edits of an untagged IPv4/IPv6 frame, with incremental checksum
  updates (RFC 1624): the TTL / hop-limit decrement a bypassed router would
  make (the MSS clamp of a TCP SYN is :func:`vtl.packet.tcp.clamp_mss`).
- The IPv6 neighbour solicitation sent through the tunnel to resolve a remote VM's
  MAC (the ARP request is :func:`vtl.packet.build.arp_request`).
"""

from __future__ import annotations

import struct

from vtl.packet import build
from vtl.packet.checksum import csum_replace16

VXLAN_HLEN = 8
VXLAN_I = 0x08
#: the encapsulation's cost in bytes beyond the inner IP packet: inner Ethernet 14,
#: VXLAN 8, UDP 8, outer IPv4 20 (IPv6 40)
OVERHEAD_V4, OVERHEAD_V6 = 50, 70
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
TCP_SYN = 0x02


def vxlan_header(vni: int) -> bytes:
    return struct.pack("!B3xI", VXLAN_I, vni << 8)


def vxlan_vni(data: bytes | bytearray) -> int | None:
    """The VNI of a VXLAN datagram, or None when its I flag is clear."""
    if not data[0] & VXLAN_I:
        return None
    return int.from_bytes(data[4:7], "big")


def decrement_ttl(data: bytearray, version: int) -> bool:
    """Decrement the IPv4 TTL (fixing the header checksum) or the IPv6 hop limit of an
    untagged frame; False (frame unchanged) when it is 1 or 0: the packet expires here."""
    if version == 4:
        ttl = data[22]
        if ttl <= 1:
            return False
        old = (ttl << 8) | data[23]
        data[22] = ttl - 1
        c = csum_replace16(int.from_bytes(data[24:26], "big"), old, old - 0x100)
        data[24:26] = c.to_bytes(2, "big")
        return True
    hl = data[21]
    if hl <= 1:
        return False
    data[21] = hl - 1
    return True


def neighbor_solicitation(src_mac: bytes, src_ip: bytes, target: bytes) -> bytearray:
    """An IPv6 neighbour solicitation for ``target`` to its solicited-node group, from the
    guest's address with its link-layer address option (RFC 4861 7.2.2)."""
    group = b"\xff\x02" + bytes(9) + b"\x01\xff" + target[13:]
    mac = b"\x33\x33" + group[12:]
    body = struct.pack("!BBHI", 135, 0, 0, 0) + target + bytes((1, 1)) + src_mac
    return build.ip_frame(src_mac, mac, src_ip, group, 58, body, 2, ttl=255)


def is_link_local(addr: bytes | bytearray) -> bool:
    """Is the IPv6 address starting with these bytes link-local (fe80::/10)?"""
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def lladdr_option(data: bytearray, kind: int) -> bytes | None:
    """The link-layer address option ``kind`` (1 source, 2 target) of an untagged NS/NA."""
    i, end = 78, len(data)
    while i + 8 <= end:
        t, n = data[i], data[i + 1] * 8
        if n == 0:
            return None
        if t == kind and n >= 8:
            return bytes(data[i + 2:i + 8])
        i += n
    return None
