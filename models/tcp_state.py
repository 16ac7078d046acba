"""TCP connection states and one endpoint's control block (RFC 9293 3.3).

:class:`TcpState` names the eleven states of RFC 9293 3.3.2 (CLOSED is the
fictional state of no connection). :class:`HalfState` is what one endpoint of
a connection knows (its "TCB"): send and receive sequence variables, the
windows in bytes (already scaled), and what the handshake negotiated (MSS,
window scaling, SACK-permitted, timestamps). Both the two-endpoint observer
model (:mod:`vtl.models.tcp_connection`) and the virtual endpoint
(:mod:`vtl.models.tcp_endpoint`) keep their state in it, and
:func:`segment_options` turns it into the options a segment must carry so the
peer accepts it.

Invariants: sequence fields are in ``0 .. 2**32-1``; ``snd_una <= snd_nxt``
(modular); windows are in bytes (``window_field << shift``); ``rcv_shift`` /
``snd_shift`` are 0 unless both SYNs carried the window-scale option
(RFC 7323 2.2); timestamps are used only if both SYNs carried them.

Transitions. :data:`LEGAL_TRANSITIONS` is RFC 9293's state machine, the one
table both users check against: each legal ``(from, to)`` pair with what
causes it (figure 5 of 3.3.2, plus the transitions the event processing of
3.10 adds: SYN-RECEIVED to CLOSE-WAIT on a FIN, FIN-WAIT-1 straight to
TIME-WAIT on a FIN that also acknowledges ours, and ABORT, RST or a give-up
timeout from any state to CLOSED). :data:`NEXT_STATES` is the same per state,
and :func:`check_transition` raises :class:`IllegalTransition` for a pair not
in it. An illegal transition is a bug of ours, never something the network can
cause, so it is an ``AssertionError`` and not a :class:`~vtl.errors.VTLError`
(which callers and property tests treat as an expected failure).

What it does not do: decide transitions (the endpoint and the observer do,
each in one place), keep data or timers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vtl.models.seq import MASK

from vtl.packet.tcp import TcpOptions, timestamp_option

DEFAULT_MSS_V4 = 536  # RFC 9293 3.7.1: the MSS to assume without the option
DEFAULT_MSS_V6 = 1220  # RFC 8200: 1280 - 40 - 20
MAX_WINDOW_FIELD = 0xFFFF
MAX_WSCALE = 14  # RFC 7323 2.3


class TcpState(enum.Enum):
    """RFC 9293 3.3.2 connection states."""

    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"

    @property
    def synchronized(self) -> bool:
        """Both ISNs known (RFC 9293 "synchronized states")."""
        return self not in _UNSYNCHRONIZED

    @property
    def can_send(self) -> bool:
        """This endpoint may still send data (it has not sent its FIN)."""
        return self in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)

    @property
    def can_receive(self) -> bool:
        """The peer may still send data (its FIN has not been received)."""
        return self in (TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2)


_UNSYNCHRONIZED = frozenset({TcpState.CLOSED, TcpState.LISTEN, TcpState.SYN_SENT,
                             TcpState.SYN_RECEIVED})

_S = TcpState
_ANY_TO_CLOSED = "CLOSE or ABORT, an acceptable RST, or the peer gone (timeout)"

#: RFC 9293's legal transitions, ``(from, to) -> what causes it``.
LEGAL_TRANSITIONS: dict[tuple[TcpState, TcpState], str] = {
    (_S.CLOSED, _S.LISTEN): "passive OPEN",
    (_S.CLOSED, _S.SYN_SENT): "active OPEN / snd SYN",
    (_S.LISTEN, _S.SYN_RECEIVED): "rcv SYN / snd SYN,ACK",
    (_S.LISTEN, _S.SYN_SENT): "SEND / snd SYN",
    (_S.SYN_SENT, _S.SYN_RECEIVED): "rcv SYN / snd SYN,ACK (simultaneous open)",
    (_S.SYN_SENT, _S.ESTABLISHED): "rcv SYN,ACK / snd ACK",
    (_S.SYN_RECEIVED, _S.LISTEN): "rcv RST (after a passive OPEN)",
    (_S.SYN_RECEIVED, _S.ESTABLISHED): "rcv ACK of SYN",
    (_S.SYN_RECEIVED, _S.FIN_WAIT_1): "CLOSE / snd FIN",
    (_S.SYN_RECEIVED, _S.CLOSE_WAIT): "rcv FIN (3.10.7.4, eighth check)",
    (_S.ESTABLISHED, _S.FIN_WAIT_1): "CLOSE / snd FIN",
    (_S.ESTABLISHED, _S.CLOSE_WAIT): "rcv FIN / snd ACK",
    (_S.FIN_WAIT_1, _S.FIN_WAIT_2): "rcv ACK of FIN",
    (_S.FIN_WAIT_1, _S.CLOSING): "rcv FIN / snd ACK",
    (_S.FIN_WAIT_1, _S.TIME_WAIT): "rcv FIN that also acknowledges ours / snd ACK",
    (_S.FIN_WAIT_2, _S.TIME_WAIT): "rcv FIN / snd ACK",
    (_S.CLOSE_WAIT, _S.LAST_ACK): "CLOSE / snd FIN",
    (_S.CLOSING, _S.TIME_WAIT): "rcv ACK of FIN",
    (_S.LAST_ACK, _S.CLOSED): "rcv ACK of FIN",
    (_S.TIME_WAIT, _S.CLOSED): "timeout (2 MSL, or our bounded TIME-WAIT)",
    **{(s, _S.CLOSED): _ANY_TO_CLOSED
       for s in TcpState if s not in (_S.CLOSED, _S.LAST_ACK, _S.TIME_WAIT)},
}

#: :data:`LEGAL_TRANSITIONS` per state: the states it may enter.
NEXT_STATES: dict[TcpState, frozenset[TcpState]] = {
    s: frozenset(b for a, b in LEGAL_TRANSITIONS if a is s) for s in TcpState}


class IllegalTransition(AssertionError):
    """A state change RFC 9293 does not allow: a bug (module doc), not a network error."""


def check_transition(old: TcpState, new: TcpState) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in the table."""
    if new not in NEXT_STATES[old]:
        raise IllegalTransition(f"TCP state {old.value} cannot become {new.value}")


