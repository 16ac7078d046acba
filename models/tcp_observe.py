"""How a passive observer in the path updates both endpoints of a TCP connection.

:class:`TcpObserver` keeps one :class:`~vtl.models.tcp_state.HalfState` per
endpoint (``a`` and ``b``) and applies each segment seen in either direction
to both: the sender's view (what its ACK shows it received, what it sent) and
the receiver's (what arrives). :class:`~vtl.models.tcp_connection.TcpConnection`
builds on it (addresses, packets made from either side).

Invariants, per direction S -> R (modular, RFC 9293 3.4):
``S.snd_una <= R.rcv_nxt <= S.snd_nxt``. ``S.snd_una`` is the highest ACK seen
from R; ``R.rcv_nxt`` assumes what passes the observer in order reaches R (or
is what R acknowledged, if more); ``S.snd_nxt`` is the end of what S sent,
within R's window. ``R.rcv_nxt + R.rcv_wnd`` is the right edge R advertised
last (it stays put when data arrives); ``S.snd_wnd`` is R's window in bytes.

Transitions (RFC 9293 3.3.2) live in :data:`TRANSITIONS`, fired by
:class:`Event`\\ s: a segment S -> R is S's events first (its ACK shows what it
had received, then what it sent), then R's (ACK, data, FIN), the RFC's order.
Every transition fired is checked against RFC 9293's table
(:func:`~vtl.models.tcp_state.check_transition`). Initialisation (a SYN seen, a
connection picked up) sets states directly, and so does one correction: a FIN
from S in CLOSE-WAIT whose ACK shows R's FIN had not reached S means S was
still ESTABLISHED (the observer took R's FIN as delivered too early); S is put
back there, then sends its FIN (FIN-WAIT-1) and has R's FIN (CLOSING).
A segment R would not accept changes nothing: RFC 9293 3.10.7.4 as Linux's
``tcp_sequence()`` checks it, widened because R's real RCV.NXT is only known to
lie in ``[S.snd_una, R.rcv_nxt]``; an ACK of data never sent is refused (except
after a pickup, where it teaches what was missed). An RST closes both halves
only if its sequence number can be R's exact RCV.NXT (RFC 9293 and RFC 5961
answer other in-window RSTs with a challenge ACK).

Picked up mid-connection, what the handshake said is guessed: window scaling
unknown (``Observed.wscale_known`` False: windows in bytes use a shift inferred
as a lower bound from data sent beyond the unscaled window, and the right edge
allows the largest scale); MSS the RFC default raised to the largest segment
seen; SACK off; timestamps on if the first segment carries them.

Timestamps (RFC 7323): R's ``ts_recent`` takes S's TSval when
``SEG.SEQ <= Last.ACK.sent`` (R's highest ACK), or S's echo shows more. Each
side's TSval clock is its highest TSval seen, extrapolated at ``ts_rate`` ticks
per second (Linux: 1000) and never going backwards (:meth:`TcpObserver.tsval`).

What it does not do: reassembly, retransmission, timers other than TIME-WAIT;
simultaneous open (a crossing SYN is ignored); PAWS on what it observes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from vtl.models.seq import between, seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt, seq_max
from vtl.models.tcp_segment import Segment
from vtl.models.tcp_state import (
    DEFAULT_MSS_V4,
    DEFAULT_MSS_V6,
    MAX_WINDOW_FIELD,
    MAX_WSCALE,
    HalfState,
    TcpState,
    check_transition,
)

from vtl.errors import LocalProtocolError
from vtl.packet.tcp import ACK, FIN, RST, SYN, TcpOptions

Side = Literal["a", "b"]
SideLike = Side | HalfState
MAX_WINDOW = MAX_WINDOW_FIELD << MAX_WSCALE  # the largest window TCP can advertise (~2**30)
TIME_WAIT_SECONDS = 60.0  # as Linux (TCP_TIMEWAIT_LEN), not 2*MSL = 240 s
OTHER: dict[Side, Side] = {"a": "b", "b": "a"}
St = TcpState


class Event(enum.Enum):
    """What one endpoint did (``SEND_*``) or had arrive (``RECV_*``)."""

    SEND_SYN_ACK = "send SYN-ACK"
    SEND_FIN = "send FIN"
    SEND_FIN_CROSSED = "send FIN whose ACK shows the peer's FIN had not arrived"
    RECV_SYN_ACK = "receive SYN-ACK"
    RECV_ACK_OF_SYN = "receive ACK of our SYN"
    RECV_FIN = "receive FIN"
    RECV_ACK_OF_FIN = "receive ACK of our FIN"
    RST = "send or receive an acceptable RST"
    TIMEOUT = "TIME-WAIT over"


#: RFC 9293 3.3.2 as ``(state, event) -> next state``; a missing pair changes nothing.
TRANSITIONS: dict[tuple[TcpState, Event], TcpState] = {
    (St.LISTEN, Event.SEND_SYN_ACK): St.SYN_RECEIVED,
    (St.SYN_SENT, Event.RECV_SYN_ACK): St.ESTABLISHED,
    (St.SYN_RECEIVED, Event.RECV_ACK_OF_SYN): St.ESTABLISHED,
    (St.SYN_RECEIVED, Event.SEND_FIN): St.FIN_WAIT_1,
    (St.SYN_RECEIVED, Event.SEND_FIN_CROSSED): St.FIN_WAIT_1,
    (St.SYN_RECEIVED, Event.RECV_FIN): St.CLOSE_WAIT,
    (St.ESTABLISHED, Event.SEND_FIN): St.FIN_WAIT_1,
    (St.ESTABLISHED, Event.SEND_FIN_CROSSED): St.FIN_WAIT_1,
    (St.ESTABLISHED, Event.RECV_FIN): St.CLOSE_WAIT,
    (St.CLOSE_WAIT, Event.SEND_FIN): St.LAST_ACK,
    (St.FIN_WAIT_1, Event.RECV_ACK_OF_FIN): St.FIN_WAIT_2,
    (St.FIN_WAIT_1, Event.RECV_FIN): St.CLOSING,
    (St.FIN_WAIT_2, Event.RECV_FIN): St.TIME_WAIT,
    (St.CLOSING, Event.RECV_ACK_OF_FIN): St.TIME_WAIT,
    (St.LAST_ACK, Event.RECV_ACK_OF_FIN): St.CLOSED,
    (St.TIME_WAIT, Event.TIMEOUT): St.CLOSED,
    **{(s, Event.RST): St.CLOSED for s in TcpState if s is not St.CLOSED},
}

_REOPEN_BY = frozenset({St.CLOSED, St.TIME_WAIT, St.SYN_SENT})  # a new SYN from here ...
_REOPEN_AT = frozenset({St.CLOSED, St.TIME_WAIT, St.LISTEN})  # ... to here starts anew
_UNTRACKED = frozenset({St.CLOSED, St.LISTEN, St.SYN_SENT})  # receivers that take no data


@dataclass(slots=True)
class Observed:
    """What the observer learned of one endpoint beyond its control block."""

    wscale_known: bool = True  # its rcv_shift (the scale of windows it sends) is known
    mss_known: bool = True  # its mss came from the handshake (else: largest segment seen)
    last_field: int | None = None  # window field of its newest segment
    open_field: int | None = None  # its newest nonzero window field
    last_ack: int | None = None  # highest ACK it sent (RFC 7323 Last.ACK.sent)
    ts_last: int | None = None  # highest TSval it sent (seen or made) ...
    ts_at: float = 0.0  # ... and when
    time_wait_at: float | None = None  # when it entered TIME-WAIT


class TcpObserver:
    """Both halves of one connection, updated from the segments seen (module doc)."""

    def __init__(self, a: HalfState, b: HalfState, *, v6: bool = False,
                 ts_rate: float = 1000.0):
        self.a = a
        self.b = b
        self.v6 = v6
        self.ts_rate = ts_rate
        self.picked_up = False  # started mid-connection: acks of unseen data are learned
        self.info: dict[Side, Observed] = {"a": Observed(), "b": Observed()}
        self._syn_opts = TcpOptions()

    # -- access ------------------------------------------------------------------------

    def side(self, side: SideLike) -> Side:
        """``"a"`` or ``"b"`` for a side name or one of the two halves."""
        if side == "a" or side is self.a:
            return "a"
        if side == "b" or side is self.b:
            return "b"
        raise LocalProtocolError(f"no side {side!r} in this connection")

    def half(self, side: SideLike) -> HalfState:
        return self.a if self.side(side) == "a" else self.b

    def peer(self, side: SideLike) -> HalfState:
        return self.b if self.side(side) == "a" else self.a

    @property
    def closed(self) -> bool:
        return self.a.state is St.CLOSED and self.b.state is St.CLOSED

    @property
    def wscale_known(self) -> bool:
        return self.info["a"].wscale_known and self.info["b"].wscale_known

    def send_space(self, side: SideLike) -> int:
        """Bytes ``side`` may still send within the peer's window (a lower bound)."""
        h = self.half(side)
        return max(0, seq_diff(seq_add(h.snd_una, h.snd_wnd), h.snd_nxt))

    def tsval(self, side: SideLike, now: float) -> int:
        """The TSval of a segment from ``side`` at ``now``: its highest TSval seen,
        extrapolated at ``ts_rate`` per second (its own ``ts_val(now)`` if none seen)."""
        x = self.side(side)
        info = self.info[x]
        if info.ts_last is None:
            return self.half(x).ts_val(now)
        return seq_add(info.ts_last, max(0, int((now - info.ts_at) * self.ts_rate)))

    def timer(self) -> float | None:
        """When :meth:`on_timer` has something to do (a TIME-WAIT ending), or None."""
        ts = [i.time_wait_at + TIME_WAIT_SECONDS for i in self.info.values()
              if i.time_wait_at is not None]
        return min(ts) if ts else None

    def on_timer(self, now: float) -> None:
        """TIME-WAIT halves whose time is up become CLOSED."""
        for x, info in self.info.items():
            if info.time_wait_at is not None and now >= info.time_wait_at + TIME_WAIT_SECONDS:
                self._fire(x, Event.TIMEOUT, now)

    # -- initialisation ------------------------------------------------------------------

    def _default_mss(self) -> int:
        return DEFAULT_MSS_V6 if self.v6 else DEFAULT_MSS_V4

    def _start_handshake(self, client: Side, seg: Segment, now: float) -> None:
        """A SYN from ``client``: it is SYN-SENT, the other side LISTEN (fresh blocks)."""
        c, s = HalfState(state=St.SYN_SENT), HalfState(state=St.LISTEN)
        setattr(self, client, c)
        setattr(self, OTHER[client], s)
        self.info = {"a": Observed(), "b": Observed()}
        self.picked_up = False
        c.iss = c.snd_una = s.irs = s.snd_wl1 = seg.seq
        c.snd_nxt = s.rcv_nxt = seq_add(seg.seq, 1)
        c.rcv_wnd = s.snd_wnd = seg.window  # never scaled in a SYN
        c.mss = s.mss = self._default_mss()
        self._syn_opts = seg.options
        self.info[client].last_field = seg.window
        if seg.options.timestamps is not None:
            self._see_tsval(client, seg.options.timestamps[0], now)

    def _synack(self, server: Side, seg: Segment, now: float) -> None:
        """The SYN-ACK answering the tracked SYN: negotiate both halves from both SYNs."""
        client = OTHER[server]
        s, c = self.half(server), self.half(client)
        theirs = seg.options
        c.negotiate(self._syn_opts, theirs, self.v6)
        s.negotiate(theirs, self._syn_opts, self.v6)
        s.iss = s.snd_una = c.irs = c.snd_wl1 = seg.seq
        s.snd_nxt = c.rcv_nxt = seq_add(seg.seq, 1)
        s.rcv_wnd = c.snd_wnd = seg.window
        c.snd_una = c.snd_wl2 = seg.ack
        info = self.info[server]
        info.last_field, info.last_ack = seg.window, seg.ack
        if s.ts_ok and theirs.timestamps is not None:
            self._see_tsval(server, theirs.timestamps[0], now)
        self._fire(server, Event.SEND_SYN_ACK, now)
        self._fire(client, Event.RECV_SYN_ACK, now)

    def _pickup_synack(self, seg: Segment, now: float) -> None:
        """First packet seen is a SYN-ACK from b: a is ESTABLISHED, b SYN-RECEIVED. Its
        options show what a offered too, except a's window scale (unknown if b scales)."""
        a, b = self.a, self.b
        o = seg.options
        a.state, b.state = St.ESTABLISHED, St.SYN_RECEIVED
        self.picked_up = True
        b.iss = b.snd_una = a.irs = a.snd_wl1 = seg.seq
        b.snd_nxt = a.rcv_nxt = seq_add(seg.seq, 1)
        a.snd_una = a.snd_nxt = b.rcv_nxt = a.snd_wl2 = seg.ack
        a.iss = b.irs = b.snd_wl1 = seq_add(seg.ack, -1)
        b.rcv_wnd = a.snd_wnd = seg.window
        a.mss = o.mss or self._default_mss()
        b.mss = self._default_mss()
        self.info["b"].mss_known = False
        if o.wscale is not None:
            b.rcv_shift = a.snd_shift = min(o.wscale, MAX_WSCALE)
            self.info["a"].wscale_known = False
        a.sack_ok = b.sack_ok = o.sack_permitted
        if o.timestamps is not None:
            a.ts_ok = b.ts_ok = True
            a.ts_recent, b.ts_recent = o.timestamps
            self._see_tsval("b", o.timestamps[0], now)
            self._see_tsval("a", o.timestamps[1], now)
        self.info["b"].last_field, self.info["b"].last_ack = seg.window, seg.ack

    def _pickup(self, sender: Side, seg: Segment, now: float, gso: int) -> None:
        """First packet seen is a later segment: both ESTABLISHED, the state just before
        it guessed from its numbers, then the segment applied as any other."""
        s, r = self.half(sender), self.peer(sender)
        s.state = r.state = St.ESTABLISHED
        self.picked_up = True
        s.snd_una = s.snd_nxt = r.rcv_nxt = s.iss = r.irs = seg.seq
        s.rcv_nxt = r.snd_una = r.snd_nxt = r.iss = s.irs = seg.ack
        r.snd_wl1, s.snd_wl1 = seq_add(seg.seq, -1), seq_add(seg.ack, -1)
        s.mss = r.mss = self._default_mss()
        ts = seg.options.timestamps
        s.ts_ok = r.ts_ok = ts is not None
        if ts is not None:
            r.ts_recent, s.ts_recent = ts
        for info in self.info.values():
            info.wscale_known = info.mss_known = False
        self._apply(sender, seg, now, gso)

    # -- one segment ---------------------------------------------------------------------

    def _fire(self, side: Side, event: Event, now: float) -> None:
        h = self.half(side)
        new = TRANSITIONS.get((h.state, event))
        if new is not None:
            check_transition(h.state, new)
            h.state = new
            self.info[side].time_wait_at = now if new is St.TIME_WAIT else None

    def _apply(self, sender: Side, seg: Segment, now: float, gso: int = 0) -> None:
        """One segment from ``sender``: dispatch on its flags and the states."""
        s, r = self.half(sender), self.peer(sender)
        f = seg.flags
        if f & RST:
            self._rst(sender, seg, now)
        elif f & SYN:
            if not f & ACK:
                if s.state is St.SYN_SENT and seg.seq == s.iss:
                    return  # retransmitted SYN
                if s.state in _REOPEN_BY and r.state in _REOPEN_AT:
                    self._start_handshake(sender, seg, now)
            elif s.state is St.LISTEN and r.state is St.SYN_SENT and seg.ack == r.snd_nxt:
                self._synack(sender, seg, now)
            # other SYNs (retransmitted SYN-ACK, SYN in a synchronized state): nothing
        elif f & ACK and r.state not in _UNTRACKED and self._acceptable(sender, seg):
            self._acked(sender, seg, now)
            self._sent(sender, seg, now, gso)
            self._received(sender, seg, now)
            self._timestamps(sender, seg, now)

    def _right_edge(self, receiver: Side) -> int:
        """Sequence number one past the last ``receiver`` can accept (an upper bound)."""
        r, info = self.half(receiver), self.info[receiver]
        if info.wscale_known:
            return seq_add(r.rcv_nxt, r.rcv_wnd)
        span = MAX_WINDOW if info.last_field is None else info.last_field << MAX_WSCALE
        return seq_max(seq_add(self.peer(receiver).snd_una, span), r.rcv_nxt)

    def _acceptable(self, sender: Side, seg: Segment) -> bool:
        """Would R take it (module doc)? Also refused: anything after S's FIN."""
        s, r = self.half(sender), self.peer(sender)
        end = seq_add(seg.seq, seg.seg_len)
        if seq_lt(end, s.snd_una) or seq_gt(seg.seq, self._right_edge(OTHER[sender])):
            return False
        if s.fin_seq is not None and (seq_gt(end, seq_add(s.fin_seq, 1)) or (
                seg.flags & FIN and seq_add(seg.seq, len(seg.payload)) != s.fin_seq)):
            return False
        ahead = seq_diff(seg.ack, r.snd_nxt)
        if ahead > 0:  # acks data never seen: learnable only after a pickup
            if not self.picked_up or ahead >= MAX_WINDOW or r.fin_seq is not None:
                return False
            r.snd_nxt = seg.ack
        return seq_diff(seg.ack, r.snd_una) > -MAX_WINDOW

    def _acked(self, sender: Side, seg: Segment, now: float) -> None:
        """The ACK and window: S has received up to the ACK; R learns what is acked."""
        s, r = self.half(sender), self.peer(sender)
        info = self.info[sender]
        ack = seg.ack
        if info.last_ack is None or seq_gt(ack, info.last_ack):
            info.last_ack = ack
        if seq_gt(ack, s.rcv_nxt):
            s.rcv_nxt = ack
        fin_acked = r.fin_seq is not None and seq_gt(ack, r.fin_seq)
        if fin_acked:
            self._fire(sender, Event.RECV_FIN, now)
        if seq_gt(ack, r.snd_una):
            r.snd_una = ack
        if r.state is St.SYN_RECEIVED and seq_gt(ack, r.iss):
            self._fire(OTHER[sender], Event.RECV_ACK_OF_SYN, now)
        if fin_acked:
            self._fire(OTHER[sender], Event.RECV_ACK_OF_FIN, now)
        if seq_lt(r.snd_wl1, seg.seq) or (r.snd_wl1 == seg.seq and seq_le(r.snd_wl2, ack)):
            r.snd_wl1, r.snd_wl2 = seg.seq, ack  # RFC 9293 3.10.7.4: the newest window
            r.snd_wnd = seg.window << s.rcv_shift
            s.rcv_wnd = max(0, seq_diff(seq_add(ack, r.snd_wnd), s.rcv_nxt))
            info.last_field = seg.window
            if seg.window:
                info.open_field = seg.window

    def _sent(self, sender: Side, seg: Segment, now: float, gso: int) -> None:
        """What S sent: its snd_nxt (within R's window), its FIN, an MSS hint."""
        s, r = self.half(sender), self.peer(sender)
        n = len(seg.payload)
        data_end = seq_add(seg.seq, n)
        rinfo = self.info[OTHER[sender]]
        if not rinfo.wscale_known and rinfo.last_field and seq_gt(
                data_end, seq_add(s.snd_una, rinfo.last_field << r.rcv_shift)):
            self._infer_shift(OTHER[sender], data_end)
        edge = self._right_edge(OTHER[sender])
        end = data_end if seq_le(data_end, edge) else edge
        if seg.flags & FIN and end == data_end and self._sent_fin(sender, data_end, seg.ack, now):
            end = seq_add(end, 1)
        if seq_gt(end, s.snd_nxt):
            s.snd_nxt = end
        if n and not self.info[sender].mss_known:
            s.mss = max(s.mss, (gso or n) + len(seg.raw_options))

    def _sent_fin(self, sender: Side, fin_seq: int, ack: int, now: float) -> bool:
        """S's FIN at ``fin_seq``: False if it cannot be one (before data S sent)."""
        s, r = self.half(sender), self.peer(sender)
        if s.fin_seq is None:
            if seq_lt(fin_seq, s.snd_nxt):
                return False
            s.fin_seq = fin_seq
            crossed = r.fin_seq is not None and seq_le(ack, r.fin_seq)
            if crossed and s.state is St.CLOSE_WAIT:  # the correction of the module doc
                s.state = St.ESTABLISHED
                self._fire(sender, Event.SEND_FIN, now)
                self._fire(sender, Event.RECV_FIN, now)
            else:
                self._fire(sender, Event.SEND_FIN_CROSSED if crossed else Event.SEND_FIN, now)
        return s.fin_seq == fin_seq

    def _infer_shift(self, receiver: Side, data_end: int) -> None:
        """R's scale is at least the smallest shift that puts ``data_end`` in its window."""
        r, s, info = self.half(receiver), self.peer(receiver), self.info[receiver]
        field = info.last_field or 1
        need = seq_diff(data_end, s.snd_una)
        k = r.rcv_shift
        while k < MAX_WSCALE and field << k < need:
            k += 1
        r.rcv_shift = s.snd_shift = k
        s.snd_wnd = field << k
        r.rcv_wnd = max(0, seq_diff(seq_add(s.snd_una, s.snd_wnd), r.rcv_nxt))

    def _received(self, sender: Side, seg: Segment, now: float) -> None:
        """What reaches R in order (assumed delivered): its rcv_nxt, then S's FIN."""
        s, r = self.half(sender), self.peer(sender)
        data_end = seq_add(seg.seq, len(seg.payload))
        edge = self._right_edge(OTHER[sender])
        end = data_end if seq_le(data_end, edge) else edge
        if seq_le(seg.seq, r.rcv_nxt) and seq_gt(end, r.rcv_nxt):
            r.rcv_wnd = max(0, r.rcv_wnd - seq_diff(end, r.rcv_nxt))
            r.rcv_nxt = end
        if s.fin_seq is not None and r.rcv_nxt == s.fin_seq:
            r.rcv_nxt = seq_add(r.rcv_nxt, 1)
            self._fire(OTHER[sender], Event.RECV_FIN, now)

    def _timestamps(self, sender: Side, seg: Segment, now: float) -> None:
        """RFC 7323: S's TSval clock; R's TS.Recent; S's own TS.Recent from its echo."""
        s, r = self.half(sender), self.peer(sender)
        ts = seg.options.timestamps if s.ts_ok and seg.raw_options else None
        if ts is None:
            return
        tsval, tsecr = ts
        self._see_tsval(sender, tsval, now)
        if tsecr:  # an echo of R's TSval: R's clock is at least there
            self._see_tsval(OTHER[sender], tsecr, now)
        last_ack = self.info[OTHER[sender]].last_ack
        if (last_ack is None or seq_le(seg.seq, last_ack)) and seq_ge(tsval, r.ts_recent):
            r.ts_recent = tsval
        if seq_gt(tsecr, s.ts_recent):
            s.ts_recent = tsecr

    def _see_tsval(self, side: Side, tsval: int, now: float) -> None:
        info = self.info[side]
        if info.ts_last is None or seq_ge(tsval, self.tsval(side, now)):
            info.ts_last, info.ts_at = tsval, now

    def _rst(self, sender: Side, seg: Segment, now: float) -> None:
        """An RST closes both halves if R would act on it (module doc)."""
        s, r = self.half(sender), self.peer(sender)
        if r.state is St.SYN_SENT:
            ok = bool(seg.flags & ACK) and seg.ack == r.snd_nxt
        elif r.state in _UNTRACKED:
            ok = False
        else:
            ok = between(s.snd_una, seg.seq, r.rcv_nxt)
        if ok:
            self._fire(sender, Event.RST, now)
            self._fire(OTHER[sender], Event.RST, now)
