"""Anti-spoofing for the ``firewall`` service: the guest may speak only as itself.

Theory of operation. The guest's identity is a set of MACs, IPv4 and IPv6
addresses, configured (``guest_macs``, ``guest_ips``) or learned
(``learn_guest``). :meth:`AntiSpoof.outbound` sees each frame from the guest
(untagged or one VLAN tag) and answers ``None`` (pass) or a reason the service
counts and logs: ``spoofed_mac``, ``spoofed_ip``, ``spoofed_arp``,
``spoofed_nd``, ``dhcp_server``, ``router_advert``, ``redirect``,
``stacked_vlan``, ``malformed``. :meth:`AntiSpoof.inbound` sees frames toward
the guest only to learn from DHCP ACKs. Sans-IO; never raises on any bytes.
Own TCP takes a fast path: one ``struct`` unpack and two set lookups.

Rules, as libvirt's nwfilter ``clean-traffic`` (no-mac-spoofing,
no-ip-spoofing, no-arp-spoofing) applies them:

- MACs known: the Ethernet source, an ARP sender hardware address and an ND
  link-layer address option are one of them. Destination MACs are not checked.
- Addresses are enforced once any is configured or learning is on: the IPv4
  source is the guest's, or 0.0.0.0 for DHCP client traffic (UDP 68->67); an
  ARP is Ethernet/IPv4, request or reply, from one of its addresses or 0.0.0.0
  (a probe, RFC 5227). A family with no address keeps only its bootstrap
  exceptions: a guest given IPv4 only gets IPv6 link-local only.
- IPv6: the source is one of its addresses, the EUI-64 link-local address of
  one of its MACs, or ``::`` for ND and MLD (DAD, RFC 4862; RFC 3810). A guest
  with a stable-privacy link-local address (RFC 7217) needs it listed or
  learned. A neighbour advertisement's target is one of its addresses.
  Extension headers are walked to the upper layer, so an RA behind a
  destination-options header is still an RA (RFC 7113's RA Guard evasion).
- ``block_servers``: DHCP (UDP source port 67) and DHCPv6 (547) server
  traffic, router advertisements (ICMPv6 134) and redirects (137) from the
  guest are dropped, as OpenStack Neutron's port security does.

Learning, trust on first use as libvirt's ``CTRL_IP_LEARNING`` and FCFS SAVI
(RFC 6620): with no MAC known, the source of the first ARP, DHCP client
message or DAD solicitation fixes the MAC (other MACs are then spoofed, so no
second is learned). IPv4: the ``yiaddr`` of a DHCP ACK toward the guest for
one of its MACs (``chaddr``), or, while it has no IPv4 address at all, the
sender address of its first ARP. IPv6: the target of each DAD solicitation
(source ``::``), how SLAAC, privacy and DHCPv6 addresses come into use. Each
family keeps at most ``max_learned`` learned entries, a new one evicting the
oldest learned (never a configured one), so rotating privacy addresses and new
leases keep working. Until an address is known only bootstrap traffic passes,
as in libvirt.

Differences from clean-traffic, deliberately: IPv6 is checked, not dropped;
other EtherTypes pass when the MAC is right and are left to the rules
(clean-traffic's no-other-l2-traffic drops them); clean-traffic has no server
rule; two VLAN tags or more are refused (``stacked_vlan``, the inner headers
are not inspected). Nothing is unlearned (DHCP release, a defended DAD
target), and DHCPv6 Replies are not parsed (the client's DAD teaches).
"""

from __future__ import annotations

import struct

from vtl.packet.addr import ip_bytes, ip_str, mac_bytes, mac_str

