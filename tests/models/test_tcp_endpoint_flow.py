"""The virtual TCP endpoint's data path against a scripted VM: retransmission (RFC 6298
backoff, fast retransmit, SACK holes, NewReno partial ACKs), window scaling across the
64 KB boundary, a zero window held for ten minutes, sequence wrap-around at 2**32,
back-pressure and bounded memory, timestamps and PAWS, checksums."""

from __future__ import annotations

import random

import pytest
from models_tcplink import (
    ACK,
    SYN,
    Peer,
    active_established,
    events,
    kinds,
    passive_established,
)
from vtl.models.tcp_endpoint import Aborted, Closed, DataReady, EndpointConfig, TcpEndpoint
from vtl.models.tcp_state import TcpState

from vtl.frame import VIRTIO_NET_HDR_F_NEEDS_CSUM, VnetHeader
from vtl.packet.packet import Packet

S = TcpState
NOW = 100.0
ISS = 1_000_000
M32 = 0xFFFFFFFF
MSS = 1448  # 1460 minus the timestamp option


def seq(n: int) -> int:
    return n & M32


def cfg(**kw) -> EndpointConfig:
    return EndpointConfig(**{"offload": False, **kw})


# -- retransmission timeout (RFC 6298) ---------------------------------------------------------


def test_rto_doubles_until_the_vm_is_given_up():
    ep, peer = passive_established(cfg())
    assert ep.rto.rto == pytest.approx(0.2)  # the handshake's timestamp gave a sample
    ep.send(b"lost" * 250, NOW)
    [first] = peer.take(ep, learn=False)
    expiries = []
    while ep.state is S.ESTABLISHED:
        t = ep.poll_at()
        ep.on_timer(t)
        expiries.append(round(t - NOW, 6))
        segs = peer.take(ep, learn=False)
        if ep.state is S.ESTABLISHED:
            [r] = segs
            assert r.seq == ISS + 1 and r.payload == first.payload[: len(r.payload)]
    gaps = [round(b - a, 6) for a, b in zip([0.0] + expiries, expiries, strict=False)]
    assert gaps[:8] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6]
    assert set(gaps[8:]) == {30.0}  # rto_max
    assert len(expiries) == EndpointConfig().max_retries + 1
    assert segs[-1].rst and segs[-1].seq == ISS + 1 + 1000
    assert events(ep) == [Aborted("timeout"), Closed()]


def test_rto_go_back_and_slow_start_after_timeout():
    ep, peer = passive_established(cfg())
    ep.send(b"a" * 10 * MSS, NOW)
    assert len(peer.take(ep, learn=False)) == 10  # initial window: ten segments
    ep.on_timer(ep.poll_at())
    [r] = peer.take(ep, learn=False)
    assert r.seq == ISS + 1 and len(r.payload) == MSS and ep.cwnd == MSS
    peer.rcv_nxt = seq(ISS + 1 + 2 * MSS)  # the VM had the first two
    ep.receive(peer.ack(), NOW + 0.25)
    segs = peer.take(ep, learn=False)
    # going back: from the first byte the VM lacks, contiguous, a cwnd that grew
    assert [s.seq for s in segs] == [seq(ISS + 1 + k * MSS) for k in range(2, 2 + len(segs))]
    assert len(segs) >= 2


def test_rtt_sample_without_timestamps():
    peer = Peer(timestamps=False)
    ep, peer = passive_established(cfg(), peer)
    assert ep.rto.srtt is None
    ep.send(b"x" * 100, NOW)
    peer.take(ep)
    ep.receive(peer.ack(), NOW + 0.05)
    assert ep.rto.srtt == pytest.approx(0.05)
    assert ep.rto.rto == pytest.approx(0.2)  # 0.05 + 4 * 0.025 = 0.15, floored at rto_min


def test_karn_no_sample_from_a_retransmitted_segment():
    peer = Peer(timestamps=False)
    ep, peer = passive_established(cfg(), peer)
    ep.send(b"x" * 100, NOW)
    peer.take(ep)
    ep.on_timer(ep.poll_at())  # retransmitted at NOW + 1
    peer.take(ep)
    ep.receive(peer.ack(), NOW + 5)
    assert ep.rto.srtt is None


# -- fast retransmit, SACK, NewReno -------------------------------------------------------------


