"""IPv4 header view (RFC 791), options included.

Models the header at ``buf[off:off+ihl*4]`` and knows where its datagram ends
(``off + total_length``; Ethernet padding after it is ignored). The
constructor checks version 4, ``ihl >= 5``, ``total_length >= ihl*4`` and that
the whole datagram is in the buffer; then fields are properties.

Invariants:
- ``header_len``, ``end``, ``l4_offset`` and ``l4_proto`` are read once, at
  construction: after changing ``ihl``, ``total_length``, the fragment
  offset or ``proto`` (or resizing the buffer), parse again.
- ``l4_offset`` is None for non-first fragments (no L4 header there).
- :meth:`set_src`/:meth:`set_dst` keep the header checksum right (RFC 1624)
  and, with ``update_l4``, the TCP/UDP checksum too, treating it as a partial
  pseudo-header sum when the frame's virtio header says ``NEEDS_CSUM``.
- Swapping addresses is checksum-neutral (the sums are commutative).

What it does not do: reassembly; source routing semantics; the L4 checksum of
a fragmented datagram cannot be recomputed from one fragment.
"""

from __future__ import annotations

import struct
from typing import Any

from vtl.errors import PacketError
from vtl.packet.addr import IPLike, ip_bytes, ip_str
from vtl.packet.checksum import checksum, ones_sum, patch_l4_pseudo, pseudo_sum_v4
from vtl.packet.view import U16, View, bits, patch_field16, raw, u8, uint

_HDR = struct.Struct("!BxHxxHxB")
_ADDRS = struct.Struct("4s4s")

IPV4_HLEN = 20
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IP_DF = 0x4000
IP_MF = 0x2000


def _ip4(v: IPLike) -> bytes:
    return ip_bytes(v, 4)


