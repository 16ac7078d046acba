"""The packet access API: lazy zero-copy views over Ethernet frames.

Start with :class:`Packet` (or :func:`parse`): ``Packet(frame)`` gives
``.eth``, ``.vlan_tags``, ``.arp``, ``.ip``/``.ipv4``/``.ipv6``, ``.tcp``,
``.udp``, ``.icmp``, ``.icmp6`` (None when absent), ``.l3_offset``,
``.l4_offset`` and ``.payload``. Fields are properties on the views; raw
writes leave checksums alone, while ``view.update(name, value)``,
``ip.set_src/set_dst`` and ``l4.set_sport/set_dport`` patch them
incrementally (offload-aware). :func:`fix_checksums` recomputes everything.

Modules: :mod:`.checksum`, :mod:`.addr`, :mod:`.ethernet`, :mod:`.arp`,
:mod:`.ipv4`, :mod:`.ipv6`, :mod:`.tcp`, :mod:`.udp`, :mod:`.icmp`,
:mod:`.packet`, :mod:`.classify`, :mod:`.build`, :mod:`.offload`,
:mod:`.scapy_compat` (tests only; imports scapy lazily).
Malformed or truncated frames raise only :class:`vtl.errors.PacketError`.
"""

from vtl.packet import classify
from vtl.packet.addr import ip_bytes, ip_str, mac_bytes, mac_str
from vtl.packet.arp import ARP
from vtl.packet.build import (
    arp_reply,
    arp_request,
    icmp6_error,
    icmp_echo_reply,
    icmp_error,
    neighbor_advertisement,
    tcp_reset,
    tcp_segment,
    udp_datagram,
    unreachable,
)
from vtl.packet.checksum import checksum, csum_replace, ones_sum
from vtl.packet.ethernet import Ethernet, VlanTag
from vtl.packet.icmp import ICMP, ICMPv6
from vtl.packet.ipv4 import IPv4
from vtl.packet.ipv6 import IPv6
from vtl.packet.offload import complete_offloads, pop_vlan, prepare_offloads, push_vlan
from vtl.packet.packet import Packet, fix_checksums, parse, verify_checksums
from vtl.packet.scapy_compat import from_scapy, to_scapy
from vtl.packet.tcp import TCP, TcpOptions
from vtl.packet.udp import UDP

__all__ = [
    "ARP", "ICMP", "TCP", "UDP", "Ethernet", "ICMPv6", "IPv4", "IPv6", "Packet", "TcpOptions",
    "VlanTag", "arp_reply", "arp_request", "checksum", "classify", "complete_offloads",
    "csum_replace", "fix_checksums", "from_scapy", "icmp6_error", "icmp_echo_reply",
    "icmp_error", "ip_bytes", "ip_str", "mac_bytes", "mac_str", "neighbor_advertisement",
    "ones_sum", "parse", "pop_vlan", "prepare_offloads", "push_vlan", "tcp_reset", "tcp_segment",
    "to_scapy", "udp_datagram", "unreachable", "verify_checksums",
]