def flight(ep, peer, n: int) -> list:
    ep.send((bytes(range(256)) * (n * MSS // 256 + 1))[: n * MSS], NOW)
    segs = peer.take(ep, learn=False)
    assert len(segs) == n
    return segs


def test_fast_retransmit_after_three_duplicate_acks():
    ep, peer = passive_established(cfg(), Peer(sack=False))
    segs = flight(ep, peer, 10)
    peer.rcv_nxt = seq(ISS + 1 + MSS)
    ep.receive(peer.ack(), NOW + 0.002)  # segment 0 arrived, 1 is lost
    peer.take(ep, learn=False)
    for i in range(3):
        ep.receive(peer.ack(), NOW + 0.003 + i * 0.0001)  # for segments 2, 3, 4
        out = [s for s in peer.take(ep, learn=False) if s.seq == segs[1].seq]
        assert bool(out) == (i == 2)
    assert out[0].payload == segs[1].payload
    assert ep.retransmits == 1 and ep.recover is not None


def test_window_update_is_not_a_duplicate_ack():
    ep, peer = passive_established(cfg(), Peer(sack=False))
    flight(ep, peer, 10)
    for w in (60000, 50000, 40000):
        ep.receive(peer.ack(window=w >> 7), NOW + 0.003)
    assert ep.dupacks == 0 and ep.retransmits == 0


def test_newreno_partial_ack_retransmits_the_next_hole():
    ep, peer = passive_established(cfg(), Peer(sack=False))
    segs = flight(ep, peer, 10)
    for _ in range(4):
        ep.receive(peer.ack(), NOW + 0.003)  # segment 0 lost; dupacks
    peer.take(ep, learn=False)
    assert ep.retransmits == 1
    peer.rcv_nxt = segs[4].seq  # the retransmission filled 0; 4 was lost too
    ep.receive(peer.ack(), NOW + 0.005)
    out = peer.take(ep, learn=False)
    assert segs[4].seq in [s.seq for s in out if s.payload]
    assert ep.retransmits == 2


def sack_ack(peer, blocks_segs, segs) -> object:
    blocks = tuple((segs[a].seq, seq(segs[b - 1].seq + len(segs[b - 1].payload)))
                   for a, b in blocks_segs)
    return peer.ack(options=peer.options(sack=blocks))


def test_sack_retransmits_only_the_holes():
    """Segments 1 and 4 of ten are lost: the VM's SACK blocks grow as the others arrive;
    segment 1 is resent at the third duplicate ACK, 4 once enough is SACKed above it,
    nothing else (what lies above the highest SACK block is not assumed lost)."""
    ep, peer = passive_established(cfg())
    segs = flight(ep, peer, 10)
    assert ep.tcb.sack_ok
    t = NOW + 0.002
    peer.rcv_nxt = segs[1].seq
    ep.receive(peer.ack(), t)
    peer.take(ep, learn=False)
    resent = []
    for blocks in ([(2, 3)], [(2, 4)], [(5, 6), (2, 4)], [(5, 7), (2, 4)], [(5, 8), (2, 4)],
                   [(5, 9), (2, 4)], [(5, 10), (2, 4)]):
        ep.receive(sack_ack(peer, blocks, segs), t)
        resent += [s.seq for s in peer.take(ep, learn=False) if s.seq <= segs[9].seq]
    assert resent == [segs[1].seq, segs[4].seq]
    # the VM gets both: everything acknowledged, recovery over
    peer.rcv_nxt = seq(segs[9].seq + len(segs[9].payload))
    ep.receive(peer.ack(), t + 0.002)
    assert ep.recover is None and ep.sacked == [] and ep.sbuf.una == ep.max_sent


def test_sack_blocks_outside_the_flight_are_ignored():
    ep, peer = passive_established(cfg())
    segs = flight(ep, peer, 4)
    bogus = ((seq(ISS - 5000), seq(ISS - 10)), (seq(ISS + 10**6), seq(ISS + 10**6 + 100)),
             (segs[2].seq, segs[1].seq))
    for _ in range(5):
        ep.receive(peer.ack(options=peer.options(sack=bogus)), NOW + 0.001)
    assert ep.sacked == []


# -- window scaling (RFC 7323)


def test_peer_window_above_64k_is_used():
    ep, peer = passive_established(cfg(initial_cwnd_segments=400), Peer(wscale=7, window=1000))
    assert ep.snd_wnd == 128_000
    ep.send(b"w" * 300_000, NOW)
    segs = peer.take(ep, learn=False)
    # the window filled but for less than a segment (sender SWS avoidance), > 65535
    assert 128_000 - MSS < sum(len(s.payload) for s in segs) <= 128_000
    edge = ISS + 1 + 128_000
    ep.receive(peer.ack(window=1000, ack=seq(ISS + 1 + 64 * MSS)), NOW + 0.01)
    segs = peer.take(ep, learn=False)
    top = segs[-1].seq + len(segs[-1].payload)
    assert edge + 64 * MSS - MSS < top <= edge + 64 * MSS
    ep.receive(peer.ack(window=200, ack=seq(top)), NOW + 0.02)
    segs = peer.take(ep, learn=False)
    assert 25_600 - MSS < sum(len(s.payload) for s in segs) <= 25_600  # 200 << 7


def test_advertised_window_is_scaled_and_exact_across_64k():
    c = cfg(recv_buffer=1 << 20)
    ep, peer = passive_established(c)
    assert ep.tcb.rcv_shift == 9
    seen = []
    while True:
        ep.receive(peer.data(b"d" * 1400), NOW)
        [a] = peer.take(ep)
        room = c.recv_buffer - ep.readable
        # the field is the room rounded to the scale; rounding up only to keep the right
        # edge where it was (it never moves left)
        assert abs((a.window << 9) - room) < 512
        seen.append(a.window << 9)
        if a.window == 0:
            break
    assert seen[0] > 65535 and min(seen) == 0
    assert any(0 < w < 65535 for w in seen)
    assert ep.readable >= c.recv_buffer - 512
    # reading reopens it above 64 KB with one window update
    ep.read(200_000, NOW)
    [u] = peer.take(ep)
    assert u.flags == ACK and u.window << 9 > 65535


def test_no_window_scaling_without_the_peer_option():
    ep, peer = passive_established(cfg(initial_cwnd_segments=400, recv_buffer=1 << 20),
                                   Peer(wscale=None, window=65535))
    assert ep.tcb.rcv_shift == 0 and ep.tcb.snd_shift == 0
    ep.send(b"w" * 200_000, NOW)
    segs = peer.take(ep, learn=False)
    assert 65535 - MSS < sum(len(s.payload) for s in segs) <= 65535
    assert all(s.window == 65535 for s in segs)  # 1 MB of room, capped unscaled
    ep.receive(peer.data(b"x" * 1000), NOW)
    [a] = peer.take(ep)
    assert a.window == 65535


def test_syn_window_never_scaled_and_small_buffer_advertised_as_is():
    peer = Peer()
    ep = TcpEndpoint.passive(peer.syn(), cfg(recv_buffer=20_000), NOW)
    ep.accept(NOW)
    [sa] = peer.take(ep)
    assert sa.window == 20_000


# -- zero window and persist (RFC 9293 3.8.6.1)


def zero_window(c=None):
    ep, peer = passive_established(c or cfg())
    ep.send(b"z" * 5000, NOW)
    peer.take(ep)
    ep.receive(peer.ack(window=0), NOW + 0.001)  # all acked, and the VM's buffer is full
    ep.send(b"q" * 3000, NOW + 0.001)
    assert peer.take(ep) == []
    assert ep.poll_at() is not None
    return ep, peer


def test_zero_window_ten_minutes_probed_with_backoff_then_resumes_at_once():
    ep, peer = zero_window()
    probes = []
    t = NOW
    while t < NOW + 600:
        t = ep.poll_at()
        ep.on_timer(t)
        [p] = peer.take(ep, learn=False)
        assert p.flags == ACK and not p.payload and p.seq == seq(peer.rcv_nxt - 1)
        probes.append(t)
        ep.receive(peer.ack(window=0), t + 0.001)  # the VM answers: still full
        assert peer.take(ep) == []
    gaps = [round(b - a, 3) for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[:4] == [0.4, 0.8, 1.6, 3.2]
    assert max(gaps) == EndpointConfig().persist_max and set(gaps[5:]) == {5.0}
    assert ep.state is S.ESTABLISHED and ep.events == []
    # the window opens: the queued bytes go out with the ACK that says so
    ep.receive(peer.ack(window=100), t + 1)
    segs = peer.take(ep)
    assert b"".join(s.payload for s in segs) == b"q" * 3000
    assert ep.poll_at() is not None and ep.timer_persist is None


def test_zero_window_reopened_by_a_window_update_between_probes():
    ep, peer = zero_window()
    ep.receive(peer.ack(window=100), NOW + 0.05)
    assert b"".join(s.payload for s in peer.take(ep)) == b"q" * 3000


def test_zero_window_peer_gone_aborts():
    ep, peer = zero_window()
    while ep.state is S.ESTABLISHED:
        ep.on_timer(ep.poll_at())
        segs = peer.take(ep, learn=False)
    assert segs[-1].rst
    assert events(ep) == [Aborted("timeout"), Closed()]
    assert ep.probes_unanswered == EndpointConfig().max_retries + 1


def test_zero_window_probe_from_the_vm_is_answered():
    """The VM probes our zero window (one byte beyond it, or SND.UNA - 1): we answer with
    an ACK carrying our window and keep nothing beyond the edge."""
    c = cfg(recv_buffer=4096)
    ep, peer = passive_established(c, Peer(wscale=None))
    ep.receive(peer.data(b"f" * 4096), NOW)
    [a] = peer.take(ep)
    assert a.window == 0
    ep.receive(peer.data(b"X"), NOW + 1)
    [a] = peer.take(ep)
    assert a.window == 0 and a.ack == seq(peer.snd_nxt - 1)
    assert ep.readable == 4096 and ep.buffered == 4096
    peer.snd_nxt = seq(peer.snd_nxt - 1)
    ep.receive(peer.ack(seq=seq(peer.snd_nxt - 1)), NOW + 2)
    [a] = peer.take(ep)
    assert a.window == 0 and a.ack == peer.snd_nxt


# -- sequence numbers wrapping at 2**32


def test_wrap_around_both_ways_with_a_scripted_peer():
    near = (1 << 32) - 1000
    c = cfg(offload=True)
    ep, peer = passive_established(c, Peer(isn=near), iss=near)
    size = 2_000_000
    out = bytes(range(251)) * (size // 251 + 1)
    inbound = bytes(range(241)) * (size // 241 + 1)
    sent = got = fed = 0
    read = bytearray()
    t = NOW
    while len(peer.received) < size or len(read) < size:
        t += 0.001
        if sent < size:
            sent += ep.send(out[sent:size], t)
        if fed < size:
            chunk = inbound[fed : min(fed + 1400, size)]
            ep.receive(peer.data(chunk), t)
            fed += len(chunk)
        peer.take(ep, oracle=False)
        ep.receive(peer.ack(), t)
        peer.take(ep, oracle=False)
        read += ep.read(1 << 20, t)
        got += 1
        assert got < 20_000
    assert bytes(peer.received[:size]) == out[:size]
    assert bytes(read) == inbound[:size]
    assert ep.tcb.rcv_nxt < near and ep.tcb.snd_una < near  # both wrapped
    assert ep.retransmits == 0 and ep.bad_segments == 0


def test_wrap_around_ooo_and_sack_blocks_straddle_zero():
    near = (1 << 32) - 700
    ep, peer = passive_established(cfg(), Peer(isn=near))
    base = peer.snd_nxt
    ep.receive(peer.data(b"b" * 1000, seq=seq(base + 1000)), NOW)
    [a] = peer.take(ep)
    assert a.options.sack_blocks == ((seq(base + 1000), seq(base + 2000)),)
    assert seq(base + 1000) < base  # the block lies past zero
    ep.receive(peer.data(b"a" * 1000, seq=base), NOW)
    assert ep.read(5000, NOW) == b"a" * 1000 + b"b" * 1000


# -- back-pressure: the window reflects the application


def test_unread_data_closes_the_window_and_memory_stays_bounded():
    c = cfg(recv_buffer=64 * 1024, send_buffer=32 * 1024)
    ep, peer = passive_established(c)
    ep.send(b"s" * 100_000, NOW)  # our own send queue full too
    peer.take(ep, learn=False)
    edge = seq(peer.snd_nxt + 64 * 1024)
    for i in range(200):
        ep.receive(peer.data(b"r" * 1400), NOW + i * 0.001)
        # and some far beyond any window
        far = seq(peer.snd_nxt + 200_000 + i * 3000)
        ep.receive(peer.seg(ACK, seq=far, payload=b"o" * 1400), NOW)
        assert ep.buffered <= c.recv_buffer + c.send_buffer + 1024
    acks = peer.take(ep, learn=False)
    assert acks[-1].window == 0
    assert ep.readable <= c.recv_buffer
    assert ep.tcb.rcv_nxt == edge or ep.readable >= c.recv_buffer - 512
    # the app reads a little: no update (receiver SWS avoidance) ...
    ep.read(100, NOW + 1)
    assert peer.take(ep) == []
    # ... then enough: a window update at once
    ep.read(40_000, NOW + 1)
    [u] = peer.take(ep)
    assert u.flags == ACK and (u.window << ep.tcb.rcv_shift) > 40_000 - 512


def test_ooo_store_is_bounded_by_the_receive_buffer():
    c = cfg(recv_buffer=32 * 1024)
    ep, peer = passive_established(c)
    base = peer.snd_nxt
    for i in range(1, 100):
        ep.receive(peer.seg(ACK, seq=seq(base + i * 600), payload=b"o" * 500), NOW)
    assert ep.rbuf.ooo_bytes <= c.recv_buffer
    assert ep.buffered <= c.recv_buffer


# -- timestamps (RFC 7323)


def test_tsval_monotone_and_tsecr_echoes_the_vm():
    ep, peer = passive_established(cfg())
    vals = []
    for i in range(20):
        t = NOW + i * 0.013
        peer.tick(7)
        ep.receive(peer.data(b"%02d" % i), t)
        [a] = peer.take(ep)
        assert a.options.timestamps[1] == peer.tsval  # TSecr echoes the latest TSval
        vals.append(a.tsval)
    assert all(seq(b - a) < 1 << 31 for a, b in zip(vals, vals[1:], strict=False))
    assert seq(vals[-1] - vals[0]) == pytest.approx(19 * 13, abs=2)  # a millisecond clock


@pytest.mark.parametrize("offset", [0, 123_456, M32 - 50])
def test_tsval_is_exact_with_an_injected_offset(offset: int):
    """``ts_offset`` makes every TSval exact: milliseconds of ``now`` plus the offset, mod
    2**32 (RFC 7323 5.4), in the SYN, the SYN-ACK and every later segment."""
    peer = Peer()
    ep = TcpEndpoint.active(peer.ep_addrs, cfg(), 2.5, iss=ISS, ts_offset=offset)
    [syn] = peer.take(ep)
    assert syn.options.timestamps == (seq(2500 + offset), 0)
    peer.ts_ok = True
    peer.snd_nxt = peer.isn
    ep.receive(peer.seg(SYN | ACK, options=peer.syn_options(), advance=True), 2.6)
    [ack] = peer.take(ep)
    assert ack.options.timestamps == (seq(2600 + offset), peer.tsval)
    for t in (3.0, 3.0004, 3.0017, 70.25):
        ep.send(b"x", t)
        [d] = peer.take(ep)
        assert d.tsval == seq(int(t * 1000) + offset)
        ep.receive(peer.ack(), t)
    passive = TcpEndpoint.passive(Peer().syn(), cfg(), 9.0, ts_offset=offset)
    passive.accept(9.25)
    [synack] = Peer().take(passive)
    assert synack.tsval == seq(9250 + offset)


def test_iss_and_ts_offset_come_from_an_injected_rng():
    peer = Peer()
    a = TcpEndpoint.active(peer.ep_addrs, cfg(), 1.0, rng=random.Random(42))
    b = TcpEndpoint.active(peer.ep_addrs, cfg(), 1.0, rng=random.Random(42))
    r = random.Random(42)
    assert (a.tcb.iss, a.tcb.ts_offset) == (b.tcb.iss, b.tcb.ts_offset) == \
        (r.getrandbits(32), r.getrandbits(32))
    c = TcpEndpoint.active(peer.ep_addrs, cfg(), 1.0, iss=5, rng=random.Random(42))
    assert (c.tcb.iss, c.tcb.ts_offset) == (5, random.Random(42).getrandbits(32))
    assert peer.take(a)[0].seq == a.tcb.iss


def test_paws_drops_an_old_duplicate():
    ep, peer = passive_established(cfg())
    peer.tick(1000)
    ep.receive(peer.data(b"new"), NOW)
    peer.take(ep)
    old = peer.data(b"stale", options=peer.options(ts=(peer.tsval - 500, peer.ts_recent)))
    bad = ep.bad_segments
    ep.receive(old, NOW)
    assert ep.read(100, NOW) == b"new"
    assert ep.bad_segments == bad + 1
    [a] = peer.take(ep, learn=False)
    assert a.flags == ACK and a.ack == seq(peer.snd_nxt - 5)  # a duplicate ACK


def test_paws_does_not_apply_to_rst():
    ep, peer = passive_established(cfg())
    peer.tick(1000)
    ep.receive(peer.data(b"new"), NOW)
    ep.receive(peer.rst(options=peer.options(ts=(1, 0))), NOW)
    assert kinds(events(ep))[-2:] == [Aborted, Closed]


# -- checksums


def corrupt(pkt: Packet) -> Packet:
    pkt.data[-1] ^= 0xFF
    return pkt


def test_bad_checksum_is_dropped_and_counted():
    ep, peer = passive_established(cfg())
    base = peer.snd_nxt
    ep.receive(corrupt(peer.data(b"garbled")), NOW)
    assert ep.bad_segments == 1 and ep.readable == 0 and ep.outbox == [] and ep.events == []
    ep.receive(peer.data(b"fine!!!", seq=base), NOW)
    assert ep.read(100, NOW) == b"fine!!!"


def test_partial_checksum_from_the_kernel_is_trusted():
    ep, peer = passive_established(cfg())
    pkt = peer.data(b"offloaded")
    from vtl.frame import Frame

    t = pkt.tcp
    frame = Frame(pkt.data, VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=t.off,
                                       csum_offset=16))
    p = Packet(frame)
    p.fix_checksums()  # leaves the pseudo-header sum, as a sending kernel does
    assert not Packet(bytearray(frame.data)).verify_checksums()
    ep.receive(p, NOW)
    assert ep.read(100, NOW) == b"offloaded" and ep.bad_segments == 0


def test_checksum_verification_can_be_disabled():
    ep, peer = passive_established(cfg(verify_checksums=False))
    ep.receive(corrupt(peer.data(b"trusted")), NOW)
    assert ep.readable == 7 and kinds(events(ep)) == [DataReady]


# -- offload output


def test_offload_super_frames_cut_into_mss_segments():
    ep, peer = active_established(cfg(offload=True))
    data = bytes(range(256)) * 400
    ep.send(data, NOW)
    frames = list(ep.outbox)
    assert all(f.vnet is not None for f in frames)
    assert any(f.vnet.gso_size == MSS for f in frames)
    segs = peer.take(ep)  # cut by complete_offloads, checked by scapy
    assert all(len(s.payload) <= MSS for s in segs)
    assert bytes(peer.received) == data[: len(peer.received)] and len(peer.received) > 10_000


def test_tiny_segments_cannot_creep_past_the_receive_buffer():
    """Rounding the scaled window up, to keep its right edge, must not add up: a VM that
    fills the last bytes of the window one byte at a time gets nowhere past the buffer."""
    c = cfg(recv_buffer=64 * 1024)
    ep, peer = passive_established(c)
    while True:
        ep.receive(peer.data(b"f" * 1400), NOW)
        [a] = peer.take(ep)
        if (a.window << 9) < 1400:
            break
    for _ in range(2000):
        ep.receive(peer.data(b"1"), NOW)
        [a] = peer.take(ep, oracle=False)
        peer.snd_nxt = a.ack  # the VM goes on from what we took
    assert ep.readable <= c.recv_buffer
    assert a.window == 0


def test_window_shrunk_to_zero_with_data_in_flight_never_times_out_while_answered():
    """The VM takes back its window (zero, with our data in flight unacknowledged): our
    retransmissions become probes, and as long as the VM answers them the connection
    lives on, however long; it resumes when the window opens."""
    ep, peer = passive_established(cfg())
    ep.send(b"k" * 8000, NOW)
    peer.take(ep, learn=False)
    ep.receive(peer.ack(window=0), NOW + 0.001)
    t = NOW
    while t < NOW + 600:
        t = ep.poll_at()
        ep.on_timer(t)
        segs = peer.take(ep, learn=False)
        assert segs and not any(s.rst for s in segs)
        ep.receive(peer.ack(window=0), t + 0.001)
    assert ep.state is S.ESTABLISHED and ep.events == []
    ep.receive(peer.ack(window=1000), t + 0.5)
    first = peer.take(ep)  # at once: what went into the closed window, sent again
    assert first and first[0].seq == ISS + 1
    for i in range(5):
        ep.receive(peer.ack(window=1000), t + 0.5 + 0.001 * i)
        peer.take(ep)
    assert bytes(peer.received) == b"k" * 8000


def test_window_shrunk_to_zero_and_peer_gone_times_out():
    ep, peer = passive_established(cfg())
    ep.send(b"k" * 8000, NOW)
    peer.take(ep, learn=False)
    ep.receive(peer.ack(window=0), NOW + 0.001)
    for _ in range(100):
        if ep.state is not S.ESTABLISHED:
            break
        ep.on_timer(ep.poll_at())
    assert events(ep) == [Aborted("timeout"), Closed()]


@pytest.mark.parametrize("recv_buffer", [2048, 4096, 20_000])
def test_small_receive_buffer_limits_the_window_scale(recv_buffer):
    """A shift so large that the whole buffer rounds to a zero window field would close
    the window for good: the shift offered leaves the buffer at least eight units."""
    ep, peer = passive_established(cfg(wscale=14, recv_buffer=recv_buffer))
    assert recv_buffer >> ep.tcb.rcv_shift >= 8
    ep.receive(peer.data(b"x" * 1000), NOW)
    [a] = peer.take(ep)
    assert a.window > 0
    while a.window:
        ep.receive(peer.data(b"x" * min(1000, a.window << ep.tcb.rcv_shift)), NOW)
        [a] = peer.take(ep)
    ep.read(recv_buffer, NOW)  # the application catches up: the window reopens
    [u] = peer.take(ep)
    assert u.window << ep.tcb.rcv_shift > recv_buffer // 2


def test_receive_buffer_smaller_than_the_mss_still_reopens():
    """Receiver SWS avoidance waits for min(half the buffer, one MSS) of room (RFC 9293
    3.8.6.2.2), not for more than the buffer can ever hold."""
    c = cfg(recv_buffer=1000)
    ep, peer = passive_established(c, Peer(wscale=None))
    ep.receive(peer.data(b"x" * 1000), NOW)
    [a] = peer.take(ep)
    assert a.window == 0
    ep.read(300, NOW)
    assert peer.take(ep) == []  # less than half the buffer: not yet
    ep.read(300, NOW)
    [u] = peer.take(ep)
    assert u.window == 600


def test_acks_never_numbered_beyond_the_vm_window():
    """After a timeout retransmission went into the VM's closed window, our ACKs are
    numbered at the window's right edge, not past it: a number outside the VM's window
    gets the ACK dropped and answered, and two such ends answer each other forever."""
    ep, peer = passive_established(cfg())
    ep.send(b"k" * 8000, NOW)
    peer.take(ep, learn=False)
    ep.receive(peer.ack(window=0), NOW + 0.001)  # nothing taken, window closed
    ep.on_timer(ep.poll_at())
    peer.take(ep, learn=False)
    ep.receive(peer.data(b"hello", window=0), NOW + 0.5)
    [a] = peer.take(ep, learn=False)
    assert a.flags == ACK and a.seq == ISS + 1  # SND.UNA + SND.WND, not SND.NXT
    ep.receive(peer.ack(window=10), NOW + 0.6)  # a 1280-byte window
    peer.take(ep, learn=False)
    ep.receive(peer.data(b"again", window=10), NOW + 0.7)
    [a] = [s for s in peer.take(ep, learn=False) if not s.payload]
    assert a.seq == ISS + 1 + 1280


def test_ack_at_the_right_edge_of_our_window_is_taken():
    """A pure ACK numbered at the right edge of our window (the VM sent up to it) is
    acceptable, as Linux has it: no answer, its acknowledgment processed."""
    c = cfg(recv_buffer=4096)
    ep, peer = passive_established(c, Peer(wscale=None))
    ep.send(b"s" * 1000, NOW)
    peer.take(ep)
    edge = seq(peer.snd_nxt + 4096)
    ep.receive(peer.ack(seq=edge), NOW)
    assert peer.take(ep) == [] and ep.sbuf.una == 1000
    ep.receive(peer.ack(seq=seq(edge + 1)), NOW)
    [a] = peer.take(ep)  # beyond it: answered
    assert a.ack == peer.snd_nxt


def test_timestamp_echo_older_than_the_latest_retransmission_is_no_rtt_sample():
    """Karn for timestamps: the VM got our first retransmission but its ACK was lost; our
    second one is an old duplicate to it, so the ACK it sends echoes the first one's
    TSval. That echo would count the whole timeout as round-trip time."""
    ep, peer = passive_established(cfg())
    srtt = ep.rto.srtt
    ep.send(b"x" * 100, NOW)
    peer.take(ep)
    ep.on_timer(ep.poll_at())  # retransmission 1: the VM takes it, records its TSval
    [r1] = peer.take(ep, learn=False)
    t2 = ep.poll_at()
    ep.on_timer(t2)  # retransmission 2 (the ACK of 1 was lost)
    [r2] = peer.take(ep, learn=False)
    assert r2.tsval != r1.tsval
    ep.receive(peer.ack(options=peer.options(ts=(peer.tsval, r1.tsval))), t2 + 0.001)
    assert ep.sbuf.una == 100 and ep.rto.srtt == srtt  # no sample
    ep.send(b"y" * 100, t2 + 0.01)
    [d] = peer.take(ep)
    ep.receive(peer.ack(options=peer.options(ts=(peer.tsval, d.tsval))), t2 + 0.06)
    assert ep.rto.srtt != srtt  # a fresh echo is a sample again


def test_congestion_avoidance_grows_a_segment_per_window_however_few_the_acks():
    """RFC 3465: in congestion avoidance cwnd grows by one MSS per cwnd of bytes acked.
    A guest ACKs each 64 KB GSO frame once; counted per ACK (RFC 5681's per-ACK form)
    the window would grow ~70 bytes per round trip and a download toward the guest
    stayed stuck near the window a single loss left it (measured: 78 KB, one frame)."""
    ep, peer = passive_established(cfg(offload=True, send_buffer=1 << 22),
                                   Peer(wscale=7, window=30000))
    ep.ssthresh = ep.cwnd = 20 * MSS  # as a loss would leave it
    now = NOW
    for rnd in range(5):
        before = ep.cwnd
        ep.send(b"d" * before, now)
        frames = peer.take(ep, learn=False)
        assert sum(len(f.payload) for f in frames) == before  # the window, all in flight
        peer.rcv_nxt = seq(frames[-1].seq + len(frames[-1].payload))
        now += 0.001
        ep.receive(peer.ack(), now)  # one cumulative ACK for the whole window
        assert ep.cwnd == pytest.approx(before + MSS, abs=2), rnd


def test_a_tail_shorter_than_a_super_frame_waits_for_the_ack_of_what_is_in_flight():
    """TSO deferral: with data in flight, a queue tail smaller than a super-frame waits for
    the next ACK (or more data) instead of leaving as a frame of its own; a FIN, or
    nothing in flight, sends it at once."""
    ep, peer = passive_established(cfg(offload=True, send_buffer=1 << 22),
                                   Peer(wscale=7, window=30000))
    ep.cwnd = 1 << 22
    full = ep.config.gso_max

    def sent() -> int:
        return sum(len(s.payload) for s in peer.take(ep, learn=False))

    assert sent() == 0
    ep.send(b"t" * 2048, NOW)
    assert sent() == 2048  # nothing in flight: no reason to wait
    peer.rcv_nxt = seq(ISS + 1 + 2048)
    ep.receive(peer.ack(), NOW)
    ep.send(b"a" * 65536, NOW)
    assert sent() == full  # one super-frame; its 2 KiB tail waits
    ep.send(b"b" * 65536, NOW)
    assert sent() == full  # the tail joined the next read: again one full frame
    peer.rcv_nxt = seq(ISS + 1 + 2048 + 2 * full)
    ep.receive(peer.ack(), NOW + 0.001)
    assert sent() == 2 * 65536 - 2 * full  # nothing in flight any more: the tail goes
    ep.send(b"c" * 65536, NOW + 0.002)
    assert sent() == full
    ep.shutdown(NOW + 0.002)
    assert sent() == 65536 - full  # a FIN: nothing more will join the tail
