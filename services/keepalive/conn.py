"""What ``keepalive`` keeps of one TCP connection, and the segments it forges from it.

Live tracking must cost little (every segment of every connection passes it), so a
:class:`Conn` keeps, per direction, only a copy of the *last* segment's link header
and TCP header (with its options) and its payload length: two small slices and a
dict lookup per frame. Everything a hold needs is read from those copies when it
is needed (:class:`Seg`): the guest's next sequence number, its last
acknowledgement and window, its last TCP timestamps; the peer's acknowledgement,
window and timestamp; both link headers (MACs, VLAN tags) to answer on the same
path. A connection picked up in the middle (opened before the bridge started)
is tracked from its first segment seen, like any other.

Forged segments (:meth:`Conn.answer`, :meth:`Conn.custody_segment`,
:meth:`Conn.probe`) carry complete checksums, and the guest's timestamps exactly
as the guest last sent them: a paused guest's clock stands still, and a TSval
advanced for it would make the peer drop the resumed guest's segments (PAWS).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtl.flow import FlowKey
from vtl.packet import build
from vtl.packet.tcp import ACK, FIN, PSH, SYN, TcpOptions, iter_options

_HDR = struct.Struct("!HHIIBBH")  # ports, seq, ack, offset, flags, window
OPT_TIMESTAMP = 8
MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Seg:
    """The fields of one copied TCP header (and its payload length)."""

    seq: int
    ack: int
    flags: int
    window: int
    ts: tuple[int, int] | None  # (TSval, TSecr)
    length: int  # payload bytes

    @property
    def end(self) -> int:
        """The sequence number after this segment (SYN and FIN count one)."""
        return (self.seq + self.length + bool(self.flags & SYN) + bool(self.flags & FIN)) & MASK

    @classmethod
    def parse(cls, hdr: bytes | bytearray, length: int) -> Seg:
        _, _, seq, ack, _, flags, window = _HDR.unpack_from(hdr)
        ts = None
        if len(hdr) > 20:
            for kind, data in iter_options(hdr[20:]):
                if kind == OPT_TIMESTAMP and len(data) == 8:
                    ts = (int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big"))
        return cls(seq, ack, flags, window, ts, length)


class Conn:
    """One tracked TCP connection; ``key`` is as the guest sends (guest -> peer)."""

    __slots__ = ("key", "raw", "g_l2", "g_hdr", "g_len", "p_l2", "p_hdr", "p_len", "custody",
                 "replay", "answered", "window_start", "window_count", "closed", "fins", "touched")

    def __init__(self, key: FlowKey):
        self.key = key
        self.raw: tuple[bytes, ...] = ()  # the service's hot-path keys (IPv4 only)
        self.g_l2 = b""  # link header of the guest's last segment (MACs, tags, type)
        self.g_hdr: bytes | bytearray = b""  # its TCP header, options included
        self.g_len = 0
        self.p_l2 = b""  # the same of the peer's last segment
        self.p_hdr: bytes | bytearray = b""
        self.p_len = 0
        self.custody: bytes | None = None  # the byte acknowledged for the guest in a hold
        #: the peer's data just beyond what the guest has, from its last retransmission in
        #: the hold: (sequence number, bytes), replayed to the guest at release
        self.replay: tuple[int, bytes] | None = None
        self.answered = 0  # segments answered in this hold
        self.window_start = 0.0  # rate limit of the answers: this second's start...
        self.window_count = 0  # ...and the answers sent in it
        self.closed = False  # an RST or both FINs seen
        self.fins = 0  # FINs seen: 1 from the guest, 2 from the peer
        self.touched = 0.0  # when the flow table's idle timer was last refreshed

    # -- what the copies say ------------------------------------------------------------

    @property
    def answerable(self) -> bool:
        """The guest has sent an ACK segment here: a hold can stand in for it."""
        return bool(self.g_hdr) and bool(self.g_hdr[13] & ACK)

    def guest(self) -> Seg:
        return Seg.parse(self.g_hdr, self.g_len)

    def peer(self) -> Seg | None:
        return Seg.parse(self.p_hdr, self.p_len) if self.p_hdr else None

    def ack_for_guest(self) -> int:
        """What a hold acknowledges for the guest: its last ACK, plus a custody byte."""
        ack = self.guest().ack
        return (ack + 1) & MASK if self.custody is not None else ack

    # -- forged segments ----------------------------------------------------------------

    def answer(self) -> bytearray:
        """An ACK from the guest to the peer: the guest's next sequence number, what it
        acknowledged (and the custody byte), window 0, its timestamps unchanged."""
        g = self.guest()
        return self._as_guest(g.end, self.ack_for_guest(), ACK, 0, g.ts)

    def custody_segment(self, peer_ts: int | None) -> bytearray:
        """The custody byte, delivered to the guest as the peer would have sent it."""
        assert self.custody is not None
        g = self.guest()
        return self._as_peer(g.ack, ACK | PSH, peer_ts, g, self.custody)

    def replay_segment(self, peer_ts: int | None) -> bytearray:
        """The peer's last retransmission (from the guest's next byte on), replayed to the
        guest at release: the guest acknowledges it at once, which is what a peer that
        retransmits (its cwnd down to one segment) waits for."""
        assert self.replay is not None
        seq, data = self.replay
        return self._as_peer(seq, ACK | PSH, peer_ts, self.guest(), data)

    def probe(self, peer_ts: int | None) -> bytearray:
        """A zero-length segment from the peer one byte below what the guest expects:
        the guest answers it at once with an ACK carrying its real window."""
        g = self.guest()
        return self._as_peer((g.ack - 1) & MASK, ACK, peer_ts, g, b"")

    def _as_guest(self, seq: int, ack: int, flags: int, window: int,
                  ts: tuple[int, int] | None) -> bytearray:
        k, l2 = self.key, self.g_l2
        options = TcpOptions(timestamps=ts) if ts is not None else None
        return build.tcp_segment(l2[6:12], l2[0:6], k.src, k.dst, k.sport, k.dport, seq, ack,
                                 flags, window, options, tags=l2[12:-2])

    def _as_peer(self, seq: int, flags: int, peer_ts: int | None, g: Seg,
                 payload: bytes) -> bytearray:
        k = self.key
        p = self.peer()
        # the peer's link header if it was seen, else the guest's reversed
        l2 = self.p_l2 or (self.g_l2[6:12] + self.g_l2[0:6] + self.g_l2[12:])
        ack = p.ack if p is not None else g.end
        window = p.window if p is not None else 0xFFFF
        options = None
        if g.ts is not None:
            tsval = peer_ts if peer_ts is not None else (p.ts[0] if p and p.ts else g.ts[1])
            options = TcpOptions(timestamps=(tsval, g.ts[0]))
        return build.tcp_segment(l2[6:12], l2[0:6], k.dst, k.src, k.dport, k.sport, seq, ack,
                                 flags, window, options, payload, tags=l2[12:-2])


__all__ = ["Conn", "Seg"]
