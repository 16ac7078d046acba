"""udt, sans-IO: outbound opens (stream requests, fallbacks), inbound offers (active opens
toward the guest), and two services joined through fake streams."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, Ether
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP
from vtl.models.tcp_endpoint import EndpointConfig, TcpEndpoint
from vtl.models.tcp_segment import FlowAddrs
from vtl.models.tcp_state import TcpState
from vtl.services.udt import Udt, UdtOptions
from vtl.services.udt.service import FAR_SILENT

from vtl import CONSUMED, DROP, PASS, Direction, FlowKey, Frame
from vtl.packet.addr import ip_bytes, mac_bytes
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet
from vtl.stream import StreamFlow
from vtl.testing import FakeContext, run_timers

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
A_MAC, GW_A = "02:00:00:00:0a:01", "02:00:00:00:0a:fe"  # guest at A, the gateway it uses
B_MAC, GW_B = "02:00:00:00:0b:01", "02:00:00:00:0b:fe"
A_IP, B_IP = "10.191.1.5", "10.191.2.7"
A_IP6, B_IP6 = "fd00:191:1::5", "fd00:191:2::7"
PEERS_A = [{"prefix": "10.191.2.0/24", "bridge": "10.190.0.2:9000"},
           {"prefix": "fd00:191:2::/48", "bridge": "10.190.0.3:9000"}]
PEERS_B = [{"prefix": "10.191.1.0/24", "bridge": "10.190.0.1:9000"}]


def seg(flags: str, seq: int = 1000, ack: int = 0, data: bytes = b"", sport: int = 40000,
        dport: int = 80, src: str = A_IP, dst: str = B_IP, smac: str = A_MAC,
        dmac: str = GW_A) -> Frame:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)] \
        if "S" in flags else []
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return Frame(bytes(Ether(src=smac, dst=dmac) / ip /
                       TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                           window=65535, options=opts) / data))


def wire(ctx: FakeContext, direction: Direction = DOWN) -> list[Ether]:
    """Frames emitted toward ``direction`` so far, as wire segments; all emitted forgotten."""
    out = []
    for frame, d in ctx.emitted:
        if d is direction:
            out += [Ether(bytes(s.data)) for s in complete_offloads(frame.copy())]
    ctx.emitted.clear()
    return out


def make(**options: object) -> tuple[Udt, FakeContext]:
    ctx = FakeContext("udt")
    options.setdefault("peers", PEERS_A)
    svc = Udt(UdtOptions(**options), ctx)
    svc.start(0.0)
    return svc, ctx


# -- outbound ---------------------------------------------------------------------------


def test_syn_to_a_peer_prefix_asks_for_a_udt_stream_with_the_flow() -> None:
    udt, ctx = make(mss=1400, window=1 << 20, mux=True, connect_timeout_s=2)
    assert udt.process(seg("S"), UP, 0.0) is CONSUMED
    assert ctx.emitted == []  # no answer before the far side accepted
    [stream] = ctx.streams
    r = stream.request
    assert (r.kind, r.host, r.port, r.timeout_s) == ("udt", "10.190.0.2", 9000, 2)
    assert r.flow == StreamFlow(FlowKey.tcp(A_IP, 40000, B_IP, 80), mac_bytes(A_MAC),
                                mac_bytes(GW_A))
    assert "flow" not in r.options
    assert (r.options["mss"], r.options["window"], r.options["mux"]) == (1400, 1 << 20, True)
    assert (r.options["congestion"], r.options["max_bw"]) == ("vtl", 0)
    assert ctx.extra("connections_opened") == 1
    assert udt.report(0.0)["congestion"] == "vtl"


def test_congestion_native_reaches_the_transport_and_the_report() -> None:
    udt, ctx = make(congestion="native", max_rate_mbit=80)
    udt.process(seg("S"), UP, 0.0)
    [stream] = ctx.streams
    assert (stream.request.options["congestion"], stream.request.options["max_bw"]) == \
        ("native", 10_000_000)
    assert udt.report(0.0)["congestion"] == "native"


def test_connected_answers_the_syn() -> None:
    udt, ctx = make()
    udt.process(seg("S"), UP, 0.0)
    ctx.streams[0].connect()
    [synack] = wire(ctx)
    assert synack[TCP].flags == "SA" and synack[TCP].ack == 1001
    assert (synack[IP].src, synack[TCP].sport, synack[Ether].src) == (B_IP, 80, GW_A)


def test_refused_at_the_far_side_resets_the_guest() -> None:
    udt, ctx = make(fallback="passthrough")
    udt.process(seg("S"), UP, 0.0)
    ctx.streams[0].closed("refused", "guest refused")
    [rst] = wire(ctx)
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 1001
    assert ctx.extra("connections_refused") == 1 and ctx.extra("fallback_passthrough") == 0
    assert udt.report(0.0)["peers_down"] == 0


@pytest.mark.parametrize("reason", ["unreachable"])
def test_peer_down_with_fallback_reset_is_a_rst_and_remembered(reason: str) -> None:
    udt, ctx = make(retry_s=10)
    udt.process(seg("S"), UP, 0.0)
    ctx.now = 3.0
    ctx.streams[0].closed(reason)
    [rst] = wire(ctx)
    assert rst[TCP].flags.R and not rst.haslayer(ICMP)
    assert ctx.extra("fallback_reset") == 1
    # remembered: the next connection to that bridge is reset at once, no new stream
    assert udt.process(seg("S", sport=40001), UP, 4.0) is CONSUMED
    [rst2] = wire(ctx)
    assert rst2[TCP].flags.R and rst2[TCP].dport == 40001
    assert len(ctx.streams) == 1 and ctx.extra("fallback_reset") == 2
    assert udt.report(0.0)["peers_down"] == 1
    # after retry_s it is tried again
    assert udt.process(seg("S", sport=40002), UP, 13.5) is CONSUMED
    assert len(ctx.streams) == 2 and wire(ctx) == []


@pytest.mark.parametrize("message", [f"peer refused: {FAR_SILENT}",
                                     "UDT peer 10.0.0.2:9000: no answer to the stream open"])
def test_far_guest_silent_is_a_rst_not_a_fallback(message: str) -> None:
    udt, ctx = make(fallback="passthrough")
    udt.process(seg("S"), UP, 0.0)
    ctx.streams[0].closed("timeout", message)
    [rst] = wire(ctx)
    assert rst[TCP].flags.R
    assert ctx.extra("fallback_passthrough") == 0 and udt.report(0.0)["peers_down"] == 0


def test_peer_down_with_passthrough_lets_the_flow_pass_both_ways() -> None:
    udt, ctx = make(fallback="passthrough")
    syn = seg("S")
    original = bytes(syn.data)
    udt.process(syn, UP, 0.0)
    ctx.now = 3.0
    ctx.streams[0].closed("unreachable")
    assert [d for _, d in ctx.emitted] == [UP]  # nothing to the guest, the SYN to the uplink
    assert bytes(ctx.emitted[0][0].data) == original
    ctx.emitted.clear()
    assert ctx.extra("fallback_passthrough") == 1
    assert udt.report(0.0)["connections_active"] == 0
    assert udt.report(0.0)["passthrough_active"] == 1
    synack = seg("SA", 5000, 1001, sport=80, dport=40000, src=B_IP, dst=A_IP, smac=GW_A,
                 dmac=A_MAC)
    assert udt.process(synack, DOWN, 3.1) is PASS
    assert udt.process(seg("A", 1001, 5001), UP, 3.2) is PASS
    assert udt.process(seg("PA", 1001, 5001, b"hello"), UP, 3.3) is PASS
    assert udt.process(seg("S"), UP, 3.4) is PASS  # a retransmitted SYN too
    assert ctx.emitted == []
    # the bridge is remembered as down: a new connection passes at once
    assert udt.process(seg("S", sport=40001), UP, 4.0) is PASS
    assert len(ctx.streams) == 1 and ctx.extra("fallback_passthrough") == 2


def test_passthrough_entries_expire() -> None:
    udt, ctx = make(fallback="passthrough", passthrough_idle_s=5, retry_s=0)
    udt.process(seg("S"), UP, 0.0)
    ctx.streams[0].closed("unreachable")
    assert udt.process(seg("A", 1001, 1), UP, 4.0) is PASS
    assert udt.process(seg("A", 1001, 1), UP, 8.0) is PASS  # refreshed at 4.0
    assert udt.report(8.0)["passthrough_active"] == 1
    assert udt.report(12.9)["passthrough_active"] == 1  # refreshed at 8.0
    assert udt.report(13.1)["passthrough_active"] == 0  # idle 5 s: expired
    assert udt.process(seg("A", 1001, 1), UP, 20.0) is PASS  # not ours any more: passes
    assert udt.report(20.0)["passthrough_active"] == 0
    assert udt.process(seg("S"), UP, 21.0) is CONSUMED  # retry_s=0: tried again
    assert len(ctx.streams) == 2


def test_destinations_outside_every_prefix_and_non_tcp_pass() -> None:
    udt, ctx = make()
    assert udt.process(seg("S", dst="10.191.3.1"), UP, 0.0) is PASS
    icmp = Frame(bytes(Ether(src=A_MAC, dst=GW_A) / IP(src=A_IP, dst=B_IP) / ICMP()))
    assert udt.process(icmp, UP, 0.0) is PASS
    assert udt.process(icmp, DOWN, 0.0) is PASS
    assert udt.process(seg("A", 5, 6, sport=41000), UP, 0.0) is PASS  # opened before us
    assert ctx.streams == [] and ctx.emitted == []


def test_longest_prefix_wins() -> None:
    udt, ctx = make(peers=[{"prefix": "10.191.0.0/16", "bridge": "10.190.0.9:9000"},
                           {"prefix": "10.191.2.0/24", "bridge": "10.190.0.2:9001"}])
    udt.process(seg("S"), UP, 0.0)
    udt.process(seg("S", dst="10.191.7.1"), UP, 0.0)
    assert [(s.request.host, s.request.port) for s in ctx.streams] == [
        ("10.190.0.2", 9001), ("10.190.0.9", 9000)]


def test_uplink_frames_of_a_transformed_flow_are_dropped() -> None:
    udt, ctx = make()
    udt.process(seg("S"), UP, 0.0)
    back = seg("SA", 5000, 1001, sport=80, dport=40000, src=B_IP, dst=A_IP, smac=GW_A,
               dmac=A_MAC)
    assert udt.process(back, DOWN, 0.1) is DROP


def test_bytes_and_fin_over_the_stream() -> None:
    udt, ctx = make()
    udt.process(seg("S"), UP, 0.0)
    stream = ctx.streams[0]
    stream.connect()
    [synack] = wire(ctx)
    pseq = synack[TCP].seq + 1
    udt.process(seg("A", 1001, pseq), UP, 0.01)
    udt.process(seg("PA", 1001, pseq, b"GET /"), UP, 0.02)
    assert bytes(stream.written) == b"GET /"
    stream.data(b"200 OK")
    stream.end()
    got = wire(ctx)
    assert b"".join(bytes(p[TCP].payload) for p in got) == b"200 OK"
    assert got[-1][TCP].flags.F
    udt.process(seg("FA", 1006, pseq + 7), UP, 0.03)
    assert stream.shut


def test_ipv6_outbound() -> None:
    udt, ctx = make()
    assert udt.process(seg("S", src=A_IP6, dst=B_IP6), UP, 0.0) is CONSUMED
    [stream] = ctx.streams
    assert (stream.request.host, stream.request.port) == ("10.190.0.3", 9000)
    assert stream.request.flow.key.dst_ip == B_IP6
    stream.connect()
    [synack] = wire(ctx)
    assert synack[IPv6].src == B_IP6 and synack[TCP].flags == "SA"


# -- inbound ----------------------------------------------------------------------------


def flow(src: str = A_IP, dst: str = B_IP, sport: int = 40000, dport: int = 80) -> StreamFlow:
    return StreamFlow(FlowKey.tcp(src, sport, dst, dport), mac_bytes(A_MAC), mac_bytes(GW_A))


def make_b(**options: object) -> tuple[Udt, FakeContext]:
    options.setdefault("listen", "10.190.0.2:9000")
    options.setdefault("peers", PEERS_B)
    return make(**options)


def test_listen_binds_with_the_transport_options() -> None:
    udt, ctx = make_b(mss=1400, window=1 << 20)
    [listener] = ctx.listeners
    r = listener.request
    assert (r.kind, r.host, r.port) == ("udt", "10.190.0.2", 9000)
    assert (r.options["mss"], r.options["window"]) == (1400, 1 << 20)
    assert r.offer_timeout_s > udt.options.connect_timeout_s
    udt.stop(1.0)
    assert listener.closed


def test_no_listen_no_listener() -> None:
    _, ctx = make()
    assert ctx.listeners == []


def learn_guest(udt: Udt) -> None:
    """The guest at B says something (its MAC and its gateway's become known)."""
    arp = Frame(bytes(Ether(src=B_MAC, dst="ff:ff:ff:ff:ff:ff") /
                      ARP(op=1, hwsrc=B_MAC, psrc=B_IP, pdst="10.191.2.1")))
    assert udt.process(arp, UP, 0.0) is PASS
    ping = Frame(bytes(Ether(src=B_MAC, dst=GW_B) / IP(src=B_IP, dst=A_IP) / ICMP()))
    assert udt.process(ping, UP, 0.0) is PASS


def test_offer_opens_toward_the_guest_as_the_original_client() -> None:
    udt, ctx = make_b()
    learn_guest(udt)
    offer = ctx.listeners[0].offer(flow=flow())
    assert offer.answer is None
    [syn] = wire(ctx)
    assert syn[TCP].flags == "S"
    assert (syn[IP].src, syn[TCP].sport, syn[IP].dst, syn[TCP].dport) == (A_IP, 40000, B_IP, 80)
    assert (syn[Ether].src, syn[Ether].dst) == (GW_B, B_MAC)  # learnt, not the meta's
    assert ctx.extra("inbound_offers") == 1


def test_offer_before_the_guest_spoke_uses_the_meta_macs() -> None:
    udt, ctx = make_b()
    ctx.listeners[0].offer(flow=flow())
    [syn] = wire(ctx)
    assert (syn[Ether].src, syn[Ether].dst) == (A_MAC, GW_A)


def test_offer_without_macs_uses_what_was_learnt_or_refuses() -> None:
    udt, ctx = make_b()
    no_macs = StreamFlow(FlowKey.tcp(A_IP, 40000, B_IP, 80))
    unknown = ctx.listeners[0].offer(flow=no_macs)
    assert unknown.answer is not None and unknown.answer[0] == "error"
    learn_guest(udt)
    known = ctx.listeners[0].offer(flow=no_macs)
    assert known.answer is None
    [syn] = wire(ctx)
    assert (syn[Ether].src, syn[Ether].dst) == (GW_B, B_MAC)


def guest_synack(syn: Ether, seq: int = 7000) -> Frame:
    return seg("SA", seq, syn[TCP].seq + 1, sport=80, dport=40000, src=B_IP, dst=A_IP,
               smac=B_MAC, dmac=GW_B)


def test_guest_answer_accepts_the_offer_and_bytes_flow_both_ways() -> None:
    udt, ctx = make_b()
    learn_guest(udt)
    offer = ctx.listeners[0].offer(flow=flow())
    [syn] = wire(ctx)
    assert udt.process(guest_synack(syn), UP, 0.01) is CONSUMED
    assert offer.answer == "accept" and ctx.extra("inbound_accepted") == 1
    [ack] = wire(ctx)
    assert ack[TCP].flags == "A" and ack[TCP].ack == 7001
    stream = offer.stream
    assert stream is not None
    # the guest (a server) speaks first, before the stream reports connected: held
    our = syn[TCP].seq + 1
    banner = seg("PA", 7001, our, b"SSH-2.0-x\r\n", sport=80, dport=40000, src=B_IP, dst=A_IP,
                 smac=B_MAC, dmac=GW_B)
    assert udt.process(banner, UP, 0.02) is CONSUMED
    assert bytes(stream.written) == b""
    stream.connect()
    assert bytes(stream.written) == b"SSH-2.0-x\r\n"
    wire(ctx)
    stream.data(b"client hello")
    got = wire(ctx)
    assert b"".join(bytes(p[TCP].payload) for p in got) == b"client hello"
    assert got[0][IP].src == A_IP and got[0][TCP].sport == 40000
    # uplink frames of that flow are dropped
    assert udt.process(seg("A", 1, 1, sport=40000, dport=80, src=A_IP, dst=B_IP), DOWN,
                       0.03) is DROP
    assert udt.report(0.0)["connections_active"] == 1


def test_guest_reset_refuses_the_offer() -> None:
    udt, ctx = make_b()
    offer = ctx.listeners[0].offer(flow=flow())
    [syn] = wire(ctx)
    rst = seg("RA", 0, syn[TCP].seq + 1, sport=80, dport=40000, src=B_IP, dst=A_IP,
              smac=B_MAC, dmac=GW_B)
    assert udt.process(rst, UP, 0.01) is CONSUMED
    assert offer.answer is not None and offer.answer[0] == "refused"
    assert ctx.extra("inbound_refused") == 1 and ctx.extra("connections_refused") == 1
    assert udt.report(0.0)["connections_active"] == 0


def test_silent_guest_refuses_the_offer_with_timeout() -> None:
    udt, ctx = make_b(connect_timeout_s=3)
    offer = ctx.listeners[0].offer(flow=flow())
    wire(ctx)
    run_timers(udt, ctx, 2.9)
    assert offer.answer is None
    assert [p[TCP].flags for p in wire(ctx)] == ["S"]  # one retransmitted SYN (RTO 1 s)
    run_timers(udt, ctx, 3.1)
    assert offer.answer is not None and offer.answer[0] == "timeout"
    assert offer.answer[1] == FAR_SILENT
    assert ctx.extra("connections_timeout") == 1
    assert udt.poll_at() is None


def test_offer_for_a_live_flow_and_bad_meta_are_errors() -> None:
    udt, ctx = make_b()
    first = ctx.listeners[0].offer(flow=flow())
    again = ctx.listeners[0].offer(flow=flow())
    assert first.answer is None and again.answer is not None and again.answer[0] == "error"
    bad = ctx.listeners[0].offer(flow=StreamFlow(flow().key._replace(sport=0)))
    assert bad.answer is not None and bad.answer[0] == "error"
    v6 = flow(src=A_IP6, dst=B_IP6).key
    mixed = ctx.listeners[0].offer(flow=StreamFlow(flow().key._replace(dst=v6.dst)))
    assert mixed.answer is not None and mixed.answer[0] == "error"
    assert ctx.extra("inbound_refused") == 3


def test_stop_resets_and_refuses_what_is_pending() -> None:
    udt, ctx = make_b()
    pending = ctx.listeners[0].offer(flow=flow())
    live = ctx.listeners[0].offer(flow=flow(sport=40001))
    syns = wire(ctx)
    udt.process(seg("SA", 7000, syns[1][TCP].seq + 1, sport=80, dport=40001, src=B_IP,
                    dst=A_IP, smac=B_MAC, dmac=GW_B), UP, 0.01)
    assert live.answer == "accept"
    live.stream.connect()
    wire(ctx)
    udt.stop(1.0)
    assert pending.answer is not None and pending.answer[0] == "error"
    assert live.stream.local == "abort"
    assert any(p[TCP].flags.R for p in wire(ctx))
    assert ctx.listeners[0].closed


def test_ipv6_offer() -> None:
    udt, ctx = make_b()
    offer = ctx.listeners[0].offer(flow=flow(src=A_IP6, dst=B_IP6))
    [syn] = wire(ctx)
    assert (syn[IPv6].src, syn[IPv6].dst, syn[TCP].sport) == (A_IP6, B_IP6, 40000)
    udt.process(seg("SA", 9, syn[TCP].seq + 1, sport=80, dport=40000, src=B_IP6, dst=A_IP6,
                    smac=B_MAC, dmac=GW_B), UP, 0.01)
    assert offer.answer == "accept"


# -- two bridges joined through fake streams ----------------------------------------------


class Joined:
    """udt at bridge A and at bridge B, a real TCP endpoint as each guest, and the
    transport played by moving bytes between A's opened streams and B's accepted ones."""

    def __init__(self, v6: bool = False):
        self.a, self.actx = make(peers=PEERS_A)
        self.b, self.bctx = make_b(peers=PEERS_B)
        self.now = 0.0
        gcfg = EndpointConfig(offload=False, send_buffer=1 << 18, recv_buffer=1 << 18)
        self.gcfg = gcfg
        src, dst = (A_IP6, B_IP6) if v6 else (A_IP, B_IP)
        self.client = TcpEndpoint.active(FlowAddrs(mac_bytes(A_MAC), mac_bytes(GW_A),
                                                   ip_bytes(src), ip_bytes(dst), 40000, 80),
                                         gcfg, 0.0)
        self.server: TcpEndpoint | None = None
        self.pairs: list[list] = []  # [a stream, b offer, a->b sent, b->a sent, ended flags]
        self.got_client = bytearray()
        self.got_server = bytearray()

    def _guest_frames(self, ep: TcpEndpoint, svc: Udt) -> bool:
        out, ep.outbox = ep.outbox, []
        for f in out:
            svc.process(f, UP, self.now)
        return bool(out)

    def _to_guest(self, ctx: FakeContext, deliver) -> bool:
        out = [(f, d) for f, d in ctx.emitted]
        ctx.emitted.clear()
        for f, d in out:
            assert d is DOWN
            for s in complete_offloads(f.copy()):
                deliver(s)
        return bool(out)

    def _server_rx(self, frame: Frame) -> None:
        pkt = Packet(frame)
        if self.server is None:
            self.server = TcpEndpoint.passive(pkt, self.gcfg, self.now)
            self.server.accept(self.now)
        else:
            self.server.receive(pkt, self.now)

    def step(self) -> bool:
        moved = self._guest_frames(self.client, self.a)
        if self.server is not None:
            moved |= self._guest_frames(self.server, self.b)
        moved |= self._to_guest(self.actx, lambda f: self.client.receive(Packet(f), self.now))
        moved |= self._to_guest(self.bctx, self._server_rx)
        # the transport: A's new streams become offers at B; answers go back
        for s in self.actx.streams[len(self.pairs):]:
            offer = self.bctx.listeners[0].offer(flow=s.request.flow)
            self.pairs.append([s, offer, 0, 0, False, False, False])
            moved = True
        for p in self.pairs:
            s, offer = p[0], p[1]
            if p[6]:
                continue
            if offer.answer is None:
                continue
            if offer.answer != "accept":
                s.closed(offer.answer[0], offer.answer[1])
                p[6] = True
                continue
            t = offer.stream
            if not t.connected and t.final is None:
                t.connect()
                s.connect()
                moved = True
            moved |= self._pipe(p, s, t, 2, 4)
            moved |= self._pipe(p, t, s, 3, 5)
            if p[4] and p[5] and s.final is None:
                s.closed("closed")
                t.closed("closed")
                p[6] = True
        for ep, got in ((self.client, self.got_client), (self.server, self.got_server)):
            if ep is not None and ep.readable:
                got += ep.read(ep.readable, self.now)
                moved = True
        return moved

    @staticmethod
    def _pipe(p: list, src, dst, sent_i: int, ended_i: int) -> bool:
        new = bytes(src.written[p[sent_i]:])
        moved = False
        if new and not dst.paused:
            chunk = new[:dst.request.read_chunk]
            dst.data(chunk)
            p[sent_i] += len(chunk)
            moved = True
        if src.shut and p[sent_i] == len(src.written) and not p[ended_i]:
            dst.end()
            p[ended_i] = True
            moved = True
        return moved

    def run(self, until: float, app=None) -> None:
        for _ in range(100000):
            if app is not None:
                app(self)
            if self.step():
                continue
            times = [t for t in (self.a.poll_at(), self.b.poll_at(), self.client.poll_at(),
                                 self.server.poll_at() if self.server else None)
                     if t is not None]
            nxt = min(times) if times else None
            if nxt is None or nxt > until:
                return
            self.now = max(self.now, nxt)
            self.actx.now = self.bctx.now = self.now
            for svc in (self.a, self.b):
                t = svc.poll_at()
                if t is not None and t <= self.now:
                    svc.on_timer(self.now)
            for ep in (self.client, self.server):
                if ep is not None and (t := ep.poll_at()) is not None and t <= self.now:
                    ep.on_timer(self.now)
        raise AssertionError("no quiescence")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_byte_written_at_a_arrives_at_bs_guest_and_back(v6: bool) -> None:
    j = Joined(v6)
    up = bytes((i * 7 + 3) % 256 for i in range(300_000))
    down = bytes((i * 13 + 1) % 251 for i in range(200_000))
    sent = {"up": 0, "down": 0}

    def app(j: Joined) -> None:
        if j.client.state is TcpState.ESTABLISHED and sent["up"] < len(up):
            sent["up"] += j.client.send(up[sent["up"]:], j.now)
            if sent["up"] == len(up):
                j.client.shutdown(j.now)
        s = j.server
        if s is not None and s.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT) \
                and sent["down"] < len(down):
            sent["down"] += s.send(down[sent["down"]:], j.now)
            if sent["down"] == len(down):
                s.shutdown(j.now)

    j.run(30.0, app)
    assert j.server is not None
    assert bytes(j.got_server) == up  # intact, in order
    assert bytes(j.got_client) == down
    assert j.client.peer_fin and j.server.peer_fin  # FIN both ways
    j.run(40.0)
    assert j.a.report(0.0)["connections_active"] == 0 and j.b.report(0.0)["connections_active"] == 0
    assert j.actx.extra("connections_closed") == 1 and j.bctx.extra("connections_closed") == 1
    assert j.actx.extra("bytes_up") == len(up) and j.bctx.extra("bytes_up") == len(down)
    assert j.bctx.extra("inbound_accepted") == 1


