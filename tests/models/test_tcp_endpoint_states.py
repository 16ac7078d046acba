"""The virtual TCP endpoint state by state (RFC 9293 3.3.2), driven by a scripted VM whose
segments are built with vtl.packet.build and whose view of the endpoint's output is scapy's:
opening both ways, every closing path, RST in every state (RFC 5961), half-close."""

from __future__ import annotations

import pytest
from models_tcplink import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Peer,
    active_established,
    events,
    kinds,
    passive_established,
    to_state,
)
from scapy.layers.inet import ICMP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet6 import ICMPv6DestUnreach
from scapy.layers.l2 import Ether
from vtl.models.tcp_endpoint import (
    Aborted,
    Closed,
    Connected,
    DataReady,
    EndpointConfig,
    PeerFinished,
    TcpEndpoint,
)
from vtl.models.tcp_state import TcpState

from vtl.errors import PacketError
from vtl.packet.packet import Packet

S = TcpState
CFG = EndpointConfig(offload=False)
NOW = 100.0
ISS = 1_000_000
M32 = 0xFFFFFFFF


def seq(n: int) -> int:
    return n & M32


# -- LISTEN: the VM's SYN held until accept() ---------------------------------------------------


def test_listen_holds_the_syn_silently():
    peer = Peer()
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    assert ep.state is S.LISTEN
    assert ep.outbox == [] and ep.events == [] and ep.poll_at() is None
    ep.receive(peer.syn(), NOW + 0.5)  # the VM retransmits its SYN meanwhile
    ep.receive(peer.syn(), NOW + 1.5)
    assert ep.state is S.LISTEN and ep.outbox == [] and ep.events == []


def test_listen_accept_answers_with_syn_ack_offering_what_the_vm_offered():
    peer = Peer(wscale=7, ts_start=4242)
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    ep.accept(NOW)
    [sa] = peer.take(ep)
    assert sa.flags == SYN | ACK and sa.seq == ISS and sa.ack == seq(peer.isn + 1)
    assert sa.window == 65535  # never scaled in a SYN (RFC 7323 2.2)
    o = sa.options
    assert o.mss == 1460 and o.wscale == CFG.wscale and o.sack_permitted
    assert o.timestamps is not None and o.timestamps[1] == 4242
    assert ep.state is S.SYN_RECEIVED and ep.poll_at() == NOW + CFG.rto_initial


def test_listen_accept_offers_nothing_the_vm_did_not():
    peer = Peer(wscale=None, sack=False, timestamps=False, mss=1000)
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    ep.accept(NOW)
    [sa] = peer.take(ep)
    o = sa.options
    assert o.wscale is None and not o.sack_permitted and o.timestamps is None
    ep.receive(peer.ack(), NOW)
    assert ep.tcb.mss == 1000 and not ep.tcb.ts_ok and not ep.tcb.sack_ok
    assert ep.send(b"x" * 3000, NOW) == 3000
    segs = peer.take(ep)
    assert [len(s.payload) for s in segs] == [1000, 1000, 1000]
    assert all(s.raw_options == b"" for s in segs)


@pytest.mark.parametrize("rst_seq", [0, 1])
def test_listen_rst_from_the_vm_abandons(rst_seq):
    peer = Peer()
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    ep.receive(peer.rst(seq=seq(peer.isn + rst_seq)), NOW)
    assert kinds(events(ep)) == [Aborted, Closed]
    assert ep.state is S.CLOSED and ep.outbox == []


def test_listen_rst_with_a_foreign_sequence_number_is_ignored():
    peer = Peer()
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    ep.receive(peer.rst(seq=seq(peer.isn + 100_000)), NOW)
    assert ep.state is S.LISTEN and ep.events == []


def test_listen_refuse_sends_rst():
    peer = Peer()
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    ep.refuse(NOW)
    [r] = peer.take(ep)
    assert r.flags == RST | ACK and r.ack == seq(peer.isn + 1)
    assert events(ep) == [Aborted("local"), Closed()]
    assert ep.state is S.CLOSED


