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
:meth:`_enter`, which checks it against RFC 9293's table
(:data:`~vtl.models.tcp_state.LEGAL_TRANSITIONS`). Time comes in as ``now``.

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

The sending half (ACK processing, congestion window, SACK recovery, the
retransmission and persist timers, segment emission) is
:class:`~vtl.models.tcp_sender.TcpSender`, which this class inherits; this
module keeps opening, the application calls, segment arrival and acceptance,
reassembly, the window we advertise, and the state changes. The configuration
and the events live in :mod:`vtl.models.tcp_events` and are re-exported here.

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
from typing import Literal

from vtl.models.seq import MASK, seq_add, seq_diff, seq_lt
from vtl.models.tcp_buffers import ReceiveBuffer
from vtl.models.tcp_events import (
    Aborted,
    Closed,
    Connected,
    DataReady,
    EndpointConfig,
    Event,
    PeerFinished,
    Writable,
)
from vtl.models.tcp_segment import FlowAddrs, Segment, SegmentWriter
from vtl.models.tcp_sender import TcpSender
from vtl.models.tcp_state import HalfState, TcpState, check_transition

from vtl.errors import PacketError
from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.checksum import NEEDS_CSUM
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, RST, SYN, TcpOptions

__all__ = ["Aborted", "Closed", "Connected", "DataReady", "EndpointConfig", "Event",
           "PeerFinished", "TcpEndpoint", "Writable"]

S = TcpState


class TcpEndpoint(TcpSender):
    """One virtual TCP endpoint facing the VM (see the module docstring); its sending
    half is :class:`~vtl.models.tcp_sender.TcpSender`."""

    def __init__(self, addrs: FlowAddrs, config: EndpointConfig, now: float,
                 iss: int | None = None, *, ts_offset: int | None = None,
                 rng: random.Random | None = None):
        """``iss`` (our initial sequence number) and ``ts_offset`` (added to our
        millisecond clock for TSval, RFC 7323 5.4) are drawn from ``rng`` (default: the
        :mod:`random` module) unless given; tests pass them for exact numbers."""
        self.addrs = addrs  # local (the endpoint) -> peer (the VM)
        self.config = config
        self.tcb = HalfState()
        bits = random.getrandbits if rng is None else rng.getrandbits
        self.tcb.iss = bits(32) if iss is None else iss & MASK
        self.tcb.ts_offset = bits(32) if ts_offset is None else ts_offset & MASK
        self.writer = SegmentWriter(addrs, offload=config.offload)
        self.outbox: list[Frame] = []
        self.events: list[Event] = []
        self.rbuf = ReceiveBuffer(config.recv_buffer)
        self._init_sender(config)
        self.v6 = addrs.v6
        self.mss_adv = config.mss - (20 if self.v6 else 0)
        # the shift offered: a unit larger than an eighth of the buffer would round whole
        # windows to zero and close the window for good
        self.wscale = min(config.wscale, max(0, config.recv_buffer.bit_length() - 4))
        self.peer_fin = False
        self.rcv_edge = 0  # offset past the right edge we advertised (never shrinks)
        self.timer_close: float | None = None  # TIME-WAIT expiry
        self.syn: Packet | None = None  # the VM's SYN (passive open), kept for refusals
        self.peer_opts = TcpOptions()
        self.bad_segments = 0  # dropped: bad checksum or unacceptable
        self._clock = now  # the latest `now` the endpoint was driven with (for TSval)

    # -- opening ------------------------------------------------------------------

    @classmethod
    def passive(cls, syn: Packet, config: EndpointConfig, now: float,
                iss: int | None = None, *, ts_offset: int | None = None,
                rng: random.Random | None = None) -> TcpEndpoint:
        """An endpoint for the VM's SYN, waiting in LISTEN for :meth:`accept`."""
        seg = Segment.parse(syn)
        if seg.flags & (SYN | ACK | RST) != SYN:
            raise PacketError("passive open needs a SYN without ACK or RST")
        ep = cls(FlowAddrs.of(syn).reverse(), config, now, iss, ts_offset=ts_offset, rng=rng)
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
               iss: int | None = None, *, ts_offset: int | None = None,
               rng: random.Random | None = None) -> TcpEndpoint:
        """Open toward the VM as a client (``addrs``: us -> the VM); sends the SYN."""
        ep = cls(addrs, config, now, iss, ts_offset=ts_offset, rng=rng)
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

    def unreachable(self, now: float, code: int = 1, code6: int = 3) -> None:
        """Answer the held SYN with ICMP destination unreachable (``code`` for IPv4, 1:
        host; ``code6`` for ICMPv6, 3: address); a SYN no ICMP error may be about (to a
        multicast or broadcast address, RFC 1122 3.2.2, RFC 4443 2.4) goes unanswered."""
        if self.tcb.state is S.LISTEN and self.syn is not None:
            c = code if not self.v6 else code6
            try:
                self.outbox.append(Frame(build.unreachable(self.syn, c)))
            except PacketError:
                pass
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
        self._start_sending(seg, now)
        self._enter(S.ESTABLISHED)
        self.events.append(Connected())
        if self.sbuf.queued or self.fin_queued:
            self._output(now)

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

    # -- state changes ------------------------------------------------------------------------

    def _enter(self, state: TcpState) -> None:
        """Every transition goes through here, checked against RFC 9293's table."""
        check_transition(self.tcb.state, state)
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
