"""The top-level lazy parse: one :class:`Packet` over one frame.

``Packet(frame)`` reads only the Ethernet header and walks the VLAN tags (a
few byte reads); every other layer is built on first access and cached:
``.arp``, ``.ip`` (``.ipv4``/``.ipv6``), ``.tcp``, ``.udp``, ``.icmp``,
``.icmp6``. An absent layer is ``None``; a present but malformed one raises
:class:`~vtl.errors.PacketError` when it is first asked for. Views share the
frame's ``bytearray``: writing a field writes the frame.

Invariants:
- ``l3_offset`` is where the header after Ethernet and VLAN tags starts;
  ``l4_offset`` is None unless an IP layer with an L4 header is present.
- L4 views end where the IP datagram ends (Ethernet padding excluded).
- When the frame's virtio header says ``NEEDS_CSUM`` for the L4 header, the
  L4 view is ``partial``: its checksum field holds the pseudo-header sum.

What it does not do: follow a frame that is resized after parsing (push/pop a
VLAN tag, trim): make a new ``Packet`` then. A ``bytes`` input is copied into
a ``bytearray`` (views need a mutable buffer).
"""

from __future__ import annotations

from typing import Any

from vtl.errors import PacketError
from vtl.frame import Frame
from vtl.packet.arp import ARP
from vtl.packet.checksum import is_partial
from vtl.packet.ethernet import (
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    VLAN_TPIDS,
    Ethernet,
    VlanTag,
    walk_tags,
)
from vtl.packet.icmp import ICMP, ICMPv6
from vtl.packet.ipv4 import IPv4
from vtl.packet.ipv6 import IPv6
from vtl.packet.tcp import TCP
from vtl.packet.udp import UDP

_UNSET: Any = object()


