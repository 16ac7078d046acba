"""TCP segments as a connection model sees them: parsed in, built out.

:class:`FlowAddrs` is the addressing of one direction of a connection (MACs,
IPs, ports, VLAN tags), taken from a packet or given by hand.
:class:`Segment` is the part of a received TCP packet that the state machines
read (sequence, ack, flags, window field, payload, options on demand).
:class:`SegmentWriter` builds frames for one direction with precompiled
structs: only the headers are packed per segment.

Offloads: with ``offload=True`` (the default) checksums are left to the
receiver's kernel (virtio ``NEEDS_CSUM`` with the pseudo-header sum, no pass
over the payload) and a payload larger than ``mss`` becomes one GSO
super-frame; the bridge finishes both in software for a port without
virtio-net headers. With ``offload=False`` every frame is plain and its
checksums complete, and callers must keep payloads within one MSS.

What it does not do: IP options, IPv6 extension headers, fragmentation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtl.errors import LocalProtocolError, PacketError
from vtl.frame import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    Frame,
    VnetHeader,
)
from vtl.packet.checksum import checksum, fold
from vtl.packet.ethernet import ETH_P_IP, ETH_P_IPV6
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, RST, SYN, TcpOptions

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_TCP_IN = struct.Struct("!IIBBH")  # seq, ack, offset, flags, window at TCP offset 4
_IP4_FIXED = 0x4500 + 0x4000  # version/IHL/TOS and DF: the IPv4 words every frame has
_JOIN = bytearray().join  # a frame's parts into one new bytearray, one allocation


@dataclass(frozen=True, slots=True)
class FlowAddrs:
    """Addresses of one direction of a connection: who sends (src) to whom (dst)."""

    src_mac: bytes
    dst_mac: bytes
    src_ip: bytes  # 4 or 16 bytes
    dst_ip: bytes
    sport: int
    dport: int
    tags: bytes = b""  # raw 802.1Q tags, outermost first

    @classmethod
    def of(cls, pkt: Packet) -> FlowAddrs:
        """The addresses of a TCP packet as sent (src is its sender)."""
        ip, tcp = pkt.ip, pkt.tcp
        if ip is None or tcp is None:
            raise PacketError("not a TCP packet")
        src, dst = ip.addrs
        sport, dport = tcp.ports
        d = pkt.data
        return cls(bytes(d[6:12]), bytes(d[0:6]), src, dst, sport, dport,
                   bytes(d[12:12 + 4 * pkt.ntags]))

    def reverse(self) -> FlowAddrs:
        """The other direction (answers go back where they came from)."""
        return FlowAddrs(self.dst_mac, self.src_mac, self.dst_ip, self.src_ip, self.dport,
                         self.sport, self.tags)

    @property
    def v6(self) -> bool:
        return len(self.src_ip) == 16

    @property
    def key(self) -> tuple[bytes, int, bytes, int]:
        """``(src_ip, sport, dst_ip, dport)``: a flow key for tables."""
        return (self.src_ip, self.sport, self.dst_ip, self.dport)


class Segment:
    """The fields of a received TCP segment a state machine reads (a snapshot)."""

    __slots__ = ("seq", "ack", "flags", "window", "payload", "_raw_opts", "_opts", "addrs_pkt")

    def __init__(self, seq: int, ack: int, flags: int, window: int, payload: bytes | memoryview,
                 raw_options: bytes = b"", pkt: Packet | None = None):
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window  # the raw 16-bit field
        self.payload = payload
        self._raw_opts = raw_options
        self._opts: TcpOptions | None = None
        self.addrs_pkt = pkt

    @classmethod
    def parse(cls, pkt: Packet) -> Segment:
        """From a TCP packet (PacketError if it is not one)."""
        t = pkt.tcp
        if t is None:
            raise PacketError("not a TCP packet")
        d = pkt.data
        seq, ack, off, flags, window = _TCP_IN.unpack_from(d, t.off + 4)
        hlen = (off >> 4) * 4
        start = t.off + hlen
        payload = memoryview(d)[start:t.end] if t.end > start else b""
        raw = bytes(d[t.off + 20:start]) if hlen > 20 else b""
        return cls(seq, ack, flags, window, payload, raw, pkt)

    @property
    def raw_options(self) -> bytes:
        """The option bytes as received (empty when the header has none)."""
        return self._raw_opts

    @property
    def options(self) -> TcpOptions:
        if self._opts is None:
            self._opts = TcpOptions.decode(self._raw_opts) if self._raw_opts else TcpOptions()
        return self._opts

    @property
    def seg_len(self) -> int:
        """Sequence space used: payload plus one for SYN and one for FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def __repr__(self) -> str:
        names = "".join(n for b, n in ((SYN, "S"), (FIN, "F"), (RST, "R"), (ACK, "A"))
                        if self.flags & b)
        return f"Segment({names} seq={self.seq} ack={self.ack} win={self.window} " \
               f"len={len(self.payload)})"


