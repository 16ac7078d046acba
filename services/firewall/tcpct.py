"""TCP connection tracking as Linux conntrack does it (``nf_conntrack_proto_tcp.c``, 6.x).

Operators know the kernel's verdicts, and the firewall is tested against them, so
this follows its algorithm step for step (in Python, in our own words):

- **Flags**: after masking PSH, ECE and CWR, only SYN, SYN+URG, SYN+ACK, RST,
  RST+ACK, FIN+ACK, FIN+ACK+URG, ACK, ACK+URG are valid; anything else (SYN+FIN,
  a bare FIN, no flags) is invalid before any lookup.
- **States** and the **transition table** below: per direction (original,
  reply), per packet class (SYN, SYN+ACK, FIN, ACK, RST, none) and current state,
  the next state, or IV (invalid) or IG (ignored: let through without changing
  anything, the end hosts will sort it out).
- **A new connection** starts with a SYN; with ``loose`` any packet whose class
  leads from NONE to a state (an ACK: ESTABLISHED) picks the connection up
  mid-stream, with liberal window checks for it.
- **Window tracking** (Guido van Rooij's "Real Stateful TCP Packet Filtering"):
  per direction ``td_end`` (highest seq + len sent), ``td_maxend`` (highest
  ack + window the other side allowed), ``td_maxwin`` (largest window). A
  segment must start at or before the receiver's window end, its ACK must not
  acknowledge unseen data; segments under the lower bound (retransmissions) and
  ACKs far behind are ignored, not invalid. ``liberal`` accepts what is out of
  window (only the RST checks stay).
- **RST** must match the highest ACK seen from the other side (a RST with
  another in-window sequence keeps the state, for a challenge ACK); a RST before
  any reply deletes the entry.
- **Reopening**: a SYN on a closed or time-wait connection (after a FIN, or our
  own RST) deletes the entry and starts a new one.
"""

from __future__ import annotations

from typing import Protocol

from vtl.services.firewall.parse import Parsed, tcp_options, tcp_sack_edge

NO, SS, SR, ES, FW, CW, LA, TW, CL, S2, IV, IG = range(12)
NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
         "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
I_SYN, I_SYNACK, I_FIN, I_ACK, I_RST, I_NONE = range(6)
#: the timeout name of each state (FirewallOptions.timeouts keys)
TIMEOUT_OF = ("tcp_close", "tcp_syn_sent", "tcp_syn_recv", "tcp_established", "tcp_fin_wait",
              "tcp_close_wait", "tcp_last_ack", "tcp_time_wait", "tcp_close", "tcp_syn_sent2")

# [direction][packet class][state]; states in the order NO SS SR ES FW CW LA TW CL S2
TABLE = (
    (  # original
        (SS, SS, IG, IG, IG, IG, IG, SS, SS, S2),  # syn
        (IV, IV, SR, IV, IV, IV, IV, IV, IV, SR),  # synack
        (IV, IV, FW, FW, LA, LA, LA, TW, CL, IV),  # fin
        (ES, IV, ES, ES, CW, CW, TW, TW, CL, IV),  # ack
        (IV, CL, CL, CL, CL, CL, CL, CL, CL, CL),  # rst
        (IV,) * 10,  # none
    ),
    (  # reply
        (IV, S2, IV, IV, IV, IV, IV, SS, IV, S2),
        (IV, SR, IG, IG, IG, IG, IG, IG, IG, SR),
        (IV, IV, FW, FW, LA, LA, LA, TW, CL, IV),
        (IV, IG, SR, ES, CW, CW, TW, TW, CL, IG),
        (IV, CL, CL, CL, CL, CL, CL, CL, CL, CL),
        (IV,) * 10,
    ),
)

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
VALID_FLAGS = frozenset((SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK,
                         FIN | ACK | URG, ACK, ACK | URG))
# per-direction flags (Side.flags)
F_WSCALE, F_SACK, F_CLOSE_INIT, F_LIBERAL, F_UNACKED, F_MAXACK = 1, 2, 4, 8, 16, 32
# per-connection last_flags
L_CHALLENGE, L_SIMOPEN = 1, 2
M32 = 0xFFFFFFFF
MAXACKWINCONST = 66000

ACCEPT, IGNORE, INVALID, REOPEN = "accept", "ignore", "invalid", "reopen"