class Packet:
    """Lazy views over one Ethernet frame (a :class:`Frame` or a ``bytearray``)."""

    __slots__ = ("data", "frame", "vnet", "ntags", "l3_offset", "ethertype", "_eth", "_arp",
                 "_ip", "_l4", "_l4off")

    def __init__(self, frame: Frame | bytearray | bytes | memoryview) -> None:
        if type(frame) is bytearray:
            data = frame
            self.frame: Frame | None = None
            self.vnet: Any = None
        elif isinstance(frame, Frame):
            data = frame.data
            self.frame = frame
            self.vnet = frame.vnet
        else:
            data = bytearray(frame)
            self.frame = None
            self.vnet = None
        self.data = data
        if len(data) < 14:
            raise PacketError(f"Ethernet header truncated ({len(data)} bytes)")
        et = (data[12] << 8) | data[13]
        if et in VLAN_TPIDS:
            self.ntags, self.l3_offset, self.ethertype = walk_tags(data)
        else:
            self.ntags = 0
            self.l3_offset = 14
            self.ethertype = et
        self._eth: Ethernet | None = None
        self._arp: Any = _UNSET
        self._ip: Any = _UNSET
        self._l4: Any = _UNSET
        self._l4off: int | None = None

    # -- L2 -----------------------------------------------------------------------

    @property
    def eth(self) -> Ethernet:
        e = self._eth
        if e is None:
            e = self._eth = Ethernet(self.data, 0)
        return e

    @property
    def vlan_tags(self) -> list[VlanTag]:
        """The tags, outermost first (empty when untagged)."""
        return [VlanTag(self.data, 12 + 4 * i) for i in range(self.ntags)]

    @property
    def arp(self) -> ARP | None:
        a = self._arp
        if a is _UNSET:
            a = self._arp = ARP(self.data, self.l3_offset) if self.ethertype == ETH_P_ARP else None
        return a

    # -- L3 -----------------------------------------------------------------------

    @property
    def ip(self) -> IPv4 | IPv6 | None:
        v = self._ip
        if v is _UNSET:
            et = self.ethertype
            if et == ETH_P_IP:
                v = IPv4(self.data, self.l3_offset, self.vnet)
            elif et == ETH_P_IPV6:
                v = IPv6(self.data, self.l3_offset, self.vnet)
            else:
                v = None
            self._ip = v
        return v

    @property
    def ipv4(self) -> IPv4 | None:
        if self.ethertype != ETH_P_IP:
            return None
        v = self._ip
        if v is _UNSET:
            v = self._ip = IPv4(self.data, self.l3_offset, self.vnet)
        return v  # type: ignore[no-any-return]

    @property
    def ipv6(self) -> IPv6 | None:
        if self.ethertype != ETH_P_IPV6:
            return None
        v = self._ip
        if v is _UNSET:
            v = self._ip = IPv6(self.data, self.l3_offset, self.vnet)
        return v  # type: ignore[no-any-return]

    # -- L4 -----------------------------------------------------------------------

    def _parse_l4(self) -> Any:
        ip = self._ip
        if ip is _UNSET:
            ip = self.ip
        l4 = None
        if ip is not None:
            off = self._l4off = ip.l4_offset
            if off is not None:
                proto = ip.l4_proto
                vnet = self.vnet
                partial = vnet is not None and is_partial(vnet, off)
                if proto == 6:
                    l4 = TCP(self.data, off, ip.end, ip, partial)
                elif proto == 17:
                    l4 = UDP(self.data, off, ip.end, ip, partial)
                elif proto == 1 and ip.version_number == 4:
                    l4 = ICMP(self.data, off, ip.end, ip)
                elif proto == 58 and ip.version_number == 6:
                    l4 = ICMPv6(self.data, off, ip.end, ip)
        self._l4 = l4
        return l4

    @property
    def l4(self) -> TCP | UDP | ICMP | ICMPv6 | None:
        """Whichever L4 view is present (TCP, UDP, ICMP or ICMPv6)."""
        v = self._l4
        return self._parse_l4() if v is _UNSET else v

    @property
    def tcp(self) -> TCP | None:
        v = self._l4
        if v is _UNSET:
            v = self._parse_l4()
        return v if type(v) is TCP else None

    @property
    def udp(self) -> UDP | None:
        v = self._l4
        if v is _UNSET:
            v = self._parse_l4()
        return v if type(v) is UDP else None

    @property
    def icmp(self) -> ICMP | None:
        v = self._l4
        if v is _UNSET:
            v = self._parse_l4()
        return v if type(v) is ICMP else None

    @property
    def icmp6(self) -> ICMPv6 | None:
        v = self._l4
        if v is _UNSET:
            v = self._parse_l4()
        return v if type(v) is ICMPv6 else None

    @property
    def l4_offset(self) -> int | None:
        if self._l4 is _UNSET:
            self._parse_l4()
        return self._l4off

    @property
    def l4_proto(self) -> int | None:
        ip = self.ip
        return None if ip is None else ip.l4_proto

    @property
    def payload(self) -> memoryview | None:
        """The L4 payload (TCP/UDP data, ICMP body), else the IP payload; None without IP."""
        l4 = self.l4
        if l4 is not None:
            return memoryview(self.data)[l4.payload_offset : l4.end]
        ip = self.ip
        if ip is None:
            return None
        off = ip.l4_offset
        if off is None:
            off = ip.off + (ip.header_len if ip.version_number == 4 else 40)
        return memoryview(self.data)[off : ip.end]

    # -- whole-packet operations ---------------------------------------------------

    def swap(self) -> None:
        """Swap source and destination at every layer (MACs, IPs, ports), in place.

        Checksum-neutral: the swapped words stay in the same sums.
        """
        self.eth.swap()
        ip = self.ip
        if ip is not None:
            ip.swap()
            l4 = self.l4
            if isinstance(l4, TCP | UDP):
                l4.swap()

    def fix_checksums(self) -> None:
        """Recompute the IPv4 header checksum and the L4 checksum (partial if offloaded).

        L4 checksums of fragments are left alone (they cover the whole datagram).
        """
        fix_checksums(self)

    def verify_checksums(self) -> bool:
        return verify_checksums(self)

    def __repr__(self) -> str:
        layers: list[object] = [self.eth, *self.vlan_tags]
        try:
            layers += [x for x in (self.arp, self.ip, self.l4) if x is not None]
        except PacketError as e:
            layers.append(f"<malformed: {e}>")
        return "Packet(" + " / ".join(map(repr, layers)) + ")"


def parse(data: Frame | bytearray | bytes | memoryview) -> Packet:
    """Same as ``Packet(data)``."""
    return Packet(data)


def fix_checksums(pkt: Packet) -> None:
    """Recompute every checksum of ``pkt`` (IPv4 header, TCP/UDP/ICMP/ICMPv6)."""
    ip = pkt.ip
    if ip is None:
        return
    ip.fix_checksum()
    if ip.is_fragment:
        return
    l4 = pkt.l4
    if l4 is not None:
        l4.fix_checksum()


def verify_checksums(pkt: Packet) -> bool:
    """True when every checksum present is valid (partial sums must match the pseudo sum)."""
    ip = pkt.ip
    if ip is None:
        return True
    if not ip.verify_checksum():
        return False
    if ip.is_fragment:
        return True
    l4 = pkt.l4
    return True if l4 is None else l4.verify_checksum()
