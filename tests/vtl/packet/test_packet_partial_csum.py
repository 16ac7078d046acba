"""vtl.packet.offload.partial_csum: prepare_offloads(csum=True) written out for the
bridge's chainless path; the same header and bytes, or None when it does not read it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from vtl.frame import NO_OFFLOAD, Frame
from vtl.packet import complete_offloads, prepare_offloads
from vtl.packet.offload import partial_csum

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def ip(v6: bool):  # noqa: ANN201 - a scapy layer
    return IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="10.0.0.1",
                                                                     dst="10.0.0.2")


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.sampled_from(["tcp", "udp", "udp0"]), st.binary(max_size=1400),
       st.booleans())
def test_it_agrees_with_prepare_offloads(v6: bool, l4: str, payload: bytes, garble: bool) -> None:
    layer = TCP(sport=1, dport=2, flags="PA") if l4 == "tcp" else UDP(sport=1, dport=2)
    raw = bytearray(bytes(E / ip(v6) / layer / Raw(payload)))
    if l4 == "udp0" and not v6:
        raw[40:42] = b"\0\0"  # IPv4 UDP "no checksum"
    if garble:  # an unfinished checksum, as libpcap sees it on a local interface
        at = 14 + (40 if v6 else 20) + (16 if l4 == "tcp" else 6)
        raw[at:at + 2] = b"\x12\x34"
    ours, theirs = bytearray(raw), Frame(bytearray(raw))
    head = partial_csum(ours)
    prepare_offloads(theirs, 1500, csum=True)
    assert head == (theirs.vnet_bytes() or NO_OFFLOAD)
    assert ours == theirs.data
    if head != NO_OFFLOAD:  # what the kernel makes of it: the right checksum
        done = complete_offloads(Frame(ours, theirs.vnet))[0].data
        assert bytes(done) == bytes(E / ip(v6) / layer / Raw(payload))


def test_what_it_leaves_to_the_packet_api() -> None:
    tagged = bytearray(bytes(E / Dot1Q(vlan=5) / IP() / TCP() / Raw(b"x")))
    frag6 = bytearray(bytes(E / IPv6() / IPv6ExtHdrFragment() / UDP() / Raw(b"x" * 30)))
    frag4 = bytearray(bytes(E / IP(flags="MF") / UDP() / Raw(b"x" * 30)))
    short = bytearray(bytes(E / IP() / TCP())[:40])
    for frame in (tagged, frag6, frag4):
        assert partial_csum(frame) is None
    assert partial_csum(short) is None
    for frame in (bytearray(bytes(E / ARP())), bytearray(bytes(E / IP() / ICMP() / b"x"))):
        before = bytes(frame)
        assert partial_csum(frame) == NO_OFFLOAD and bytes(frame) == before
