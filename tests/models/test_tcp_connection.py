"""The two-endpoint connection model, against reference endpoints and scapy.

Two small reference endpoints (``Ref``) play a real conversation segment by
segment the way Linux would number it; the observer (``TcpConnection``) sees
every frame. Packets the model makes from either side are handed to the *real*
other endpoint, whose checker applies RFC 9293 3.10.7.4 (sequence in its
receive window, ACK within what it sent, RST at exactly RCV.NXT), RFC 7323
(timestamps present when negotiated, TSval not below TS.Recent nor below what
that side sent before) and scapy (checksums and lengths recomputed unchanged).
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from vtl.models.seq import MASK, between, seq_add, seq_ge, seq_le, seq_lt
from vtl.models.tcp_connection import TcpConnection
from vtl.models.tcp_observe import TIME_WAIT_SECONDS, TRANSITIONS, Event
from vtl.models.tcp_segment import FlowAddrs
from vtl.models.tcp_state import HalfState, TcpState

from vtl.errors import LocalProtocolError, PacketError, RemoteProtocolError, VTLError
from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

T = TcpState
MAC_C, MAC_S = b"\x02\x00\x00\x00\x00\x0c", b"\x02\x00\x00\x00\x00\x05"
V4 = (bytes([10, 1, 0, 1]), bytes([10, 1, 0, 2]))
V6 = (bytes.fromhex("20010db8000000000000000000000001"),
      bytes.fromhex("20010db8000000000000000000000002"))


# -- a reference endpoint ------------------------------------------------------------------


class Ref:
    """One real endpoint, numbered as Linux numbers it; lossless, in-order only."""

    def __init__(self, mac: bytes, ip: bytes, port: int, iss: int, *, wscale: int | None = 7,
                 ts: bool = True, sack: bool = True, mss: int = 1460, wnd: int = 200_000,
                 ts_offset: int = 0):
        self.mac, self.ip, self.port = mac, ip, port
        self.iss = self.snd_una = iss
        self.snd_nxt = seq_add(iss, 1)
        self.rcv_nxt = 0
        self.offer_wscale, self.offer_ts, self.offer_sack, self.mss_opt = wscale, ts, sack, mss
        self.shift = self.peer_shift = 0
        self.ts_ok = False
        self.ts_recent = 0
        self.ts_offset = ts_offset
        self.wnd = wnd
        self.peer_last_tsval: int | None = None
        self.peer: Ref
        self.received = bytearray()
        self.fin_received = False

    def tsval(self, now: float) -> int:
        return (int(now * 1000) + self.ts_offset) & MASK

    def _build(self, seq: int, ack: int, flags: int, window: int, opts: TcpOptions | None,
               payload: bytes = b"") -> bytearray:
        p = self.peer
        return build.tcp_segment(self.mac, p.mac, self.ip, p.ip, self.port, p.port, seq, ack,
                                 flags, window, opts, payload)

    def syn(self, now: float) -> bytearray:
        opts = TcpOptions(mss=self.mss_opt, wscale=self.offer_wscale,
                          sack_permitted=self.offer_sack,
                          timestamps=(self.tsval(now), 0) if self.offer_ts else None)
        return self._build(self.iss, 0, SYN, min(self.wnd, 65535), opts)

    def synack(self, now: float) -> bytearray:
        p = self.peer
        opts = TcpOptions(mss=self.mss_opt,
                          wscale=self.offer_wscale if p.offer_wscale is not None else None,
                          sack_permitted=self.offer_sack and p.offer_sack,
                          timestamps=(self.tsval(now), self.ts_recent) if self.ts_ok else None)
        return self._build(self.iss, self.rcv_nxt, SYN | ACK, min(self.wnd, 65535), opts)

    def negotiate(self, syn_opts: TcpOptions) -> None:
        if self.offer_wscale is not None and syn_opts.wscale is not None:
            self.shift, self.peer_shift = self.offer_wscale, syn_opts.wscale
        self.ts_ok = self.offer_ts and syn_opts.timestamps is not None
        if self.ts_ok:
            assert syn_opts.timestamps is not None
            self.ts_recent = syn_opts.timestamps[0]

    def send(self, now: float, payload: bytes = b"", flags: int = ACK) -> bytearray:
        opts = TcpOptions(timestamps=(self.tsval(now), self.ts_recent)) if self.ts_ok else None
        raw = self._build(self.snd_nxt, self.rcv_nxt, flags, min(self.wnd >> self.shift, 65535),
                          opts, payload)
        self.snd_nxt = seq_add(self.snd_nxt, len(payload) + (1 if flags & FIN else 0))
        return raw

    def receive(self, raw: bytes | bytearray) -> None:
        """Apply a segment already checked (or from the real peer)."""
        t = Ether(bytes(raw))[TCP]
        f = int(t.flags)
        opts = TcpOptions.decode(bytes(t)[20:t.dataofs * 4])
        if f & SYN:
            self.rcv_nxt = seq_add(t.seq, 1)
            if f & ACK:  # we are the client
                self.negotiate(opts)
                self.snd_una = t.ack
            else:
                self.negotiate(opts)
            return
        payload = bytes(t.payload)
        if t.seq == self.rcv_nxt:
            self.received += payload
            self.rcv_nxt = seq_add(self.rcv_nxt, len(payload))
            if f & FIN:
                self.rcv_nxt = seq_add(self.rcv_nxt, 1)
                self.fin_received = True
            if self.ts_ok and opts.timestamps:
                self.ts_recent = opts.timestamps[0]
        if f & ACK and seq_lt(self.snd_una, t.ack):
            self.snd_una = t.ack
        if self.ts_ok and opts.timestamps:
            self.peer_last_tsval = opts.timestamps[0]


def handshake(c: Ref, s: Ref, conn_now: float = 0.0) -> list[bytearray]:
    """The three frames of the handshake, applied to both references."""
    syn = c.syn(conn_now)
    s.receive(syn)
    synack = s.synack(conn_now)
    c.receive(synack)
    ack = c.send(conn_now)
    s.receive(ack)
    return [syn, synack, ack]


def pair(v6: bool = False, iss_c: int = 1000, iss_s: int = 5_000_000, **kw: object
         ) -> tuple[Ref, Ref]:
    ips = V6 if v6 else V4
    skw = {k[2:]: v for k, v in kw.items() if k.startswith("s_")}
    ckw = {k[2:]: v for k, v in kw.items() if k.startswith("c_")}
    c = Ref(MAC_C, ips[0], 40000, iss_c, **ckw)  # type: ignore[arg-type]
    s = Ref(MAC_S, ips[1], 80, iss_s, ts_offset=777_777, **skw)  # type: ignore[arg-type]
    c.peer, s.peer = s, c
    return c, s


# -- the checker -----------------------------------------------------------------------------


def scapy_clean(frame: Frame) -> Ether:
    """scapy parses it and, recomputing every checksum and length, gets the same bytes."""
    assert frame.vnet is None
    raw = bytes(frame.data)
    s = Ether(raw)
    assert TCP in s
    for layer, fields in ((IP, ("chksum", "len")), (IPv6, ("plen",)), (TCP, ("chksum",))):
        if layer in s:
            for f in fields:
                delattr(s[layer], f)
    assert bytes(s) == raw
    assert Packet(bytearray(raw)).verify_checksums()
    return Ether(raw)


def accepts(rx: Ref, frame: Frame, *, probe: bool = False) -> None:
    """Would ``rx`` (the real receiver) accept ``frame``? RFC 9293 3.10.7.4, RFC 7323."""
    s = scapy_clean(frame)
    t = s[TCP]
    ip = s[IP] if IP in s else s[IPv6]
    assert ip.dst == Ether(bytes(rx.peer._build(0, 0, ACK, 0, None)))[ip.__class__].dst
    assert (t.sport, t.dport) == (rx.peer.port, rx.port)
    f, seq, ack = int(t.flags), t.seq, t.ack
    n = len(bytes(t.payload)) + (1 if f & FIN else 0)
    wnd = rx.wnd
    opts = TcpOptions.decode(bytes(t)[20:t.dataofs * 4])
    if f & RST:
        assert seq == rx.rcv_nxt, "RST not at RCV.NXT: a challenge ACK, not a reset"
        return
    assert f & ACK
    if probe:
        # below RCV.NXT: old, so the receiver answers with an ACK (RFC 9293 3.8.4)
        assert seq_lt(seq, rx.rcv_nxt) and seq_lt(seq_add(rx.rcv_nxt, -(1 << 20)), seq)
    elif n == 0:
        assert between(rx.rcv_nxt, seq, seq_add(rx.rcv_nxt, max(wnd - 1, 0)))
    else:
        assert wnd > 0 and (between(rx.rcv_nxt, seq, seq_add(rx.rcv_nxt, wnd - 1)) or
                            between(rx.rcv_nxt, seq_add(seq, n - 1), seq_add(rx.rcv_nxt, wnd - 1)))
    assert between(rx.snd_una, ack, rx.snd_nxt), (rx.snd_una, ack, rx.snd_nxt)
    if rx.ts_ok:
        assert opts.timestamps is not None, "timestamps negotiated: every segment has them"
        tsval = opts.timestamps[0]
        assert seq_ge(tsval, rx.ts_recent), "PAWS would drop it"
        if rx.peer_last_tsval is not None:
            assert seq_ge(tsval, rx.peer_last_tsval)
    else:
        assert opts.timestamps is None


def check_all_makers(conn: TcpConnection, refs: dict[str, Ref], now: float) -> None:
    """Every packet kind, from each side that may send it, accepted by the real peer."""
    for x in ("a", "b"):
        rx = refs["b" if x == "a" else "a"]
        st_ = conn.half(x).state
        makers = [("ack", lambda c, x=x: c.ack(x, now), False),
                  ("window", lambda c, x=x: c.window_update(x, 30000, now), False),
                  ("zero window", lambda c, x=x: c.window_update(x, 0, now), False),
                  ("keepalive", lambda c, x=x: c.keepalive(x, now), True),
                  ("garbage keepalive", lambda c, x=x: c.keepalive(x, now, garbage=True), True),
                  ("rst", lambda c, x=x: c.rst(x, now), False)]
        if st_ in (T.ESTABLISHED, T.CLOSE_WAIT):
            makers += [("data", lambda c, x=x: c.data(x, b"z" * 500, now), False),
                       ("fin", lambda c, x=x: c.fin(x, now), False)]
        for name, make, probe in makers:
            c = copy.deepcopy(conn)
            frame = make(c)
            try:
                accepts(rx, frame, probe=probe)
            except AssertionError as e:
                raise AssertionError(f"{name} from {x}: {e}") from e
            if name == "rst":
                assert c.closed


def conn_of(frames: list[bytearray], now: float = 0.0) -> TcpConnection:
    conn = TcpConnection.from_packet(Packet(frames[0]), now)
    for fr in frames[1:]:
        conn.observe(Packet(fr), now)
    return conn


# -- the handshake, data and close, step by step ------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("iss_c,iss_s", [(1000, 5_000_000), (MASK - 5, MASK - 700)])
def test_full_exchange_step_by_step(v6: bool, iss_c: int, iss_s: int) -> None:
    c, s = pair(v6, iss_c, iss_s)
    refs = {"a": c, "b": s}
    syn = c.syn(0.0)
    conn = TcpConnection.from_packet(Packet(syn), 0.0)
    s.receive(syn)
    a, b = conn.a, conn.b
    assert (a.state, b.state) == (T.SYN_SENT, T.LISTEN)
    assert a.snd_nxt == b.rcv_nxt == seq_add(iss_c, 1)

    synack = s.synack(0.01)
    assert conn.observe(Packet(synack), 0.01) == "b"
    c.receive(synack)
    a, b = conn.a, conn.b
    assert (a.state, b.state) == (T.ESTABLISHED, T.SYN_RECEIVED)
    assert (a.snd_shift, a.rcv_shift, b.snd_shift, b.rcv_shift) == (7, 7, 7, 7)
    assert a.ts_ok and b.ts_ok and a.sack_ok and b.sack_ok
    assert a.mss == b.mss == 1460
    assert a.rcv_nxt == b.snd_nxt == seq_add(iss_s, 1)

    ack = c.send(0.02)
    conn.observe(Packet(ack), 0.02)
    s.receive(ack)
    assert (a.state, b.state) == (T.ESTABLISHED, T.ESTABLISHED)
    assert b.snd_wnd == 200_000 >> 7 << 7
    check_all_makers(conn, refs, 0.03)

    # data both ways, with the acks
    for payload, (tx, rx, side) in [(b"x" * 1000, (c, s, "a")), (b"y" * 1400, (s, c, "b")),
                                    (b"w" * 300, (s, c, "b"))]:
        fr = tx.send(0.05, payload, ACK | PSH)
        assert conn.observe(Packet(fr), 0.05) == side
        rx.receive(fr)
        h, p = conn.half(side), conn.peer(side)
        assert h.snd_nxt == p.rcv_nxt == tx.snd_nxt
        assert h.snd_una != tx.snd_nxt
        check_all_makers(conn, refs, 0.06)
        back = rx.send(0.07)
        conn.observe(Packet(back), 0.07)
        tx.receive(back)
        assert h.snd_una == h.snd_nxt == tx.snd_nxt
    assert c.received == b"y" * 1400 + b"w" * 300

    # a closes first
    fin = c.send(0.1, b"", FIN | ACK)
    conn.observe(Packet(fin), 0.1)
    s.receive(fin)
    assert (a.state, b.state) == (T.FIN_WAIT_1, T.CLOSE_WAIT)
    check_all_makers(conn, refs, 0.11)
    fr = s.send(0.12)
    conn.observe(Packet(fr), 0.12)
    c.receive(fr)
    assert (a.state, b.state) == (T.FIN_WAIT_2, T.CLOSE_WAIT)
    fr = s.send(0.13, b"late data", ACK | PSH)  # half-closed: b may still send
    conn.observe(Packet(fr), 0.13)
    c.receive(fr)
    check_all_makers(conn, refs, 0.14)
    fr = s.send(0.15, b"", FIN | ACK)
    conn.observe(Packet(fr), 0.15)
    c.receive(fr)
    assert (a.state, b.state) == (T.TIME_WAIT, T.LAST_ACK)
    assert conn.timer() == pytest.approx(0.15 + TIME_WAIT_SECONDS)
    fr = c.send(0.16)
    conn.observe(Packet(fr), 0.16)
    assert (a.state, b.state) == (T.TIME_WAIT, T.CLOSED)
    conn.on_timer(1.0)
    assert a.state is T.TIME_WAIT
    conn.on_timer(0.15 + TIME_WAIT_SECONDS)
    assert conn.closed and conn.timer() is None


def test_negotiation_without_wscale_ts_sack() -> None:
    c, s = pair(c_wscale=None, s_ts=False, c_sack=False, s_mss=1200)
    conn = conn_of(handshake(c, s))
    a, b = conn.a, conn.b
    assert (a.snd_shift, a.rcv_shift, b.snd_shift, b.rcv_shift) == (0, 0, 0, 0)
    assert not a.ts_ok and not b.ts_ok and not a.sack_ok
    assert a.mss == 1200 and b.mss == 1200
    check_all_makers(conn, {"a": c, "b": s}, 1.0)


def test_simultaneous_close() -> None:
    c, s = pair()
    conn = conn_of(handshake(c, s))
    fin_a = c.send(0.1, b"", FIN | ACK)
    fin_b = s.send(0.1, b"", FIN | ACK)  # crosses fin_a
    conn.observe(Packet(fin_a), 0.1)
    assert (conn.a.state, conn.b.state) == (T.FIN_WAIT_1, T.CLOSE_WAIT)
    conn.observe(Packet(fin_b), 0.1)
    assert (conn.a.state, conn.b.state) == (T.CLOSING, T.CLOSING)
    c.receive(fin_b)
    s.receive(fin_a)
    ack_a, ack_b = c.send(0.2), s.send(0.2)
    conn.observe(Packet(ack_a), 0.2)
    assert conn.b.state is T.TIME_WAIT
    conn.observe(Packet(ack_b), 0.2)
    assert (conn.a.state, conn.b.state) == (T.TIME_WAIT, T.TIME_WAIT)
    assert conn.a.rcv_nxt == c.rcv_nxt and conn.b.rcv_nxt == s.rcv_nxt


def test_fin_with_data_and_ack_of_the_other_fin() -> None:
    """b's FIN carries data and acks a's FIN: a goes FIN-WAIT-1 -> TIME-WAIT at once."""
    c, s = pair()
    conn = conn_of(handshake(c, s))
    fr = c.send(0.1, b"", FIN | ACK)
    conn.observe(Packet(fr), 0.1)
    s.receive(fr)
    fr = s.send(0.2, b"bye", FIN | ACK | PSH)
    conn.observe(Packet(fr), 0.2)
    assert (conn.a.state, conn.b.state) == (T.TIME_WAIT, T.LAST_ACK)
    assert conn.a.rcv_nxt == seq_add(s.snd_nxt, 0)


# -- resets ----------------------------------------------------------------------------------


def _established() -> tuple[TcpConnection, Ref, Ref]:
    c, s = pair()
    frames = handshake(c, s)
    fr = c.send(0.05, b"q" * 100, ACK | PSH)
    s.receive(fr)
    frames.append(fr)
    fr = s.send(0.06)
    c.receive(fr)
    frames.append(fr)
    return conn_of(frames), c, s


@pytest.mark.parametrize("offset,closes", [(0, True), (1, False), (5000, False),
                                           (-1, False), (1 << 31, False), (-(1 << 20), False)])
def test_rst_only_at_rcv_nxt(offset: int, closes: bool) -> None:
    conn, c, s = _established()
    rst = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port, s.port,
                            seq_add(s.rcv_nxt, offset), 0, RST, 0)
    conn.observe(Packet(rst), 1.0)
    assert conn.closed is closes
    if not closes:
        assert (conn.a.state, conn.b.state) == (T.ESTABLISHED, T.ESTABLISHED)


def test_rst_refusing_a_syn() -> None:
    c, s = pair()
    syn = c.syn(0.0)
    conn = TcpConnection.from_packet(Packet(syn), 0.0)
    wrong = build.tcp_segment(s.mac, c.mac, s.ip, c.ip, s.port, c.port, 0, 12345, RST | ACK, 0)
    conn.observe(Packet(wrong), 0.0)
    assert conn.a.state is T.SYN_SENT
    right = build.tcp_segment(s.mac, c.mac, s.ip, c.ip, s.port, c.port, 0, seq_add(c.iss, 1),
                              RST | ACK, 0)
    conn.observe(Packet(right), 0.0)
    assert conn.closed
    # the port is reused: a new SYN starts tracking again
    c2 = Ref(c.mac, c.ip, c.port, 99)
    c2.peer = s
    conn.observe(Packet(c2.syn(1.0)), 1.0)
    assert (conn.a.state, conn.b.state) == (T.SYN_SENT, T.LISTEN) and conn.a.iss == 99


def test_rst_made_from_b_refuses_the_syn() -> None:
    c, s = pair()
    conn = TcpConnection.from_packet(Packet(c.syn(0.0)), 0.0)
    frame = conn.rst("b", 0.0)
    t = Ether(bytes(frame.data))[TCP]
    assert int(t.flags) == RST | ACK and t.ack == seq_add(c.iss, 1)
    assert conn.closed


# -- mid-connection pickup ---------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("first", ["data from server", "ack from client", "fin from server"])
def test_pickup_mid_connection(v6: bool, first: str) -> None:
    c, s = pair(v6, iss_c=MASK - 100, iss_s=MASK - 3000)
    handshake(c, s)
    for i in range(4):  # unobserved history
        fr = s.send(0.1 + i, b"h" * 1400, ACK | PSH)
        c.receive(fr)
        s.receive(c.send(0.1 + i))
    if first == "data from server":
        fr = s.send(10.0, b"d" * 1000, ACK | PSH)
        c.receive(fr)
        refs = {"a": s, "b": c}
    elif first == "ack from client":
        fr = c.send(10.0)
        s.receive(fr)
        refs = {"a": c, "b": s}
    else:
        fr = s.send(10.0, b"", FIN | ACK)
        c.receive(fr)
        refs = {"a": s, "b": c}
    conn = TcpConnection.from_packet(Packet(fr), 10.0)
    a, b = conn.a, conn.b
    assert conn.picked_up and not conn.wscale_known
    assert a.ts_ok and b.ts_ok
    ra, rb = refs["a"], refs["b"]
    assert a.snd_nxt == ra.snd_nxt and b.rcv_nxt == rb.rcv_nxt
    assert b.snd_nxt == rb.snd_nxt and a.rcv_nxt == ra.rcv_nxt
    if first == "fin from server":
        assert (a.state, b.state) == (T.FIN_WAIT_1, T.CLOSE_WAIT)
    else:
        assert (a.state, b.state) == (T.ESTABLISHED, T.ESTABLISHED)
    if first == "data from server":
        assert a.mss >= 1000 + 12
    # packets made now are accepted; b's window is not known yet
    check_all_makers(conn, refs, 10.5)
    # after b's first segment its window field is what packets from b carry
    fr = rb.send(11.0)
    conn.observe(Packet(fr), 11.0)
    ra.receive(fr)
    field = Ether(bytes(fr))[TCP].window
    made = copy.deepcopy(conn).ack("b", 11.5)
    assert Ether(bytes(made.data))[TCP].window == field
    check_all_makers(conn, refs, 11.5)
    # the conversation continues through the observer
    for i in range(3):
        fr = ra.send(12.0 + i, b"m" * 1200, ACK | PSH) if ra.fin_received is False and \
            conn.a.state is T.ESTABLISHED else ra.send(12.0 + i)
        conn.observe(Packet(fr), 12.0 + i)
        rb.receive(fr)
        fr = rb.send(12.0 + i)
        conn.observe(Packet(fr), 12.0 + i)
        ra.receive(fr)
    assert conn.a.snd_una == ra.snd_una and conn.b.rcv_nxt == rb.rcv_nxt
    check_all_makers(conn, refs, 20.0)


def test_pickup_infers_a_lower_bound_of_the_scale() -> None:
    c, s = pair(s_wnd=2_000_000, c_wnd=2_000_000, c_wscale=9, s_wscale=9)
    handshake(c, s)
    fr = c.send(1.0)  # the client acks: its window field is 2_000_000 >> 9 = 3906
    s.receive(fr)
    conn = TcpConnection.from_packet(Packet(fr), 1.0)
    assert conn.b.snd_wnd == 3906  # unknown scale: the field taken as bytes
    assert conn.send_space("b") == 3906
    sent = 0
    while sent < 60_000:  # the server sends far beyond 3906 bytes: the scale must be larger
        fr = s.send(1.1, b"s" * 1400, ACK | PSH)
        c.receive(fr)
        conn.observe(Packet(fr), 1.1)
        sent += 1400
    assert conn.a.rcv_shift >= 4 and conn.b.snd_shift == conn.a.rcv_shift
    assert conn.a.rcv_shift <= 9 and conn.b.snd_wnd <= 2_000_000
    assert conn.b.snd_nxt == s.snd_nxt and conn.a.rcv_nxt == c.rcv_nxt


def test_pickup_from_synack() -> None:
    c, s = pair(c_wscale=6, s_wscale=8)
    syn = c.syn(0.0)
    s.receive(syn)
    synack = s.synack(0.001)
    c.receive(synack)
    conn = TcpConnection.from_packet(Packet(synack), 0.001)
    assert conn.flows["a"].src_ip == c.ip
    assert (conn.a.state, conn.b.state) == (T.ESTABLISHED, T.SYN_RECEIVED)
    assert conn.b.rcv_shift == 8 and conn.a.snd_shift == 8
    assert conn.info["b"].wscale_known and not conn.info["a"].wscale_known
    assert conn.a.mss == 1460 and conn.a.ts_ok and conn.a.sack_ok
    fr = c.send(0.002)
    conn.observe(Packet(fr), 0.002)
    s.receive(fr)
    assert conn.b.state is T.ESTABLISHED
    check_all_makers(conn, {"a": c, "b": s}, 0.01)


def test_from_packet_refuses_what_cannot_start_a_connection() -> None:
    c, s = pair()
    rst = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port, s.port, 1, 0, RST, 0)
    with pytest.raises(RemoteProtocolError):
        TcpConnection.from_packet(Packet(rst), 0.0)
    bare_fin = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port, s.port, 1, 0, FIN, 0)
    with pytest.raises(RemoteProtocolError):
        TcpConnection.from_packet(Packet(bare_fin), 0.0)
    udp = build.udp_datagram(c.mac, s.mac, c.ip, s.ip, 1, 2, b"x")
    with pytest.raises(PacketError):
        TcpConnection.from_packet(Packet(udp), 0.0)


def test_observe_refuses_another_connection() -> None:
    conn, c, s = _established()
    other = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port + 1, s.port, 1, 0, ACK, 0)
    with pytest.raises(LocalProtocolError):
        conn.observe(Packet(other), 0.0)
    assert conn.side_of(Packet(other)) is None


# -- old, duplicate and out-of-window segments -------------------------------------------


def test_retransmissions_and_reordering_do_not_move_things_back() -> None:
    conn, c, s = _established()
    frames = []
    for _ in range(3):
        fr = c.send(0.2, b"r" * 500, ACK | PSH)
        frames.append(fr)
    s_snd = conn.a.snd_nxt
    for fr in (frames[0], frames[2]):  # frames[1] is late
        conn.observe(Packet(fr), 0.2)
    assert conn.a.snd_nxt == c.snd_nxt
    assert conn.b.rcv_nxt == seq_add(s_snd, 500)  # the hole stops it
    conn.observe(Packet(frames[1]), 0.3)
    assert conn.b.rcv_nxt == seq_add(s_snd, 1000)  # no reassembly: it fills only its part
    for fr in frames:  # retransmissions change nothing
        conn.observe(Packet(fr), 0.4)
    assert conn.a.snd_nxt == conn.b.rcv_nxt == c.snd_nxt
    # an ACK from the past (reordered) does not take snd_una back
    for fr in frames:
        s.receive(fr)
    new_ack, old_ack = s.send(0.5), None
    conn.observe(Packet(new_ack), 0.5)
    old_ack = build.tcp_segment(s.mac, c.mac, s.ip, c.ip, s.port, c.port, s.snd_nxt,
                                seq_add(c.snd_nxt, -1000), ACK, 10,
                                TcpOptions(timestamps=(s.tsval(0.5), 0)))
    conn.observe(Packet(old_ack), 0.5)
    assert conn.a.snd_una == c.snd_nxt


def test_ack_of_unsent_data_is_ignored_when_the_handshake_was_seen() -> None:
    conn, c, s = _established()
    before = copy.deepcopy((conn.a, conn.b))
    bogus = build.tcp_segment(s.mac, c.mac, s.ip, c.ip, s.port, c.port, s.snd_nxt,
                              seq_add(c.snd_nxt, 10), ACK, 100,
                              TcpOptions(timestamps=(s.tsval(0.5), 0)))
    conn.observe(Packet(bogus), 0.5)
    assert (conn.a, conn.b) == before


def test_data_far_outside_the_window_is_ignored() -> None:
    conn, c, s = _established()
    before = copy.deepcopy((conn.a, conn.b))
    far = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port, s.port,
                            seq_add(c.snd_nxt, 1 << 30), c.rcv_nxt, ACK, 100,
                            TcpOptions(timestamps=(c.tsval(0.5), 0)), b"evil")
    conn.observe(Packet(far), 0.5)
    assert (conn.a, conn.b) == before


# -- made packets keep the model consistent ------------------------------------------------


def test_injected_data_continues_the_connection() -> None:
    conn, c, s = _established()
    frame = conn.data("a", b"injected", 1.0)
    accepts(s, frame)
    s.receive(frame.data)
    assert conn.a.snd_nxt == s.rcv_nxt == conn.b.rcv_nxt
    # the real server acks it; the observer sees a consistent exchange
    fr = s.send(1.1)
    conn.observe(Packet(fr), 1.1)
    assert conn.a.snd_una == conn.a.snd_nxt
    assert s.received.endswith(b"injected")
    # packets made from the server now ack the injected bytes too (the real client, which
    # never sent them, is out of step: a service that injects for a live side must shift
    # its later numbers or take it over)
    t = Ether(bytes(copy.deepcopy(conn).ack("b", 1.2).data))[TCP]
    assert t.ack == conn.a.snd_nxt == seq_add(c.snd_nxt, 8)


def test_fin_made_from_a_side_moves_both_states() -> None:
    conn, c, s = _established()
    accepts(s, conn.fin("a", 1.0))
    assert (conn.a.state, conn.b.state) == (T.FIN_WAIT_1, T.CLOSE_WAIT)
    with pytest.raises(LocalProtocolError):
        conn.data("a", b"after fin", 1.0)
    with pytest.raises(LocalProtocolError):
        conn.fin("a", 1.0)
    conn.ack("b", 1.1)
    assert conn.a.state is T.FIN_WAIT_2
    conn.fin("b", 1.2)
    conn.ack("a", 1.3)
    assert (conn.a.state, conn.b.state) == (T.TIME_WAIT, T.CLOSED)
    with pytest.raises(LocalProtocolError):
        conn.rst("b", 1.4)


def test_data_beyond_the_mss() -> None:
    conn, c, s = _established()
    with pytest.raises(LocalProtocolError):
        conn.data("a", b"x" * 1460, 1.0)  # 1460 + 12 bytes of timestamps > 1460
    conn.data("a", b"x" * 1448, 1.0)
    c, s = pair()
    big = TcpConnection.from_packet(Packet(c.syn(0)), 0.0, offload=True)
    s.receive(c.syn(0))
    big.observe(Packet(s.synack(0.0)), 0.0)
    frame = big.data("a", bytes(range(256)) * 20, 0.1)
    assert frame.vnet is not None and frame.vnet.gso_size == 1448
    wire = complete_offloads(frame)
    assert len(wire) == 4
    for w in wire:
        scapy_clean(w)
    assert b"".join(bytes(Ether(bytes(w.data))[TCP].payload) for w in wire) == \
        bytes(range(256)) * 20
    assert big.a.snd_nxt == seq_add(c.iss, 1 + 5120)


def test_tsval_is_extrapolated_and_never_goes_back() -> None:
    c, s = pair()
    conn = conn_of(handshake(c, s))  # all at time 0
    fr = c.send(0.05, b"q", ACK | PSH)
    conn.observe(Packet(fr), 0.05)
    s.receive(fr)
    t0 = conn.tsval("a", 0.05)
    assert t0 == c.tsval(0.05)
    assert conn.tsval("a", 1.05) == seq_add(t0, 1000)
    # the real clock turns out slower: what it sends does not take the clock back
    slow = c.send(2.0)
    fr = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port, s.port, c.snd_nxt, c.rcv_nxt, ACK,
                           100, TcpOptions(timestamps=(seq_add(t0, 5), s.tsval(1))))
    conn.observe(Packet(fr), 2.0)
    assert seq_ge(conn.tsval("a", 2.0), seq_add(t0, 1950))
    # a faster one moves it forward
    conn.observe(Packet(slow), 2.0)
    fast = build.tcp_segment(c.mac, s.mac, c.ip, s.ip, c.port, s.port, c.snd_nxt, c.rcv_nxt,
                             ACK, 100, TcpOptions(timestamps=(seq_add(t0, 10_000), 0)))
    conn.observe(Packet(fast), 2.0)
    assert conn.tsval("a", 2.0) == seq_add(t0, 10_000)
    frozen = copy.deepcopy(conn)
    frozen.ts_rate = 0
    assert frozen.tsval("a", 500.0) == seq_add(t0, 10_000)


def test_window_update_with_unknown_scale_never_offers_more() -> None:
    c, s = pair()
    handshake(c, s)
    fr = c.send(1.0)
    s.receive(fr)
    conn = TcpConnection.from_packet(Packet(fr), 1.0)
    field = Ether(bytes(fr))[TCP].window
    assert Ether(bytes(conn.window_update("a", 0, 1.1).data))[TCP].window == 0
    assert Ether(bytes(conn.ack("a", 1.2).data))[TCP].window == 0  # closed stays closed
    reopened = Ether(bytes(conn.window_update("a", 1 << 30, 1.3).data))[TCP].window
    assert reopened == field
    small = Ether(bytes(conn.window_update("a", 100, 1.4).data))[TCP].window
    assert small == 100


def test_manual_connection() -> None:
    addrs = FlowAddrs(MAC_C, MAC_S, *V4, 40000, 80)
    a = HalfState(state=T.ESTABLISHED, snd_una=100, snd_nxt=100, rcv_nxt=9000, rcv_wnd=65535,
                  snd_wnd=65535, mss=1460)
    b = HalfState(state=T.ESTABLISHED, snd_una=9000, snd_nxt=9000, rcv_nxt=100, rcv_wnd=65535,
                  snd_wnd=65535, mss=1460)
    conn = TcpConnection.manual(addrs, a, b)
    frame = conn.data(a, b"hello", 0.0)
    t = Ether(bytes(frame.data))[TCP]
    assert (t.seq, t.ack, t.window, bytes(t.payload)) == (100, 9000, 65535, b"hello")
    assert conn.b.rcv_nxt == 105 and conn.b.rcv_wnd == 65530
    frame = conn.ack(b, 0.0)
    t = Ether(bytes(frame.data))[TCP]
    assert (t.seq, t.ack) == (9000, 105)
    assert conn.a.snd_una == 105
    with pytest.raises(LocalProtocolError):
        conn.half("c")  # type: ignore[arg-type]


def test_transition_table_is_rfc_9293() -> None:
    """Spot checks of the table against RFC 9293 3.3.2 figure 5."""
    assert TRANSITIONS[(T.ESTABLISHED, Event.SEND_FIN)] is T.FIN_WAIT_1
    assert TRANSITIONS[(T.CLOSE_WAIT, Event.SEND_FIN)] is T.LAST_ACK
    assert TRANSITIONS[(T.FIN_WAIT_2, Event.RECV_FIN)] is T.TIME_WAIT
    assert TRANSITIONS[(T.CLOSING, Event.RECV_ACK_OF_FIN)] is T.TIME_WAIT
    assert (T.CLOSED, Event.RST) not in TRANSITIONS
    assert all(TRANSITIONS[(s, Event.RST)] is T.CLOSED for s in TcpState if s is not T.CLOSED)


# -- property: random segments never break the model ---------------------------------------

FLAGS = [ACK] * 6 + [ACK | PSH] * 4 + [FIN | ACK] * 3 + [RST, RST | ACK, SYN, SYN | ACK, FIN, 0,
                                                         ACK | FIN | PSH]


def _invariants(conn: TcpConnection) -> None:
    for x in ("a", "b"):
        s, r = conn.half(x), conn.peer(x)
        assert seq_le(s.snd_una, s.snd_nxt), (x, s)
        if s.state not in (T.CLOSED, T.LISTEN) and r.state not in (T.CLOSED, T.LISTEN):
            assert seq_le(s.snd_una, r.rcv_nxt) and seq_le(r.rcv_nxt, s.snd_nxt), (x, s, r)
        assert s.rcv_wnd >= 0 and s.snd_wnd >= 0 and 0 <= s.rcv_shift <= 14
        if s.fin_seq is not None:  # a side that sent its FIN cannot send any more
            assert not s.state.can_send, (x, s)
            if r.rcv_nxt == seq_add(s.fin_seq, 1) and r.state is not T.CLOSED:
                assert not r.state.can_receive, (x, s, r)


near = st.one_of(st.just(0), st.integers(-2, 2), st.integers(-3000, 3000),
                st.integers(3001, MASK))  # offsets from what is expected, or anything
segment = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(FLAGS),
    near,  # seq, from the sender's snd_nxt
    near,  # ack, from the receiver's snd_nxt
    st.one_of(st.just(0), st.integers(0, 1500)),
    st.integers(0, 65535),
    st.one_of(st.none(), st.tuples(st.integers(0, MASK), st.integers(0, MASK))),
)


def make(conn: TcpConnection, side: str, what: str, now: float) -> Frame:
    if what == "data":
        return conn.data(side, b"m" * 100, now)  # type: ignore[arg-type]
    if what == "window":
        return conn.window_update(side, 5000, now)  # type: ignore[arg-type]
    return getattr(conn, what)(side, now)


@given(start=st.sampled_from(["syn", "data", "synack"]), near_wrap=st.booleans(),
       steps=st.lists(segment, max_size=40),
       makes=st.lists(st.tuples(st.sampled_from(["a", "b"]),
                                st.sampled_from(["data", "ack", "window", "keepalive", "fin",
                                                 "rst"])), max_size=5))
def test_random_segments_keep_the_model_sane(start: str, near_wrap: bool,
                                             steps: list[tuple], makes: list) -> None:
    c, s = pair(iss_c=MASK - 50 if near_wrap else 1000)
    first = {"syn": c.syn(0.0), "synack": None, "data": None}[start]
    if start == "synack":
        s.receive(c.syn(0.0))
        first = s.synack(0.0)
    elif start == "data":
        handshake(c, s)
        first = c.send(0.0, b"d" * 100, ACK | PSH)
    conn = TcpConnection.from_packet(Packet(first), 0.0)
    refs = {"a": c, "b": s} if start != "synack" else {"a": c, "b": s}
    now = 0.0
    for side, flags, dseq, dack, n, window, ts in steps:
        now += 0.01
        tx, rx = refs[side], refs["b" if side == "a" else "a"]
        h, p = conn.half(side), conn.peer(side)
        seq = seq_add(h.snd_nxt, dseq) if abs(dseq) <= 3000 else dseq
        ack = seq_add(p.snd_nxt, dack) if abs(dack) <= 3000 else dack
        if flags & SYN and not flags & ACK and dseq == 0:
            seq = h.iss
        opts = TcpOptions(timestamps=ts) if ts is not None else None
        raw = build.tcp_segment(tx.mac, rx.mac, tx.ip, rx.ip, tx.port, rx.port, seq, ack,
                                flags, window, opts, b"p" * n)
        try:
            conn.observe(Packet(raw), now)
        except VTLError:
            pass
        _invariants(conn)
    for side, what in makes:
        now += 0.01
        try:
            frame = make(conn, side, what, now)
        except LocalProtocolError:
            continue
        scapy_clean(frame)
        _invariants(conn)
