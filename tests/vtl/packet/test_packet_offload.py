"""Offloads: software GSO, GSO preparation and VLAN edits that keep the virtio header right."""

from __future__ import annotations

import os

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from vtl.errors import PacketError
from vtl.frame import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    Frame,
    VnetHeader,
)
from vtl.packet import Packet, complete_offloads, pop_vlan, prepare_offloads, push_vlan

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def gso_frame(v6: bool, size: int, flags: str = "PA", mss: int = 1448, udp: bool = False,
              tag: bool = False) -> tuple[Frame, bytes]:
    payload = os.urandom(size)
    ip = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2",
                                                                   id=65530)
    l4 = UDP(sport=5000, dport=6000) if udp else TCP(
        sport=1234, dport=80, seq=0xFFFFF000, ack=1, flags=flags,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    s = (E / Dot1Q(vlan=5) if tag else E) / ip / l4 / Raw(payload)
    raw = bytearray(bytes(s))
    p = Packet(raw)
    l4v = p.l4
    if udp:
        gso = VIRTIO_NET_HDR_GSO_UDP_L4
    else:
        gso = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=gso,
                      hdr_len=l4v.payload_offset, gso_size=mss, csum_start=l4v.off,
                      csum_offset=6 if udp else 16)
    f = Frame(raw, vnet)
    Packet(f).fix_checksums()  # partial pseudo-header sum, as a guest kernel leaves it
    return f, payload