@dataclass(slots=True)
class HalfState:
    """One endpoint's control block. Field names follow RFC 9293 3.3.1."""

    state: TcpState = TcpState.CLOSED
    iss: int = 0  # initial send sequence number
    snd_una: int = 0  # oldest unacknowledged
    snd_nxt: int = 0  # next to send
    snd_wnd: int = 0  # the peer's receive window, bytes
    snd_wl1: int = 0  # segment seq used for the last window update
    snd_wl2: int = 0  # segment ack used for the last window update
    irs: int = 0  # initial receive sequence number
    rcv_nxt: int = 0  # next expected from the peer
    rcv_wnd: int = 0  # the window we advertise, bytes
    snd_shift: int = 0  # peer's window-scale shift (applied to windows we receive)
    rcv_shift: int = 0  # our window-scale shift (applied to windows we send)
    mss: int = DEFAULT_MSS_V4  # largest payload we may send (peer's MSS option)
    adv_mss: int = 1460  # the MSS we announced
    sack_ok: bool = False
    ts_ok: bool = False
    ts_recent: int = 0  # last TSval from the peer (RFC 7323 4.3)
    ts_offset: int = 0  # added to our millisecond clock for TSval
    fin_seq: int | None = None  # sequence number of our FIN, once sent

    def window_field(self, window: int | None = None) -> int:
        """The 16-bit window field for ``window`` bytes (default ``rcv_wnd``)."""
        w = self.rcv_wnd if window is None else window
        return min(MAX_WINDOW_FIELD, max(0, w) >> self.rcv_shift)

    def ts_val(self, now: float) -> int:
        """Our TSval at ``now``: a millisecond clock (RFC 7323 5.4), offset per connection."""
        return (int(now * 1000) + self.ts_offset) & MASK

    def negotiate(self, ours: TcpOptions, theirs: TcpOptions, v6: bool = False) -> None:
        """Apply what two SYNs agreed: MSS, window scaling, SACK, timestamps."""
        default = DEFAULT_MSS_V6 if v6 else DEFAULT_MSS_V4
        self.mss = min(theirs.mss or default, ours.mss or 65495)
        self.adv_mss = ours.mss or default
        if ours.wscale is not None and theirs.wscale is not None:
            self.rcv_shift = min(ours.wscale, MAX_WSCALE)
            self.snd_shift = min(theirs.wscale, MAX_WSCALE)
        else:
            self.rcv_shift = self.snd_shift = 0
        self.sack_ok = ours.sack_permitted and theirs.sack_permitted
        self.ts_ok = ours.timestamps is not None and theirs.timestamps is not None
        if self.ts_ok and theirs.timestamps is not None:
            self.ts_recent = theirs.timestamps[0]


def syn_options(half: HalfState, now: float, mss: int, wscale: int | None, sack: bool,
                timestamps: bool, echo: int = 0) -> TcpOptions:
    """Options of a SYN or SYN-ACK offering what a modern stack offers."""
    return TcpOptions(mss=mss, wscale=wscale, sack_permitted=sack,
                      timestamps=(half.ts_val(now), echo) if timestamps else None)


def segment_options(half: HalfState, now: float,
                    sack_blocks: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Encoded options for a non-SYN segment: timestamps if negotiated, SACK blocks
    if permitted (at most 3 with timestamps, 4 without, RFC 2018 3)."""
    if not half.ts_ok and not (half.sack_ok and sack_blocks):
        return b""
    if not sack_blocks:  # timestamps alone: most segments
        return timestamp_option(half.ts_val(now), half.ts_recent)
    blocks = sack_blocks[: (3 if half.ts_ok else 4)] if half.sack_ok else ()
    ts = (half.ts_val(now), half.ts_recent) if half.ts_ok else None
    return TcpOptions(timestamps=ts, sack_blocks=blocks).encode()
