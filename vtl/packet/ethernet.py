"""Ethernet II and 802.1Q / 802.1ad (QinQ) tag views.

Models the 14-byte Ethernet header (no preamble, no FCS) and the 4-byte VLAN
tags that may follow the source MAC: ``[dst 6][src 6]([TPID 2][TCI 2])*[type 2]``.
:func:`walk_tags` finds how many tags there are and where L3 begins.

Invariants: an :class:`Ethernet` view guarantees 14 bytes; a :class:`VlanTag`
view sits at the tag's TPID (``off`` = 12 + 4*i) and guarantees the tag and the
following type field. ``type`` of the Ethernet view is the *outer* EtherType
(a TPID when tagged); :attr:`VlanTag.inner_type` is what follows the tag.

What it does not do: 802.3 length/LLC frames are not decoded (their "type" is
a length below 0x0600); inserting or removing tags is
:func:`insert_vlan`/:func:`remove_vlan` here (raw) or
:func:`vtl.packet.offload.push_vlan` (keeps the virtio header right).
"""

from __future__ import annotations

from typing import NamedTuple

from vtl.errors import LocalProtocolError, PacketError
from vtl.packet.addr import mac_bytes, mac_str
from vtl.packet.view import U16, View, bits, raw, uint

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_QINQ_OLD = 0x9100
VLAN_TPIDS = frozenset((ETH_P_8021Q, ETH_P_8021AD, ETH_P_QINQ_OLD))
MAX_VLAN_TAGS = 8


class VlanTagValue(NamedTuple):
    """A tag's values, as removed by :func:`remove_vlan`."""

    tpid: int
    pcp: int
    dei: int
    vid: int


class Ethernet(View):
    """The Ethernet header at ``buf[off:off+14]``."""

    __slots__ = ()
    FIELDS = {"dst": (0, 6), "src": (6, 6), "type": (12, 2)}

    def __init__(self, buf: bytearray, off: int = 0) -> None:
        if len(buf) < off + ETH_HLEN:
            raise PacketError(f"Ethernet header truncated ({len(buf) - off} bytes)")
        self.buf = buf
        self.off = off

    dst = raw(0, 6, "dst", mac_bytes)
    src = raw(6, 6, "src", mac_bytes)
    type = uint(U16, 12, "type")

    @property
    def is_broadcast(self) -> bool:
        o = self.off
        return self.buf[o : o + 6] == b"\xff\xff\xff\xff\xff\xff"

    @property
    def is_multicast(self) -> bool:
        """Group address (I/G bit set); broadcast included."""
        return bool(self.buf[self.off] & 1)

    def swap(self) -> None:
        """Exchange source and destination MACs."""
        o = self.off
        b = self.buf
        b[o : o + 6], b[o + 6 : o + 12] = b[o + 6 : o + 12], b[o : o + 6]

    def __repr__(self) -> str:
        return f"Ethernet(dst={mac_str(self.dst)}, src={mac_str(self.src)}, type={self.type:#06x})"


class VlanTag(View):
    """One 802.1Q/802.1ad tag: ``off`` points at its TPID."""

    __slots__ = ()
    FIELDS = {
        "tpid": (0, 2), "pcp": (2, 1), "dei": (2, 1), "vid": (2, 2), "tci": (2, 2),
        "inner_type": (4, 2),
    }

    def __init__(self, buf: bytearray, off: int) -> None:
        if len(buf) < off + 6:
            raise PacketError("VLAN tag truncated")
        self.buf = buf
        self.off = off

    tpid = uint(U16, 0, "tpid")
    tci = uint(U16, 2, "tci")
    pcp = bits(U16, 2, 13, 3, "pcp")
    dei = bits(U16, 2, 12, 1, "dei")
    vid = bits(U16, 2, 0, 12, "vid")
    inner_type = uint(U16, 4, "inner_type")

    def __repr__(self) -> str:
        return f"VlanTag(tpid={self.tpid:#06x}, pcp={self.pcp}, dei={self.dei}, vid={self.vid})"


def walk_tags(buf: bytearray | bytes, off: int = 0) -> tuple[int, int, int]:
    """``(ntags, l3_offset, ethertype)`` for the frame at ``buf[off:]``."""
    n = len(buf)
    if n < off + ETH_HLEN:
        raise PacketError(f"Ethernet header truncated ({n - off} bytes)")
    pos = off + 12
    et = (buf[pos] << 8) | buf[pos + 1]
    ntags = 0
    while et in VLAN_TPIDS:
        ntags += 1
        pos += 4
        if pos + 2 > n or ntags > MAX_VLAN_TAGS:
            raise PacketError("VLAN tags truncated or too many")
        et = (buf[pos] << 8) | buf[pos + 1]
    return ntags, pos + 2, et


def insert_vlan(buf: bytearray, vid: int, pcp: int = 0, dei: int = 0,
                tpid: int = ETH_P_8021Q, off: int = 0) -> None:
    """Insert a tag as the outermost one (right after the source MAC)."""
    Ethernet(buf, off)
    if not (0 <= vid < 4096 and 0 <= pcp < 8 and dei in (0, 1) and 0 <= tpid <= 0xFFFF):
        raise LocalProtocolError(f"bad VLAN tag vid={vid} pcp={pcp} dei={dei}")
    tci = (pcp << 13) | (dei << 12) | vid
    buf[off + 12 : off + 12] = tpid.to_bytes(2, "big") + tci.to_bytes(2, "big")


def remove_vlan(buf: bytearray, off: int = 0) -> VlanTagValue:
    """Remove the outermost tag; return its ``(tpid, pcp, dei, vid)``."""
    ntags, _, _ = walk_tags(buf, off)
    if not ntags:
        raise PacketError("frame has no VLAN tag to remove")
    tag = VlanTag(buf, off + 12)
    value = VlanTagValue(tag.tpid, tag.pcp, tag.dei, tag.vid)
    del buf[off + 12 : off + 16]
    return value