@pytest.mark.parametrize("v6", [False, True])
def test_listen_unreachable_sends_icmp(v6):
    peer = Peer(v6=v6)
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    ep.unreachable(NOW)
    [f] = ep.outbox
    s = Ether(bytes(f.data))
    if v6:
        assert ICMPv6DestUnreach in s and s[ICMPv6DestUnreach].code == 3
    else:
        assert ICMP in s and s[ICMP].type == 3 and s[ICMP].code == 1
    assert events(ep) == [Aborted("local"), Closed()]


def test_passive_open_needs_a_plain_syn():
    peer = Peer()
    with pytest.raises(PacketError):
        TcpEndpoint.passive(peer.seg(SYN | ACK), CFG, NOW)
    with pytest.raises(PacketError):
        TcpEndpoint.passive(peer.ack(), CFG, NOW)


def test_listen_shutdown_and_send_before_accept_apply_after_the_handshake():
    peer = Peer()
    ep = TcpEndpoint.passive(peer.syn(), CFG, NOW, iss=ISS)
    assert ep.send(b"hello", NOW) == 5
    ep.shutdown(NOW)
    assert ep.outbox == []
    ep.accept(NOW)
    peer.ts_ok = True
    assert peer.take(ep)[0].syn
    ep.receive(peer.ack(), NOW)
    segs = peer.take(ep)
    assert segs[0].payload == b"hello" and segs[0].seq == ISS + 1
    assert any(s.fin for s in segs)
    assert ep.state is S.FIN_WAIT_1


# -- SYN-SENT: the endpoint opens toward the VM ---------------------------------------------------


def test_active_open_sends_a_full_syn():
    peer = Peer()
    ep = TcpEndpoint.active(peer.ep_addrs, CFG, NOW, iss=ISS)
    [syn] = peer.take(ep)
    assert syn.flags == SYN and syn.seq == ISS and syn.window == 65535
    o = syn.options
    assert o.mss == 1460 and o.wscale == 9 and o.sack_permitted and o.timestamps is not None
    assert ep.state is S.SYN_SENT and ep.poll_at() == NOW + 1.0


def test_syn_sent_syn_ack_establishes():
    ep, peer = active_established()
    assert ep.state is S.ESTABLISHED
    assert ep.tcb.snd_shift == peer.wscale and ep.tcb.rcv_shift == 9


def test_syn_sent_rst_with_the_right_ack_aborts():
    ep, peer = to_state("SYN_SENT")
    ep.receive(peer.rst(flags=ACK, seq=0, ack=ISS + 1), NOW)
    assert events(ep) == [Aborted("reset"), Closed()]


@pytest.mark.parametrize("ack", [ISS, ISS + 2, ISS + 100_000])
def test_syn_sent_rst_with_a_wrong_ack_is_ignored(ack):
    ep, peer = to_state("SYN_SENT")
    ep.receive(peer.rst(flags=ACK, seq=0, ack=ack), NOW)
    assert ep.state is S.SYN_SENT and ep.outbox == [] and ep.events == []


def test_syn_sent_rst_without_ack_is_ignored():
    ep, peer = to_state("SYN_SENT")
    ep.receive(peer.rst(seq=peer.isn), NOW)
    assert ep.state is S.SYN_SENT and ep.outbox == [] and ep.events == []


def test_syn_sent_bad_ack_is_answered_with_rst():
    ep, peer = to_state("SYN_SENT")
    ep.receive(peer.seg(SYN | ACK, seq=peer.isn, ack=ISS + 77, options=peer.syn_options()), NOW)
    [r] = peer.take(ep)
    assert r.rst and r.seq == ISS + 77
    assert ep.state is S.SYN_SENT


def test_syn_sent_segment_without_syn_is_ignored():
    ep, peer = to_state("SYN_SENT")
    ep.receive(peer.seg(ACK, seq=peer.isn, ack=ISS + 1), NOW)
    assert ep.state is S.SYN_SENT and ep.outbox == []


