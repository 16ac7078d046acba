"""What the firewall reads of a frame: addresses, ports, TCP fields, ICMP and what it quotes.

:func:`parse` reads an Ethernet frame (its VLAN tags walked by ``walk_tags``) carrying IPv4 or IPv6
with plain byte indexing (it runs for every frame the firewall sees: building
:mod:`vtl.packet` views would cost more than the whole lookup). It returns None
for what is not IP (ARP, other ethertypes: the service decides about those) and
a :class:`Parsed` otherwise, with ``bad`` set (and nothing else trusted) when the
headers are truncated or inconsistent, which conntrack calls invalid.

IPv6 extension headers (hop-by-hop, routing, destination options, fragment) are
walked, at most 8 of them. A non-first fragment has no L4 header: ``frag`` is 2
and its ports are 0; the service looks its flow up by the fragment id.

An ICMP or ICMPv6 error (v4 types 3, 4, 5, 11, 12; v6 types 1 to 4) carries the
header of the packet it is about: ``inner`` is that packet's :class:`Parsed`
(its L4 fields as far as the quote goes: 8 bytes give ports, and TCP's
sequence number).
"""

from __future__ import annotations

from vtl.errors import PacketError
from vtl.packet.ethernet import walk_tags
from vtl.packet.tcp import walk_options

ETH_IP, ETH_IP6 = 0x0800, 0x86DD
V4_ERRORS = frozenset((3, 4, 5, 11, 12))
V6_ERRORS = frozenset((1, 2, 3, 4))
_V6_EXT = frozenset((0, 43, 60))


class Parsed:
    """One IP packet as the firewall sees it (see the module docstring)."""

    __slots__ = ("version", "proto", "src", "dst", "sport", "dport", "l3", "l4", "end",
                 "flags", "seq", "ack", "win", "doff", "itype", "icode", "iid", "frag",
                 "frag_id", "bad", "inner")

    def __init__(self) -> None:
        self.version = 4
        self.proto = 0
        self.src = self.dst = b""
        self.sport = self.dport = 0
        self.l3 = self.l4 = self.end = 0
        self.flags = self.seq = self.ack = self.win = self.doff = 0
        self.itype = self.icode = self.iid = -1
        self.frag = 0  # 0: not a fragment, 1: the first, 2: a later one
        self.frag_id = 0
        self.bad = False
        self.inner: Parsed | None = None

    @property
    def payload(self) -> int:
        """TCP payload bytes (segment length without SYN/FIN)."""
        return self.end - self.l4 - self.doff

    def __repr__(self) -> str:
        return (f"Parsed(v{self.version} proto={self.proto} {self.src.hex()}:{self.sport} -> "
                f"{self.dst.hex()}:{self.dport} flags={self.flags:#x} bad={self.bad})")


def parse(data: bytearray | bytes) -> Parsed | None:
    """The IP packet of an Ethernet frame, or None when the frame is not IP."""
    try:
        _, l3, et = walk_tags(data)
    except PacketError:  # truncated, or more VLAN tags than a frame may carry
        return None
    if et == ETH_IP:
        return _ip4(data, l3, len(data), True)
    if et == ETH_IP6:
        return _ip6(data, l3, len(data), True)
    return None


def _ip4(data: bytearray | bytes, l3: int, limit: int, outer: bool) -> Parsed:
    p = Parsed()
    p.l3 = l3
    if limit < l3 + 20 or data[l3] >> 4 != 4:
        p.bad = True
        return p
    ihl = (data[l3] & 15) << 2
    total = (data[l3 + 2] << 8) | data[l3 + 3]
    if ihl < 20 or total < ihl or (outer and l3 + total > limit):
        p.bad = True
        return p
    p.proto = data[l3 + 9]
    p.src = bytes(data[l3 + 12:l3 + 16])
    p.dst = bytes(data[l3 + 16:l3 + 20])
    frag = ((data[l3 + 6] & 0x1F) << 8) | data[l3 + 7]
    if frag:
        p.frag = 2
    elif data[l3 + 6] & 0x20:
        p.frag = 1
    if p.frag:
        p.frag_id = (data[l3 + 4] << 8) | data[l3 + 5]
    p.l4 = l3 + ihl
    p.end = min(l3 + total, limit)
    if p.frag != 2:
        _l4(p, data, outer)
    return p


