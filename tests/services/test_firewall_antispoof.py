"""Anti-spoofing of the firewall (services/firewall/antispoof.py): scapy-built frames from and
toward the guest, each refusal with its reason, learning and its bounds, random bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import DHCP6_Advertise
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet
from vtl.services.firewall.antispoof import AntiSpoof, eui64_link_local

MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:99:99:99"
IP4 = "192.0.2.10"
IP6 = "2001:db8::10"
PEER4 = "192.0.2.1"
PEER6 = "2001:db8::1"
LL = "fe80::5054:ff:fe12:3456"          # the EUI-64 link-local address of MAC


def raw(pkt: Packet) -> bytearray:
    return bytearray(bytes(pkt))


def eth(src: str = MAC, dst: str = "52:54:00:00:00:01") -> Ether:
    return Ether(src=src, dst=dst)


MACS = bytes(eth())[:12]


@pytest.fixture
def guard() -> AntiSpoof:
    return AntiSpoof([MAC], [IP4, IP6], learn=False)


def test_eui64_link_local() -> None:
    import ipaddress
    assert ipaddress.ip_address(eui64_link_local(bytes.fromhex("525400123456"))) == \
        ipaddress.ip_address(LL)


def test_active_only_when_something_to_do() -> None:
    assert not AntiSpoof([], [], learn=False).active
    assert AntiSpoof([MAC], [], learn=False).active
    assert AntiSpoof([], [IP4], learn=False).active
    assert AntiSpoof([], [], learn=True).active


OWN = {
    "ipv4 tcp": eth() / IP(src=IP4, dst=PEER4) / TCP(sport=40000, dport=80, flags="S"),
    "ipv4 udp": eth() / IP(src=IP4, dst=PEER4) / UDP(sport=5000, dport=53),
    "ipv4 icmp": eth() / IP(src=IP4, dst=PEER4) / ICMP(),
    "vlan ipv4": eth() / Dot1Q(vlan=5) / IP(src=IP4, dst=PEER4) / TCP(),
    "broadcast": eth(dst="ff:ff:ff:ff:ff:ff") / IP(src=IP4, dst="192.0.2.255") / UDP(),
    "ipv6 tcp": eth() / IPv6(src=IP6, dst=PEER6) / TCP(),
    "ipv6 link-local": eth() / IPv6(src=LL, dst="fe80::1") / ICMPv6EchoRequest(),
    "ipv6 multicast": eth(dst="33:33:00:00:00:01") / IPv6(src=LL, dst="ff02::1") / UDP(),
    "ns own": eth() / IPv6(src=LL, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fe80::1")
    / ICMPv6NDOptSrcLLAddr(lladdr=MAC),
    "na own": eth() / IPv6(src=IP6, dst=PEER6) / ICMPv6ND_NA(tgt=IP6, R=0)
    / ICMPv6NDOptDstLLAddr(lladdr=MAC),
    "na own link-local": eth() / IPv6(src=LL, dst="ff02::1") / ICMPv6ND_NA(tgt=LL),
    "dad": eth() / IPv6(src="::", dst="ff02::1:ff00:10") / ICMPv6ND_NS(tgt=IP6),
    "mld from ::": eth() / IPv6(src="::", dst="ff02::16") / ICMPv6MLReport2(),
    "rs": eth() / IPv6(src=LL, dst="ff02::2") / ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=MAC),
    "dhcp discover": eth(dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
    / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex("525400123456"))
    / DHCP(options=[("message-type", "discover"), "end"]),
    "arp request": eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC, psrc=IP4, pdst=PEER4),
    "arp reply": eth() / ARP(op=2, hwsrc=MAC, psrc=IP4, hwdst="52:54:00:00:00:01", pdst=PEER4),
    "arp probe": eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC, psrc="0.0.0.0", pdst=IP4),
    "gratuitous own": eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC, psrc=IP4, pdst=IP4),
    "other ethertype": Ether(src=MAC, type=0x88CC) / (b"\x00" * 40),
}


@pytest.mark.parametrize("name", list(OWN))
def test_own_traffic_passes(guard: AntiSpoof, name: str) -> None:
    frame = OWN[name]
    data = raw(frame) if isinstance(frame, Packet) else bytearray(frame)
    assert guard.outbound(data, 0.0) is None


REFUSED = {
    "other mac": (eth(src=OTHER_MAC) / IP(src=IP4, dst=PEER4) / TCP(), "spoofed_mac"),
    "other mac, vlan": (eth(src=OTHER_MAC) / Dot1Q(vlan=5) / ARP(hwsrc=MAC, psrc=IP4),
                        "spoofed_mac"),
    "other ipv4": (eth() / IP(src="192.0.2.99", dst=PEER4) / TCP(), "spoofed_ip"),
    "other ipv4 udp": (eth() / IP(src="192.0.2.99", dst=PEER4) / UDP(), "spoofed_ip"),
    "zero ipv4 not dhcp": (eth() / IP(src="0.0.0.0", dst=PEER4) / UDP(sport=68, dport=53),
                           "spoofed_ip"),
    "other ipv6": (eth() / IPv6(src="2001:db8::99", dst=PEER6) / TCP(), "spoofed_ip"),
    "other link-local": (eth() / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6EchoRequest(),
                         "spoofed_ip"),
    "zero ipv6 echo": (eth() / IPv6(src="::", dst=PEER6) / ICMPv6EchoRequest(), "spoofed_ip"),
    "other ipv6 behind hop-by-hop": (eth() / IPv6(src="2001:db8::99") / IPv6ExtHdrHopByHop()
                                     / UDP(), "spoofed_ip"),
    "gratuitous arp for peer": (eth(dst="ff:ff:ff:ff:ff:ff")
                                / ARP(op=1, hwsrc=MAC, psrc=PEER4, pdst=PEER4), "spoofed_arp"),
    "arp reply for peer": (eth() / ARP(op=2, hwsrc=MAC, psrc=PEER4, pdst=PEER4), "spoofed_arp"),
    "arp other sender mac": (eth() / ARP(op=2, hwsrc=OTHER_MAC, psrc=IP4), "spoofed_arp"),
    "rarp opcode": (eth() / ARP(op=3, hwsrc=MAC, psrc=IP4), "spoofed_arp"),
    "na for other target": (eth() / IPv6(src=IP6, dst="ff02::1") / ICMPv6ND_NA(tgt=PEER6),
                            "spoofed_nd"),
    "na for router link-local": (eth() / IPv6(src=LL, dst="ff02::1") / ICMPv6ND_NA(tgt="fe80::1"),
                                 "spoofed_nd"),
    "na other lladdr": (eth() / IPv6(src=IP6, dst="ff02::1") / ICMPv6ND_NA(tgt=IP6)
                        / ICMPv6NDOptDstLLAddr(lladdr=OTHER_MAC), "spoofed_nd"),
    "ns other lladdr": (eth() / IPv6(src=LL, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fe80::1")
                        / ICMPv6NDOptSrcLLAddr(lladdr=OTHER_MAC), "spoofed_nd"),
    "dhcp offer": (eth(dst="ff:ff:ff:ff:ff:ff") / IP(src=IP4, dst="255.255.255.255")
                   / UDP(sport=67, dport=68) / BOOTP(op=2, yiaddr="192.0.2.50")
                   / DHCP(options=[("message-type", "offer"), "end"]), "dhcp_server"),
    "dhcp offer, vlan": (eth() / Dot1Q(vlan=7) / IP(src=IP4) / UDP(sport=67, dport=68)
                         / BOOTP(op=2), "dhcp_server"),
    "router advert": (eth(dst="33:33:00:00:00:01") / IPv6(src=LL, dst="ff02::1") / ICMPv6ND_RA(),
                      "router_advert"),
    "router advert behind dest-opts": (eth() / IPv6(src=LL, dst="ff02::1") / IPv6ExtHdrDestOpt()
                                       / ICMPv6ND_RA(), "router_advert"),
    "router advert first fragment": (eth() / IPv6(src=LL, dst="ff02::1")
                                     / IPv6ExtHdrFragment(offset=0, m=1) / ICMPv6ND_RA(),
                                     "router_advert"),
    "redirect": (eth() / IPv6(src=LL, dst="fe80::2") / ICMPv6ND_Redirect(), "redirect"),
    "dhcpv6 advertise": (eth() / IPv6(src=LL, dst="fe80::2") / UDP(sport=547, dport=546)
                         / DHCP6_Advertise(), "dhcp_server"),
    "double tag": (eth() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IP(src=IP4) / TCP(), "stacked_vlan"),
    "short": (b"\x00" * 13, "malformed"),
    "short ipv4": (MACS + b"\x08\x00\x45" + b"\x00" * 10, "malformed"),
    "short arp": (MACS + b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x01", "malformed"),
    "ipv4 version 6": (bytes(eth() / IP(src=IP4) / TCP())[:14] + b"\x65" + b"\x00" * 39,
                       "malformed"),
    "truncated udp": (bytes(eth() / IP(src=IP4, ihl=5, proto=17))[:34], "malformed"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_reason(guard: AntiSpoof, name: str) -> None:
    frame, reason = REFUSED[name]
    data = raw(frame) if isinstance(frame, Packet) else bytearray(frame)
    assert guard.outbound(data, 0.0) == reason


def test_block_servers_off_lets_servers_through() -> None:
    g = AntiSpoof([MAC], [IP4, IP6], learn=False, block_servers=False)
    for name in ("dhcp offer", "router advert", "redirect", "dhcpv6 advertise"):
        assert g.outbound(raw(REFUSED[name][0]), 0.0) is None, name


def test_macs_only_checks_macs_and_servers() -> None:
    g = AntiSpoof([MAC], [], learn=False)
    assert g.outbound(raw(eth() / IP(src="203.0.113.7") / TCP()), 0.0) is None
    assert g.outbound(raw(eth() / ARP(hwsrc=MAC, psrc="203.0.113.7")), 0.0) is None
    assert g.outbound(raw(eth(src=OTHER_MAC) / IP(src=IP4) / TCP()), 0.0) == "spoofed_mac"
    assert g.outbound(raw(REFUSED["router advert"][0]), 0.0) == "router_advert"


def test_ipv4_only_guest_gets_only_link_local_ipv6() -> None:
    g = AntiSpoof([MAC], [IP4], learn=False)
    assert g.outbound(raw(OWN["ipv6 link-local"]), 0.0) is None
    assert g.outbound(raw(eth() / IPv6(src=IP6, dst=PEER6) / TCP()), 0.0) == "spoofed_ip"


def test_non_first_ipv6_fragment_checks_source_only(guard: AntiSpoof) -> None:
    frag = eth() / IPv6(src=IP6, dst=PEER6) / IPv6ExtHdrFragment(offset=100) / (b"x" * 16)
    assert guard.outbound(raw(frag), 0.0) is None
    frag[IPv6].src = "2001:db8::99"
    assert guard.outbound(raw(frag), 0.0) == "spoofed_ip"


def dhcp_ack(yiaddr: str, chaddr: str = MAC, msg: str = "ack", vlan: bool = False) -> bytearray:
    l2 = Ether(src="52:54:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
    if vlan:
        l2 = l2 / Dot1Q(vlan=5)
    return raw(l2 / IP(src=PEER4, dst="255.255.255.255") / UDP(sport=67, dport=68)
               / BOOTP(op=2, yiaddr=yiaddr, chaddr=bytes.fromhex(chaddr.replace(":", "")))
               / DHCP(options=[("server_id", PEER4), ("message-type", msg), "end"]))


def test_learning_from_dhcp() -> None:
    g = AntiSpoof([], [], learn=True)
    tcp = raw(eth() / IP(src="192.0.2.50", dst=PEER4) / TCP())
    assert g.outbound(tcp, 0.0) == "spoofed_ip"             # nothing known: blocked
    g.inbound(dhcp_ack("192.0.2.50"), 0.5)                  # MAC unknown yet: ignored
    assert g.report()["ipv4"] == []
    assert g.outbound(raw(OWN["dhcp discover"]), 1.0) is None   # fixes the MAC
    assert g.report()["macs"] == [MAC] and g.report()["learned"][MAC] == ["dhcp", 1.0]
    g.inbound(dhcp_ack("192.0.2.50", msg="offer"), 1.5)     # an offer teaches nothing
    g.inbound(dhcp_ack("192.0.2.77", chaddr=OTHER_MAC), 1.6)   # another client's ACK
    assert g.report()["ipv4"] == []
    g.inbound(dhcp_ack("192.0.2.50"), 2.0)
    rep = g.report()
    assert rep["ipv4"] == ["192.0.2.50"] and rep["learned"]["192.0.2.50"] == ["dhcp", 2.0]
    assert g.outbound(tcp, 3.0) is None
    assert g.outbound(raw(eth(src=OTHER_MAC) / IP(src="192.0.2.50") / TCP()), 3.0) == \
        "spoofed_mac"
    assert g.outbound(raw(eth() / IP(src="192.0.2.51") / TCP()), 3.0) == "spoofed_ip"
    assert LL in rep["ipv6_link_local"]
    assert g.outbound(raw(OWN["ipv6 link-local"]), 3.0) is None


def test_learning_from_dhcp_ack_with_vlan_tag() -> None:
    g = AntiSpoof([MAC], [], learn=True)
    g.inbound(dhcp_ack("192.0.2.60", vlan=True), 0.0)
    assert g.report()["ipv4"] == ["192.0.2.60"]


def test_learning_from_first_arp() -> None:
    g = AntiSpoof([], [], learn=True)
    assert g.outbound(raw(OWN["arp probe"]), 0.0) is None    # fixes the MAC, teaches no address
    assert g.report()["ipv4"] == []
    assert g.outbound(raw(OWN["gratuitous own"]), 1.0) is None
    assert g.report()["ipv4"] == [IP4] and g.report()["learned"][IP4] == ["arp", 1.0]
    assert g.outbound(raw(REFUSED["gratuitous arp for peer"][0]), 2.0) == "spoofed_arp"
    assert g.outbound(raw(OWN["ipv4 tcp"]), 2.0) is None
    assert g.outbound(raw(REFUSED["other ipv4"][0]), 2.0) == "spoofed_ip"
    assert g.outbound(raw(eth(src=OTHER_MAC) / ARP(hwsrc=OTHER_MAC, psrc=PEER4)), 2.0) == \
        "spoofed_mac"


def test_arp_never_learns_multicast_or_broadcast() -> None:
    g = AntiSpoof([MAC], [], learn=True)
    assert g.outbound(raw(eth() / ARP(hwsrc=MAC, psrc="255.255.255.255")), 0.0) == "spoofed_arp"
    assert g.report()["ipv4"] == []


def test_learning_ipv6_from_dad() -> None:
    g = AntiSpoof([MAC], [], learn=True)
    assert g.outbound(raw(OWN["ipv6 tcp"]), 0.0) == "spoofed_ip"
    assert g.outbound(raw(OWN["dad"]), 1.0) is None
    assert g.outbound(raw(eth() / IPv6(src="::") / ICMPv6ND_NS(tgt="ff02::1")), 1.0) is None
    assert g.outbound(raw(eth() / IPv6(src="::") / ICMPv6ND_NS(tgt="::1")), 1.0) is None
    assert g.report()["ipv6"] == [IP6]
    assert g.outbound(raw(OWN["ipv6 tcp"]), 2.0) is None
    assert g.outbound(raw(OWN["na own"]), 2.0) is None


def test_configured_mac_is_not_replaced_by_learning() -> None:
    g = AntiSpoof([MAC], [], learn=True)
    frame = eth(src=OTHER_MAC) / ARP(hwsrc=OTHER_MAC, psrc=IP4)
    assert g.outbound(raw(frame), 0.0) == "spoofed_mac"
    assert g.report()["macs"] == [MAC] and g.report()["ipv4"] == []


def test_learning_is_bounded_and_keeps_configured() -> None:
    g = AntiSpoof([MAC], ["192.0.2.10", IP6], learn=True, max_learned=3)
    for i in range(10):
        g.inbound(dhcp_ack(f"198.51.100.{i + 1}"), float(i))
        dad = eth() / IPv6(src="::", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=f"2001:db8:1::{i + 1}")
        assert g.outbound(raw(dad), float(i)) is None
    rep = g.report()
    assert rep["ipv4"] == ["192.0.2.10", "198.51.100.8", "198.51.100.9", "198.51.100.10"]
    assert rep["ipv6"] == [IP6, "2001:db8:1::8", "2001:db8:1::9", "2001:db8:1::10"]
    assert len(rep["learned"]) == 6
    assert g.outbound(raw(eth() / IP(src="198.51.100.1") / TCP()), 20.0) == "spoofed_ip"
    assert g.outbound(raw(eth() / IP(src="198.51.100.10") / TCP()), 20.0) is None


def test_learning_off_learns_nothing(guard: AntiSpoof) -> None:
    guard.inbound(dhcp_ack("192.0.2.50"), 0.0)
    guard.outbound(raw(eth() / IPv6(src="::") / ICMPv6ND_NS(tgt="2001:db8::77")), 0.0)
    rep = guard.report()
    assert rep["ipv4"] == [IP4] and rep["ipv6"] == [IP6] and rep["learned"] == {}


GUARDS = [AntiSpoof([MAC], [IP4, IP6], learn=False), AntiSpoof([], [], learn=True),
          AntiSpoof([MAC], [], learn=True, max_learned=2)]
HEADS = [b"", MACS, MACS + b"\x81\x00\x00\x05"]
TYPES = [b"", b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00"]


@settings(max_examples=600, deadline=None)
@given(head=st.sampled_from(HEADS), et=st.sampled_from(TYPES), body=st.binary(max_size=400),
       which=st.integers(0, len(GUARDS) - 1))
def test_random_bytes_never_raise(head: bytes, et: bytes, body: bytes, which: int) -> None:
    g = GUARDS[which]
    data = bytearray(head + et + body)
    assert g.outbound(data, 0.0) in (None, "spoofed_mac", "spoofed_ip", "spoofed_arp",
                                     "spoofed_nd", "dhcp_server", "router_advert", "redirect",
                                     "stacked_vlan", "malformed")
    g.inbound(data, 0.0)
    g.report()


@settings(max_examples=300, deadline=None)
@given(frame=st.sampled_from([f for f, _ in REFUSED.values()] + list(OWN.values())),
       cut=st.integers(0, 200), flip=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)),
                                               max_size=4))
def test_mutated_frames_never_raise(frame: Packet | bytes, cut: int, flip: list) -> None:
    data = bytearray(bytes(frame))[:cut]
    for i, v in flip:
        if i < len(data):
            data[i] = v
    for g in GUARDS:
        g.outbound(data, 0.0)
        g.inbound(data, 0.0)
    data = dhcp_ack("192.0.2.5")
    for i, v in flip:
        data[min(i + 14, len(data) - 1)] = v
    GUARDS[2].inbound(data, 0.0)


FAST = [raw(OWN["ipv4 tcp"] / (b"x" * 20)), raw(OWN["ipv6 tcp"]),
        raw(OWN["vlan ipv4"] / (b"x" * 20))]
SPECS = [([MAC], [IP4, IP6], False), ([], [], True), ([MAC], [], True), ([], [IP4, IP6], False)]


@settings(max_examples=400, deadline=None)
@given(which=st.integers(0, len(FAST) - 1), spec=st.sampled_from(SPECS),
       flip=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=3))
def test_fast_path_agrees_with_the_full_check(which: int, spec: tuple, flip: list) -> None:
    """The one-unpack fast path for own TCP answers as the full parse does."""
    data = bytearray(FAST[which])
    for i, v in flip:
        data[i] = v
    assert AntiSpoof(*spec).outbound(data, 0.0) == AntiSpoof(*spec)._outbound(data, 0.0)


def test_fast_path_taken_for_own_tcp(guard: AntiSpoof) -> None:
    for data in FAST[:2]:
        assert guard.outbound(data, 0.0) is None
    bad = bytearray(FAST[0])
    bad[29] ^= 1                                    # last octet of the IPv4 source
    assert guard.outbound(bad, 0.0) == "spoofed_ip"
    bad = bytearray(FAST[1])
    bad[11] ^= 1                                    # last octet of the source MAC
    assert guard.outbound(bad, 0.0) == "spoofed_mac"
