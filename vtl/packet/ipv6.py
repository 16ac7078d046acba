"""IPv6 header view (RFC 8200) with the extension-header walk.

Models the fixed 40-byte header and the chain of extension headers after it:
hop-by-hop (0), routing (43), fragment (44), destination options (60) and AH
(51, length in 4-byte units). The walk runs once, on first need, and every
header it crosses is bounds-checked against the payload length; the result
says where the upper-layer header (``l4_offset``) starts and what it is
(``l4_proto``; 59 means none, 50 is ESP, whose contents are opaque).

Invariants: ``end`` and the walk are computed once (parse again after changing
``payload_length`` or the extension headers). The constructor checks version 6 and that
``40 + payload_length`` bytes are present (a jumbogram, payload length 0 with hop-by-hop first, runs
to the end of the buffer). ``l4_offset`` is None in a non-first fragment.
Address changes patch the L4 checksum like :class:`~vtl.packet.ipv4.IPv4`
does (there is no IPv6 header checksum).

What it does not do: the pseudo-header uses ``dst`` as given, not the final
destination named in a routing header; no reassembly.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from vtl.errors import PacketError
from vtl.packet.addr import IPLike, ip_bytes, ip_str
from vtl.packet.checksum import patch_l4_pseudo, pseudo_sum_v6
from vtl.packet.view import U16, U32, View, bits, raw, u8, uint

IPV6_HLEN = 40
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
EXT_HEADERS = frozenset((IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS,
                         IPPROTO_AH))
MAX_EXT_HEADERS = 16
_ADDRS = struct.Struct("16s16s")


class ExtHeader(NamedTuple):
    """One extension header: its type, where it starts and how long it is."""

    type: int
    offset: int
    length: int


def _ip6(v: IPLike) -> bytes:
    return ip_bytes(v, 16)


class IPv6(View):
    """An IPv6 header; ``vnet`` is the frame's virtio header (or None)."""

    __slots__ = ("vnet", "end", "_walked")
    FIELDS = {
        "version": (0, 1), "traffic_class": (0, 2), "flow_label": (1, 3),
        "payload_length": (4, 2), "next_header": (6, 1), "hop_limit": (7, 1),
        "src": (8, 16), "dst": (24, 16),
    }

    def __init__(self, buf: bytearray, off: int, vnet: Any = None) -> None:
        n = len(buf)
        if n < off + IPV6_HLEN:
            raise PacketError(f"IPv6 header truncated ({n - off} bytes)")
        if buf[off] >> 4 != 6:
            raise PacketError("bad IPv6 version")
        plen = (buf[off + 4] << 8) | buf[off + 5]
        if off + IPV6_HLEN + plen > n:
            raise PacketError(f"IPv6 payload truncated ({plen} announced, {n - off - 40} present)")
        self.buf = buf
        self.off = off
        self.vnet = vnet
        self.end = n if plen == 0 and buf[off + 6] == IPPROTO_HOPOPTS else off + IPV6_HLEN + plen
        self._walked: tuple[list[ExtHeader], int, int, bool] | None = None

    version = bits(U32, 0, 28, 4, "version")
    traffic_class = bits(U32, 0, 20, 8, "traffic_class")
    flow_label = bits(U32, 0, 0, 20, "flow_label")
    payload_length = uint(U16, 4, "payload_length")
    next_header = u8(6, "next_header")
    hop_limit = u8(7, "hop_limit")
    src = raw(8, 16, "src", _ip6)
    dst = raw(24, 16, "dst", _ip6)

    version_number = 6

    @property
    def addrs(self) -> tuple[bytes, bytes]:
        """``(src, dst)`` in one read (for flow keys)."""
        return _ADDRS.unpack_from(self.buf, self.off + 8)  # type: ignore[return-value]

    @property
    def ttl(self) -> int:
        """Alias of ``hop_limit``, so IPv4 and IPv6 views read alike."""
        return self.buf[self.off + 7]

    def _walk(self) -> tuple[list[ExtHeader], int, int, bool]:
        w = self._walked
        if w is not None:
            return w
        buf, end = self.buf, self.end
        nh, pos = buf[self.off + 6], self.off + IPV6_HLEN
        exts: list[ExtHeader] = []
        first = True
        while nh in EXT_HEADERS:
            if len(exts) >= MAX_EXT_HEADERS or pos + 8 > end:
                raise PacketError("IPv6 extension headers truncated or too many")
            if nh == IPPROTO_FRAGMENT:
                ln = 8
                if ((buf[pos + 2] << 8) | buf[pos + 3]) >> 3:
                    first = False
            elif nh == IPPROTO_AH:
                ln = (buf[pos + 1] + 2) << 2
            else:
                ln = (buf[pos + 1] + 1) << 3
            if pos + ln > end:
                raise PacketError("IPv6 extension header truncated")
            exts.append(ExtHeader(nh, pos, ln))
            nh = buf[pos]
            pos += ln
        w = self._walked = (exts, nh, pos, first)
        return w

    @property
    def ext_headers(self) -> list[ExtHeader]:
        return list(self._walk()[0])

    @property
    def l4_proto(self) -> int:
        """The upper-layer protocol after the extension headers (59: none)."""
        return self._walk()[1]

    @property
    def l4_offset(self) -> int | None:
        """Where the upper-layer header starts, or None in a non-first fragment."""
        _, _, pos, first = self._walk()
        return pos if first else None

    @property
    def header_len(self) -> int:
        """40 plus the extension headers."""
        return self._walk()[2] - self.off

    @property
    def is_fragment(self) -> bool:
        return any(e.type == IPPROTO_FRAGMENT for e in self._walk()[0])

    @property
    def payload_len(self) -> int:
        """Length of the upper-layer part (after the extension headers)."""
        return self.end - self._walk()[2]

    def pseudo_sum(self, proto: int | None = None, length: int | None = None) -> int:
        o = self.off
        return pseudo_sum_v6(
            self.buf[o + 8 : o + 24], self.buf[o + 24 : o + 40],
            self.l4_proto if proto is None else proto,
            self.payload_len if length is None else length,
        )

    def verify_checksum(self) -> bool:
        """IPv6 has no header checksum."""
        return True

    def fix_checksum(self) -> None:
        """IPv6 has no header checksum."""

    def _set_addr(self, rel: int, value: IPLike, update_l4: bool) -> None:
        new = ip_bytes(value, 16)
        o = self.off + rel
        old = bytes(self.buf[o : o + 16])
        self.buf[o : o + 16] = new
        l4 = self.l4_offset
        if update_l4 and l4 is not None:
            patch_l4_pseudo(self.buf, l4, self.end, self.l4_proto, old, new, self.vnet, True)

    def set_src(self, value: IPLike, update_l4: bool = True) -> None:
        """Rewrite the source address; patch the L4 checksum (optionally)."""
        self._set_addr(8, value, update_l4)

    def set_dst(self, value: IPLike, update_l4: bool = True) -> None:
        """Rewrite the destination address; patch the L4 checksum (optionally)."""
        self._set_addr(24, value, update_l4)

    def swap(self) -> None:
        """Exchange source and destination (checksum-neutral)."""
        o, b = self.off, self.buf
        b[o + 8 : o + 24], b[o + 24 : o + 40] = b[o + 24 : o + 40], b[o + 8 : o + 24]

    def decrement_ttl(self) -> int:
        hl = self.buf[self.off + 7]
        if hl:
            hl -= 1
            self.buf[self.off + 7] = hl
        return hl

    def __repr__(self) -> str:
        return (f"IPv6(src={ip_str(self.src)}, dst={ip_str(self.dst)}, nh={self.next_header}, "
                f"plen={self.payload_length}, hlim={self.hop_limit})")
