"""The virtual TCP endpoint: a sans-IO TCP that takes over one end of a connection.

Theory of operation. A :class:`TcpEndpoint` is one TCP endpoint (RFC 9293)
that VTL plays toward the VM: the remote server after a *passive* open (the
VM's SYN arrives; the endpoint answers only when :meth:`accept` is called, so
a service can first connect the upstream, or :meth:`refuse` / :meth:`unreachable`),
or the remote client after an *active* open (:meth:`TcpEndpoint.active` sends
the SYN toward the VM). The caller feeds it every segment of the connection
(:meth:`receive`), the application bytes to send (:meth:`send`), reads what
arrived (:meth:`read`), and calls :meth:`on_timer` at :meth:`poll_at`. Frames
to emit toward the VM pile up in :attr:`outbox`, happenings in :attr:`events`.

State is explicit: :class:`~vtl.models.tcp_state.TcpState`, one receive
handler per state (``_rx_<state>``), and every transition goes through
:meth:`_enter`. Time comes in as ``now``.

What a modern stack does and this does too: MSS, window scaling, SACK and
timestamps negotiated from the peer's SYN (each only if the peer offered it);
PAWS; RFC 5961 challenge ACKs for in-window RST and SYN; in-order delivery
with a bounded out-of-order store answered with SACK blocks; RFC 6298 RTO
(timestamps give the samples), fast retransmit on three duplicate ACKs and
SACK-guided hole retransmission; NewReno-style congestion window; the peer's
receive window honoured, with zero-window probes (persist timer); the window
we advertise is the room left in the receive buffer, i.e. it tracks how fast
the application (the upstream) takes the bytes, and never shrinks its right
edge; half-close both ways; RST both ways; a short, bounded TIME-WAIT. With
``offload`` the endpoint sends GSO super-frames of up to ``gso_max`` bytes and
leaves checksums to the kernel (NEEDS_CSUM).

Internally the send and receive sides count in unbounded stream offsets
(:mod:`vtl.models.tcp_buffers`); sequence numbers are converted at the edge,
so wrap-around at 2**32 is a non-event.

What it does not do: urgent data (ignored), ECN, TCP Fast Open, MD5/AO
options, keep-alives (the ``keepalive`` service uses the two-endpoint model),
delayed ACKs (every data segment is acknowledged at once: the VM is one hop
away, and its own segments are GSO super-frames).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from vtl.models.seq import MASK, seq_add, seq_diff, seq_lt
from vtl.models.tcp_buffers import ReceiveBuffer, RtoEstimator, SendBuffer
from vtl.models.tcp_segment import FlowAddrs, Segment, SegmentWriter
from vtl.models.tcp_state import HalfState, TcpState, segment_options, syn_options

from vtl.errors import PacketError
from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.checksum import NEEDS_CSUM
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

S = TcpState


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """How the endpoint behaves; the defaults suit a VM one hop away."""

    mss: int = 1460  # MSS announced (IPv6 subtracts 20)
    wscale: int = 9  # largest window-scale shift offered (used only if the peer offers one;
    # lowered so that recv_buffer is at least eight window units)
    sack: bool = True
    timestamps: bool = True
    send_buffer: int = 1 << 20  # bytes accepted by send() and not yet acknowledged
    recv_buffer: int = 1 << 20  # received bytes not yet read, including out of order
    offload: bool = True  # GSO super-frames and NEEDS_CSUM checksums
    gso_max: int = 62 * 1024  # largest payload of one super-frame
    initial_cwnd_segments: int = 10
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 30.0
    max_retries: int = 12  # consecutive timeouts before giving up (the peer is gone)
    syn_retries: int = 5
    persist_max: float = 5.0  # longest interval between zero-window probes
    time_wait: float = 1.0  # bounded TIME-WAIT (the VM is local, 2*MSL is not needed)
    verify_checksums: bool = True  # for frames whose checksum the kernel did not leave us


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake completed."""