#: from offset 6 of an untagged IPv4 frame: source MAC, EtherType, version/IHL, protocol, source
_FAST4 = struct.Struct("!6sHB8xB2x4s").unpack_from
#: from offset 6 of an untagged IPv6 frame: source MAC, EtherType, next header, source
_FAST6 = struct.Struct("!6sH6xB1x16s").unpack_from
_V4_ZERO = bytes(4)
_V6_ZERO = bytes(16)
_TPIDS = (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
_EXT_HDRS = frozenset((0, 43, 60))   # hop-by-hop, routing, destination options
_ND_TYPES_FROM_ZERO = frozenset((131, 132, 133, 135, 143))   # MLD, RS, NS (DAD)
_NOT_UNICAST = frozenset((0, 127, *range(224, 256)))   # first octets never learned
_DHCP_COOKIE = b"\x63\x82\x53\x63"


def eui64_link_local(mac: bytes) -> bytes:
    """``fe80::`` with the modified EUI-64 interface identifier of ``mac`` (RFC 4291)."""
    return b"\xfe\x80" + bytes(6) + bytes((mac[0] ^ 2, mac[1], mac[2], 0xFF, 0xFE)) + mac[3:6]


class _Family:
    """One kind of identity (MACs, IPv4 or IPv6): configured entries plus a bounded FIFO
    of learned ones, each learned entry with where and when it was learned."""

    def __init__(self, configured: list[bytes], bound: int) -> None:
        self.configured = list(dict.fromkeys(configured))
        self.learned: dict[bytes, tuple[str, float]] = {}   # insertion order = age
        self.bound = bound

    def learn(self, value: bytes, how: str, now: float) -> bool:
        """Add ``value``; False when it was already known."""
        if value in self.learned or value in self.configured:
            return False
        while len(self.learned) >= self.bound:
            del self.learned[next(iter(self.learned))]
        self.learned[value] = (how, now)
        return True

    def all(self) -> list[bytes]:
        return self.configured + list(self.learned)


class AntiSpoof:
    """The anti-spoofing check of one guest port; see the module docstring."""

    def __init__(self, macs: list[str], ips: list[str], learn: bool, block_servers: bool = True,
                 max_learned: int = 16) -> None:
        bound = max(1, max_learned)
        self.learn = learn
        self.block_servers = block_servers
        self._mac = _Family([mac_bytes(m) for m in macs], bound)
        addrs = [ip_bytes(a) for a in ips]
        self._v4 = _Family([a for a in addrs if len(a) == 4], bound)
        self._v6 = _Family([a for a in addrs if len(a) == 16], bound)
        self.enforce_ip = bool(ips) or learn
        self._rebuild()

    @property
    def active(self) -> bool:
        """False when nothing is configured and nothing is to be learned."""
        return bool(self._macs) or self.enforce_ip or self.learn

    def _rebuild(self) -> None:
        self._macs = tuple(self._mac.all())
        self._macset = frozenset(self._macs)
        self._ip4 = frozenset(self._v4.all())
        self._ip6 = frozenset(self._v6.all() + [eui64_link_local(m) for m in self._macs])

    def _learn(self, fam: _Family, value: bytes, how: str, now: float) -> None:
        if fam.learn(value, how, now):
            self._rebuild()

    def _learn_mac(self, data: bytearray, how: str, now: float) -> None:
        if self.learn and not self._macs and not data[6] & 1:
            self._learn(self._mac, bytes(data[6:12]), how, now)

    # -- frames from the guest ---------------------------------------------------------

    def outbound(self, data: bytearray, now: float) -> str | None:
        """A frame FROM the guest: None when it may pass, else the reason."""
        n = len(data)
        if n >= 54:                          # fast path: own untagged TCP, one unpack and sets
            mac, et, vihl, proto, src = _FAST4(data, 6)
            if et == 0x0800:
                if vihl == 0x45 and proto == 6 and src in self._ip4 and (
                        mac in self._macset or not self._macs):
                    return None
            elif et == 0x86DD:
                mac, et, proto, src = _FAST6(data, 6)
                if proto == 6 and src in self._ip6 and (mac in self._macset or not self._macs) \
                        and data[14] >> 4 == 6:
                    return None
        return self._outbound(data, now)

    def _outbound(self, data: bytearray, now: float) -> str | None:
        if len(data) < 14:
            return "malformed"
        macs = self._macs
        if macs and data[6:12] not in macs:
            return "spoofed_mac"
        off = 14
        et = data[12:14]
        if et in _TPIDS:
            if len(data) < 18:
                return "malformed"
            et = data[16:18]
            if et in _TPIDS:
                return "stacked_vlan"
            off = 18
        if et == b"\x08\x00":
            return self._ipv4(data, off, now)
        if et == b"\x86\xdd":
            return self._ipv6(data, off, now)
        if et == b"\x08\x06":
            return self._arp(data, off, now)
        return None

    def _ipv4(self, data: bytearray, o: int, now: float) -> str | None:
        n = len(data)
        if n < o + 20 or data[o] >> 4 != 4:
            return "malformed"
        ihl = (data[o] & 15) * 4
        if ihl < 20 or n < o + ihl:
            return "malformed"
        proto = data[o + 9]
        if proto == 6 and bytes(data[o + 12:o + 16]) in self._ip4:
            return None                      # the common case: own TCP
        sport = dport = -1
        if proto == 17 and not (data[o + 6] & 0x1F or data[o + 7]):
            u = o + ihl
            if n < u + 8:
                return "malformed"
            sport = data[u] << 8 | data[u + 1]
            dport = data[u + 2] << 8 | data[u + 3]
            if sport == 68 and dport == 67:
                self._learn_mac(data, "dhcp", now)
            elif sport == 67 and self.block_servers:
                return "dhcp_server"
        if self.enforce_ip:
            src = bytes(data[o + 12:o + 16])
            if src not in self._ip4 and not (src == _V4_ZERO and sport == 68 and dport == 67):
                return "spoofed_ip"
        return None

    def _arp(self, data: bytearray, o: int, now: float) -> str | None:
        if len(data) < o + 28:
            return "malformed"
        if data[o:o + 6] != b"\x00\x01\x08\x00\x06\x04" or data[o + 6] or data[o + 7] not in (1, 2):
            return "spoofed_arp"             # not Ethernet/IPv4 request or reply
        self._learn_mac(data, "arp", now)
        if self._macs and data[o + 8:o + 14] not in self._macs:
            return "spoofed_arp"
        if self.enforce_ip:
            spa = bytes(data[o + 14:o + 18])
            if spa == _V4_ZERO or spa in self._ip4:
                return None
            if self.learn and not self._ip4 and spa[0] not in _NOT_UNICAST:
                self._learn(self._v4, spa, "arp", now)
                return None
            return "spoofed_arp"
        return None

    def _ipv6(self, data: bytearray, o: int, now: float) -> str | None:
        n = len(data)
        if n < o + 40 or data[o] >> 4 != 6:
            return "malformed"
        nh = data[o + 6]
        src = bytes(data[o + 8:o + 24])
        own = src in self._ip6 or not self.enforce_ip
        if nh == 6 and own:
            return None                      # the common case: own TCP
        p = o + 40
        for _ in range(8):                   # walk the extension headers (RFC 7113)
            if nh in _EXT_HDRS:
                if n < p + 8:
                    return "malformed"
                nh, p = data[p], p + (data[p + 1] + 1) * 8
            elif nh == 44:                   # fragment header
                if n < p + 8:
                    return "malformed"
                if data[p + 2] << 8 | data[p + 3] & 0xF8:
                    return None if own else "spoofed_ip"   # not the first fragment
                nh, p = data[p], p + 8
            else:
                break
        else:
            return "malformed"
        if nh == 17:
            if n < p + 8:
                return "malformed"
            if self.block_servers and data[p] << 8 | data[p + 1] == 547:
                return "dhcp_server"
        elif nh == 58:
            if n < p + 4:
                return "malformed"
            return self._icmp6(data, p, src, own, now)
        return None if own else "spoofed_ip"

    def _icmp6(self, data: bytearray, p: int, src: bytes, own: bool, now: float) -> str | None:
        t = data[p]
        if t == 134 and self.block_servers:
            return "router_advert"
        if t == 137 and self.block_servers:
            return "redirect"
        if not own and not (src == _V6_ZERO and t in _ND_TYPES_FROM_ZERO):
            return "spoofed_ip"
        if t not in (133, 135, 136):
            return None
        n = len(data)
        q = p + (8 if t == 133 else 24)
        if n < q:
            return "malformed"
        if t == 135 and src == _V6_ZERO:     # DAD: the target is the address coming into use
            self._learn_mac(data, "dad", now)
            target = bytes(data[p + 8:p + 24])
            if self.learn and target[0] not in (0, 0xFF):   # not ::/8, not multicast
                self._learn(self._v6, target, "dad", now)
        if t == 136 and self.enforce_ip and bytes(data[p + 8:p + 24]) not in self._ip6:
            return "spoofed_nd"
        while q + 2 <= n:                    # link-layer address options must be its own
            ln = data[q + 1] * 8
            if ln == 0:
                return "malformed"
            if data[q] in (1, 2) and self._macs and data[q + 2:q + 8] not in self._macs:
                return "spoofed_nd"
            q += ln
        return None

    # -- frames toward the guest -------------------------------------------------------

    def inbound(self, data: bytearray, now: float) -> None:
        """A frame TOWARD the guest: learns the ``yiaddr`` of a DHCP ACK for the guest's
        ``chaddr`` when learning is on."""
        if not self.learn or len(data) < 14:
            return
        o = 14
        if data[12:14] in _TPIDS:
            o = 18
        n = len(data)
        if n < o + 20 or data[o - 2:o] != b"\x08\x00" or data[o + 9] != 17 \
                or data[o + 6] & 0x1F or data[o + 7]:
            return                           # not UDP over IPv4, or not a first fragment
        u = o + (data[o] & 15) * 4
        b = u + 8                            # BOOTP
        if n < b + 240 or data[u:u + 4] != b"\x00\x43\x00\x44":
            return
        if data[b:b + 3] != b"\x02\x01\x06" or data[b + 236:b + 240] != _DHCP_COOKIE:
            return
        if data[b + 28:b + 34] not in self._macs:
            return
        q = b + 240
        while q < n and data[q] != 255:      # options: find the message type
            if data[q] == 0:
                q += 1
                continue
            if q + 2 < n and data[q] == 53 and data[q + 1] == 1:
                if data[q + 2] == 5:
                    yiaddr = bytes(data[b + 16:b + 20])
                    if yiaddr != _V4_ZERO:
                        self._learn(self._v4, yiaddr, "dhcp", now)
                return
            if q + 1 >= n:
                return
            q += 2 + data[q + 1]

    def report(self) -> dict:
        """The MACs and addresses in force, and which were learned how and when
        (``learned`` maps each learned entry to [how, time])."""
        learned = {}
        for fam, text in ((self._mac, mac_str), (self._v4, ip_str), (self._v6, ip_str)):
            learned.update({text(v): [how, at] for v, (how, at) in fam.learned.items()})
        return {
            "macs": [mac_str(m) for m in self._macs],
            "ipv4": [ip_str(a) for a in self._v4.all()],
            "ipv6": [ip_str(a) for a in self._v6.all()],
            "ipv6_link_local": [ip_str(eui64_link_local(m)) for m in self._macs],
            "enforce_ip": self.enforce_ip,
            "learn": self.learn,
            "block_servers": self.block_servers,
            "learned": learned,
        }


__all__ = ["AntiSpoof", "eui64_link_local"]
