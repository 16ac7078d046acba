"""capture: frames pass unchanged and land in a pcap file."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from scapy.utils import rdpcap
from services_fakes import FakeContext, MemorySink, udp_frame
from vtl.services.capture import Capture, CaptureOptions

from vtl import PASS, Direction, Frame, VnetHeader
from vtl.frame import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4

UP = Direction.TO_UPLINK
DOWN = Direction.TO_GUEST


def make(ctx: FakeContext, **opts: object) -> Capture:
    svc = Capture(CaptureOptions(**opts), ctx)
    svc.start(0.0)
    return svc


def test_writes_every_frame_and_passes_it_unchanged():
    ctx = FakeContext("capture")
    svc = make(ctx, path="a.pcap")
    frames = [udp_frame(60 + i, sport=1000 + i) for i in range(5)]
    for i, f in enumerate(frames):
        before = bytes(f.data)
        assert svc.process(f, UP if i % 2 else DOWN, 10.0 + i) is PASS
        assert bytes(f.data) == before
    sink = ctx.sinks["a.pcap"]
    assert isinstance(sink, MemorySink)
    assert sink.records == [(bytes(f.data), 10.0 + i) for i, f in enumerate(frames)]
    assert svc.report() == {"path": "a.pcap", "direction": "both", "frames_written": 5,
                            "bytes_written": sum(len(f) for f in frames)}
    svc.stop(20.0)
    assert sink.closed
    assert svc.process(udp_frame(), UP, 21.0) is PASS  # after stop: passes, writes nothing
    assert len(sink.records) == 5


@pytest.mark.parametrize(("direction", "kept"), [("to_uplink", UP), ("to_guest", DOWN)])
def test_direction_scoping(direction, kept):
    ctx = FakeContext("capture")
    svc = make(ctx, path="d.pcap", direction=direction)
    for d in (UP, DOWN, UP, DOWN):
        assert svc.process(udp_frame(), d, 0.0) is PASS
    assert len(ctx.sinks["d.pcap"].records) == 2
    assert svc.report()["frames_written"] == 2


def test_snaplen_cuts_records_not_frames():
    ctx = FakeContext("capture")
    svc = make(ctx, path="s.pcap", snaplen=64)
    f = udp_frame(1000)
    assert svc.process(f, UP, 0.0) is PASS
    assert len(f) == 1000
    assert ctx.sinks["s.pcap"].records[0][0] == bytes(f.data[:64])


def test_pcap_file_readable_by_scapy(tmp_path):
    ctx = FakeContext("capture", pcap_dir=tmp_path)
    svc = make(ctx, path="cap.pcap")
    frames = [udp_frame(42 + 37 * i, sport=2000 + i) for i in range(20)]
    # a GSO frame with a partial checksum is written as it is, 64 KB and all
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
                                 {"path": "x", "direction": "up"}, {"path": "x", "extra": 1}])
def test_invalid_options(bad):
    with pytest.raises(ValidationError):
        CaptureOptions(**bad)


def test_class_attributes():
    assert Capture.name == "capture" and Capture.Options is CaptureOptions
    assert all(f.description for f in CaptureOptions.model_fields.values())
