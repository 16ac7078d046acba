"""The two-endpoint TCP connection model: both ends of a connection, seen from the path.

A :class:`TcpConnection` is what a service in the middle of the path keeps
per connection (keep-alive, firewall, anything that injects into a live
connection): one :class:`~vtl.models.tcp_state.HalfState` per endpoint — ``a``
(the client if the SYN was seen, else the sender of the first packet seen) and
``b`` — each direction's addresses (``flows``, by sender) and a
:class:`~vtl.models.tcp_segment.SegmentWriter` per direction.

- Start it by hand (:meth:`TcpConnection.manual`), or from the first packet
  seen (:meth:`TcpConnection.from_packet`): a SYN starts handshake tracking
  (options negotiated from both SYNs), a SYN-ACK or any later segment picks the
  connection up mid-stream (what the handshake said is guessed, see
  :mod:`vtl.models.tcp_observe`).
- Feed it every packet in either direction (:meth:`TcpConnection.observe`).
  The update rules, invariants and state table are in
  :mod:`vtl.models.tcp_observe`.
- Make packets *from either endpoint* — :meth:`~TcpConnection.data`,
  :meth:`~TcpConnection.ack`, :meth:`~TcpConnection.window_update`,
  :meth:`~TcpConnection.keepalive`, :meth:`~TcpConnection.fin`,
  :meth:`~TcpConnection.rst` — with the sequence number, ACK, window and
  options (timestamps when negotiated) the other endpoint accepts. Making a
  packet is observing it: data and FIN advance the sender's ``snd_nxt`` and the
  receiver's ``rcv_nxt``, so a service can inject and the model stays right.

What it puts in packets: seq ``snd_nxt`` (keep-alive: ``snd_una - 1``, zero
length as Linux; RST: the peer's ``rcv_nxt``, its exact RCV.NXT as far as the
observer knows); ACK ``rcv_nxt``, i.e. everything seen going to that side in
order, assumed to have arrived (``info[side].last_ack`` is what the side
acknowledged itself); the window field that keeps the right edge
the side advertised (with its scale unknown: the field it last sent itself,
which it already offered); TSval from :meth:`TcpObserver.tsval` and TSecr
``ts_recent`` (no timestamps on RSTs, RFC 7323 5.2). Beware the TSval of a
side whose real clock then runs *slower* than ``ts_rate`` (a paused VM whose
clock stopped): its own later segments carry TSvals below what was forged and
the peer drops them (PAWS) until its clock catches up; pass ``ts_rate=0`` to
forge its last TSval seen instead when standing in for a paused endpoint.

Frames are plain with complete checksums by default (``offload=False``, as an
observer emitting onto any port wants); with ``offload=True`` checksums are
left to the kernel and data above the MSS becomes one GSO frame.

Injecting data for a side whose real stack is still running puts that stack
out of step (it never sent those bytes and will not accept ACKs for them): a
service that does so must shift that side's later sequence numbers or take the
side over.

What it does not do: reassembly, retransmission, congestion control, SACK
blocks (that is the virtual endpoint's job, :mod:`vtl.models.tcp_endpoint`);
it does not hold back data the peer's window cannot take (see
:meth:`TcpObserver.send_space`).
"""

from __future__ import annotations

from vtl.models.seq import seq_add, seq_gt
from vtl.models.tcp_observe import Side, SideLike, St, TcpObserver
from vtl.models.tcp_segment import FlowAddrs, Segment, SegmentWriter
from vtl.models.tcp_state import MAX_WINDOW_FIELD, HalfState, TcpState

from vtl.errors import LocalProtocolError, RemoteProtocolError
from vtl.frame import Frame
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

__all__ = ["TcpConnection", "Side", "SideLike"]

PacketLike = Packet | Frame | bytes | bytearray
_CAN_SEND = frozenset({St.ESTABLISHED, St.CLOSE_WAIT})
_SYNCED = frozenset(s for s in TcpState if s.synchronized)