def _ip6(data: bytearray | bytes, l3: int, limit: int, outer: bool) -> Parsed:
    p = Parsed()
    p.version = 6
    p.l3 = l3
    if limit < l3 + 40 or data[l3] >> 4 != 6:
        p.bad = True
        return p
    plen = (data[l3 + 4] << 8) | data[l3 + 5]
    if outer and l3 + 40 + plen > limit:
        p.bad = True
        return p
    p.src = bytes(data[l3 + 8:l3 + 24])
    p.dst = bytes(data[l3 + 24:l3 + 40])
    p.end = min(l3 + 40 + plen, limit)
    nh, off = data[l3 + 6], l3 + 40
    for _ in range(8):
        if nh in _V6_EXT:
            if off + 8 > p.end:
                p.bad = True
                return p
            nh, off = data[off], off + ((data[off + 1] + 1) << 3)
        elif nh == 44:
            if off + 8 > p.end:
                p.bad = True
                return p
            fo = ((data[off + 2] << 8) | data[off + 3]) & 0xFFF8
            p.frag = 2 if fo else (1 if data[off + 3] & 1 else 0)
            p.frag_id = int.from_bytes(data[off + 4:off + 8], "big")
            nh, off = data[off], off + 8
        else:
            break
    else:
        p.bad = True
        return p
    p.proto = nh
    p.l4 = off
    if p.frag != 2:
        _l4(p, data, outer)
    return p


def _l4(p: Parsed, data: bytearray | bytes, outer: bool) -> None:
    """Ports and the protocol's own fields (``outer``: a whole packet, not a quote)."""
    l4, end, proto = p.l4, p.end, p.proto
    if proto == 6 or proto == 17 or proto == 132 or proto == 33:
        if outer and end < l4 + (20 if proto == 6 else 8):
            p.bad = True
            return
        if end >= l4 + 4:
            p.sport = (data[l4] << 8) | data[l4 + 1]
            p.dport = (data[l4 + 2] << 8) | data[l4 + 3]
        if proto == 6 and end >= l4 + 8:
            p.seq = int.from_bytes(data[l4 + 4:l4 + 8], "big")
        if proto == 6 and end >= l4 + 20:
            p.ack = int.from_bytes(data[l4 + 8:l4 + 12], "big")
            p.doff = (data[l4 + 12] >> 4) << 2
            p.flags = data[l4 + 13]
            p.win = (data[l4 + 14] << 8) | data[l4 + 15]
            if outer and (p.doff < 20 or l4 + p.doff > end):
                p.bad = True
        return
    if proto == 1 or proto == 58:
        if end < l4 + 8 and (outer or end < l4 + 2):
            p.bad = True
            return
        p.itype, p.icode = data[l4], data[l4 + 1]
        if end >= l4 + 6:
            p.iid = (data[l4 + 4] << 8) | data[l4 + 5]
        if outer and p.itype in (V4_ERRORS if proto == 1 else V6_ERRORS):
            q = l4 + 8
            inner = _ip4(data, q, end, False) if proto == 1 else _ip6(data, q, end, False)
            p.inner = inner


def tcp_options(data: bytearray | bytes, p: Parsed) -> tuple[int, int | None]:
    """(flags seen: 1 window scale, 2 SACK permitted; the scale, at most 14) of the
    TCP header of ``p``."""
    seen, scale = 0, None
    for kind, i, n in walk_options(data, p.l4 + 20, p.l4 + p.doff):
        if kind == 4 and n == 2:
            seen |= 2
        elif kind == 3 and n == 3:
            seen |= 1
            scale = min(data[i + 2], 14)
    return seen, scale


def tcp_sack_edge(data: bytearray | bytes, p: Parsed, ack: int) -> int:
    """The highest right edge of the SACK blocks of a TCP header (``ack`` when none)."""
    best = ack
    for kind, i, n in walk_options(data, p.l4 + 20, p.l4 + p.doff):
        if kind == 5 and n >= 10 and (n - 2) % 8 == 0:
            for b in range(i + 2, i + n, 8):
                edge = int.from_bytes(data[b + 4:b + 8], "big")
                if 0 < ((edge - best) & 0xFFFFFFFF) <= 0x80000000:
                    best = edge
            break
    return best