def test_simultaneous_open():
    """RFC 9293 figure 8: both ends send SYN; each answers the other's SYN with a SYN-ACK
    and the SYN-ACKs establish the connection."""
    ep, peer = to_state("SYN_SENT")
    peer.snd_nxt = peer.isn
    ep.receive(peer.seg(SYN, ack=0, options=peer.syn_options(), advance=True), NOW)
    assert ep.state is S.SYN_RECEIVED
    [sa] = peer.take(ep)
    assert sa.flags == SYN | ACK and sa.seq == ISS and sa.ack == seq(peer.isn + 1)
    # the VM's own SYN-ACK (its SYN again, now acknowledging ours)
    ep.receive(peer.seg(SYN | ACK, seq=peer.isn, ack=ISS + 1, options=peer.syn_options()), NOW)
    assert ep.state is S.ESTABLISHED
    assert Connected in kinds(events(ep))
    ep.receive(peer.data(b"both opened"), NOW)
    assert ep.read(100, NOW) == b"both opened"


def test_simultaneous_open_completed_by_ack():
    ep, peer = to_state("SYN_SENT")
    peer.snd_nxt = peer.isn
    ep.receive(peer.seg(SYN, ack=0, options=peer.syn_options(), advance=True), NOW)
    peer.take(ep)
    ep.receive(peer.ack(), NOW)
    assert ep.state is S.ESTABLISHED


def test_syn_sent_syn_retransmitted_with_backoff_then_timeout():
    ep, peer = to_state("SYN_SENT")
    times = []
    t = NOW
    while ep.state is S.SYN_SENT:
        t = ep.poll_at()
        assert t is not None
        ep.on_timer(t)
        for s in peer.take(ep):
            assert s.syn and s.seq == ISS
            times.append(t - NOW)
    assert times == [1, 3, 7, 15, 31]  # RTO 1 s doubling (RFC 6298 5.5), 5 retries
    assert events(ep) == [Aborted("timeout"), Closed()]
    assert t - NOW == 61  # the last wait is capped by rto_max (30 s)
    assert ep.poll_at() is None


# -- SYN-RECEIVED


def test_syn_received_retransmitted_syn_gets_the_syn_ack_again():
    ep, peer = to_state("SYN_RECEIVED")
    ep.receive(peer.syn(), NOW + 0.3)
    [sa] = peer.take(ep)
    assert sa.flags == SYN | ACK and sa.seq == ISS and sa.ack == seq(peer.isn + 1)
    assert ep.state is S.SYN_RECEIVED


def test_syn_received_bad_ack_is_answered_with_rst():
    ep, peer = to_state("SYN_RECEIVED")
    ep.receive(peer.ack(ack=ISS + 5000), NOW)
    [r] = peer.take(ep)
    assert r.rst and r.seq == ISS + 5000
    assert ep.state is S.SYN_RECEIVED


def test_syn_received_ack_with_data_establishes_and_delivers():
    ep, peer = to_state("SYN_RECEIVED")
    ep.receive(peer.data(b"GET / HTTP/1.0\r\n\r\n"), NOW)
    assert ep.state is S.ESTABLISHED
    assert kinds(events(ep)) == [Connected, DataReady]
    assert ep.read(100, NOW).startswith(b"GET /")
    [a] = peer.take(ep)
    assert a.ack == peer.snd_nxt


def test_syn_received_rst_aborts():
    ep, peer = to_state("SYN_RECEIVED")
    ep.receive(peer.rst(), NOW)
    assert events(ep) == [Aborted("reset"), Closed()]


def test_syn_received_syn_ack_retransmitted_then_timeout():
    ep, peer = to_state("SYN_RECEIVED")
    sent = []
    while ep.state is S.SYN_RECEIVED:
        t = ep.poll_at()
        ep.on_timer(t)
        sent += [(t - NOW, s) for s in peer.take(ep)]
    assert [t for t, s in sent if s.syn] == [1, 3, 7, 15, 31]
    assert sent[-1][1].rst
    assert events(ep) == [Aborted("timeout"), Closed()]