class IPv4(View):
    """An IPv4 header; ``vnet`` is the frame's virtio header (or None)."""

    __slots__ = ("vnet", "header_len", "end", "l4_offset", "l4_proto")
    FIELDS = {
        "version": (0, 1), "ihl": (0, 1), "tos": (1, 1), "dscp": (1, 1), "ecn": (1, 1),
        "total_length": (2, 2), "id": (4, 2), "flags": (6, 1), "df": (6, 1), "mf": (6, 1),
        "frag_offset": (6, 2), "ttl": (8, 1), "proto": (9, 1), "checksum": (10, 2),
        "src": (12, 4), "dst": (16, 4),
    }

    def __init__(self, buf: bytearray, off: int, vnet: Any = None) -> None:
        n = len(buf)
        if n < off + IPV4_HLEN:
            raise PacketError(f"IPv4 header truncated ({n - off} bytes)")
        b0, tl, frag, proto = _HDR.unpack_from(buf, off)
        hlen = (b0 & 15) << 2
        if b0 >> 4 != 4 or hlen < IPV4_HLEN or tl < hlen or off + tl > n:
            raise PacketError(f"bad IPv4 header (ver/ihl {b0:#04x}, length {tl}, have {n - off})")
        self.buf = buf
        self.off = off
        self.vnet = vnet
        self.header_len = hlen
        self.end = off + tl
        self.l4_proto = proto
        self.l4_offset = None if frag & 0x1FFF else off + hlen

    version = bits(U16, 0, 12, 4, "version")
    ihl = bits(U16, 0, 8, 4, "ihl")
    tos = u8(1, "tos")
    dscp = bits(U16, 0, 2, 6, "dscp")
    ecn = bits(U16, 0, 0, 2, "ecn")
    total_length = uint(U16, 2, "total_length")
    id = uint(U16, 4, "id")
    flags = bits(U16, 6, 13, 3, "flags")
    df = bits(U16, 6, 14, 1, "df")
    mf = bits(U16, 6, 13, 1, "mf")
    frag_offset = bits(U16, 6, 0, 13, "frag_offset")
    ttl = u8(8, "ttl")
    proto = u8(9, "proto")
    checksum = uint(U16, 10, "checksum")
    src = raw(12, 4, "src", _ip4)
    dst = raw(16, 4, "dst", _ip4)

    version_number = 4

    @property
    def addrs(self) -> tuple[bytes, bytes]:
        """``(src, dst)`` in one read (for flow keys)."""
        return _ADDRS.unpack_from(self.buf, self.off + 12)  # type: ignore[return-value]

    @property
    def is_fragment(self) -> bool:
        o = self.off
        return bool(((self.buf[o + 6] << 8) | self.buf[o + 7]) & 0x3FFF)

    @property
    def payload_len(self) -> int:
        return self.end - self.off - self.header_len

    @property
    def options(self) -> bytes:
        o = self.off
        return bytes(self.buf[o + IPV4_HLEN : o + self.header_len])

    def iter_options(self) -> list[tuple[int, bytes]]:
        """``[(type, data)]`` of the options, EOL ending the list, NOP skipped."""
        buf, pos, end = self.buf, self.off + IPV4_HLEN, self.off + self.header_len
        out: list[tuple[int, bytes]] = []
        while pos < end:
            kind = buf[pos]
            if kind == 0:
                break
            if kind == 1:
                pos += 1
                continue
            if pos + 2 > end or buf[pos + 1] < 2 or pos + buf[pos + 1] > end:
                raise PacketError("malformed IPv4 option")
            out.append((kind, bytes(buf[pos + 2 : pos + buf[pos + 1]])))
            pos += buf[pos + 1]
        return out

    def pseudo_sum(self, proto: int | None = None, length: int | None = None) -> int:
        """The pseudo-header sum for this datagram's L4 payload."""
        o = self.off
        return pseudo_sum_v4(
            self.buf[o + 12 : o + 16], self.buf[o + 16 : o + 20],
            self.l4_proto if proto is None else proto,
            self.payload_len if length is None else length,
        )

    # -- checksum ---------------------------------------------------------------

    def compute_checksum(self) -> int:
        o = self.off
        hl = self.header_len
        return checksum(self.buf, o, o + hl, 0xFFFF - ((self.buf[o + 10] << 8) | self.buf[o + 11]))

    def verify_checksum(self) -> bool:
        return ones_sum(self.buf, self.off, self.off + self.header_len) == 0xFFFF

    def fix_checksum(self) -> None:
        o = self.off
        U16.pack_into(self.buf, o + 10, 0)
        U16.pack_into(self.buf, o + 10, checksum(self.buf, o, o + self.header_len))

    def _patch_checksum(self, old: bytes, new: bytes) -> None:
        patch_field16(self.buf, self.off + 10, old, new)

    # -- address changes keeping checksums right ---------------------------------

    def _set_addr(self, rel: int, value: IPLike, update_l4: bool) -> None:
        new = ip_bytes(value, 4)
        o = self.off + rel
        old = bytes(self.buf[o : o + 4])
        self.buf[o : o + 4] = new
        patch_field16(self.buf, self.off + 10, old, new)
        l4 = self.l4_offset
        if update_l4 and l4 is not None:
            patch_l4_pseudo(self.buf, l4, self.end, self.l4_proto, old, new, self.vnet, False)

    def set_src(self, value: IPLike, update_l4: bool = True) -> None:
        """Rewrite the source address; patch the IP and (optionally) L4 checksums."""
        self._set_addr(12, value, update_l4)

    def set_dst(self, value: IPLike, update_l4: bool = True) -> None:
        """Rewrite the destination address; patch the IP and (optionally) L4 checksums."""
        self._set_addr(16, value, update_l4)

    def swap(self) -> None:
        """Exchange source and destination (checksum-neutral)."""
        o, b = self.off, self.buf
        b[o + 12 : o + 16], b[o + 16 : o + 20] = b[o + 16 : o + 20], b[o + 12 : o + 16]

    def decrement_ttl(self) -> int:
        """TTL minus one with the header checksum patched; returns the new TTL."""
        ttl = self.buf[self.off + 8]
        if ttl:
            self.update("ttl", ttl - 1)
            ttl -= 1
        return ttl

    def __repr__(self) -> str:
        return (f"IPv4(src={ip_str(self.src)}, dst={ip_str(self.dst)}, proto={self.proto}, "
                f"len={self.total_length}, ttl={self.ttl}, id={self.id})")
