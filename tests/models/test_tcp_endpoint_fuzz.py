"""Hypothesis stateful tests of the virtual TCP endpoint: random and mutated segment
streams (flags, sequence and acknowledgment numbers near and far from what the endpoint
expects, payloads, windows, options, bad checksums, garbage frames) interleaved with timer
firings and application calls never put the endpoint in an impossible state, never raise
anything but the project's own errors, and never deliver or send a wrong byte."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from models_tcplink import ACK, FIN, PSH, RST, SYN, Peer, quick, to_state
from vtl.models.seq import MASK
from vtl.models.tcp_endpoint import (
    Aborted,
    Closed,
    Connected,
    DataReady,
    EndpointConfig,
    PeerFinished,
)
from vtl.models.tcp_state import TcpState

from vtl.errors import VTLError
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet
from vtl.packet.tcp import URG, TcpOptions

S = TcpState
STATES = [s.name for s in S if s is not S.CLOSED] + ["CLOSED"]
FLAGS = [SYN, ACK, FIN, RST, PSH, URG]
ANY_FLAGS = st.lists(st.sampled_from(FLAGS), max_size=4).map(lambda fs: sum(set(fs)))


def pattern(off: int, n: int) -> bytes:
    """The VM's stream: byte ``k`` is a function of ``k``, so any delivered byte can be
    checked whatever segments carried it."""
    return bytes(((off + i) * 131 + ((off + i) >> 8)) & 0xFF for i in range(n))


def our_pattern(off: int, n: int) -> bytes:
    return bytes(((off + i) * 37 + 11) & 0xFF for i in range(n))


configs = st.builds(
    EndpointConfig,
    offload=st.booleans(),
    sack=st.booleans(),
    timestamps=st.booleans(),
    wscale=st.sampled_from([0, 7, 9, 14]),
    send_buffer=st.sampled_from([4096, 65536, 1 << 20]),
    recv_buffer=st.sampled_from([2048, 65536, 1 << 20]),
    gso_max=st.sampled_from([8192, 62 * 1024]),
    initial_cwnd_segments=st.sampled_from([1, 10]),
    verify_checksums=st.booleans(),
)
peers = st.builds(
    Peer,
    isn=st.sampled_from([5000, (1 << 32) - 3000, 0x7FFFFFF0]),
    mss=st.sampled_from([536, 1460, 9000]),
    wscale=st.sampled_from([None, 0, 7, 14]),
    sack=st.booleans(),
    timestamps=st.booleans(),
    window=st.sampled_from([0, 1, 1000, 65535]),
)


class EndpointMachine(RuleBasedStateMachine):
    """Drives one endpoint with a scripted, often misbehaving VM."""

    @initialize(state=st.sampled_from(STATES + ["ESTABLISHED"] * 5), cfg=configs, peer=peers,
                iss=st.sampled_from([1_000_000, (1 << 32) - 2000]))
    def start(self, state, cfg, peer, iss):
        self.now = 100.0
        self.cfg = cfg
        self.iss = iss
        self.ep, self.peer = to_state(state, cfg, peer, now=self.now, iss=iss)
        self.events: list = []
        self.closed_seen = False
        self.sent = bytearray()  # what the application handed to the endpoint
        self.read = 0  # stream offset of the next byte the application reads
        self.errors = 0

    # -- helpers ------------------------------------------------------------------------

    def call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except VTLError as e:
            self.errors += 1
            self.last_error = e
            return None

    def drain(self) -> None:
        ep = self.ep
        frames, ep.outbox = ep.outbox, []
        for f in frames:
            p = Packet(f)
            if p.tcp is None:  # an ICMP unreachable: only ever for a held SYN
                assert p.icmp is not None or p.icmp6 is not None
                continue
            s = quick(f)
            if self.closed_seen:
                assert s.rst, f"{s} sent after Closed"
            if f.vnet is None or not f.vnet.is_gso:
                for w in complete_offloads(f.copy()):
                    assert Packet(w).verify_checksums(), s
            if s.payload:  # every byte we send is the application's, at its offset
                off = (s.seq - (self.ep.tcb.iss + 1)) & MASK
                assert off + len(s.payload) <= len(self.sent), (off, len(s.payload))
                assert s.payload == bytes(self.sent[off : off + len(s.payload)])
            self.peer.learn(s)
        for e in ep.events:
            self.events.append(e)
            if isinstance(e, Closed):
                self.closed_seen = True
        ep.events.clear()

    def expected(self) -> int:
        """Sequence number of the VM's next in-order byte as the endpoint sees it."""
        return self.ep.tcb.rcv_nxt

    # -- the VM -------------------------------------------------------------------------

    @rule(data=st.data(),
          flags=st.one_of(st.sampled_from([ACK, ACK | PSH, ACK | FIN]), ANY_FLAGS),
          seq_kind=st.sampled_from(["exact", "near", "old", "far", "random", "peer"]),
          ack_kind=st.sampled_from(["una", "nxt", "inflight", "near", "random", "peer"]),
          size=st.sampled_from([0, 0, 1, 100, 1400, 3000, 9000]),
          window=st.sampled_from([0, 1, 255, 4096, 65535]),
          opt_kind=st.sampled_from(["peer", "none", "ts_old", "ts_new", "sack", "syn", "raw"]),
          dt=st.sampled_from([0.0, 0.001, 0.05, 0.3]))
    def segment(self, data, flags, seq_kind, ack_kind, size, window, opt_kind, dt):
        ep, peer = self.ep, self.peer
        self.now += dt
        base = self.expected()
        seq = {
            "exact": base,
            "near": (base + data.draw(st.integers(-3000, 70_000))) & MASK,
            "old": (base - data.draw(st.integers(1, 100_000))) & MASK,
            "far": (base + data.draw(st.sampled_from([1 << 20, 1 << 30, 1 << 31]))) & MASK,
            "random": data.draw(st.integers(0, MASK)),
            "peer": peer.snd_nxt,
        }[seq_kind]
        una = (ep.tcb.iss + 1 + ep.sbuf.una) & MASK
        top = ep.max_sent - ep.sbuf.una + (1 if ep.fin_sent else 0)
        ack = {
            "una": una,
            "nxt": ep._snd_nxt(),
            "inflight": (una + data.draw(st.integers(0, max(top, 0)))) & MASK,
            "near": (una + data.draw(st.integers(-5000, 5000))) & MASK,
            "random": data.draw(st.integers(0, MASK)),
            "peer": (ep.tcb.iss + 1) & MASK,
        }[ack_kind]
        off = (seq - (ep.tcb.irs + 1)) & MASK
        payload = pattern(off, size)
        opts: TcpOptions | bytes | None
        tsv = peer.tsval
        if opt_kind == "peer":
            opts = peer.options()
        elif opt_kind == "none":
            opts = None
        elif opt_kind in ("ts_old", "ts_new"):
            d = data.draw(st.integers(1, 1 << 30))
            tsv = (peer.tsval - d if opt_kind == "ts_old" else peer.tsval + d) & MASK
            opts = TcpOptions(timestamps=(tsv, data.draw(st.integers(0, MASK))))
        elif opt_kind == "sack":
            n = data.draw(st.integers(1, 3))
            blocks = tuple(((una + data.draw(st.integers(-3000, 80_000))) & MASK,
                            (una + data.draw(st.integers(-3000, 80_000))) & MASK)
                           for _ in range(n))
            opts = TcpOptions(sack_blocks=blocks,
                              timestamps=(tsv, 0) if data.draw(st.booleans()) else None)
        elif opt_kind == "syn":
            opts = TcpOptions(mss=data.draw(st.integers(0, 65535)),
                              wscale=data.draw(st.integers(0, 255)),
                              sack_permitted=data.draw(st.booleans()),
                              timestamps=(tsv, 0))
        else:
            opts = data.draw(st.binary(min_size=0, max_size=10)).ljust(
                data.draw(st.sampled_from([0, 4, 8, 12])), b"\x01")[:12]
            opts = opts[: len(opts) // 4 * 4]
        pkt = self.call(peer.seg, flags, seq=seq, ack=ack, payload=payload, window=window,
                        options=opts)
        if pkt is None:
            return
        if self.cfg.verify_checksums and data.draw(st.integers(0, 9)) == 0:
            # now and then a corrupted copy (without verification it would be delivered)
            pkt.data[data.draw(st.integers(14, len(pkt.data) - 1))] ^= 0xFF
        if seq_kind == "peer" and data.draw(st.booleans()):
            peer.snd_nxt = (seq + size + (1 if flags & (SYN | FIN) else 0)) & MASK
        self.call(ep.receive, pkt, self.now)
        self.drain()

    @rule(data=st.data(), size=st.sampled_from([0, 1, 500, 5000]))
    def in_order_data(self, data, size):
        """A well-behaved VM segment carrying the next bytes (keeps the stream moving)."""
        ep, peer = self.ep, self.peer
        self.now += 0.001
        seq = self.expected()
        off = (seq - (ep.tcb.irs + 1)) & MASK
        flags = ACK | (FIN if data.draw(st.integers(0, 7)) == 0 else 0)
        pkt = peer.seg(flags, seq=seq, ack=ep._snd_nxt(), payload=pattern(off, size))
        self.call(ep.receive, pkt, self.now)
        self.drain()

    @rule(data=st.data(), sack=st.booleans(), window=st.sampled_from([None, 0, 1, 65535]))
    def vm_acks(self, data, sack, window):
        """A well-behaved ACK of part or all of what the endpoint sent, with SACK blocks
        over some of the rest (holes the VM pretends to have)."""
        ep, peer = self.ep, self.peer
        if not ep.state.synchronized:
            return
        self.now += 0.001
        una_off, top = ep.sbuf.una, ep.max_sent + (1 if ep.fin_sent else 0)
        ack_off = data.draw(st.integers(una_off, max(una_off, top)))
        opts = peer.options()
        if sack and top - ack_off > 2:
            a = data.draw(st.integers(ack_off + 1, top - 1))
            b = data.draw(st.integers(a + 1, top))
            base = ep.tcb.iss + 1
            blocks = (((base + a) & MASK, (base + b) & MASK),)
            opts = TcpOptions(sack_blocks=blocks,
                              timestamps=opts.timestamps if opts is not None else None)
        pkt = peer.seg(ACK, seq=self.expected(), ack=(ep.tcb.iss + 1 + ack_off) & MASK,
                       window=window, options=opts)
        self.call(ep.receive, pkt, self.now)
        self.drain()

    @rule(junk=st.binary(max_size=120))
    def garbage(self, junk):
        try:
            pkt = Packet(bytearray(junk))
        except VTLError:
            return
        self.call(self.ep.receive, pkt, self.now)
        self.drain()

    # -- time ---------------------------------------------------------------------------

    @rule(early=st.booleans())
    def timer(self, early):
        at = self.ep.poll_at()
        if at is None:
            self.now += 1.0
        elif early:
            self.now = max(self.now, at - 0.001)
        else:
            self.now = max(self.now, at)
        self.call(self.ep.on_timer, self.now)
        self.drain()

    @rule(seconds=st.sampled_from([0.01, 0.3, 3.0]), long=st.integers(0, 9))
    def idle(self, seconds, long):
        """Let the timers run for a while (now and then ten minutes), the VM silent."""
        end = self.now + (600.0 if long == 0 else seconds)
        for _ in range(200):
            at = self.ep.poll_at()
            if at is None or at > end:
                break
            self.now = max(self.now, at)
            self.call(self.ep.on_timer, self.now)
            self.drain()
        self.now = end

    # -- the application ------------------------------------------------------------------

    @rule(size=st.sampled_from([1, 1000, 70_000]))
    def app_send(self, size):
        chunk = our_pattern(len(self.sent), size)
        n = self.call(self.ep.send, chunk, self.now)
        if n:
            self.sent += chunk[:n]
        assert n is None or 0 <= n <= size
        self.drain()

    @rule(size=st.sampled_from([1, 100, 1 << 20]))
    def app_read(self, size):
        data = self.call(self.ep.read, size, self.now)
        if data:
            assert data == pattern(self.read, len(data)), "delivered bytes differ"
            self.read += len(data)
        self.drain()

    @rule()
    def app_shutdown(self):
        self.call(self.ep.shutdown, self.now)
        self.drain()

    @precondition(lambda self: self.ep.state is S.LISTEN)
    @rule(how=st.sampled_from(["accept"] * 6 + ["refuse", "unreachable"]))
    def app_answer(self, how):
        self.call(getattr(self.ep, how), self.now)
        self.drain()

    @rule(really=st.integers(0, 9))
    def app_abort(self, really):
        if really:  # seldom: it ends the run's interesting part
            return
        self.call(self.ep.abort, self.now)
        self.drain()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def sane(self):
        ep = self.ep
        assert isinstance(ep.state, TcpState)
        assert ep.sbuf.una <= ep.nxt <= ep.max_sent <= ep.sbuf.end
        assert ep.sbuf.una >= 0
        assert ep.buffered <= self.cfg.recv_buffer + self.cfg.send_buffer + 1024
        assert ep.rbuf.unread + ep.rbuf.ooo_bytes <= self.cfg.recv_buffer
        at = ep.poll_at()
        assert at is None or (isinstance(at, float) and math.isfinite(at))
        assert ep.cwnd >= 0 and ep.snd_wnd >= 0

    @invariant()
    def events_well_formed(self):
        evs = self.events
        assert sum(isinstance(e, Closed) for e in evs) <= 1
        if any(isinstance(e, Closed) for e in evs):
            assert isinstance(evs[-1], Closed)
            assert self.ep.state is S.CLOSED and self.ep.poll_at() is None
        assert sum(isinstance(e, Aborted) for e in evs) <= 1
        for i, e in enumerate(evs):
            if isinstance(e, Aborted):
                assert i + 1 < len(evs) and isinstance(evs[i + 1], Closed)
        assert sum(isinstance(e, Connected) for e in evs) <= 1
        assert sum(isinstance(e, PeerFinished) for e in evs) <= 1
        assert all(isinstance(e, (Aborted, Closed, Connected, DataReady, PeerFinished))
                   or type(e).__name__ == "Writable" for e in evs)

    @invariant()
    def not_stuck(self):
        """Whatever is outstanding has a timer that will see to it."""
        ep = self.ep
        st_ = ep.state
        if not st_.synchronized or st_ is S.TIME_WAIT:
            return
        outstanding = ep.max_sent > ep.sbuf.una or (ep.fin_sent and not ep.fin_acked)
        if outstanding or ep.nxt < ep.sbuf.end:
            assert ep.poll_at() is not None, "data or FIN outstanding and no timer"

    @invariant()
    def tcb_consistent(self):
        ep = self.ep
        if not ep.state.synchronized:
            return
        t = ep.tcb
        assert t.rcv_nxt == (t.irs + 1 + ep.rbuf.nxt + (1 if ep.peer_fin else 0)) & MASK
        assert t.snd_una == (t.iss + 1 + ep.sbuf.una + (1 if ep.fin_acked else 0)) & MASK


EndpointMachine.TestCase.settings = settings(
    settings.default, stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEndpointStateful = EndpointMachine.TestCase