def after(a: int, b: int) -> bool:
    """a > b in sequence space, as the kernel's ``after()``: ``(s32)(b - a) < 0``, so a
    distance of exactly 2**31 is both after and before."""
    return 0 < ((a - b) & M32) <= 0x80000000


def before(a: int, b: int) -> bool:
    return 0 < ((b - a) & M32) <= 0x80000000


class Side:
    """What is known of one direction's sender."""

    __slots__ = ("td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags")

    def __init__(self) -> None:
        self.td_end = self.td_maxend = self.td_maxwin = self.td_maxack = self.td_scale = 0
        self.flags = 0

    def reset(self) -> None:
        self.td_end = self.td_maxend = self.td_maxwin = self.td_maxack = self.td_scale = 0
        self.flags &= F_LIBERAL


class Conn(Protocol):
    """What the tracker reads and writes of a connection (``conntrack.Conn`` has it)."""

    seen: tuple[Side, Side]
    state: int
    last_index: int
    last_dir: int
    last_seq: int
    last_ack: int
    last_end: int
    last_win: int
    retrans: int


def index_of(flags: int) -> int:
    if flags & RST:
        return I_RST
    if flags & SYN:
        return I_SYNACK if flags & ACK else I_SYN
    if flags & FIN:
        return I_FIN
    if flags & ACK:
        return I_ACK
    return I_NONE


def valid_flags(flags: int) -> bool:
    return (flags & 0x37) in VALID_FLAGS  # PSH (0x08), ECE, CWR masked


def seg_end(p: Parsed) -> int:
    return (p.seq + p.payload + (1 if p.flags & SYN else 0) + (1 if p.flags & FIN else 0)) & M32


def _options(data: bytearray | bytes, p: Parsed, side: Side) -> None:
    seen, scale = tcp_options(data, p)
    side.td_scale = scale or 0
    side.flags = (side.flags & F_LIBERAL) | (F_WSCALE if seen & 1 else 0) | \
        (F_SACK if seen & 2 else 0)


def new(conn: Conn, data: bytearray | bytes, p: Parsed, loose: bool) -> bool:
    """Set up the TCP part of a connection first seen with ``p``; False: invalid."""
    state = TABLE[0][index_of(p.flags)][NO]
    if state >= IV:
        return False
    s0 = conn.seen[0]
    end = seg_end(p)
    if state == SS:
        s0.td_end = s0.td_maxend = end
        s0.td_maxwin = p.win or 1
        _options(data, p, s0)
    elif not loose:
        return False
    else:
        s0.td_end = end
        s0.td_maxwin = p.win or 1
        s0.td_maxend = (end + s0.td_maxwin) & M32
        conn.seen[0].flags = conn.seen[1].flags = F_SACK | F_LIBERAL
    conn.last_index = I_NONE
    return True


def _init_sender(sender: Side, receiver: Side, data: bytearray | bytes, p: Parsed, end: int,
                 direction: int) -> None:
    sender.td_end = sender.td_maxend = end
    sender.td_maxwin = p.win or 1
    _options(data, p, sender)
    if direction == 1 and not (sender.flags & F_WSCALE and receiver.flags & F_WSCALE):
        sender.td_scale = receiver.td_scale = 0