# -- ESTABLISHED -----------------------------------------------------------------------------------


def test_established_data_both_ways():
    ep, peer = passive_established()
    ep.receive(peer.data(b"ping"), NOW)
    assert kinds(events(ep)) == [DataReady]
    [a] = peer.take(ep)
    assert a.flags == ACK and a.ack == peer.snd_nxt and a.seq == ISS + 1
    assert ep.read(10, NOW) == b"ping"
    assert ep.send(b"pong", NOW) == 4
    [d] = peer.take(ep)
    assert d.payload == b"pong" and d.flags == ACK | PSH and d.seq == ISS + 1
    ep.receive(peer.ack(), NOW)
    assert ep.sbuf.una == 4 and ep.poll_at() is None


def test_established_out_of_order_data_is_sacked_and_reassembled():
    ep, peer = passive_established()
    base = peer.snd_nxt
    ep.receive(peer.data(b"B" * 100, seq=seq(base + 100)), NOW)
    ep.receive(peer.data(b"D" * 100, seq=seq(base + 300)), NOW)
    acks = peer.take(ep)
    assert all(a.ack == base for a in acks)
    assert acks[-1].options.sack_blocks == ((seq(base + 300), seq(base + 400)),
                                            (seq(base + 100), seq(base + 200)))
    assert ep.readable == 0
    ep.receive(peer.data(b"A" * 100, seq=base), NOW)
    ep.receive(peer.data(b"C" * 100, seq=seq(base + 200)), NOW)
    acks = peer.take(ep)
    assert acks[-1].ack == seq(base + 400) and acks[-1].options.sack_blocks == ()
    assert ep.read(1000, NOW) == b"A" * 100 + b"B" * 100 + b"C" * 100 + b"D" * 100


def test_established_duplicate_data_is_acked_not_delivered_twice():
    ep, peer = passive_established()
    base = peer.snd_nxt
    ep.receive(peer.data(b"once"), NOW)
    ep.receive(peer.data(b"once", seq=base), NOW)
    assert ep.read(100, NOW) == b"once"
    acks = peer.take(ep)
    assert len(acks) == 2 and all(a.ack == seq(base + 4) for a in acks)


def test_established_ack_for_unsent_data_is_answered_and_ignored():
    ep, peer = passive_established()
    ep.send(b"abc", NOW)
    peer.take(ep)
    ep.receive(peer.ack(ack=ISS + 1 + 1000), NOW)
    [a] = peer.take(ep)
    assert a.flags == ACK and a.seq == ISS + 4
    assert ep.sbuf.una == 0 and ep.state is S.ESTABLISHED


def test_established_segment_without_ack_flag_is_dropped():
    ep, peer = passive_established()
    ep.receive(peer.data(b"noack", flags=PSH), NOW)
    assert ep.readable == 0 and ep.events == []


def test_established_syn_gets_a_challenge_ack():
    ep, peer = passive_established()
    ep.receive(peer.seg(SYN, seq=seq(peer.snd_nxt + 10), options=peer.syn_options()), NOW)
    [a] = peer.take(ep)
    assert a.flags == ACK and a.ack == peer.snd_nxt
    assert ep.state is S.ESTABLISHED and ep.events == []


def test_established_abort_sends_rst_at_snd_nxt():
    ep, peer = passive_established()
    ep.send(b"x" * 5000, NOW)
    peer.take(ep)
    ep.abort(NOW)
    [r] = peer.take(ep)
    assert r.rst and r.seq == ISS + 1 + 5000 and r.ack == peer.snd_nxt
    assert events(ep) == [Aborted("local"), Closed()]
    assert ep.poll_at() is None


# -- RST in every synchronized state (RFC 9293 3.10.7.4, RFC 5961 3) ------------------------------

SYNCED = ["ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSE_WAIT", "CLOSING", "LAST_ACK"]


