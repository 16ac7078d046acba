"""ICMP (RFC 792) and ICMPv6 (RFC 4443, RFC 4861 neighbor discovery) views.

Both model the common 8-byte header ``type code checksum rest`` at
``buf[off:end]``; ``rest`` is read as ``id``/``seq`` (echo), ``mtu`` (needs
fragmentation, packet too big: the low 16 bits) or ``pointer``. The body after
the 8 bytes is ``body``. The constructor checks the 8 bytes.

Checksums: ICMP covers only the message; ICMPv6 adds the IPv6 pseudo-header,
which ``ip`` provides. Neighbor discovery accessors (``target``,
``nd_options``, ``nd_lladdr``) check their own length and raise
:class:`~vtl.errors.PacketError` if the message is too short.
"""

from __future__ import annotations

from typing import Any

from vtl.errors import LocalProtocolError, PacketError
from vtl.packet.addr import IPLike, ip_bytes
from vtl.packet.checksum import checksum, fold, ones_sum
from vtl.packet.view import U16, U32, View, patch_field16, u8, uint

ICMP_HLEN = 8
# ICMPv4 types and codes
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_REDIRECT = 5
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROTO_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMP_NET_PROHIBITED = 9
ICMP_HOST_PROHIBITED = 10
ICMP_ADMIN_PROHIBITED = 13
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))
# ICMPv6 types and codes
ICMP6_DEST_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAM_PROBLEM = 4
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP6_ROUTER_SOLICIT = 133
ICMP6_ROUTER_ADVERT = 134
ICMP6_NEIGHBOR_SOLICIT = 135
ICMP6_NEIGHBOR_ADVERT = 136
ICMP6_NO_ROUTE = 0
ICMP6_ADMIN_PROHIBITED = 1
ICMP6_ADDR_UNREACH = 3
ICMP6_PORT_UNREACH = 4
ND_OPT_SOURCE_LLADDR = 1
ND_OPT_TARGET_LLADDR = 2
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000


class _IcmpBase(View):
    __slots__ = ("end", "ip")
    FIELDS = {
        "type": (0, 1), "code": (1, 1), "checksum": (2, 2), "rest": (4, 4), "id": (4, 2),
        "seq": (6, 2),
    }

    def __init__(self, buf: bytearray, off: int, end: int | None = None, ip: Any = None) -> None:
        if end is None:
            end = len(buf)
        if end > len(buf) or end < off + ICMP_HLEN:
            raise PacketError(f"ICMP message truncated ({end - off} bytes)")
        self.buf = buf
        self.off = off
        self.end = end
        self.ip = ip

    type = u8(0, "type")
    code = u8(1, "code")
    checksum = uint(U16, 2, "checksum")
    rest = uint(U32, 4, "rest")
    id = uint(U16, 4, "id")
    seq = uint(U16, 6, "seq")
    mtu = uint(U16, 6, "mtu")
    pointer = u8(4, "pointer")

    header_len = ICMP_HLEN

    @property
    def payload_offset(self) -> int:
        return self.off + ICMP_HLEN

    @property
    def body(self) -> memoryview:
        """What follows the 8-byte header, zero-copy."""
        return memoryview(self.buf)[self.off + ICMP_HLEN : self.end]

    payload = body

    def _pseudo(self, pseudo: int | None) -> int:
        return 0

    def compute_checksum(self, pseudo: int | None = None) -> int:
        o = self.off
        field = (self.buf[o + 2] << 8) | self.buf[o + 3]
        return checksum(self.buf, o, self.end, self._pseudo(pseudo) + 0xFFFF - field)

    def verify_checksum(self, pseudo: int | None = None) -> bool:
        return fold(ones_sum(self.buf, self.off, self.end) + self._pseudo(pseudo)) == 0xFFFF

    def fix_checksum(self, pseudo: int | None = None) -> None:
        U16.pack_into(self.buf, self.off + 2, self.compute_checksum(pseudo))

    def _patch_checksum(self, old: bytes, new: bytes) -> None:
        patch_field16(self.buf, self.off + 2, old, new)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(type={self.type}, code={self.code}, len={self.end - self.off})"


class ICMP(_IcmpBase):
    """An ICMPv4 message."""

    __slots__ = ()
    FIELDS = {**_IcmpBase.FIELDS, "mtu": (6, 2), "pointer": (4, 1)}

    @property
    def is_error(self) -> bool:
        return self.buf[self.off] in ICMP_ERROR_TYPES


class ICMPv6(_IcmpBase):
    """An ICMPv6 message; ``ip`` (the IPv6 view) gives the pseudo-header."""

    __slots__ = ()
    FIELDS = {**_IcmpBase.FIELDS, "mtu": (4, 4), "pointer": (4, 4)}

    mtu = uint(U32, 4, "mtu")
    pointer = uint(U32, 4, "pointer")

    @property
    def is_error(self) -> bool:
        return self.buf[self.off] < 128

    def _pseudo(self, pseudo: int | None) -> int:
        if pseudo is not None:
            return pseudo
        if self.ip is None:
            raise LocalProtocolError("ICMPv6 checksum needs the pseudo-header: pass pseudo= or ip")
        return self.ip.pseudo_sum(58, self.end - self.off)

    # -- neighbor discovery ------------------------------------------------------

    @property
    def target(self) -> bytes:
        """Target address of a neighbor solicitation/advertisement (or redirect)."""
        o = self.off
        if self.end < o + 24:
            raise PacketError("ND message too short for a target address")
        return bytes(self.buf[o + 8 : o + 24])

    @target.setter
    def target(self, value: IPLike) -> None:
        if self.end < self.off + 24:
            raise PacketError("ND message too short for a target address")
        self.buf[self.off + 8 : self.off + 24] = ip_bytes(value, 16)

    def nd_options(self) -> list[tuple[int, bytes]]:
        """``[(type, data)]`` of the ND options after an NS/NA (RFC 4861 4.6)."""
        t = self.buf[self.off]
        start = {133: 8, 134: 16, 135: 24, 136: 24, 137: 40}.get(t)
        if start is None:
            return []
        buf, pos, end = self.buf, self.off + start, self.end
        out = []
        while pos + 2 <= end:
            ln = buf[pos + 1] * 8
            if ln == 0 or pos + ln > end:
                raise PacketError("malformed ND option")
            out.append((buf[pos], bytes(buf[pos + 2 : pos + ln])))
            pos += ln
        return out

    def nd_lladdr(self, kind: int = ND_OPT_SOURCE_LLADDR) -> bytes | None:
        """The source (1) or target (2) link-layer address option, if present."""
        for t, data in self.nd_options():
            if t == kind and len(data) >= 6:
                return data[:6]
        return None