class TcpConnection(TcpObserver):
    """Both endpoints of one TCP connection, and packets from either (module doc)."""

    def __init__(self, addrs_a_to_b: FlowAddrs, a: HalfState, b: HalfState, *,
                 offload: bool = False, ttl: int = 64, ts_rate: float = 1000.0):
        super().__init__(a, b, v6=addrs_a_to_b.v6, ts_rate=ts_rate)
        self.offload = offload
        self.ttl = ttl
        self.flows: dict[Side, FlowAddrs] = {}  # by sender
        self.writers: dict[Side, SegmentWriter] = {}  # by sender
        self._learned: set[Side] = {"a"}  # flows taken from what that side really sent
        self._set_flow("a", addrs_a_to_b)
        self._set_flow("b", addrs_a_to_b.reverse())

    @classmethod
    def manual(cls, addrs_a_to_b: FlowAddrs, a: HalfState, b: HalfState, *,
               offload: bool = False, ttl: int = 64, ts_rate: float = 1000.0) -> TcpConnection:
        """From two control blocks set up by hand, used as given (set ``rcv_wnd``:
        a zero window takes no data)."""
        return cls(addrs_a_to_b, a, b, offload=offload, ttl=ttl, ts_rate=ts_rate)

    @classmethod
    def from_packet(cls, pkt: PacketLike, now: float, *, offload: bool = False,
                    ttl: int = 64, ts_rate: float = 1000.0) -> TcpConnection:
        """From the first packet seen: a SYN, a SYN-ACK or any segment with ACK.
        Others (RST, no ACK) raise RemoteProtocolError, non-TCP PacketError."""
        if not isinstance(pkt, Packet):
            pkt = Packet(pkt)
        seg = Segment.parse(pkt)
        addrs = FlowAddrs.of(pkt)
        f = seg.flags
        if f & RST or not f & (SYN | ACK):
            raise RemoteProtocolError(f"cannot start tracking a connection from {seg!r}")
        if f & SYN and f & ACK:  # a is the client, the receiver
            conn = cls(addrs.reverse(), HalfState(), HalfState(), offload=offload, ttl=ttl,
                       ts_rate=ts_rate)
            conn._set_flow("b", addrs)
            conn._learned = {"b"}
            conn._pickup_synack(seg, now)
        else:
            conn = cls(addrs, HalfState(), HalfState(), offload=offload, ttl=ttl,
                       ts_rate=ts_rate)
            if f & SYN:
                conn._start_handshake("a", seg, now)
            else:
                conn._pickup("a", seg, now, _gso(pkt))
        return conn

    def _set_flow(self, side: Side, addrs: FlowAddrs) -> None:
        self.flows[side] = addrs
        self.writers[side] = SegmentWriter(addrs, offload=self.offload, ttl=self.ttl)

    def side_of(self, pkt: Packet) -> Side | None:
        """Which side sent ``pkt`` (None if it is not of this connection)."""
        ip, tcp = pkt.ip, pkt.tcp
        if ip is None or tcp is None:
            return None
        key = (*ip.addrs, *tcp.ports)
        for side, f in self.flows.items():
            if key == (f.src_ip, f.dst_ip, f.sport, f.dport):
                return side
        return None

    def observe(self, pkt: PacketLike, now: float) -> Side:
        """Update both halves from one packet of this connection; returns its sender.
        A packet of another connection raises LocalProtocolError."""
        if not isinstance(pkt, Packet):
            pkt = Packet(pkt)
        sender = self.side_of(pkt)
        if sender is None:
            raise LocalProtocolError("packet does not belong to this connection")
        seg = Segment.parse(pkt)
        if sender not in self._learned:  # MACs and VLAN tags as that side really sends
            self._learned.add(sender)
            self._set_flow(sender, FlowAddrs.of(pkt))
        self._apply(sender, seg, now, _gso(pkt))
        return sender

    # -- making packets ----------------------------------------------------------------

    def data(self, side: SideLike, payload: bytes | bytearray | memoryview, now: float, *,
             push: bool = True) -> Frame:
        """A data segment from ``side`` at its ``snd_nxt`` (advances it). Without
        offload the payload must fit the side's MSS less options."""
        x = self._require(side, _CAN_SEND, "send data")
        return self._make(x, self.half(x).snd_nxt, ACK | PSH if push else ACK, now,
                          payload=payload)

    def ack(self, side: SideLike, now: float) -> Frame:
        """A pure ACK from ``side`` acknowledging everything it has received."""
        x = self._require(side, _SYNCED, "send an ACK")
        return self._make(x, self.half(x).snd_nxt, ACK, now)

    def window_update(self, side: SideLike, window: int, now: float) -> Frame:
        """A pure ACK from ``side`` advertising ``window`` bytes (0 closes the window).
        With ``side``'s scale unknown the field never exceeds its newest nonzero one."""
        x = self._require(side, _SYNCED, "send a window update")
        h, info = self.half(x), self.info[x]
        if window <= 0:
            field = 0
        elif info.wscale_known:
            field = h.window_field(window)
        else:
            field = min(window >> h.rcv_shift, info.open_field or self._window_field(x),
                        MAX_WINDOW_FIELD)
        return self._make(x, h.snd_nxt, ACK, now, window=field)

    def keepalive(self, side: SideLike, now: float, *, garbage: bool = False) -> Frame:
        """A keep-alive probe from ``side`` (RFC 9293 3.8.4): seq ``snd_una - 1``, which
        the peer has had, so it answers with an ACK; zero-length as Linux sends it, or one
        garbage byte (``garbage=True``) for peers that ignore empty probes."""
        x = self._require(side, _SYNCED, "send a keep-alive")
        seq = seq_add(self.half(x).snd_una, -1)
        return self._make(x, seq, ACK, now, payload=b"\0" if garbage else b"")

    def fin(self, side: SideLike, now: float) -> Frame:
        """A FIN from ``side`` (its half-close; advances snd_nxt by one)."""
        x = self._require(side, _CAN_SEND, "send a FIN")
        return self._make(x, self.half(x).snd_nxt, FIN | ACK, now)

    def rst(self, side: SideLike, now: float) -> Frame:
        """An RST from ``side`` at the peer's expected sequence number (closes both)."""
        x = self.side(side)
        if self.half(x).state is St.CLOSED:
            raise LocalProtocolError(f"cannot send an RST from side {x}: it is CLOSED")
        return self._make(x, self.peer(x).rcv_nxt, RST | ACK, now, window=0)

    def _require(self, side: SideLike, states: frozenset[TcpState], what: str) -> Side:
        x = self.side(side)
        st = self.half(x).state
        if st not in states:
            raise LocalProtocolError(f"cannot {what} from side {x} in state {st.value}")
        return x

    def _window_field(self, side: Side) -> int:
        h, info = self.half(side), self.info[side]
        if info.wscale_known:
            return h.window_field()
        if info.last_field is not None:
            return info.last_field
        return min(MAX_WINDOW_FIELD, h.mss)  # never seen: small, so rarely more than it has

    def _make(self, side: Side, seq: int, flags: int, now: float, *,
              payload: bytes | bytearray | memoryview = b"", window: int | None = None) -> Frame:
        h = self.half(side)
        opts = b""
        if h.ts_ok and not flags & RST:
            opts = TcpOptions(timestamps=(self.tsval(side, now), h.ts_recent)).encode()
        room = h.mss - len(opts)
        if len(payload) > room and not self.offload:
            raise LocalProtocolError(f"{len(payload)} bytes exceed side {side}'s MSS "
                                     f"({room} with options); split them or use offload")
        field = self._window_field(side) if window is None else window
        ack = h.rcv_nxt
        frame = self.writers[side].build(seq, ack, flags, field, opts, payload,
                                         mss=max(room, 1))
        self._apply(side, Segment(seq, ack, flags, field, payload, opts), now)
        if flags & RST:
            return frame
        # what was sent counts even where the peer's window could not take it
        data_end = seq_add(seq, len(payload))
        if flags & FIN:
            self._sent_fin(side, data_end, ack, now)
            data_end = seq_add(data_end, 1)
        if seq_gt(data_end, h.snd_nxt):
            h.snd_nxt = data_end
        return frame


def _gso(pkt: Packet) -> int:
    v = pkt.vnet
    return v.gso_size if v is not None and v.is_gso else 0

