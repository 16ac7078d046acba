"""vtl.packet.gro: runs of one TCP flow's in-order segments become one GSO frame; nothing
else changes, order is kept, corrupted segments are left alone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from vtl import Frame
from vtl.packet.gro import MAX_MERGED, coalesce
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet, verify_checksums

MSS = 1400


def seg(seq: int, payload: bytes, flags: str = "A", v6: bool = False, sport: int = 5001,
        opts: list | None = None, ttl: int = 64) -> Frame:
    ip = IPv6(src="fd62::20", dst="fd61::10", hlim=ttl) if v6 else \
        IP(src="10.62.2.20", dst="10.61.1.10", ttl=ttl, id=seq & 0xFFFF, flags="DF")
    pkt = Ether(src="02:00:00:00:00:01", dst="52:54:00:00:00:02") / ip / \
        TCP(sport=sport, dport=40000, seq=seq, ack=7, flags=flags, window=500,
            options=opts if opts is not None else [("NOP", None), ("NOP", None),
                                                   ("Timestamp", (100, 50))]) / payload
    return Frame(bytearray(bytes(pkt)))


def stream(n: int, v6: bool = False, start: int = 1000) -> tuple[list[Frame], bytes]:
    data = bytes((i * 7) & 0xFF for i in range(n * MSS))
    return [seg(start + i * MSS, data[i * MSS:(i + 1) * MSS], v6=v6) for i in range(n)], data


def segments_of(frames: list[Frame]) -> list[Frame]:
    """What the guest's kernel would see: GSO frames cut back into wire segments."""
    out = []
    for f in frames:
        out += complete_offloads(Frame(bytearray(f.data), f.vnet))
    return out


def test_a_run_becomes_one_gso_frame_with_the_same_bytes() -> None:
    for v6 in (False, True):
        frames, data = stream(10, v6=v6)
        [merged] = coalesce(frames)
        v = merged.vnet
        assert v is not None and v.gso_size == MSS and v.needs_csum
        assert v.gso_type == (4 if v6 else 1)
        assert bytes(Ether(bytes(merged.data))[TCP].payload) == data
        again = segments_of([merged])
        assert [bytes(f.data)[-MSS:] for f in again] == [bytes(f.data)[-MSS:] for f in frames]
        assert all(verify_checksums(Packet(f)) for f in again)


def test_runs_break_on_gaps_other_flows_psh_short_segments_and_non_tcp() -> None:
    frames, _ = stream(4)
    other = seg(1, b"x" * MSS, sport=6000)
    udp = Frame(bytearray(bytes(Ether() / IP() / UDP() / b"u")))
    gap = seg(1000 + 6 * MSS, b"g" * MSS)
    psh = seg(1000 + 4 * MSS, b"p" * MSS, flags="PA")
    after_psh = seg(1000 + 5 * MSS, b"q" * MSS)
    out = coalesce(frames[:2] + [other] + frames[2:] + [psh, after_psh, udp, gap])
    kinds = [(f.vnet is not None, len(f.data)) for f in out]
    # run(0,1) | other | run(2,3,psh) | after_psh | udp | gap
    assert [k[0] for k in kinds] == [True, False, True, False, False, False]
    assert Ether(bytes(out[2].data))[TCP].flags == "PA"
    short = seg(1000 + 2 * MSS, b"s" * 100)
    out = coalesce(frames[:2] + [short, frames[2]])
    assert len(out) == 2 and out[1] is frames[2]  # nothing joins after a short segment
    ttl = seg(1000 + 2 * MSS, b"t" * MSS, ttl=3)
    assert len(coalesce(frames[:2] + [ttl])) == 2


def test_a_corrupted_segment_is_left_for_the_guest_to_drop() -> None:
    frames, _ = stream(3)
    frames[1].data[-1] ^= 0xFF
    out = coalesce(frames)
    assert len(out) == 3 and all(f.vnet is None for f in out)
    assert not verify_checksums(Packet(out[1]))


def test_frames_bigger_than_a_jumbo_frame_are_passed_unread() -> None:
    """A 64 KB frame read through pcap was coalesced by the sender's GRO: it is not a
    segment to merge, and its checksum (often unfinished) is not verified in Python."""
    big = [seg(1000, b"b" * 30000), seg(31000, b"b" * 30000)]
    out = coalesce(big)
    assert out == big and all(f.vnet is None for f in out)
    jumbo, _ = stream(2)
    assert len(coalesce(jumbo)) == 1  # wire-size ones still merge


def test_merged_frames_stay_under_the_ip_limit() -> None:
    frames, data = stream(60)
    out = coalesce(frames)
    assert all(len(f.data) - 14 <= MAX_MERGED for f in out) and len(out) == 2
    assert b"".join(bytes(Ether(bytes(f.data))[TCP].payload) for f in out) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=20))
def test_order_and_bytes_are_kept_whatever_the_mix(picks: list[tuple[int, int]]) -> None:
    flows = {k: 1000 for k in range(3)}
    frames = []
    for flow, kind in picks:
        if kind == 3:
            frames.append(Frame(bytearray(bytes(Ether() / IP() / UDP(sport=flow) / b"u"))))
            continue
        size = MSS if kind else 10
        frames.append(seg(flows[flow % 3], bytes([flow]) * size, sport=5000 + flow % 3))
        flows[flow % 3] += size
    before = [bytes(f.data) for f in segments_of([Frame(bytearray(f.data)) for f in frames])]
    after = [bytes(f.data) for f in segments_of(coalesce(frames))]
    strip = lambda b: (b[:18], b[26:38], b[54:])  # noqa: E731 - what must be equal
    assert [strip(b) for b in after] == [strip(b) for b in before]