@pytest.mark.parametrize("state", SYNCED)
def test_rst_exact_sequence_aborts(state):
    ep, peer = to_state(state)
    ep.receive(peer.rst(), NOW)
    assert events(ep) == [Aborted("reset"), Closed()]
    assert ep.state is S.CLOSED and ep.outbox == [] and ep.poll_at() is None


@pytest.mark.parametrize("state", SYNCED)
@pytest.mark.parametrize("flags", [0, ACK])
def test_rst_in_window_but_inexact_gets_a_challenge_ack(state, flags):
    ep, peer = to_state(state)
    ep.receive(peer.rst(flags=flags, seq=seq(peer.snd_nxt + 1000)), NOW)
    assert ep.state.name == state and ep.events == []
    [a] = peer.take(ep)
    assert a.flags == ACK and a.ack == peer.snd_nxt


@pytest.mark.parametrize("state", SYNCED + ["TIME_WAIT"])
@pytest.mark.parametrize("off", [-1, -70_000, 1 << 21, 1 << 31])
def test_rst_out_of_window_is_ignored(state, off):
    ep, peer = to_state(state)
    ep.receive(peer.rst(seq=seq(peer.snd_nxt + off)), NOW)
    assert ep.state.name == state and ep.events == [] and ep.outbox == []


def test_rst_in_time_wait_is_ignored():
    """RFC 1337: no TIME-WAIT assassination."""
    ep, peer = to_state("TIME_WAIT")
    ep.receive(peer.rst(), NOW)
    assert ep.state is S.TIME_WAIT and ep.events == []


def test_rst_in_closed_is_ignored_and_other_segments_answered_with_rst():
    ep, peer = to_state("CLOSED")
    ep.receive(peer.rst(), NOW)
    assert ep.outbox == []
    ep.receive(peer.data(b"late"), NOW)
    [r] = peer.take(ep)
    assert r.rst and r.seq == ISS + 2  # what the segment acknowledged
    ep.receive(peer.syn(), NOW)
    [r] = peer.take(ep)
    assert r.flags == RST | ACK and r.ack == seq(peer.isn + 1)
    assert ep.events == []


# -- closing: FIN-WAIT-1, FIN-WAIT-2, TIME-WAIT ----------------------------------------------------


def test_active_close_through_time_wait():
    ep, peer = passive_established()
    ep.send(b"bye", NOW)
    ep.shutdown(NOW)
    segs = peer.take(ep)
    assert segs[-1].fin and segs[-1].seq == ISS + 1 + (0 if segs[-1].payload else 3)
    assert ep.state is S.FIN_WAIT_1 and ep.send_room == 0
    assert ep.send(b"more", NOW) == 0
    ep.receive(peer.ack(), NOW)
    assert ep.state is S.FIN_WAIT_2 and ep.poll_at() is None
    # half-close: we finished, the VM keeps sending
    for i in range(3):
        ep.receive(peer.data(b"%d" % i * 1000), NOW)
    assert ep.read(10_000, NOW) == b"0" * 1000 + b"1" * 1000 + b"2" * 1000
    peer.take(ep)
    ep.receive(peer.fin(), NOW + 1)
    assert ep.state is S.TIME_WAIT
    [a] = peer.take(ep)
    assert a.flags == ACK and a.ack == peer.snd_nxt
    assert PeerFinished in kinds(events(ep)) and ep.eof
    # TIME-WAIT is bounded; the VM's FIN again (our ACK was lost) is acknowledged again
    assert ep.poll_at() == pytest.approx(NOW + 1 + CFG.time_wait)
    ep.receive(peer.fin(seq=seq(peer.snd_nxt - 1)), NOW + 1.5)
    [a] = peer.take(ep)
    assert a.flags == ACK and a.ack == peer.snd_nxt
    assert ep.state is S.TIME_WAIT
    ep.on_timer(ep.poll_at())
    assert ep.state is S.CLOSED and kinds(events(ep)) == [Closed]
    assert ep.poll_at() is None