def check_checksums(raw: bytes) -> None:
    s = Ether(raw)
    for layer in (IP, TCP, UDP):
        if layer in s:
            del s[layer].chksum
            if layer is IP:
                del s[IP].len
    if IPv6 in s:
        del s[IPv6].plen
    assert bytes(s) == raw


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("tag", [False, True])
def test_tcp_gso_segmentation(v6: bool, tag: bool) -> None:
    f, payload = gso_frame(v6, 65000 - 100, flags="FPA", tag=tag)
    segs = complete_offloads(f)
    assert len(segs) == -(-len(payload) // 1448)
    data = b""
    seq = 0xFFFFF000
    for i, seg in enumerate(segs):
        assert seg.vnet is None
        s = Ether(bytes(seg.data))
        check_checksums(bytes(seg.data))
        t = s[TCP]
        assert t.seq == seq % 2**32
        assert len(t.payload) == (1448 if i < len(segs) - 1 else len(payload) - 1448 * i)
        seq += len(t.payload)
        data += bytes(t.payload)
        last = i == len(segs) - 1
        assert ("F" in t.flags) == last and ("P" in t.flags) == last and "A" in t.flags
        if not v6:
            assert s[IP].id == (65530 + i) & 0xFFFF and s[IP].len == len(seg.data) - 14 - 4 * tag
        assert len(seg.data) <= 14 + 4 * tag + (40 if v6 else 20) + 32 + 1448
        assert Packet(seg).verify_checksums()
    assert data == payload


def test_cwr_only_on_first_segment() -> None:
    f, _ = gso_frame(False, 5000, flags="CA")
    f.vnet.gso_type |= VIRTIO_NET_HDR_GSO_ECN
    segs = complete_offloads(f)
    assert ["C" in Ether(bytes(s.data))[TCP].flags for s in segs] == [True] + [False] * 3


def test_udp_l4_segmentation_and_ufo() -> None:
    f, payload = gso_frame(True, 5000, mss=1400, udp=True)
    segs = complete_offloads(f)
    assert b"".join(bytes(Ether(bytes(s.data))[UDP].payload) for s in segs) == payload
    for s in segs:
        check_checksums(bytes(s.data))
    f, payload = gso_frame(False, 1000, mss=1472, udp=True)
    f.vnet.gso_type = VIRTIO_NET_HDR_GSO_UDP
    (one,) = complete_offloads(f)
    check_checksums(bytes(one.data))
    f, _ = gso_frame(False, 5000, mss=1472, udp=True)
    f.vnet.gso_type = VIRTIO_NET_HDR_GSO_UDP
    with pytest.raises(PacketError):
        complete_offloads(f)


def test_needs_csum_without_gso_is_completed() -> None:
    f, _ = gso_frame(False, 500)
    f.vnet.gso_type = 0
    (out,) = complete_offloads(f)
    assert out.vnet is None
    check_checksums(bytes(out.data))
    plain = Frame(bytes(E / IP() / TCP()))
    assert complete_offloads(plain) == [plain]
    f, _ = gso_frame(True, 500)  # partial checksum, then a tag pushed before it
    f.vnet.gso_type = 0
    push_vlan(f, 9)
    (out,) = complete_offloads(f)
    check_checksums(bytes(out.data))
    assert Packet(out).verify_checksums()


@pytest.mark.parametrize("v6", [False, True])
def test_prepare_offloads_roundtrip(v6: bool) -> None:
    payload = os.urandom(20000)
    ip = IPv6(src="::1", dst="::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    f = Frame(bytes(E / ip / TCP(flags="PA", seq=5) / Raw(payload)))
    prepare_offloads(f, 1500)
    v = f.vnet
    assert v.needs_csum and v.csum_start == 14 + (40 if v6 else 20) and v.csum_offset == 16
    assert v.gso_size == 1500 - (40 if v6 else 20) - 20 and v.hdr_len == v.csum_start + 20
    assert v.gso_type == (VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4)
    p = Packet(f)
    assert p.tcp.partial and p.verify_checksums()
    segs = complete_offloads(f)
    assert all(len(s.data) <= 1514 for s in segs)
    assert b"".join(bytes(Ether(bytes(s.data))[TCP].payload) for s in segs) == payload
    small = Frame(bytes(E / IP() / TCP()))
    assert prepare_offloads(small).vnet is None
    with pytest.raises(PacketError):
        prepare_offloads(Frame(bytes(E / IP() / UDP() / Raw(b"x" * 3000))))


def test_push_pop_vlan_keep_vnet_consistent() -> None:
    f, payload = gso_frame(False, 4000)
    start, hdr = f.vnet.csum_start, f.vnet.hdr_len
    push_vlan(f, 42, pcp=3)
    assert (f.vnet.csum_start, f.vnet.hdr_len) == (start + 4, hdr + 4)
    p = Packet(f)
    assert p.vlan_tags[0].vid == 42 and p.vlan_tags[0].pcp == 3 and p.tcp.partial
    segs = complete_offloads(f.copy())
    assert b"".join(bytes(Ether(bytes(s.data))[TCP].payload) for s in segs) == payload
    assert pop_vlan(f).vid == 42
    assert (f.vnet.csum_start, f.vnet.hdr_len) == (start, hdr)
    with pytest.raises(PacketError):
        pop_vlan(f)


def test_prepare_offloads_csum_marks_unfinished_checksums_for_the_kernel():
    """A plain TCP/UDP frame with a wrong checksum (as libpcap shows frames of an interface
    with checksum offload) gets NEEDS_CSUM; completing it gives the right checksum."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    from vtl.frame import Frame
    from vtl.packet.offload import complete_offloads, prepare_offloads

    for l4, off in ((TCP(sport=1, dport=2, flags="PA"), 16), (UDP(sport=1, dport=2), 6)):
        good = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / l4 / (b"x" * 300))
        bad = bytearray(good)
        bad[34 + off] ^= 0x5A  # spoil the checksum
        frame = prepare_offloads(Frame(bad), 1500, csum=True)
        assert frame.vnet is not None and frame.vnet.needs_csum and not frame.vnet.is_gso
        assert (frame.vnet.csum_start, frame.vnet.csum_offset) == (34, off)
        (done,) = complete_offloads(frame)
        assert bytes(done.data) == good