@dataclass(frozen=True, slots=True)
class DataReady:
    """New bytes can be read (:attr:`TcpEndpoint.readable`)."""


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The VM sent FIN: after the bytes already readable, it sends nothing more."""


@dataclass(frozen=True, slots=True)
class Writable:
    """:attr:`TcpEndpoint.send_room` grew after :meth:`TcpEndpoint.send` took less than offered."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The connection ended abnormally; ``reason`` is ``"reset"`` (the VM sent RST),
    ``"timeout"`` (the VM stopped answering) or ``"local"`` (abort/refuse)."""

    reason: Literal["reset", "timeout", "local"]


@dataclass(frozen=True, slots=True)
class Closed:
    """The endpoint is CLOSED and can be forgotten (always the last event)."""


Event = Connected | DataReady | PeerFinished | Writable | Aborted | Closed


class TcpEndpoint:
    """One virtual TCP endpoint facing the VM (see the module docstring)."""

    def __init__(self, addrs: FlowAddrs, config: EndpointConfig, now: float,
                 iss: int | None = None):
        self.addrs = addrs  # local (the endpoint) -> peer (the VM)
        self.config = config
        self.tcb = HalfState()
        self.tcb.iss = random.getrandbits(32) if iss is None else iss & MASK
        self.tcb.ts_offset = random.getrandbits(32)
        self.writer = SegmentWriter(addrs, offload=config.offload)
        self.outbox: list[Frame] = []
        self.events: list[Event] = []
        self.sbuf = SendBuffer(config.send_buffer)
        self.rbuf = ReceiveBuffer(config.recv_buffer)
        self.rto = RtoEstimator(config.rto_initial, config.rto_min, config.rto_max)
        self.v6 = addrs.v6
        self.mss_adv = config.mss - (20 if self.v6 else 0)
        # the shift offered: a unit larger than an eighth of the buffer would round whole
        # windows to zero and close the window for good
        self.wscale = min(config.wscale, max(0, config.recv_buffer.bit_length() - 4))
        # send side, in stream offsets (0 = first data byte)
        self.nxt = 0  # next offset to send
        self.max_sent = 0  # highest offset ever sent + 1
        self.fin_queued = False  # shutdown() called: FIN goes after the last byte
        self.fin_sent = False
        self.fin_acked = False
        self.peer_fin = False
        self.snd_wnd = 0  # the VM's window, bytes
        self.wnd_edge = 0  # offset just past what the VM's window allows
        self.cwnd = 0
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self.recover: int | None = None  # offset that ends fast recovery
        self.sacked: list[tuple[int, int]] = []  # VM's SACK blocks, offsets, sorted
        self.rexmit_hi = 0  # in recovery: retransmitted up to here already
        self.rcv_edge = 0  # offset past the right edge we advertised (never shrinks)
        self.timer_rexmit: float | None = None
        self.timer_persist: float | None = None
        self.timer_close: float | None = None  # TIME-WAIT expiry
        self.persist_interval = 0.0
        self.retries = 0
        self.rtt_probe: tuple[int, float] | None = None  # (offset, sent at) without timestamps
        self.rexmit_tsval: int | None = None  # our TSval at the latest retransmission
        self.want_writable = False
        self.syn: Packet | None = None  # the VM's SYN (passive open), kept for refusals
        self.peer_opts = TcpOptions()
        self.bad_segments = 0  # dropped: bad checksum or unacceptable
        self.retransmits = 0
        self.probes_unanswered = 0
        self._clock = now  # the latest `now` the endpoint was driven with (for TSval)

    # -- opening ------------------------------------------------------------------

    @classmethod
    def passive(cls, syn: Packet, config: EndpointConfig, now: float,
                iss: int | None = None) -> TcpEndpoint:
        """An endpoint for the VM's SYN, waiting in LISTEN for :meth:`accept`."""
        seg = Segment.parse(syn)
        if seg.flags & (SYN | ACK | RST) != SYN:
            raise PacketError("passive open needs a SYN without ACK or RST")
        ep = cls(FlowAddrs.of(syn).reverse(), config, now, iss)
        ep.syn = Packet(bytearray(syn.data))  # a private copy for refusals and ICMP quotes
        ep.peer_opts = seg.options
        t = ep.tcb
        t.irs = seg.seq
        t.rcv_nxt = seq_add(seg.seq, 1)
        ep._window_from(seg.window << 0)
        ep._enter(S.LISTEN)
        return ep

    @classmethod
    def active(cls, addrs: FlowAddrs, config: EndpointConfig, now: float,
               iss: int | None = None) -> TcpEndpoint:
        """Open toward the VM as a client (``addrs``: us -> the VM); sends the SYN."""
        ep = cls(addrs, config, now, iss)
        ep._enter(S.SYN_SENT)
        ep._send_syn(now, ack=False)
        return ep

    def accept(self, now: float) -> None:
        """Answer the held SYN with a SYN-ACK (passive open; the upstream is ready)."""
        self._clock = now
        if self.tcb.state is not S.LISTEN:
            return
        self._negotiate(now)
        self._enter(S.SYN_RECEIVED)
        self._send_syn(now, ack=True)

    def refuse(self, now: float) -> None:
        """Answer the held SYN with RST (the upstream refused the connection)."""
        if self.tcb.state is S.LISTEN and self.syn is not None:
            self.outbox.append(Frame(build.tcp_reset(self.syn)))
        self._abort_events("local")

    def unreachable(self, now: float, code: int = 1) -> None:
        """Answer the held SYN with ICMP destination unreachable (code 1: host)."""
        if self.tcb.state is S.LISTEN and self.syn is not None:
            c = code if not self.v6 else 3  # ICMPv6 3: address unreachable
            self.outbox.append(Frame(build.unreachable(self.syn, c)))
        self._abort_events("local")

    # -- the application side ---------------------------------------------------------

    @property
    def state(self) -> TcpState:
        return self.tcb.state

    @property
    def readable(self) -> int:
        return self.rbuf.unread

    @property
    def send_room(self) -> int:
        if self.fin_queued or self.tcb.state not in (S.SYN_RECEIVED, S.SYN_SENT,
                                                     S.ESTABLISHED, S.CLOSE_WAIT, S.LISTEN):
            return 0
        return self.sbuf.room

    @property
    def eof(self) -> bool:
        """The VM finished sending and every byte has been read."""
        return self.peer_fin and self.rbuf.unread == 0

    @property
    def buffered(self) -> int:
        """Bytes this endpoint holds (send queue, unread and out-of-order)."""
        return self.sbuf.queued + self.rbuf.unread + self.rbuf.ooo_bytes

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue bytes toward the VM; returns how many were taken (see send_room)."""
        self._clock = now
        n = self.sbuf.push(data) if self.send_room else 0
        if n < len(data):
            self.want_writable = True
        if n and self.tcb.state.synchronized:
            self._output(now)
        return n

    def read(self, size: int, now: float) -> bytes:
        """Take up to ``size`` received bytes; reopens the window (window update)."""
        self._clock = now
        out = self.rbuf.read(size)
        if out and self.tcb.state.synchronized and self.tcb.state.can_receive:
            # RFC 9293 3.8.6.2.2 receiver SWS avoidance: announce only a real opening, but
            # never wait for more than half the buffer (it may be smaller than one MSS)
            believed = self.rcv_edge - self.rbuf.nxt
            buf = self.config.recv_buffer
            step = min(max(self.tcb.mss, min(buf // 4, 65536)), max(1, buf // 2))
            if self._window() - believed >= step:
                self._send_ack(now)
        return out

    def shutdown(self, now: float) -> None:
        """Send FIN after the queued bytes (half-close our side)."""
        self._clock = now
        if self.fin_queued:
            return
        self.fin_queued = True
        if self.tcb.state is S.LISTEN:
            return
        if self.tcb.state.synchronized:
            self._output(now)

    def abort(self, now: float) -> None:
        """Reset the connection (RST toward the VM) and close."""
        self._clock = now
        st = self.tcb.state
        if st is S.LISTEN:
            self.refuse(now)
            return
        if st not in (S.CLOSED, S.TIME_WAIT, S.SYN_SENT):  # SYN-SENT: nothing to reset
            self._emit(RST | ACK, seq=self._snd_nxt(), options=False)
        self._abort_events("local")

    # -- timers -----------------------------------------------------------------------

    def poll_at(self) -> float | None:
        best = None
        for t in (self.timer_rexmit, self.timer_persist, self.timer_close):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def on_timer(self, now: float) -> None:
        self._clock = now
        if self.timer_close is not None and now >= self.timer_close:
            self.timer_close = None
            self._enter(S.CLOSED)
            return
        if self.timer_rexmit is not None and now >= self.timer_rexmit:
            self.timer_rexmit = None
            self._on_rexmit_timeout(now)
        if self.timer_persist is not None and now >= self.timer_persist:
            self.timer_persist = None
            self._on_persist(now)

    # -- segment arrival ----------------------------------------------------------------

    def receive(self, pkt: Packet, now: float) -> None:
        """Process one segment from the VM (RFC 9293 3.10.7)."""
        self._clock = now
        if self.config.verify_checksums and not _partial(pkt) and not pkt.verify_checksums():
            self.bad_segments += 1
            return
        seg = Segment.parse(pkt)
        handler = _RX[self.tcb.state]
        handler(self, seg, now)

    def _rx_closed(self, seg: Segment, now: float) -> None:
        if not seg.flags & RST:
            pkt = seg.addrs_pkt
            if pkt is not None:
                self.outbox.append(Frame(build.tcp_reset(pkt)))

    def _rx_listen(self, seg: Segment, now: float) -> None:
        # waiting for accept(): a retransmitted SYN changes nothing; RST abandons. The VM
        # numbers a RST after its SYN (RCV.NXT), or, from some stacks, with the SYN's own.
        if seg.flags & RST and seg.seq in (self.tcb.irs, self.tcb.rcv_nxt):
            self._abort_events("reset")

    def _rx_syn_sent(self, seg: Segment, now: float) -> None:
        t = self.tcb
        if seg.flags & ACK and seg.ack != seq_add(t.iss, 1):
            if not seg.flags & RST:
                self._emit(RST, seq=seg.ack, options=False)
            return
        if seg.flags & RST:
            if seg.flags & ACK:
                self._abort_events("reset")
            return
        if not seg.flags & SYN:
            return
        t.irs = seg.seq
        t.rcv_nxt = seq_add(seg.seq, 1)
        self.peer_opts = seg.options
        self._negotiate(now)
        if seg.flags & ACK:
            self._established_by_ack(seg, now)
            self._send_ack(now)
        else:  # simultaneous open (RFC 9293 3.5)
            self._enter(S.SYN_RECEIVED)
            self._send_syn(now, ack=True)

    def _rx_syn_received(self, seg: Segment, now: float) -> None:
        if seg.flags & SYN and seg.seq == self.tcb.irs:
            if not seg.flags & ACK:
                self._send_syn(now, ack=True)  # our SYN-ACK was lost: answer the retransmission
            elif seg.ack == seq_add(self.tcb.iss, 1):
                # simultaneous open (RFC 9293 figure 8): the VM's SYN-ACK crossed ours
                self._established_by_ack(seg, now)
            return
        if not self._acceptable(seg, now):
            return
        if seg.flags & RST:
            self._abort_events("reset")
            return
        if seg.flags & SYN:
            self._challenge_ack(now)
            return
        if not seg.flags & ACK:
            return
        if seg.ack != seq_add(self.tcb.iss, 1):
            self._emit(RST, seq=seg.ack, options=False)
            return
        self._established_by_ack(seg, now)
        self._rx_synchronized(seg, now)

    def _rx_synchronized(self, seg: Segment, now: float) -> None:
        """ESTABLISHED and the closing states but TIME-WAIT: the general path of RFC 9293
        3.10.7.4."""
        if not self._acceptable(seg, now):
            return
        if seg.flags & RST:
            if seg.seq == self.tcb.rcv_nxt:
                self._abort_events("reset")
            else:
                self._challenge_ack(now)  # RFC 5961 3.2
            return
        if seg.flags & SYN:
            self._challenge_ack(now)  # RFC 5961 4.2
            return
        if not seg.flags & ACK:
            return
        if not self._process_ack(seg, now):
            return
        self._process_data(seg, now)

    def _rx_time_wait(self, seg: Segment, now: float) -> None:
        """TIME-WAIT: the VM can only repeat its FIN (our last ACK was lost): acknowledge
        it again and restart the wait (RFC 9293 3.10.7.4). RST is ignored (RFC 1337: no
        TIME-WAIT assassination); what is unacceptable gets an ACK, a SYN a challenge ACK."""
        if seg.flags & RST:
            return
        if seg.flags & FIN and seq_add(seg.seq, len(seg.payload) + 1) == self.tcb.rcv_nxt:
            self._send_ack(now)
            self.timer_close = now + self.config.time_wait
            return
        if self._acceptable(seg, now) and seg.flags & SYN:
            self._challenge_ack(now)  # RFC 5961 4.2

    # -- pieces of segment processing -----------------------------------------------------

    def _acceptable(self, seg: Segment, now: float) -> bool:
        """Sequence test (RFC 9293 3.10.7.4 first check) and PAWS (RFC 7323 5)."""
        t = self.tcb
        rel = seq_diff(seg.seq, t.rcv_nxt)
        length = len(seg.payload) + (1 if seg.flags & FIN else 0)
        wnd = self.rcv_edge - self.rbuf.nxt
        if length == 0:  # the right edge itself is fine for an ACK (as Linux has it)
            ok = rel == 0 if wnd == 0 else 0 <= rel < wnd + (0 if seg.flags & RST else 1)
        else:
            ok = wnd > 0 and (0 <= rel < wnd or 0 < rel + length <= wnd)
            if not ok and wnd == 0 and rel == 0:
                ok = True  # zero-window probe: acknowledge it, keep nothing beyond the edge
        if ok and t.ts_ok and not seg.flags & RST:
            ts = seg.options.timestamps
            if ts is not None:
                if seq_lt(ts[0], t.ts_recent) and not seg.flags & SYN:
                    ok = False  # PAWS: an old duplicate
                elif rel <= 0:
                    t.ts_recent = ts[0]
        if not ok:
            self.bad_segments += 1
            if not seg.flags & RST:
                self._send_ack(now)
        return ok

    def _process_ack(self, seg: Segment, now: float) -> bool:
        """Acknowledgment and window (RFC 9293 3.10.7.4 fifth check); False to stop."""
        t = self.tcb
        una = self.sbuf.una
        ack_off = una + seq_diff(seg.ack, self._seq(una))
        top = self.max_sent + (1 if self.fin_sent else 0)
        if ack_off > top:
            self._send_ack(now)  # acknowledges something not yet sent
            return False
        if ack_off < una:
            return True  # old duplicate ACK: ignore, but the segment may carry data
        wnd = seg.window << t.snd_shift
        if self.tcb.sack_ok:
            self._note_sacks(seg)
        self.probes_unanswered = 0  # the VM is alive
        if ack_off > una:
            self._on_new_ack(ack_off, seg, now)
        elif not seg.payload and not seg.flags & FIN and wnd == self.snd_wnd \
                and wnd > 0 and self.max_sent > una:
            self._on_dupack(now)
        # window update (RFC 9293 3.10.7.4: SND.WL1/SND.WL2 rule)
        if seq_lt(t.snd_wl1, seg.seq) or (t.snd_wl1 == seg.seq and
                                         not seq_lt(seg.ack, t.snd_wl2)):
            reopened = self.snd_wnd == 0 and wnd > 0
            self._window_from(wnd)
            t.snd_wl1, t.snd_wl2 = seg.seq, seg.ack
            if reopened and self.nxt > self.sbuf.una:
                self.nxt = self.sbuf.una  # sent into a closed window, so dropped: resend now
        self._after_ack(now, ack_off > una)
        return self.tcb.state is not S.CLOSED

    def _on_new_ack(self, ack_off: int, seg: Segment, now: float) -> None:
        t = self.tcb
        data_end = self.sbuf.end
        acked = self.sbuf.ack(min(ack_off, data_end))
        una = self.sbuf.una
        self.sacked = [(max(s, una), e) for s, e in self.sacked if e > una]
        if self.fin_sent and ack_off == self.max_sent + 1:
            self.fin_acked = True
        t.snd_una = self._seq(self.sbuf.una) if not self.fin_acked else \
            seq_add(self._seq(self.sbuf.una), 1)
        if self.nxt < self.sbuf.una:
            self.nxt = self.sbuf.una
        self.retries = 0
        self.dupacks = 0
        # RTT sample: the timestamp echo, or the timed segment. Karn for timestamps: an
        # echo older than our latest retransmission can be that of an earlier copy (the
        # VM echoes its TS.Recent, which an old duplicate does not update) and would
        # count the retransmission timeout itself as round-trip time.
        ts = seg.options.timestamps if t.ts_ok else None
        if ts is not None and ts[1]:
            if self.rexmit_tsval is None or not seq_lt(ts[1], self.rexmit_tsval):
                self.rto.sample(((t.ts_val(now) - ts[1]) & MASK) / 1000.0)
                self.rexmit_tsval = None
        elif self.rtt_probe is not None and ack_off >= self.rtt_probe[0]:
            self.rto.sample(now - self.rtt_probe[1])
            self.rtt_probe = None
        # congestion window (RFC 5681, appropriate byte counting)
        if self.recover is not None:
            if ack_off >= self.recover:
                self.recover = None
                self.cwnd = max(self.ssthresh, 2 * t.mss)
            else:  # partial ACK: the next hole is lost too
                self._retransmit_hole(now)
        elif self.cwnd < self.ssthresh:
            self.cwnd += min(acked, 2 * self.config.gso_max)
        else:
            self.cwnd += max(1, t.mss * t.mss // max(self.cwnd, 1))
        self.cwnd = min(self.cwnd, 1 << 30)
        if self.want_writable and self.send_room > 0:
            self.want_writable = False
            self.events.append(Writable())
        st = t.state
        if self.fin_acked:
            if st is S.FIN_WAIT_1:
                self._enter(S.FIN_WAIT_2)
            elif st is S.CLOSING:
                self._enter_time_wait(now)
            elif st is S.LAST_ACK:
                self._enter(S.CLOSED)

    def _on_dupack(self, now: float) -> None:
        self.dupacks += 1
        if self.dupacks == 3 and self.recover is None:
            flight = self.max_sent - self.sbuf.una
            self.ssthresh = max(flight // 2, 2 * self.tcb.mss)
            self.cwnd = self.ssthresh + 3 * self.tcb.mss
            self.recover = self.max_sent
            self.rexmit_hi = self.sbuf.una
            self._retransmit_hole(now)
        elif self.recover is not None:
            self.cwnd += self.tcb.mss
            if self.sacked:
                self._retransmit_hole(now)

    def _note_sacks(self, seg: Segment) -> None:
        blocks = seg.options.sack_blocks
        una = self.sbuf.una
        base = self._seq(una)
        keep = [(s, e) for s, e in self.sacked if e > una]
        for left, right in blocks:
            s = una + seq_diff(left, base)
            e = una + seq_diff(right, base)
            if una < s < e <= self.max_sent:
                keep.append((s, e))
        keep.sort()
        merged: list[tuple[int, int]] = []
        for s, e in keep:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.sacked = merged

    def _retransmit_hole(self, now: float) -> None:
        """Resend the first unacknowledged range the VM has not SACKed and that counts as
        lost (RFC 6675 NextSeg and IsLost): the range at SND.UNA always (it is what the
        duplicate or partial ACKs ask for), a later hole only once three SACK blocks or
        more than two segments' worth of SACKed bytes lie above it; what lies beyond the
        highest SACKed byte is still in flight. Without SACK, only the first unacknowledged
        segment (NewReno)."""
        una = self.sbuf.una
        start = max(una, self.rexmit_hi)
        end = min(self.max_sent, self.sbuf.end)
        if self.sacked:
            end = min(end, self.sacked[-1][0])
        elif start > una:
            return
        for s, e in self.sacked:
            if s <= start < e:
                start = e
            elif s > start:
                end = min(end, s)
                break
        if start >= end:
            if self.fin_sent and not self.fin_acked and start >= self.sbuf.end:
                self._emit(FIN | ACK, seq=self._seq(self.sbuf.end))
            return
        if start > una and not self._is_lost(start):
            return
        size = min(end - start, self.config.gso_max if self.config.offload else self.tcb.mss)
        self.rexmit_hi = start + self._send_data(start, size, now, retransmit=True)

    def _is_lost(self, off: int) -> bool:
        """RFC 6675 IsLost with DupThresh 3: SACKed blocks or bytes above ``off``."""
        above = [(s, e) for s, e in self.sacked if e > off]
        return len(above) >= 3 or sum(e - max(s, off) for s, e in above) > 2 * self.tcb.mss

    def _process_data(self, seg: Segment, now: float) -> None:
        """Segment text and FIN (RFC 9293 3.10.7.4 seventh and eighth checks)."""
        t = self.tcb
        payload = seg.payload
        if payload and t.state.can_receive:
            off = self.rbuf.nxt + seq_diff(seg.seq, t.rcv_nxt)
            got = self.rbuf.add(off, payload, max(self.rcv_edge, self.rbuf.nxt))
            if got:
                t.rcv_nxt = self._rseq(self.rbuf.nxt)
                self.events.append(DataReady())
        fin = bool(seg.flags & FIN)
        if fin and not self.peer_fin:
            fin_off = self.rbuf.nxt + seq_diff(seg.seq, t.rcv_nxt) + len(payload)
            if fin_off == self.rbuf.nxt:
                self.peer_fin = True
                t.rcv_nxt = seq_add(t.rcv_nxt, 1)
                self.events.append(PeerFinished())
                self._on_peer_fin(now)
        if payload or fin:
            self._send_ack(now)

    def _on_peer_fin(self, now: float) -> None:
        st = self.tcb.state
        if st is S.ESTABLISHED:
            self._enter(S.CLOSE_WAIT)
        elif st is S.FIN_WAIT_1:
            if self.fin_acked:
                self._enter_time_wait(now)
            else:
                self._enter(S.CLOSING)
        elif st is S.FIN_WAIT_2:
            self._enter_time_wait(now)

    def _established_by_ack(self, seg: Segment, now: float) -> None:
        t = self.tcb
        self.sbuf.una = 0
        t.snd_una = seq_add(t.iss, 1)
        t.snd_wl1, t.snd_wl2 = seg.seq, seg.ack
        self._window_from(seg.window << (t.snd_shift if not seg.flags & SYN else 0))
        self.retries = 0
        self.timer_rexmit = None
        self.cwnd = self.config.initial_cwnd_segments * t.mss
        ts = seg.options.timestamps if t.ts_ok else None
        if ts is not None and ts[1]:
            self.rto.sample(((t.ts_val(now) - ts[1]) & MASK) / 1000.0)
        self._enter(S.ESTABLISHED)
        self.events.append(Connected())
        if self.sbuf.queued or self.fin_queued:
            self._output(now)

    # -- sending ----------------------------------------------------------------------------

    def _after_ack(self, now: float, new_ack: bool) -> None:
        """Arm, restart or stop the retransmission timer (RFC 6298 5.1-5.3: restarted only
        when new data is acknowledged, so ACKs that acknowledge nothing new, such as those
        on the VM's own data, never postpone it) and send what the windows allow."""
        if self.max_sent + (1 if self.fin_sent else 0) <= self.sbuf.una or self.fin_acked:
            self.timer_rexmit = None
        elif new_ack or self.timer_rexmit is None:
            self.timer_rexmit = now + self.rto.rto
        self._output(now)

    def _output(self, now: float) -> None:
        """Send new data (and the FIN) as the VM's window and the congestion window allow."""
        t = self.tcb
        if not t.state.synchronized:
            return
        cfg = self.config
        chunk = cfg.gso_max if cfg.offload else t.mss
        end = self.sbuf.end
        sent = False
        while self.nxt < end:
            limit = min(self.wnd_edge, self.sbuf.una + max(self.cwnd, t.mss))
            room = limit - self.nxt
            if room <= 0:
                break
            size = min(room, end - self.nxt, chunk)
            if size < t.mss and self.nxt + size < end and self.max_sent > self.sbuf.una:
                break  # sender SWS avoidance: wait for a full segment while data is in flight
            self._send_data(self.nxt, size, now)
            sent = True
        if self.fin_queued and not self.fin_sent and self.nxt >= end and t.state.can_send:
            self._send_fin(now)
            sent = True
        if sent and self.timer_rexmit is None:
            self.timer_rexmit = now + self.rto.rto
        if self.nxt < end and self.wnd_edge <= self.nxt and self.max_sent <= self.sbuf.una:
            if self.timer_persist is None:  # zero window, nothing in flight: probe it
                self.persist_interval = max(self.rto.rto, 0.2)
                self.timer_persist = now + self.persist_interval
        else:
            self.timer_persist = None

    def _send_data(self, off: int, size: int, now: float, retransmit: bool = False) -> int:
        """Send ``[off, off + size)``, less if the options leave less room in one segment
        (without offload); returns the bytes sent."""
        t = self.tcb
        opts = self._options()
        seg_max = self._segment_max(len(opts))
        if not self.config.offload:
            size = min(size, seg_max)
        payload = self.sbuf.view(off, size)
        flags = ACK | (PSH if off + size >= self.sbuf.end else 0)
        fin = self.fin_queued and off + size >= self.sbuf.end and \
            (t.state.can_send or (self.fin_sent and not self.fin_acked))
        if fin:
            flags |= FIN
        self._emit(flags, seq=self._seq(off), payload=payload, opts=opts, seg_max=seg_max)
        if retransmit:
            self.retransmits += 1
            self.rexmit_tsval = t.ts_val(now)
        else:
            if self.rtt_probe is None and not t.ts_ok and off >= self.max_sent:
                self.rtt_probe = (off + size, now)  # Karn: time new data only
            self.nxt = off + size
            self.max_sent = max(self.max_sent, self.nxt)
        if fin and not self.fin_sent:
            self._fin_sent_now()
        return size

    def _segment_max(self, options_len: int) -> int:
        """Payload bytes that fit one segment next to ``options_len`` bytes of options: the
        VM's MSS counts data and options together (RFC 9293 3.7.1, RFC 6691)."""
        return max(8, self.tcb.mss + (12 if self.tcb.ts_ok else 0) - options_len)

    def _send_fin(self, now: float) -> None:
        self._emit(FIN | ACK, seq=self._seq(self.sbuf.end))
        self._fin_sent_now()

    def _fin_sent_now(self) -> None:
        self.fin_sent = True
        self.tcb.fin_seq = self._seq(self.sbuf.end)
        self.tcb.snd_nxt = seq_add(self.tcb.fin_seq, 1)
        if self.tcb.state is S.ESTABLISHED:
            self._enter(S.FIN_WAIT_1)
        elif self.tcb.state is S.CLOSE_WAIT:
            self._enter(S.LAST_ACK)

    def _send_syn(self, now: float, ack: bool) -> None:
        cfg = self.config
        t = self.tcb
        p = self.peer_opts
        if ack:  # offer only what the VM offered (RFC 7323, RFC 2018)
            opts = syn_options(t, now, self.mss_adv, self.wscale if p.wscale is not None else None,
                               cfg.sack and p.sack_permitted,
                               cfg.timestamps and p.timestamps is not None,
                               echo=p.timestamps[0] if p.timestamps else 0)
        else:
            opts = syn_options(t, now, self.mss_adv, self.wscale, cfg.sack, cfg.timestamps)
        window = min(cfg.recv_buffer, 0xFFFF)  # never scaled in a SYN (RFC 7323 2.2)
        self.rcv_edge = window
        frame = self.writer.build(t.iss, t.rcv_nxt if ack else 0, SYN | (ACK if ack else 0),
                                  window, opts.encode())
        self.outbox.append(frame)
        t.snd_nxt = seq_add(t.iss, 1)
        self.timer_rexmit = now + self.rto.rto

    def _send_ack(self, now: float) -> None:
        self._emit(ACK, seq=self._snd_nxt())

    def _snd_nxt(self) -> int:
        """The sequence number of an ACK or RST: SND.NXT, the number after the highest ever
        sent (a retransmission timeout rewinds :attr:`nxt`, never this), but no further
        than the right edge of the VM's window. What went beyond the edge (a timeout
        retransmission into a closed window) the VM did not take, and a number outside its
        window gets our ACK dropped and answered with an ACK of its own, which may be just
        as unacceptable to us: an endless ACK exchange (Linux: tcp_acceptable_seq)."""
        snd_nxt = self.max_sent + (1 if self.fin_sent else 0)
        snd_una = self.sbuf.una + (1 if self.fin_acked else 0)
        return self._seq(min(snd_nxt, snd_una + self.snd_wnd))

    def _challenge_ack(self, now: float) -> None:
        self._send_ack(now)

    def _emit(self, flags: int, seq: int, payload: bytes = b"", options: bool = True,
              opts: bytes | None = None, seg_max: int = 0) -> None:
        t = self.tcb
        if flags & RST:
            frame = self.writer.build(seq, t.rcv_nxt, flags, 0)
            self.outbox.append(frame)
            return
        window = self._advertise()
        if opts is None:
            opts = self._options() if options else b""
        self.outbox.append(self.writer.build(seq, t.rcv_nxt, flags, window, opts, payload,
                                             seg_max or self._segment_max(len(opts))))

    def _options(self) -> bytes:
        """Options of a non-SYN segment: timestamps, SACK blocks for what is out of order."""
        t = self.tcb
        if not (t.ts_ok or t.sack_ok):
            return b""
        blocks: tuple[tuple[int, int], ...] = ()
        if t.sack_ok and self.rbuf.ooo_bytes:
            base = self.rbuf.nxt
            blocks = tuple((seq_add(t.rcv_nxt, s - base), seq_add(t.rcv_nxt, e - base))
                           for s, e in self.rbuf.sack_ranges(4))
        return segment_options(t, self._clock, blocks)

    # -- windows ----------------------------------------------------------------------------

    def _window(self) -> int:
        """Room in the receive buffer (bytes the VM may send beyond what it has)."""
        used = self.rbuf.unread + self.rbuf.ooo_bytes
        return max(0, self.config.recv_buffer - used)

    def _advertise(self) -> int:
        """The window field to send: room, rounded down to the scale, right edge never
        shrinking (RFC 9293 3.8.6.2.2). :attr:`rcv_edge` is the exact edge the room allows;
        when keeping it means rounding the field up, the rounding (less than one scale
        unit) is announced but not recorded, so it never accumulates: segments beyond
        :attr:`rcv_edge` are trimmed, and memory stays within ``recv_buffer``."""
        t = self.tcb
        room = self._window()
        shift = t.rcv_shift
        field = min(0xFFFF, room >> shift)
        edge = self.rbuf.nxt + (field << shift)
        if edge < self.rcv_edge:
            field = min(0xFFFF, -(-(self.rcv_edge - self.rbuf.nxt) >> shift))
        else:
            self.rcv_edge = edge
        t.rcv_wnd = field << shift
        return field

    def _window_from(self, wnd: int) -> None:
        self.snd_wnd = wnd
        self.tcb.snd_wnd = wnd
        self.wnd_edge = self.sbuf.una + wnd

    # -- timeouts -----------------------------------------------------------------------------

    def _on_rexmit_timeout(self, now: float) -> None:
        t = self.tcb
        st = t.state
        if st.synchronized and self.snd_wnd == 0:
            # the VM took its window back over our data: the retransmissions are window
            # probes, and the VM is given up only when it stops answering them (as Linux)
            self.probes_unanswered += 1
            exceeded = self.probes_unanswered > self.config.max_retries
        else:
            self.retries += 1
            exceeded = self.retries > (self.config.syn_retries if not st.synchronized
                                       else self.config.max_retries)
        if exceeded:
            if st is not S.SYN_SENT:
                self._emit(RST | ACK, seq=self._snd_nxt(), options=False)
            self._abort_events("timeout")
            return
        self.rto.backoff()
        self.rtt_probe = None
        self.rexmit_tsval = t.ts_val(now)
        if st in (S.SYN_SENT, S.SYN_RECEIVED):
            self._send_syn(now, ack=st is S.SYN_RECEIVED)
            return
        # RFC 5681 3.1 / RFC 6298 5.5: loss window, go back to the oldest unacked byte
        flight = self.max_sent - self.sbuf.una
        self.ssthresh = max(flight // 2, 2 * t.mss)
        self.cwnd = t.mss
        self.recover = None
        self.dupacks = 0
        self.sacked = []
        self.nxt = self.sbuf.una
        if self.fin_sent and not self.fin_acked and self.sbuf.queued == 0:
            self._emit(FIN | ACK, seq=self._seq(self.sbuf.end))
            self.retransmits += 1
        elif self.sbuf.queued:
            size = min(self.sbuf.queued, t.mss)
            self._send_data(self.sbuf.una, size, now)  # carries the FIN if it reaches it
            self.retransmits += 1
        self.timer_rexmit = now + self.rto.rto

    def _on_persist(self, now: float) -> None:
        """Zero-window probe (RFC 9293 3.8.6.1), as Linux sends it: a segment just below
        the window (sequence SND.UNA - 1, no data), which the VM must answer with an ACK
        carrying its current window. A VM that answers nothing for ``max_retries``
        probes is gone."""
        if self.nxt < self.sbuf.end and self.wnd_edge <= self.nxt:
            self.probes_unanswered += 1
            if self.probes_unanswered > self.config.max_retries:
                self._emit(RST | ACK, seq=self._snd_nxt(), options=False)
                self._abort_events("timeout")
                return
            self._emit(ACK, seq=(self._seq(self.sbuf.una) - 1) & MASK)
            self.persist_interval = min(self.persist_interval * 2, self.config.persist_max)
            self.timer_persist = now + self.persist_interval
        else:
            self._output(now)

    # -- state changes ------------------------------------------------------------------------

    def _enter(self, state: TcpState) -> None:
        """Every transition goes through here."""
        self.tcb.state = state
        if state is S.CLOSED:
            self.timer_rexmit = self.timer_persist = self.timer_close = None
            self.events.append(Closed())

    def _enter_time_wait(self, now: float) -> None:
        self.timer_rexmit = self.timer_persist = None
        self._enter(S.TIME_WAIT)
        self.timer_close = now + self.config.time_wait

    def _abort_events(self, reason: Literal["reset", "timeout", "local"]) -> None:
        if self.tcb.state is S.CLOSED:
            return
        self.events.append(Aborted(reason))
        self._enter(S.CLOSED)

    def _negotiate(self, now: float) -> None:
        cfg = self.config
        ours = TcpOptions(mss=self.mss_adv, wscale=self.wscale, sack_permitted=cfg.sack,
                          timestamps=(0, 0) if cfg.timestamps else None)
        self.tcb.negotiate(ours, self.peer_opts, v6=self.v6)
        hdr_opts = 12 if self.tcb.ts_ok else 0
        self.tcb.mss = max(64, self.tcb.mss - hdr_opts)

    # -- sequence numbers <-> stream offsets -------------------------------------------------

    def _seq(self, off: int) -> int:
        return (self.tcb.iss + 1 + off) & MASK

    def _rseq(self, off: int) -> int:
        return (self.tcb.irs + 1 + off) & MASK


def _partial(pkt: Packet) -> bool:
    v = pkt.vnet
    return v is not None and bool(v.flags & NEEDS_CSUM)


_RX = {
    S.CLOSED: TcpEndpoint._rx_closed,
    S.LISTEN: TcpEndpoint._rx_listen,
    S.SYN_SENT: TcpEndpoint._rx_syn_sent,
    S.SYN_RECEIVED: TcpEndpoint._rx_syn_received,
    S.ESTABLISHED: TcpEndpoint._rx_synchronized,
    S.FIN_WAIT_1: TcpEndpoint._rx_synchronized,
    S.FIN_WAIT_2: TcpEndpoint._rx_synchronized,
    S.CLOSE_WAIT: TcpEndpoint._rx_synchronized,
    S.CLOSING: TcpEndpoint._rx_synchronized,
    S.LAST_ACK: TcpEndpoint._rx_synchronized,
    S.TIME_WAIT: TcpEndpoint._rx_time_wait,
}
