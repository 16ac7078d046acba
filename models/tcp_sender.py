"""The sending half of the virtual TCP endpoint: ACKs in, data and timers out.

Theory of operation. :class:`TcpSender` is the part of
:class:`~vtl.models.tcp_endpoint.TcpEndpoint` that moves the application's bytes
toward the VM; the endpoint inherits it (a mixin, not a composed object: the two
halves share the control block, the outbox and the receive window on every
segment, and one object keeps that free of indirection and of a reference
cycle). Its state is set up by :meth:`TcpSender._init_sender` and counts in
stream offsets of :class:`~vtl.models.tcp_buffers.SendBuffer` (0 = first data
byte): ``sbuf.una <= nxt <= max_sent <= sbuf.end``.

- ACK processing (:meth:`TcpSender._process_ack`): acknowledged bytes are
  released, RTT samples taken (timestamp echo, else one timed segment, Karn's
  rule both ways), the VM's window taken by the SND.WL1/SND.WL2 rule, duplicate
  ACKs counted, SACK blocks kept as a scoreboard (:attr:`sacked`).
- Congestion window: slow start with appropriate byte counting, congestion
  avoidance, NewReno fast recovery with RFC 6675-style hole retransmission.
- Output (:meth:`TcpSender._output`): new data as the VM's window and the
  congestion window allow, in GSO super-frames with ``offload``, then the FIN;
  every frame is built by :meth:`TcpSender._emit`, which stamps the window we
  advertise and the options (timestamps, SACK blocks for what we hold out of
  order).
- Timers: retransmission (RFC 6298: backoff, loss window, go back to SND.UNA)
  and persist (zero-window probes); the TIME-WAIT timer is the endpoint's.

State changes are not decided here: a FIN sent or acknowledged calls the
endpoint's ``_enter`` / ``_enter_time_wait``, a dead peer ``_abort_events``.

What it does not do: parse segments or check their acceptability (the endpoint
does, then hands over an acceptable ACK), reassemble received data, pace, or
any congestion control but NewReno.
"""

from __future__ import annotations

from typing import Literal

from vtl.models.seq import MASK, seq_add, seq_diff, seq_lt
from vtl.models.tcp_buffers import ReceiveBuffer, RtoEstimator, SendBuffer
from vtl.models.tcp_events import EndpointConfig, Event, Writable
from vtl.models.tcp_segment import Segment, SegmentWriter
from vtl.models.tcp_state import HalfState, TcpState, segment_options, syn_options

from vtl.frame import Frame
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

S = TcpState


class TcpSender:
    """The sending half of :class:`~vtl.models.tcp_endpoint.TcpEndpoint` (module doc)."""

    # shared with the endpoint, which sets them up
    config: EndpointConfig
    tcb: HalfState
    writer: SegmentWriter
    outbox: list[Frame]
    events: list[Event]
    rbuf: ReceiveBuffer
    peer_opts: TcpOptions
    mss_adv: int
    wscale: int
    rcv_edge: int
    _clock: float

    def _init_sender(self, config: EndpointConfig) -> None:
        self.sbuf = SendBuffer(config.send_buffer)
        self.rto = RtoEstimator(config.rto_initial, config.rto_min, config.rto_max)
        # in stream offsets (0 = first data byte)
        self.nxt = 0  # next offset to send
        self.max_sent = 0  # highest offset ever sent + 1
        self.fin_queued = False  # shutdown() called: FIN goes after the last byte
        self.fin_sent = False
        self.fin_acked = False
        self.snd_wnd = 0  # the VM's window, bytes
        self.wnd_edge = 0  # offset just past what the VM's window allows
        self.cwnd = 0
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self.recover: int | None = None  # offset that ends fast recovery
        self.sacked: list[tuple[int, int]] = []  # VM's SACK blocks, offsets, sorted
        self.rexmit_hi = 0  # in recovery: retransmitted up to here already
        self.timer_rexmit: float | None = None
        self.timer_persist: float | None = None
        self.persist_interval = 0.0
        self.retries = 0
        self.rtt_probe: tuple[int, float] | None = None  # (offset, sent at) without timestamps
        self.rexmit_tsval: int | None = None  # our TSval at the latest retransmission
        self.want_writable = False
        self.retransmits = 0
        self.probes_unanswered = 0

    # -- provided by the endpoint ---------------------------------------------------------

    @property
    def send_room(self) -> int:
        raise NotImplementedError

    def _enter(self, state: TcpState) -> None:
        raise NotImplementedError

    def _enter_time_wait(self, now: float) -> None:
        raise NotImplementedError

    def _abort_events(self, reason: Literal["reset", "timeout", "local"]) -> None:
        raise NotImplementedError

    def _advertise(self) -> int:
        raise NotImplementedError

    # -- acknowledgments ----------------------------------------------------------------------

    def _start_sending(self, seg: Segment, now: float) -> None:
        """The VM acknowledged our SYN with ``seg``: take its window, stop the SYN's timer,
        open the congestion window, and take the handshake's RTT sample."""
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
        if self.tcb.sack_ok and (self.sacked or seg.options.sack_blocks):
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
        if self.sacked:
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
        else:  # one MSS per window of bytes acknowledged (RFC 3465), however many per ACK
            self.cwnd += max(1, acked * t.mss // max(self.cwnd, 1))
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
            if size < chunk <= room and cfg.offload and not self.fin_queued \
                    and self.max_sent - self.sbuf.una >= 2 * t.mss:
                # TSO deferral (as Linux's tcp_tso_should_defer): the windows allow a full
                # super-frame but the queue holds only a tail of one; the ACK of what is in
                # flight comes within the VM's round trip, and by then the upstream has
                # usually added to it. Sent at once, a 64 KiB read became a 62 KiB frame
                # and a 2 KiB one: two frames and two ACKs for one frame's worth.
                break
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

    # -- sequence numbers <-> stream offsets -------------------------------------------------

    def _seq(self, off: int) -> int:
        return (self.tcb.iss + 1 + off) & MASK