def test_fin_wait_1_data_still_received():
    ep, peer = to_state("FIN_WAIT_1")
    ep.receive(peer.data(b"still here", ack=seq(peer.rcv_nxt - 1)), NOW)  # FIN not acked
    assert ep.read(100, NOW) == b"still here"
    assert ep.state is S.FIN_WAIT_1


def test_fin_wait_1_fin_retransmitted_on_timeout():
    ep, peer = to_state("FIN_WAIT_1")
    fin_seq = seq(peer.rcv_nxt - 1)
    ep.on_timer(ep.poll_at())
    [f] = peer.take(ep, learn=False)
    assert f.fin and f.seq == fin_seq


def test_fin_wait_1_fin_and_ack_together_go_to_time_wait():
    ep, peer = to_state("FIN_WAIT_1")
    ep.receive(peer.fin(), NOW)
    assert ep.state is S.TIME_WAIT


def test_simultaneous_close_through_closing():
    ep, peer = to_state("CLOSING")
    assert kinds(events(ep)) == []
    ep.receive(peer.ack(), NOW + 0.01)  # the VM acknowledges our FIN
    assert ep.state is S.TIME_WAIT
    ep.on_timer(ep.poll_at())
    assert ep.state is S.CLOSED and kinds(events(ep)) == [Closed]


def test_closing_reached_from_fin_wait_1():
    ep, peer = to_state("FIN_WAIT_1")
    ep.receive(peer.fin(ack=seq(peer.rcv_nxt - 1)), NOW)
    assert ep.state is S.CLOSING
    assert kinds(events(ep)) == [PeerFinished]
    [a] = peer.take(ep)
    assert a.ack == peer.snd_nxt


# -- passive close: CLOSE-WAIT, LAST-ACK


def test_passive_close_half_close_then_last_ack():
    ep, peer = passive_established()
    ep.receive(peer.data(b"request"), NOW)
    ep.receive(peer.fin(), NOW)
    assert ep.state is S.CLOSE_WAIT
    assert kinds(events(ep)) == [DataReady, PeerFinished]
    assert not ep.eof and ep.read(100, NOW) == b"request" and ep.eof
    peer.take(ep)
    # the VM finished; we keep sending (half-close the other way)
    data = bytes(range(256)) * 100
    assert ep.send(data, NOW) == len(data)
    got = peer.take(ep)
    ep.receive(peer.ack(), NOW)
    got += peer.take(ep)
    assert b"".join(s.payload for s in got) == data == bytes(peer.received)
    ep.shutdown(NOW)
    [f] = peer.take(ep)
    assert f.fin and ep.state is S.LAST_ACK
    ep.receive(peer.ack(), NOW)
    assert ep.state is S.CLOSED and kinds(events(ep)) == [Closed]
    assert ep.poll_at() is None


def test_close_wait_data_from_the_vm_is_not_accepted_after_its_fin():
    ep, peer = to_state("CLOSE_WAIT")
    ep.receive(peer.data(b"after fin"), NOW)
    assert ep.readable == 0


def test_last_ack_fin_retransmitted_until_acked():
    ep, peer = to_state("LAST_ACK")
    t1 = ep.poll_at()
    ep.on_timer(t1)
    [f] = peer.take(ep, learn=False)
    assert f.fin and f.seq == seq(peer.rcv_nxt - 1)
    t2 = ep.poll_at()
    assert t2 - t1 == pytest.approx(2 * (t1 - NOW))
    ep.receive(peer.ack(), t2 - 0.01)
    assert ep.state is S.CLOSED


# -- events and the application side


def test_events_end_with_one_closed_whatever_happens_after():
    ep, peer = passive_established()
    ep.abort(NOW)
    ep.abort(NOW)
    ep.refuse(NOW)
    ep.receive(peer.rst(), NOW)
    ep.shutdown(NOW)
    ep.on_timer(NOW + 100)
    assert events(ep) == [Aborted("local"), Closed()]


