"""ARP (RFC 826) for Ethernet and IPv4.

Models the 28-byte ARP packet with 6-byte hardware and 4-byte protocol
addresses: ``htype ptype hlen plen op sha spa tha tpa``. The constructor checks
the length and that the sizes are 6 and 4; other hardware/protocol kinds are
reported as :class:`~vtl.errors.PacketError` (they are not what this view
models). Replies are built by :func:`vtl.packet.build.arp_reply`.
"""

from __future__ import annotations

from vtl.errors import PacketError
from vtl.packet.addr import IPLike, ip_bytes, ip_str, mac_bytes, mac_str
from vtl.packet.view import U16, View, raw, u8, uint

ARP_LEN = 28
ARP_REQUEST = 1
ARP_REPLY = 2


def _ip4(v: IPLike) -> bytes:
    return ip_bytes(v, 4)


class ARP(View):
    """An Ethernet/IPv4 ARP packet at ``buf[off:off+28]``."""

    __slots__ = ()
    FIELDS = {
        "htype": (0, 2), "ptype": (2, 2), "hlen": (4, 1), "plen": (5, 1), "op": (6, 2),
        "sha": (8, 6), "spa": (14, 4), "tha": (18, 6), "tpa": (24, 4),
    }

    def __init__(self, buf: bytearray, off: int) -> None:
        if len(buf) < off + ARP_LEN:
            raise PacketError(f"ARP packet truncated ({len(buf) - off} bytes)")
        if buf[off + 4] != 6 or buf[off + 5] != 4:
            raise PacketError("ARP packet is not Ethernet/IPv4 (hlen 6, plen 4)")
        self.buf = buf
        self.off = off

    htype = uint(U16, 0, "htype")
    ptype = uint(U16, 2, "ptype")
    hlen = u8(4, "hlen")
    plen = u8(5, "plen")
    op = uint(U16, 6, "op")
    sha = raw(8, 6, "sha", mac_bytes)
    spa = raw(14, 4, "spa", _ip4)
    tha = raw(18, 6, "tha", mac_bytes)
    tpa = raw(24, 4, "tpa", _ip4)

    def __repr__(self) -> str:
        return (f"ARP(op={self.op}, sha={mac_str(self.sha)}, spa={ip_str(self.spa)}, "
                f"tha={mac_str(self.tha)}, tpa={ip_str(self.tpa)})")