def test_joined_refusal_at_b_resets_the_client_at_a() -> None:
    j = Joined()
    # B's guest refuses: answer its SYN with RST instead of a passive endpoint
    j.step()
    [syn] = wire(j.bctx)
    j.b.process(seg("RA", 0, syn[TCP].seq + 1, sport=80, dport=40000, src=B_IP, dst=A_IP,
                    smac=B_MAC, dmac=GW_B), UP, 0.0)
    j.step()
    [rst] = wire(j.actx)
    assert rst[TCP].flags.R and rst[IP].dst == A_IP
    assert j.actx.extra("connections_refused") == 1


# -- fuzz ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(min_size=0, max_size=120), st.booleans(),
                          st.integers(0, 4)), max_size=20))
def test_random_frames_never_raise(frames: list[tuple[bytes, bool, int]]) -> None:
    udt, ctx = make_b(peers=PEERS_A, fallback="passthrough")
    templates = [b"", bytes(seg("S").data), bytes(seg("SA", sport=80, dport=40000, src=B_IP,
                                                      dst=A_IP).data),
                 bytes(seg("S", src=A_IP6, dst=B_IP6).data), bytes(seg("PA", data=b"x").data)]
    now = 0.0
    for raw, up, t in frames:
        data = bytearray(templates[t])
        data[:len(raw)] = raw[:len(data)] if data else raw
        now += 0.1
        udt.process(Frame(bytes(data)), UP if up else DOWN, now)
        for s in ctx.streams:
            if s.final is None and not s.connected:
                s.closed("timeout") if t % 2 else s.connect()
    run_timers(udt, ctx, now + 100)
    udt.stop(now + 100)
