"""pep, sans-IO: the guest's segments in, frames toward the guest and stream calls out."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, Ether
from vtl.services.pep import Pep, PepOptions

from vtl import CONSUMED, DROP, PASS, Direction, Frame
from vtl.packet.offload import complete_offloads
from vtl.testing import FakeContext

G_MAC, R_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
G_IP, R_IP = "10.0.0.1", "10.0.0.2"
UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST


def seg(flags: str, seq: int = 1000, ack: int = 0, data: bytes = b"", sport: int = 40000,
        dport: int = 80, src: str = G_IP, dst: str = R_IP) -> Frame:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)] \
        if flags == "S" else []
    return Frame(bytes(Ether(src=G_MAC, dst=R_MAC) / IP(src=src, dst=dst) /
                       TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                           window=65535, options=opts) / data))


def to_guest(ctx: FakeContext) -> list[Ether]:
    """Everything emitted toward the guest so far, as wire segments, then forgotten."""
    out = []
    for frame, direction in ctx.emitted:
        assert direction is DOWN
        out += [Ether(bytes(s.data)) for s in complete_offloads(frame.copy())]
    ctx.emitted.clear()
    return out


def make(**options: object) -> tuple[Pep, FakeContext]:
    ctx = FakeContext("pep")
    return Pep(PepOptions(**options), ctx), ctx


def handshake(pep: Pep, ctx: FakeContext) -> tuple[int, int]:
    """SYN, upstream connects, SYN-ACK, ACK: returns (guest's next seq, pep's next seq)."""
    assert pep.process(seg("S"), UP, 0.0) is CONSUMED
    assert ctx.emitted == []  # no answer before the upstream is connected
    stream = ctx.streams[0]
    assert (stream.request.kind, stream.request.host, stream.request.port) == ("tcp", R_IP, 80)
    stream.connect()
    [synack] = to_guest(ctx)
    t = synack[TCP]
    assert t.flags == "SA" and t.ack == 1001
    assert (synack[IP].src, synack[Ether].src, t.sport) == (R_IP, R_MAC, 80)
    opts = dict(t.options)
    assert opts["MSS"] == 1460 and "SAckOK" in opts and "WScale" in opts
    assert pep.process(seg("A", 1001, t.seq + 1), UP, 0.01) is CONSUMED
    return 1001, t.seq + 1


def test_bytes_flow_both_ways_and_fin_follows_the_data() -> None:
    pep, ctx = make()
    gseq, pseq = handshake(pep, ctx)
    stream = ctx.streams[0]
    assert pep.process(seg("PA", gseq, pseq, b"GET / HTTP/1.0\r\n\r\n"), UP, 0.02) is CONSUMED
    assert bytes(stream.written) == b"GET / HTTP/1.0\r\n\r\n"
    [ack] = to_guest(ctx)
    assert ack[TCP].ack == gseq + 18
    body = bytes(range(256)) * 40
    stream.data(body)
    stream.end()
    got = to_guest(ctx)
    payload = b"".join(bytes(p[TCP].payload) for p in got)
    assert payload == body
    assert got[-1][TCP].flags.F  # FIN after the last byte
    assert pep.report(0.0)["connections_active"] == 1


def test_congestion_goes_with_the_host_connection_and_only_when_set() -> None:
    pep, ctx = make()
    pep.process(seg("S"), UP, 0.0)
    assert "congestion" not in ctx.streams[0].request.options  # the kernel's default
    pep, ctx = make(congestion="bbr")
    pep.process(seg("S"), UP, 0.0)
    assert ctx.streams[0].request.options == {"congestion": "bbr"}
    assert pep.tunable == {"congestion"}


def test_refused_upstream_resets_the_guest() -> None:
    pep, ctx = make()
    pep.process(seg("S"), UP, 0.0)
    ctx.streams[0].closed("refused", "connection refused")
    [rst] = to_guest(ctx)
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 1001
    assert ctx.extra("connections_refused") == 1
    assert pep.report(0.0)["connections_active"] == 0


@pytest.mark.parametrize("reason", ["timeout", "unreachable"])
def test_unreachable_upstream_gets_icmp(reason: str) -> None:
    pep, ctx = make()
    pep.process(seg("S"), UP, 0.0)
    ctx.streams[0].closed(reason)
    [err] = to_guest(ctx)
    assert err[ICMP].type == 3 and err[ICMP].code == 1
    assert err[IP].src == R_IP and err[IP].dst == G_IP


def test_upstream_reset_after_connect_resets_the_guest() -> None:
    pep, ctx = make()
    handshake(pep, ctx)
    ctx.streams[0].closed("reset")
    [rst] = to_guest(ctx)
    assert rst[TCP].flags.R


def test_guest_reset_aborts_the_stream() -> None:
    pep, ctx = make()
    gseq, pseq = handshake(pep, ctx)
    pep.process(seg("R", gseq), UP, 0.1)
    assert ctx.streams[0].local == "abort"


def test_other_frames_pass_and_the_split_flow_is_dropped_from_the_uplink() -> None:
    pep, ctx = make()
    # an established connection pep never saw open: left alone
    assert pep.process(seg("A", 5, 6, sport=41000), UP, 0.0) is PASS
    udp = Frame(bytes(Ether(src=G_MAC, dst=R_MAC) / IP(src=G_IP, dst=R_IP) / ICMP()))
    assert pep.process(udp, UP, 0.0) is PASS
    handshake(pep, ctx)
    back = Frame(bytes(Ether(src=R_MAC, dst=G_MAC) / IP(src=R_IP, dst=G_IP) /
                       TCP(sport=80, dport=40000, flags="A")))
    assert pep.process(back, DOWN, 0.2) is DROP


def test_connections_over_the_limit_are_reset() -> None:
    pep, ctx = make(max_connections=1)
    pep.process(seg("S"), UP, 0.0)
    pep.process(seg("S", sport=40001), UP, 0.0)
    assert len(ctx.streams) == 1
    [rst] = to_guest(ctx)
    assert rst[TCP].flags.R and rst[TCP].dport == 40001
    assert ctx.extra("over_limit") == 1


def test_stray_segments_after_close_get_a_reset_not_the_uplink() -> None:
    pep, ctx = make()
    gseq, pseq = handshake(pep, ctx)
    pep.process(seg("R", gseq), UP, 0.1)
    ctx.deliver_local_closes()
    assert pep.report(0.0)["connections_active"] == 0
    assert pep.process(seg("A", gseq, pseq), UP, 0.2) is CONSUMED
    [rst] = to_guest(ctx)
    assert rst[TCP].flags.R


def test_window_tracks_the_upstream() -> None:
    pep, ctx = make(buffer_bytes=64 * 1024)
    gseq, pseq = handshake(pep, ctx)
    stream = ctx.streams[0]
    stream.room = 0  # the upstream takes nothing
    chunk = b"x" * 1000
    windows = []
    for i in range(40):
        pep.process(seg("A", gseq + i * 1000, pseq, chunk), UP, 0.1)
        windows += [p[TCP].window for p in to_guest(ctx)]
    assert windows[-1] == 0  # 32 KB receive buffer full: the guest is told to stop
    assert pep.report(0.0)["buffered_bytes"] <= 32 * 1024 + 1000
    stream.writable()  # the upstream drains: bytes flow and the window reopens
    assert len(stream.written) >= 32 * 1024
    assert max(p[TCP].window for p in to_guest(ctx)) > 0


def test_a_connection_in_teardown_gives_its_slot_back() -> None:
    """A closing connection costs a small entry, not one of max_connections (20,000 short
    connections, 50 at a time, were refused as over_limit before)."""
    pep, ctx = make(max_connections=1)
    gseq, pseq = handshake(pep, ctx)
    stream = ctx.streams[0]
    stream.end()
    stream.closed("closed")
    [fin] = to_guest(ctx)
    assert fin[TCP].flags.F
    # the guest acknowledges our FIN: we are in FIN-WAIT-2, with nothing buffered
    assert pep.process(seg("A", gseq, pseq + 1), UP, 0.03) is CONSUMED
    rep = pep.report(0.03)
    assert (rep["connections_active"], rep["connections_closing"]) == (0, 1)
    assert pep.process(seg("S", sport=40001), UP, 0.04) is CONSUMED
    assert len(ctx.streams) == 2 and ctx.extra("over_limit") == 0
    # the first connection still finishes properly: the guest's FIN is acknowledged
    assert pep.process(seg("FA", gseq, pseq + 1), UP, 0.05) is CONSUMED
    [ack] = to_guest(ctx)
    assert ack[TCP].flags == "A" and ack[TCP].ack == gseq + 1
    assert pep.process(seg("S", sport=40002), UP, 0.06) is CONSUMED  # over the limit
    assert ctx.extra("over_limit") == 1
    [rst] = to_guest(ctx)
    assert rst[TCP].flags == "RA" and rst[TCP].dport == 40002


def test_a_destination_the_bridge_prohibits_gets_icmp_admin_prohibited() -> None:
    pep, ctx = make()
    pep.process(seg("S"), UP, 0.0)
    ctx.streams[0].closed("prohibited", "127.0.0.0/8 is loopback")
    [err] = to_guest(ctx)
    assert err[ICMP].type == 3 and err[ICMP].code == 13
    assert ctx.extra("connections_prohibited") == 1


def test_a_prohibited_ipv6_destination_gets_icmpv6_admin_prohibited() -> None:
    from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

    pep, ctx = make()
    syn = Frame(bytes(Ether(src=G_MAC, dst=R_MAC) / IPv6(src="fd00::1", dst="::1") /
                      TCP(sport=40000, dport=80, flags="S", seq=1000)))
    pep.process(syn, UP, 0.0)
    ctx.streams[0].closed("prohibited")
    [err] = to_guest(ctx)
    assert err[ICMPv6DestUnreach].code == 1 and err[IPv6].dst == "fd00::1"


def test_byte_counters_are_live_and_count_connections_open_at_stop() -> None:
    """An hour-long transfer must not show zero bytes for an hour, and a bridge stopping
    with the connection open must count what it moved."""
    pep, ctx = make()
    gseq, pseq = handshake(pep, ctx)
    stream = ctx.streams[0]
    pep.process(seg("PA", gseq, pseq, b"x" * 1000), UP, 0.02)
    assert ctx.extra("bytes_up") == 1000  # before the connection ends
    stream.data(b"y" * 3000)
    assert ctx.extra("bytes_down") == 3000
    pep.process(seg("PA", gseq + 1000, pseq, b"z" * 500), UP, 0.03)
    assert ctx.extra("bytes_up") == 1500
    pep.stop(0.04)  # still open: nothing more, nothing twice
    assert (ctx.extra("bytes_up"), ctx.extra("bytes_down")) == (1500, 3000)
    assert bytes(stream.written) == b"x" * 1000 + b"z" * 500
