"""capture: frames pass unchanged and land in a pcap file."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from scapy.layers.inet import IP, TCP, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap
from vtl.services.capture import Capture, CaptureOptions

from vtl import PASS, Direction, Frame, VnetHeader
from vtl.frame import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4
from vtl.packet import Packet
from vtl.testing import FakeContext, MemorySink, ServiceHarness, udp_frame

UP = Direction.TO_UPLINK
DOWN = Direction.TO_GUEST


def make(ctx: FakeContext, **opts: object) -> Capture:
    svc = Capture(CaptureOptions(**opts), ctx)
    svc.start(0.0)
    return svc


def test_writes_every_frame_and_passes_it_unchanged():
    h = ServiceHarness(Capture, path="a.pcap")
    h.start(0.0)
    frames = [udp_frame(60 + i, sport=1000 + i) for i in range(5)]
    for i, f in enumerate(frames):
        before = bytes(f.data)
        assert h.send(f, UP if i % 2 else DOWN, 10.0 + i) is PASS
        [out] = h.take(UP if i % 2 else DOWN)
        assert out.frame is f and bytes(f.data) == before
    sink = h.ctx.sinks["a.pcap"]
    assert isinstance(sink, MemorySink)
    assert sink.records == [(bytes(f.data), 10.0 + i) for i, f in enumerate(frames)]
    assert h.report(15.0) == {"path": "a.pcap", "active": True, "direction": "both",
                              "frames_written": 5,
                              "bytes_written": sum(len(f) for f in frames)}
    assert h.emitted() == [] and h.counters.frames_out == 5
    h.stop(20.0)
    assert sink.closed
    svc = h.service
    assert svc.process(udp_frame(), UP, 21.0) is PASS  # after stop: passes, writes nothing
    assert len(sink.records) == 5


@pytest.mark.parametrize(("direction", "kept"), [("to_uplink", UP), ("to_guest", DOWN)])
def test_direction_scoping(direction, kept):
    h = ServiceHarness(Capture, path="d.pcap", direction=direction)
    h.start(0.0)
    for d in (UP, DOWN, UP, DOWN):
        assert h.send(udp_frame(), d, 0.0) is PASS
    assert len(h.ctx.sinks["d.pcap"].records) == 2
    assert h.report(0.0)["frames_written"] == 2


def test_snaplen_cuts_records_not_frames():
    ctx = FakeContext("capture")
    svc = make(ctx, path="s.pcap", snaplen=64)
    f = udp_frame(1000)
    assert svc.process(f, UP, 0.0) is PASS
    assert len(f) == 1000
    assert ctx.sinks["s.pcap"].records[0][0] == bytes(f.data[:64])


def test_pcap_file_readable_by_scapy(tmp_path):
    ctx = FakeContext("capture", pcap_dir=tmp_path)
    svc = make(ctx, path="cap.pcap", segment=False)
    frames = [udp_frame(42 + 37 * i, sport=2000 + i) for i in range(20)]
    # segment = false: a GSO frame with a partial checksum is written as it is, 64 KB and all
    gso = udp_frame(65000)
    gso.vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                          hdr_len=42, gso_size=1448, csum_start=34, csum_offset=6)
    frames.append(gso)
    for i, f in enumerate(frames):
        svc.process(f, UP, 100.0 + i * 0.25)
    svc.stop(200.0)
    pkts = rdpcap(str(tmp_path / "cap.pcap"))
    assert [bytes(p) for p in pkts] == [bytes(f.data) for f in frames]
    assert [float(p.time) for p in pkts] == pytest.approx([100.0 + i * 0.25 for i in range(21)])


def tcp_gso_frame(payload: bytes, mss: int = 1448, gso: bool = True) -> Frame:
    """A TCP/IPv4 frame as a guest kernel hands it over: partial checksum, maybe GSO."""
    s = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(
        src="10.0.0.1", dst="10.0.0.2", id=100) / TCP(
        sport=40000, dport=80, seq=1000, ack=1, flags="PA") / Raw(payload)
    raw = bytearray(bytes(s))
    t = Packet(raw).tcp
    assert t is not None
    vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                      gso_type=VIRTIO_NET_HDR_GSO_TCPV4 if gso else 0,
                      hdr_len=t.payload_offset if gso else 0, gso_size=mss if gso else 0,
                      csum_start=t.off, csum_offset=16)
    f = Frame(raw, vnet)
    Packet(f).fix_checksums()  # the pseudo-header sum only, as the guest leaves it
    return f


def tcp_checksum_ok(raw: bytes) -> bool:
    pkt = Ether(raw)
    again = pkt.copy()
    del again[TCP].chksum
    del again[IP].chksum
    again = Ether(bytes(again))
    return pkt[TCP].chksum == again[TCP].chksum and pkt[IP].chksum == again[IP].chksum


@pytest.mark.parametrize("scapy_file", [False, True])
def test_gso_tcp_frame_written_as_wire_segments(tmp_path, scapy_file):
    ctx = FakeContext("capture", pcap_dir=tmp_path if scapy_file else None)
    svc = make(ctx, path="seg.pcap")
    payload = bytes((i * 7 + 3) & 0xFF for i in range(20000))
    f = tcp_gso_frame(payload)
    before, vnet_before = bytes(f.data), f.vnet.pack()
    assert svc.process(f, UP, 5.0) is PASS
    assert bytes(f.data) == before and f.vnet.pack() == vnet_before  # passing frame untouched
    assert not tcp_checksum_ok(before)  # the raw frame's checksum is only partial
    svc.stop(6.0)
    if scapy_file:
        pkts = rdpcap(str(tmp_path / "seg.pcap"))
        raws = [bytes(p) for p in pkts]
        assert all(float(p.time) == pytest.approx(5.0) for p in pkts)
    else:
        raws = [r for r, _ in ctx.sinks["seg.pcap"].records]
    n = -(-len(payload) // 1448)
    assert len(raws) == n == svc.report(0.0)["frames_written"]
    assert svc.report(0.0)["bytes_written"] == sum(map(len, raws))
    got = b""
    seq = 1000
    for r in raws:
        assert tcp_checksum_ok(r)
        t = Ether(r)[TCP]
        assert t.seq == seq and len(t.payload) <= 1448
        seq += len(t.payload)
        got += bytes(t.payload)
    assert got == payload


def test_needs_csum_frame_written_with_finished_checksum_and_plain_frames_as_is():
    ctx = FakeContext("capture")
    svc = make(ctx, path="c.pcap")
    f = tcp_gso_frame(b"x" * 300, gso=False)
    before = bytes(f.data)
    svc.process(f, DOWN, 0.0)
    plain = udp_frame(80)
    plain.vnet = VnetHeader()  # asks nothing: written as it is
    svc.process(plain, DOWN, 0.0)
    (done, _), (p, _) = ctx.sinks["c.pcap"].records
    assert bytes(f.data) == before and f.vnet is not None and f.vnet.needs_csum
    assert not tcp_checksum_ok(before) and tcp_checksum_ok(done)
    assert len(done) == len(before) and done[:50] == before[:50] and done[52:] == before[52:]
    assert p == bytes(plain.data)


def test_snaplen_cuts_each_segment():
    ctx = FakeContext("capture")
    svc = make(ctx, path="c.pcap", snaplen=100)
    svc.process(tcp_gso_frame(bytes(5000)), UP, 0.0)
    assert [len(r) for r, _ in ctx.sinks["c.pcap"].records] == [100] * 4


def test_malformed_gso_frame_written_as_it_is():
    ctx = FakeContext("capture")
    svc = make(ctx, path="m.pcap")
    bad = udp_frame(3000)  # says TCP GSO, carries UDP: cannot be segmented
    bad.vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                          hdr_len=42, gso_size=1448, csum_start=34, csum_offset=6)
    assert svc.process(bad, UP, 0.0) is PASS
    assert ctx.sinks["m.pcap"].records == [(bytes(bad.data), 0.0)]


def test_with_the_bridge_sink_timestamps_become_wall_clock(tmp_path):
    from vtl.bridge.pcapfile import PcapSink

    class BridgeLikeContext(FakeContext):
        def open_pcap(self, path: str) -> PcapSink:
            return PcapSink(tmp_path / path)

    svc = make(BridgeLikeContext("capture"), path="b.pcap")
    f = Frame(bytes(udp_frame(80).data))
    svc.process(f, DOWN, time.monotonic())
    svc.stop(0.0)
    [pkt] = rdpcap(str(tmp_path / "b.pcap"))
    assert bytes(pkt) == bytes(f.data)
    assert abs(float(pkt.time) - time.time()) < 60


@pytest.mark.parametrize("bad", [{}, {"path": ""}, {"path": "x", "snaplen": 0},
                                 {"path": "x", "direction": "up"}, {"path": "x", "extra": 1},
                                 {"path": "x", "segment": "maybe"}])
def test_invalid_options(bad):
    with pytest.raises(ValidationError):
        CaptureOptions(**bad)


def test_class_attributes():
    assert Capture.name == "capture" and Capture.Options is CaptureOptions
    assert all(f.description for f in CaptureOptions.model_fields.values())