class SegmentWriter:
    """Builds TCP frames for one direction of a connection."""

    __slots__ = ("addrs", "offload", "ttl", "_l2", "_v6", "_pseudo", "_ip_id", "_src", "_dst")

    def __init__(self, addrs: FlowAddrs, offload: bool = True, ttl: int = 64):
        self.addrs = addrs
        self.offload = offload
        self.ttl = ttl
        self._v6 = addrs.v6
        if len(addrs.src_ip) != len(addrs.dst_ip) or len(addrs.src_ip) not in (4, 16):
            raise LocalProtocolError("FlowAddrs needs two IPv4 or two IPv6 addresses")
        et = ETH_P_IPV6 if self._v6 else ETH_P_IP
        self._l2 = addrs.dst_mac + addrs.src_mac + addrs.tags + et.to_bytes(2, "big")
        self._src, self._dst = addrs.src_ip, addrs.dst_ip
        base = int.from_bytes(self._src + self._dst, "big") + 6
        self._pseudo = base  # plus the L4 length (v6: 32-bit length, same sum mod 0xFFFF)
        self._ip_id = 0

    def build(self, seq: int, ack: int, flags: int, window: int, options: bytes = b"",
              payload: bytes | bytearray | memoryview = b"", mss: int = 0) -> Frame:
        """One frame; ``window`` is the 16-bit field; ``mss`` > 0 allows GSO above it.

        The frame is joined in one allocation (headers, then the payload copied once)."""
        olen = len(options)
        hlen = 20 + olen
        plen = len(payload)
        l4len = hlen + plen
        pseudo = fold(self._pseudo + l4len)
        addrs = self.addrs
        # with offload the checksum field holds the pseudo-header sum the kernel completes
        tcp = _TCP.pack(addrs.sport, addrs.dport, seq, ack, (hlen // 4) << 4, flags, window,
                        pseudo if self.offload else 0, 0)
        if self._v6:
            iph = _IP6.pack(0x60000000, l4len, 6, self.ttl, self._src, self._dst)
        else:
            self._ip_id = ip_id = (self._ip_id + 1) & 0xFFFF
            total = 20 + l4len
            # the pseudo-header sum already holds the addresses and the protocol; add the
            # header's other words (RFC 1071, as one sum): no pass over the header
            c = ~fold(self._pseudo + _IP4_FIXED + (self.ttl << 8) + total + ip_id) & 0xFFFF
            iph = _IP4.pack(0x45, 0, total, ip_id, 0x4000, self.ttl, 6, c, self._src, self._dst)
        data = _JOIN((self._l2, iph, tcp, options, payload))
        cpos = len(self._l2) + len(iph) + 16
        if self.offload:
            vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=cpos - 16,
                              csum_offset=16)
            if mss and plen > mss:
                vnet.gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if self._v6 else VIRTIO_NET_HDR_GSO_TCPV4
                vnet.gso_size = mss
                vnet.hdr_len = cpos - 16 + hlen
            return Frame(data, vnet)
        c = checksum(data, cpos - 16, None, pseudo)
        data[cpos] = c >> 8
        data[cpos + 1] = c & 0xFF
        return Frame(data, None)
