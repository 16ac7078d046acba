"""keepalive, sans-IO: live tracking, the hold's answers as the guest, ARP/ND for the
guest, custody byte and wake-up at release, QMP events, bounds and hostile frames."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether
from vtl.services.keepalive import Keepalive
from vtl.services.keepalive.conn import Seg

from vtl import CONSUMED, DROP, PASS, Direction, Frame
from vtl.errors import PacketError, RemoteProtocolError
from vtl.packet import build
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN
from vtl.testing import ServiceHarness

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
G_MAC, P_MAC = "52:54:00:00:00:02", "02:00:00:00:00:01"
G_IP, P_IP = "10.0.0.2", "10.0.0.1"
G6, P6 = "fd00::2", "fd00::1"
GPORT, PPORT = 40000, 5001


def seg(from_guest: bool, seq: int, ack: int, flags: int = ACK, payload: bytes = b"",
        ts: tuple[int, int] | None = (1000, 500), window: int = 502, v6: bool = False,
        gport: int = GPORT) -> Frame:
    g, p = (G6, P6) if v6 else (G_IP, P_IP)
    options = [("Timestamp", ts)] if ts is not None else None
    if from_guest:
        data = build.tcp_segment(G_MAC, P_MAC, g, p, gport, PPORT, seq, ack, flags, window,
                                 options, payload)
    else:
        data = build.tcp_segment(P_MAC, G_MAC, p, g, PPORT, gport, seq, ack, flags, window,
                                 options, payload)
    return Frame(data)


def harness(**opts: object) -> ServiceHarness[Keepalive]:
    h = ServiceHarness(Keepalive, **opts)
    h.start(0.0)
    return h


def established(h: ServiceHarness[Keepalive], now: float = 1.0, **kw: object) -> None:
    """The guest (seq 1000...) and the peer (seq 5000...) have exchanged some data: the
    guest last sent 100 bytes at 1100 acknowledging 5300, with TSval 7777."""
    assert h.send(seg(True, 1000, 5000, ACK | PSH, b"x" * 100, ts=(7770, 300), **kw), UP,
                  now) is PASS
    assert h.send(seg(False, 5000, 1100, ACK | PSH, b"y" * 300, ts=(301, 7770), **kw), DOWN,
                  now) is PASS
    assert h.send(seg(True, 1100, 5300, ACK, ts=(7777, 301), **kw), UP, now) is PASS
    h.take()


def answer_of(h: ServiceHarness[Keepalive]) -> TCP:
    [out] = h.take(UP)
    assert out.injected
    return Ether(bytes(out.frame.data))[TCP]


def ts_of(tcp: TCP) -> tuple[int, int]:
    return dict(tcp.options)["Timestamp"]


# -- live -------------------------------------------------------------------------------

def test_live_frames_pass_untouched_and_connections_are_tracked():
    h = harness()
    established(h)
    assert h.report(2.0)["tracked"] == 1 and h.report(2.0)["state"] == "live"
    assert h.out == [] or all(not o.injected for o in h.out)
    # picked up mid-stream: a connection open before the bridge started
    h.send(seg(False, 9000, 3000, gport=40001), DOWN, 2.0)
    h.send(seg(True, 3000, 9000, gport=40001), UP, 2.0)
    assert h.report(2.5)["tracked"] == 2


# -- hold -------------------------------------------------------------------------------

def test_hold_answers_the_peer_as_the_guest_with_window_0_and_the_guests_timestamps():
    h = harness()
    established(h)
    assert h.service.act("hold", 2.0)["state"] == "holding"
    # the peer sends more data: 5300..6748
    assert h.send(seg(False, 5300, 1100, ACK | PSH, b"abcdefgh" * 181, ts=(900, 7777)), DOWN,
                  2.1) is CONSUMED
    a = answer_of(h)
    assert (a.sport, a.dport) == (GPORT, PPORT)
    assert a.seq == 1100, "the guest's next sequence number"
    assert a.ack == 5301, "what the guest acknowledged, and the custody byte"
    assert a.window == 0 and a.flags == "A"
    assert ts_of(a) == (7777, 301), "the guest's own TSval and TSecr, never advanced"
    assert h.service.conns.values()[0].custody == b"a"
    # the peer's persist probe (seq una-1 = 5300, no data): answered the same way
    assert h.send(seg(False, 5300, 1100, ts=(1400, 7777)), DOWN, 3.0) is CONSUMED
    a = answer_of(h)
    assert (a.seq, a.ack, a.window, ts_of(a)) == (1100, 5301, 0, (7777, 301))
    assert h.ctx.extra("answered") == 2 and h.ctx.extra("custody_bytes") == 1


def test_without_custody_the_guests_own_ack_and_keepalive_probes_are_answered():
    h = harness(custody=False)
    established(h)
    h.service.act("hold", 2.0)
    h.send(seg(False, 5299, 1100, ts=(500, 7777)), DOWN, 2.5)  # a keep-alive probe
    a = answer_of(h)
    assert (a.seq, a.ack, a.window) == (1100, 5300, 0)
    assert h.send(seg(False, 5300, 1100, ts=(501, 7777)), DOWN, 2.6) is DROP, \
        "a pure ACK at the expected sequence needs no answer"
    assert h.take() == []


def test_hold_answers_arp_and_neighbour_solicitation_for_the_guest():
    h = harness()
    h.send(Frame(build.arp_request(G_MAC, G_IP, P_IP)), UP, 0.5)
    established(h)
    h.send(seg(True, 1, 1, v6=True, gport=40002), UP, 1.0)
    h.take()
    h.service.act("hold", 2.0)
    assert h.send(Frame(build.arp_request(P_MAC, P_IP, G_IP)), DOWN, 2.1) is CONSUMED
    [reply] = h.take(UP)
    arp = Ether(bytes(reply.frame.data))[ARP]
    assert (arp.op, arp.psrc, arp.hwsrc, arp.pdst) == (2, G_IP, G_MAC, P_IP)
    ns = Ether(dst="33:33:ff:00:00:02", src=P_MAC) / IPv6(src=P6, dst="ff02::1:ff00:2") / \
        ICMPv6ND_NS(tgt=G6)
    assert h.send(Frame(bytes(ns)), DOWN, 2.2) is CONSUMED
    [na] = h.take(UP)
    pkt = Ether(bytes(na.frame.data))
    assert pkt[ICMPv6ND_NA].tgt == G6 and pkt[ICMPv6NDOptDstLLAddr].lladdr == G_MAC
    # an ARP for an address that is not the guest's is held back, not answered
    assert h.send(Frame(build.arp_request(P_MAC, P_IP, "10.0.0.99")), DOWN, 2.3) is DROP
    assert h.report(3.0)["addresses"] == 2


@pytest.mark.parametrize("policy", ["drop", "reset"])
def test_a_syn_toward_the_held_guest_is_dropped_or_reset(policy):
    h = harness(hold_syn=policy)
    h.service.act("hold", 1.0)
    assert h.send(seg(False, 77, 0, SYN, ts=None, gport=80), DOWN, 1.1) is DROP
    out = h.take(UP)
    if policy == "drop":
        assert out == [] and h.ctx.extra("syn_dropped") == 1
    else:
        [rst] = out
        t = Ether(bytes(rst.frame.data))[TCP]
        assert t.flags.R and t.ack == 78 and h.ctx.extra("syn_reset") == 1


def test_everything_else_toward_the_held_guest_is_dropped_and_counted():
    h = harness()
    established(h)
    h.service.act("hold", 2.0)
    udp = build.udp_datagram(P_MAC, G_MAC, P_IP, G_IP, 53, 5353, b"q")
    assert h.send(Frame(udp), DOWN, 2.1) is DROP
    assert h.send(seg(False, 1, 1, gport=41000), DOWN, 2.2) is DROP, "an unknown connection"
    assert h.ctx.extra("held_dropped") == 2
    assert h.send(Frame(build.udp_datagram(G_MAC, P_MAC, G_IP, P_IP, 5353, 53, b"a")), UP,
                  2.3) is PASS, "what the guest sends still goes out"


def test_answers_are_rate_limited_per_connection():
    h = harness(answers_per_s=5)
    established(h)
    h.service.act("hold", 2.0)
    for i in range(20):
        h.send(seg(False, 5299, 1100, ts=(600 + i, 7777)), DOWN, 2.0 + i * 0.01)
    assert len(h.take(UP)) == 5 and h.ctx.extra("answers_limited") == 15


# -- release ----------------------------------------------------------------------------

def test_release_delivers_the_custody_byte_as_the_peer_sent_it():
    h = harness()
    established(h)
    h.service.act("hold", 2.0)
    h.send(seg(False, 5300, 1100, ACK | PSH, b"Zabc", ts=(900, 7777)), DOWN, 2.1)
    h.send(seg(False, 5300, 1100, ts=(1900, 7777)), DOWN, 60.0)  # a later persist probe
    h.take()
    result = h.service.act("release", 61.0)
    assert result["custody_delivered"] == 1 and result["replayed"] == 1
    assert result["state"] == "live"
    custody, replay = (Ether(bytes(o.frame.data))[TCP] for o in h.take(DOWN))
    assert (custody.sport, custody.dport, custody.seq, custody.ack) == (PPORT, GPORT, 5300, 1100)
    assert bytes(custody.payload) == b"Z" and custody.window == 502
    assert ts_of(custody) == (1900, 7777), "the peer's latest TSval, echoing the guest's"
    # then what the peer retransmitted beyond it: the guest acknowledges new data at once
    assert (replay.seq, bytes(replay.payload), ts_of(replay)) == (5301, b"abc", (1900, 7777))
    assert h.send(seg(False, 5301, 1100, ACK, b"bc", ts=(2000, 7777)), DOWN, 61.1) is PASS


def test_without_custody_the_last_retransmission_is_replayed_from_the_guests_ack():
    h = harness(custody=False)
    established(h)
    h.service.act("hold", 2.0)
    h.send(seg(False, 5200, 1100, ACK, b"o" * 100 + b"NEW", ts=(950, 7777)), DOWN, 3.0)
    h.take()
    assert h.service.act("release", 4.0)["replayed"] == 1
    [out] = h.take(DOWN)
    t = Ether(bytes(out.frame.data))[TCP]
    assert (t.seq, bytes(t.payload)) == (5300, b"NEW"), "from the guest's next byte on"


def test_replay_is_bounded_per_connection_and_altogether(monkeypatch):
    from vtl.services.keepalive import service as ka

    monkeypatch.setattr(ka, "REPLAY_BUDGET", 7000)
    h = harness(custody=False)
    for i in range(3):
        h.send(seg(True, 1000, 5000, gport=30000 + i), UP, 1.0)
    h.service.act("hold", 2.0)
    for i in range(3):
        h.send(seg(False, 5000, 1000, ACK, b"p" * 3000, gport=30000 + i), DOWN, 2.1)
    assert h.service.replay_bytes == 6000 and h.ctx.extra("replay_over_budget") == 1
    monkeypatch.setattr(ka, "REPLAY_BUDGET", 1 << 20)
    h.send(seg(False, 5000, 1000, ACK, b"q" * 20000, gport=30000), DOWN, 2.2)
    assert h.service.replay_bytes == 3000 + ka.REPLAY_MAX, "at most REPLAY_MAX a connection"
    h.service.act("release", 3.0)
    assert h.service.replay_bytes == 0


def test_release_wakes_a_connection_answered_without_custody():
    h = harness()
    established(h)
    h.service.act("hold", 2.0)
    h.send(seg(False, 5299, 1100, ts=(950, 7777)), DOWN, 9.0)  # keep-alive probe
    h.take()
    assert h.service.act("release", 10.0)["woken"] == 1
    [out] = h.take(DOWN)
    t = Ether(bytes(out.frame.data))[TCP]
    assert (t.seq, t.ack, len(t.payload)) == (5299, 1100, 0), "one below what the guest expects"


def test_qmp_events_hold_and_release():
    h = harness(qmp="/run/vtl/vm.qmp")
    [watch] = h.ctx.watches
    assert watch.path == "/run/vtl/vm.qmp"
    established(h)
    watch.event("connected", 1.5)
    watch.event("status", 1.5, running=True, status="running")
    assert h.report(1.6)["state"] == "live" and h.report(1.6)["qmp_connected"]
    watch.event("STOP", 2.0)
    assert h.report(2.5)["state"] == "holding"
    watch.event("disconnected", 3.0)  # the source QEMU quit after migrating to a file
    watch.event("connected", 4.0)  # the restored QEMU, paused until `cont`
    watch.event("status", 4.0, running=False, status="inmigrate")
    assert h.report(4.5)["state"] == "holding"
    watch.event("RESUME", 5.0)
    rep = h.report(5.5)
    assert rep["state"] == "live" and rep["vm_status"] == "running"
    assert h.ctx.extra("holds") == 1 and h.ctx.extra("releases") == 1


def test_closed_connections_are_not_answered_and_are_forgotten_soon():
    h = harness(closed_timeout_s=5.0)
    established(h)
    h.send(seg(True, 1100, 5300, ACK | FIN), UP, 2.0)
    h.send(seg(False, 5300, 1101, ACK | FIN), DOWN, 2.0)
    h.service.act("hold", 3.0)
    assert h.send(seg(False, 5300, 1101, ts=(2, 2)), DOWN, 3.1) is DROP
    h.advance(9.0)
    assert h.report(9.0)["tracked"] == 0


def test_tracked_connections_are_bounded():
    h = harness(max_connections=50)
    for i in range(500):
        h.send(seg(True, 1, 1, gport=20000 + i), UP, 1.0 + i * 0.001)
    assert h.report(2.0)["tracked"] == 50 and h.ctx.extra("evicted") == 450


def test_mutated_frames_never_raise_anything_but_packet_errors():
    rng = random.Random(5)
    h = harness()
    established(h)
    base = [seg(False, 5300, 1100, ACK | PSH, b"data"), seg(True, 1100, 5300),
            Frame(build.arp_request(P_MAC, P_IP, G_IP)),
            seg(False, 5300, 1100, RST, ts=None)]
    for holding in (False, True):
        if holding:
            h.service.act("hold", 2.0)
        for _ in range(3000):
            data = bytearray(rng.choice(base).data)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[:rng.randrange(14, len(data) + 1)]
            try:
                h.send(Frame(data), rng.choice((UP, DOWN)), 2.0)
            except (PacketError, RemoteProtocolError):
                pass
    assert h.report(3.0)["tracked"] <= 6100


def test_seg_parses_what_it_copied():
    frame = seg(True, 0xFFFFFFF0, 7, ACK | FIN, b"abc", ts=(1, 2))
    raw = bytes(frame.data)[34:34 + 32]
    s = Seg.parse(raw, 3)
    assert (s.seq, s.ack, s.flags, s.ts, s.end) == (0xFFFFFFF0, 7, ACK | FIN, (1, 2),
                                                      0xFFFFFFF4)


def test_the_hand_parser_agrees_with_packet():
    from vtl.services.keepalive.service import packet_fields, tcp_fields

    from vtl import Packet

    rng = random.Random(9)
    for i in range(300):
        v6 = i % 3 == 0
        payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 5, 1400))))
        f = seg(bool(i % 2), rng.getrandbits(32), rng.getrandbits(32), ACK | PSH, payload,
                ts=None if i % 5 == 0 else (rng.getrandbits(32), rng.getrandbits(32)), v6=v6,
                gport=rng.randrange(1, 65536))
        assert tcp_fields(f.data) == packet_fields(Packet(f))
    short = seg(True, 1, 2, ACK, ts=None)  # 54 bytes, padded to 60 on the wire
    padded = Frame(bytes(short.data) + bytes(6))
    assert tcp_fields(padded.data)[-1] == 0, "the IP length, not the padding"
    udp = Frame(build.udp_datagram(G_MAC, P_MAC, G_IP, P_IP, 1, 2, b"x" * 40))
    assert tcp_fields(udp.data) is None


def test_the_hot_path_keeps_what_the_general_path_keeps():
    h = harness()
    established(h)  # the connection is known: later segments take the hot path
    h.send(seg(True, 1100, 5300, ACK | PSH, b"z" * 700, ts=(8000, 302)), UP, 1.2)
    h.send(seg(False, 5300, 1800, ACK, ts=(303, 8000), window=77), DOWN, 1.3)
    conn = h.service.conns.values()[0]
    g, p = conn.guest(), conn.peer()
    assert (g.seq, g.ack, g.length, g.ts, g.end) == (1100, 5300, 700, (8000, 302), 1800)
    assert (p.seq, p.ack, p.window, p.ts, p.length) == (5300, 1800, 77, (303, 8000), 0)
    assert len(h.service.fast) == 2
    h.advance(20000.0)  # idle past the timeout: forgotten, from both indexes
    assert len(h.service.conns) == 0 and h.service.fast == {}


def test_a_connection_the_peer_opened_is_answered_too():
    """The peer's SYN makes the entry; the guest's segments within the same second must
    still leave their link header for the hold's answers (found with a real VM)."""
    h = harness()
    assert h.send(seg(False, 4999, 0, SYN, ts=(1, 0)), DOWN, 1.0) is PASS
    assert h.send(seg(True, 999, 5000, SYN | ACK, ts=(7000, 1)), UP, 1.01) is PASS
    h.send(seg(False, 5000, 1000, ACK | PSH, b"hello", ts=(2, 7000)), DOWN, 1.02)
    h.send(seg(True, 1000, 5005, ACK | PSH, b"hello", ts=(7001, 2)), UP, 1.03)
    h.take()
    h.service.act("hold", 1.1)
    assert h.send(seg(False, 5005, 1005, ACK | PSH, b"more", ts=(3, 7001)), DOWN,
                  1.2) is CONSUMED
    a = answer_of(h)
    assert (a.seq, a.ack, a.window, ts_of(a)) == (1005, 5006, 0, (7001, 2))
    assert h.ctx.counters.errors == 0


def test_a_hold_pins_the_guests_macs_and_a_release_unpins_them_later():
    h = harness()
    established(h)
    h.service.act("hold", 2.0)
    assert h.ctx.pins == {bytes.fromhex(G_MAC.replace(":", "")): None}
    h.service.act("release", 700.0)
    assert h.ctx.pins == {bytes.fromhex(G_MAC.replace(":", "")): 730.0}
