"""Segments in and out: FlowAddrs, Segment.parse, SegmentWriter.build — scapy as the oracle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from vtl.models.tcp_segment import FlowAddrs, Segment, SegmentWriter

from vtl.errors import LocalProtocolError, PacketError
from vtl.frame import VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, Frame
from vtl.packet import build
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

M1, M2 = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
IP4 = (bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7]))
IP6 = (bytes.fromhex("20010db8000000000000000000000001"),
       bytes.fromhex("20010db8000000000000000000000abc"))
TAG = bytes.fromhex("8100002a")  # VLAN 42


def addrs(v6: bool, tags: bytes = b"") -> FlowAddrs:
    src, dst = IP6 if v6 else IP4
    return FlowAddrs(M1, M2, src, dst, 40000, 443, tags)


def plain(frame: Frame) -> list[Frame]:
    return complete_offloads(frame) if frame.vnet is not None else [frame]


def scapy_checked(frame: Frame) -> Ether:
    """scapy recomputes lengths and checksums and gets the same bytes."""
    assert frame.vnet is None
    raw = bytes(frame.data)
    s = Ether(raw)
    for layer, fields in ((IP, ("chksum", "len")), (IPv6, ("plen",)), (TCP, ("chksum",))):
        if layer in s:
            for f in fields:
                delattr(s[layer], f)
    assert bytes(s) == raw
    return Ether(raw)


# -- FlowAddrs ------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("tags", [b"", TAG])
def test_flow_addrs_of_a_packet(v6: bool, tags: bytes) -> None:
    a = addrs(v6, tags)
    raw = build.tcp_segment(a.src_mac, a.dst_mac, a.src_ip, a.dst_ip, a.sport, a.dport, 1, 2,
                            ACK, 100, tags=tags)
    assert FlowAddrs.of(Packet(raw)) == a
    r = a.reverse()
    assert (r.src_mac, r.dst_mac, r.src_ip, r.dst_ip, r.sport, r.dport, r.tags) == \
        (M2, M1, a.dst_ip, a.src_ip, 443, 40000, tags)
    assert r.reverse() == a
    assert a.v6 is v6
    assert a.key == (a.src_ip, 40000, a.dst_ip, 443)


def test_flow_addrs_of_a_non_tcp_packet() -> None:
    raw = build.udp_datagram(M1, M2, *IP4, 1, 2, b"x")
    with pytest.raises(PacketError):
        FlowAddrs.of(Packet(raw))
    with pytest.raises(PacketError):
        Segment.parse(Packet(raw))


# -- Segment.parse ----------------------------------------------------------------------------

flags_st = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)


@given(v6=st.booleans(), seq=u32, ack=u32, flags=flags_st, window=st.integers(0, 0xFFFF),
       payload=st.binary(max_size=300),
       opts=st.one_of(st.none(), st.builds(
           TcpOptions, mss=st.one_of(st.none(), st.integers(0, 0xFFFF)),
           wscale=st.one_of(st.none(), st.integers(0, 14)), sack_permitted=st.booleans(),
           timestamps=st.one_of(st.none(), st.tuples(u32, u32)))))
def test_parse_round_trip(v6: bool, seq: int, ack: int, flags: int, window: int,
                          payload: bytes, opts: TcpOptions | None) -> None:
    a = addrs(v6)
    raw = build.tcp_segment(a.src_mac, a.dst_mac, a.src_ip, a.dst_ip, a.sport, a.dport, seq,
                            ack, flags, window, opts, payload)
    seg = Segment.parse(Packet(raw))
    t = Ether(bytes(raw))[TCP]
    assert (seg.seq, seg.ack, seg.flags, seg.window) == (t.seq, t.ack, int(t.flags), t.window)
    assert bytes(seg.payload) == payload == bytes(t.payload)
    want = opts if opts is not None else TcpOptions()
    assert seg.options == want
    extra = (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
    assert seg.seg_len == len(payload) + extra
    assert repr(seg).startswith("Segment(")


def test_parse_malformed_options() -> None:
    a = addrs(False)
    raw = build.tcp_segment(a.src_mac, a.dst_mac, a.src_ip, a.dst_ip, 1, 2, 0, 0, ACK, 0,
                            bytes([8, 30, 0, 0]))  # a timestamp option claiming 30 bytes
    seg = Segment.parse(Packet(raw))
    with pytest.raises(PacketError):
        _ = seg.options


# -- SegmentWriter.build ----------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("tags", [b"", TAG])
def test_build_one_segment(v6: bool, offload: bool, tags: bytes) -> None:
    a = addrs(v6, tags)
    w = SegmentWriter(a, offload=offload, ttl=33)
    opts = TcpOptions(timestamps=(123, 456)).encode()
    frame = w.build(0xFFFFFFF0, 77, ACK | PSH, 1000, opts, b"hello world")
    assert (frame.vnet is not None) is offload
    if offload:
        assert frame.vnet is not None and frame.vnet.needs_csum and not frame.vnet.is_gso
        assert Packet(frame).verify_checksums()  # the partial sum is the pseudo-header's
    [wire] = plain(frame)
    s = scapy_checked(wire)
    if tags:
        assert s[Dot1Q].vlan == 42
    ip = s[IPv6] if v6 else s[IP]
    assert (ip.hlim if v6 else ip.ttl) == 33
    t = s[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, int(t.flags), t.window) == \
        (40000, 443, 0xFFFFFFF0, 77, ACK | PSH, 1000)
    assert bytes(t.payload) == b"hello world"
    assert TcpOptions.decode(bytes(t)[20:t.dataofs * 4]).timestamps == (123, 456)
    assert FlowAddrs.of(Packet(wire)) == a
    seg = Segment.parse(Packet(wire))
    assert (seg.seq, bytes(seg.payload)) == (0xFFFFFFF0, b"hello world")


@pytest.mark.parametrize("v6", [False, True])
def test_build_pure_flags(v6: bool) -> None:
    w = SegmentWriter(addrs(v6), offload=False)
    for flags in (ACK, FIN | ACK, RST, RST | ACK, SYN):
        t = scapy_checked(w.build(5, 6, flags, 0))[TCP]
        assert int(t.flags) == flags and bytes(t.payload) == b""


def test_ipv4_ids_advance() -> None:
    w = SegmentWriter(addrs(False), offload=False)
    ids = [Ether(bytes(w.build(1, 1, ACK, 1).data))[IP].id for _ in range(3)]
    assert ids == [1, 2, 3]


@pytest.mark.parametrize("v6", [False, True])
def test_gso_split(v6: bool) -> None:
    w = SegmentWriter(addrs(v6), offload=True)
    payload = bytes(range(256)) * 23  # 5888 bytes
    opts = TcpOptions(timestamps=(1, 2)).encode()
    frame = w.build(0xFFFFF000, 9, ACK | PSH, 500, opts, payload, mss=1448)
    v = frame.vnet
    assert v is not None and v.is_gso and v.gso_size == 1448
    assert v.gso_type == (VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4)
    wire = complete_offloads(frame)
    assert [len(Ether(bytes(f.data))[TCP].payload) for f in wire] == [1448] * 4 + [96]
    seqs = [Ether(bytes(f.data))[TCP].seq for f in wire]
    assert seqs == [(0xFFFFF000 + 1448 * i) & 0xFFFFFFFF for i in range(5)]
    got = b""
    for i, f in enumerate(wire):
        t = scapy_checked(f)[TCP]
        assert bool(int(t.flags) & PSH) is (i == len(wire) - 1)
        assert TcpOptions.decode(bytes(t)[20:t.dataofs * 4]).timestamps == (1, 2)
        got += bytes(t.payload)
    assert got == payload


def test_no_gso_without_mss_or_offload() -> None:
    big = b"x" * 3000
    assert SegmentWriter(addrs(False), offload=True).build(1, 1, ACK, 1, b"", big).vnet \
        .gso_size == 0  # type: ignore[union-attr]
    frame = SegmentWriter(addrs(False), offload=False).build(1, 1, ACK, 1, b"", big, mss=1000)
    assert frame.vnet is None and len(Ether(bytes(frame.data))[TCP].payload) == 3000


def test_writer_refuses_mixed_families() -> None:
    with pytest.raises(LocalProtocolError):
        SegmentWriter(FlowAddrs(M1, M2, IP4[0], IP6[1], 1, 2))
    with pytest.raises(LocalProtocolError):
        SegmentWriter(FlowAddrs(M1, M2, b"\x01\x02", b"\x03\x04", 1, 2))