def in_window(conn: Conn, direction: int, index: int, data: bytearray | bytes, p: Parsed,
              liberal: bool) -> str:
    """The window checks of one segment (ACCEPT, IGNORE or INVALID); updates the sides."""
    sender, receiver = conn.seen[direction], conn.seen[1 - direction]
    seq, ack, win_raw = p.seq, p.ack, p.win
    win = win_raw
    sack = ack
    end = seg_end(p)
    flags = p.flags
    if receiver.flags & F_SACK and p.doff > 20:
        sack = tcp_sack_edge(data, p, ack)
    be_liberal = liberal or bool(sender.flags & F_LIBERAL)
    if sender.td_maxwin == 0:
        if flags & SYN:
            _init_sender(sender, receiver, data, p, end, direction)
            if not flags & ACK:
                return ACCEPT  # simultaneous open
        else:
            sender.td_end = end
            swin = (win << sender.td_scale) & M32
            sender.td_maxwin = swin or 1
            sender.td_maxend = (end + sender.td_maxwin) & M32
            if receiver.td_maxwin == 0:
                receiver.td_end = receiver.td_maxend = sack
            elif sack == ((receiver.td_end + 1) & M32):
                receiver.td_end = (receiver.td_end + 1) & M32  # a reply to a keepalive
    elif flags & SYN and after(end, sender.td_end) and conn.state in (SS, SR):
        _init_sender(sender, receiver, data, p, end, direction)
        if direction == 1 and not flags & ACK:
            return ACCEPT
    if not flags & ACK:
        ack = sack = receiver.td_end
    elif flags & (ACK | RST) == ACK | RST and ack == 0:
        ack = sack = receiver.td_end  # stacks that send RST+ACK with a zero ack
    if flags & RST and seq == 0 and conn.state == SS:
        seq = end = sender.td_end  # a RST answering a SYN
    maxackwin = max(sender.td_maxwin, MAXACKWINCONST)
    if not before(seq, (sender.td_maxend + 1) & M32):
        overshot = (end - sender.td_maxend + 1) & M32
        ack_ok = after(sack, (receiver.td_end - maxackwin - 1) & M32)
        in_recv = bool(receiver.td_maxwin) and after(
            end, (sender.td_end - receiver.td_maxwin - 1) & M32)
        if in_recv and ack_ok and overshot <= receiver.td_maxwin and \
                before(sack, (receiver.td_end + 1) & M32):
            sender.td_end = end
            sender.flags |= F_UNACKED
            return ACCEPT if be_liberal else IGNORE  # more than the window allowed
        return ACCEPT if be_liberal else INVALID  # SEQ over the upper bound
    # each failed check below is accepted as it is when liberal (and nothing learnt)
    if not before(sack, (receiver.td_end + 1) & M32):
        return ACCEPT if be_liberal else INVALID  # ACK of data not seen yet
    in_recv = not receiver.td_maxwin or after(end, (sender.td_end - receiver.td_maxwin - 1)
                                                & M32)
    if not in_recv:
        return ACCEPT if be_liberal else IGNORE  # already ACKed data retransmitted
    if not after(sack, (receiver.td_end - maxackwin - 1) & M32):
        return ACCEPT if be_liberal else IGNORE  # an ACK under the lower bound
    if not flags & SYN:
        win = (win << sender.td_scale) & M32
    update(conn, sender, receiver, direction, index, flags, seq, ack, sack, end, win, win_raw)
    return ACCEPT


def update(conn: Conn, sender: Side, receiver: Side, direction: int, index: int, flags: int,
           seq: int, ack: int, sack: int, end: int, win: int, win_raw: int) -> None:
    """What an accepted segment teaches about both sides (``win`` already scaled).
    Sequence comparisons are written out (``0 < (a - b) mod 2**32 < 2**31`` is "a after
    b"): this runs for every accepted segment."""
    swin = (win + (sack - ack)) & M32
    if sender.td_maxwin < swin:
        sender.td_maxwin = swin
    if 0 < ((end - sender.td_end) & M32) <= 0x80000000:
        sender.td_end = end
        sender.flags |= F_UNACKED
    if flags & ACK:
        if not sender.flags & F_MAXACK:
            sender.td_maxack = ack
            sender.flags |= F_MAXACK
        elif 0 < ((ack - sender.td_maxack) & M32) <= 0x80000000:
            sender.td_maxack = ack
    over = (end - sender.td_maxend) & M32
    if receiver.td_maxwin != 0 and 0 < over <= 0x80000000:
        receiver.td_maxwin = (receiver.td_maxwin + over) & M32
    right = (sack + win) & M32
    if 0 < ((right - receiver.td_maxend + 1) & M32) <= 0x80000000:
        receiver.td_maxend = (right + 1) & M32 if win == 0 else right
    if ack == receiver.td_end:
        receiver.flags &= ~F_UNACKED
    if index == I_ACK:
        # the kernel keeps one set of last_* fields: an in-window ACK rewrites them (a
        # RST that follows it must start at its last_end to count as part of a train)
        if conn.last_dir == direction and conn.last_seq == seq and conn.last_ack == ack \
                and conn.last_end == end and conn.last_win == win_raw:
            conn.retrans += 1
        else:
            conn.last_dir, conn.last_seq, conn.last_ack = direction, seq, ack
            conn.last_end, conn.last_win = end, win_raw
            conn.retrans = 0