def test_writable_after_send_buffer_drains():
    cfg = EndpointConfig(offload=False, send_buffer=10_000)
    ep, peer = passive_established(cfg)
    assert ep.send(b"x" * 15_000, NOW) == 10_000
    assert ep.send_room == 0
    peer.take(ep)
    ep.receive(peer.ack(), NOW)
    assert Writable_in(events(ep))
    assert ep.send_room == 10_000


def Writable_in(evs) -> bool:  # noqa: N802
    from vtl.models.tcp_endpoint import Writable

    return Writable in kinds(evs)


def test_send_before_active_open_completes_is_sent_after():
    ep, peer = to_state("SYN_SENT")
    assert ep.send(b"early", NOW) == 5
    assert ep.outbox == []
    peer.snd_nxt = peer.isn
    ep.receive(peer.seg(SYN | ACK, ack=ISS + 1, options=peer.syn_options(), advance=True), NOW)
    segs = peer.take(ep)
    assert b"".join(s.payload for s in segs) == b"early"


def test_scapy_sees_the_ports_and_addresses():
    ep, peer = passive_established()
    ep.send(b"x", NOW)
    [d] = peer.take(ep)
    t = d.pkt[ScapyTCP]
    assert t.sport == peer.ep_port and t.dport == peer.port
    assert Packet(bytearray(bytes(d.pkt))).ip.addrs == (peer.ep_ip, peer.ip)


def test_fin_from_the_vm_out_of_order_is_taken_once_the_hole_fills():
    ep, peer = passive_established()
    base = peer.snd_nxt
    ep.receive(peer.seg(FIN | ACK | PSH, seq=seq(base + 5), payload=b"world"), NOW)
    assert ep.state is S.ESTABLISHED
    ep.receive(peer.data(b"hello", seq=base), NOW)
    # the FIN is not kept out of order: the VM retransmits it
    ep.receive(peer.seg(FIN | ACK, seq=seq(base + 10)), NOW)
    assert ep.state is S.CLOSE_WAIT and ep.read(100, NOW) == b"helloworld"


def test_timeout_resends_data_and_fin_in_one_segment():
    ep, peer = passive_established()
    ep.send(b"abc", NOW)
    ep.shutdown(NOW)
    assert [(len(s.payload), s.fin) for s in peer.take(ep, learn=False)] == [(3, False),
                                                                            (0, True)]
    ep.on_timer(ep.poll_at())
    [r] = peer.take(ep, learn=False)
    assert r.payload == b"abc" and r.fin and r.seq == ISS + 1


def test_abort_in_syn_sent_sends_nothing():
    """RFC 9293 3.10.5: ABORT in SYN-SENT deletes the TCB; there is nothing to reset
    (the VM's ISN is not even known)."""
    ep, peer = to_state("SYN_SENT")
    ep.abort(NOW)
    assert ep.outbox == []
    assert events(ep) == [Aborted("local"), Closed()]


@pytest.mark.parametrize("state", ["SYN_RECEIVED", "FIN_WAIT_1", "CLOSE_WAIT", "LAST_ACK"])
def test_abort_resets_at_snd_nxt(state):
    ep, peer = to_state(state)
    ep.abort(NOW)
    [r] = peer.take(ep, learn=False)
    assert r.rst and r.seq == peer.rcv_nxt and r.ack == peer.snd_nxt
    assert events(ep) == [Aborted("local"), Closed()]


def test_time_wait_restarts_when_the_vm_fin_comes_again():
    """RFC 9293 3.10.7.4: a retransmitted FIN in TIME-WAIT is acknowledged and restarts
    the wait, so a VM whose first ACK was lost is not answered by a RST."""
    ep, peer = to_state("TIME_WAIT")
    end = ep.poll_at()
    ep.receive(peer.fin(seq=seq(peer.snd_nxt - 1)), end - 0.1)
    [a] = peer.take(ep)
    assert a.flags == ACK and a.ack == peer.snd_nxt
    assert ep.poll_at() == pytest.approx(end - 0.1 + CFG.time_wait)
    ep.on_timer(end)
    assert ep.state is S.TIME_WAIT
