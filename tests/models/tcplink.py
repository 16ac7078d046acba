"""Sans-IO test harness for the virtual TCP endpoint: a virtual clock, an in-memory link
that loses, duplicates, reorders and delays frames, two endpoints driven over it with
applications that stream checked bytes, and a scripted peer that plays the VM segment by
segment (its own segments built with :func:`vtl.packet.build.tcp_segment`, the endpoint's
output read back with scapy as the oracle).

Everything is deterministic: every random choice comes from a seeded ``random.Random``,
and time is the simulation's ``now``. Runs are bounded in steps and in simulated time, and
a run that stops making progress fails with the state of both endpoints.

Imported by the tests as ``models_tcplink`` (``tests/models/conftest.py`` registers it).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from vtl.models.tcp_endpoint import (
    Aborted,
    Closed,
    DataReady,
    EndpointConfig,
    Event,
    TcpEndpoint,
    Writable,
)
from vtl.models.tcp_segment import FlowAddrs

from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

MAC_A = b"\x02\x00\x00\x00\x00\x0a"  # the endpoint under test ("A", or the remote host)
MAC_B = b"\x02\x00\x00\x00\x00\x0b"  # the VM (scripted peer or the second endpoint)
IP4_A, IP4_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
IP6_A = bytes.fromhex("20010db8000000000000000000000001")
IP6_B = bytes.fromhex("20010db8000000000000000000000002")


def addrs_ab(v6: bool = False, sport: int = 80, dport: int = 40000) -> FlowAddrs:
    """Addresses from A (the endpoint, port ``sport``) to B (the VM, port ``dport``)."""
    a, b = (IP6_A, IP6_B) if v6 else (IP4_A, IP4_B)
    return FlowAddrs(MAC_A, MAC_B, a, b, sport, dport)


class Stalled(AssertionError):
    """A simulation exceeded its step or time budget, or nothing was left to happen."""


# -- the link ------------------------------------------------------------------------------


@dataclass
class LinkParams:
    """One direction of the link. Probabilities are per frame (per wire segment with
    ``wire``); a reordered frame is held back an extra ``reorder_delay``."""

    delay: float = 0.001
    jitter: float = 0.0
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.004
    rate: float | None = None  # bytes per second (serialisation), None: unlimited
    wire: bool = False  # cut GSO super-frames into wire segments, finish checksums
    drop: Callable[[Frame], bool] | None = None  # a scripted filter: True drops the frame


@dataclass
class LinkStats:
    frames: int = 0
    bytes: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    delivered: int = 0


class Direction:
    """Frames in flight in one direction, ordered by delivery time."""

    def __init__(self, params: LinkParams, rng: random.Random):
        self.p = params
        self.rng = rng
        self.heap: list[tuple[float, int, Frame]] = []
        self.count = 0
        self.busy_until = 0.0  # the transmitter's queue (with ``rate``)
        self.stats = LinkStats()
        self.tap: list[Frame] = []  # every frame offered to this direction (if ``keep``)
        self.keep = False

    def push(self, frame: Frame, now: float) -> None:
        p, rng, st = self.p, self.rng, self.stats
        frames = complete_offloads(frame.copy()) if p.wire else [frame]
        for f in frames:
            st.frames += 1
            st.bytes += len(f.data)
            if self.keep:
                self.tap.append(f.copy())
            if p.drop is not None and p.drop(f):
                st.lost += 1
                continue
            t = now
            if p.rate:
                t = max(t, self.busy_until) + len(f.data) / p.rate
                self.busy_until = t
            if p.loss and rng.random() < p.loss:
                st.lost += 1
                continue
            copies = 1
            if p.dup and rng.random() < p.dup:
                copies = 2
                st.duplicated += 1
            for i in range(copies):
                at = t + p.delay + (rng.random() * p.jitter if p.jitter else 0.0)
                if p.reorder and rng.random() < p.reorder:
                    at += p.reorder_delay * (0.5 + rng.random())
                    st.reordered += 1
                self.count += 1
                heapq.heappush(self.heap, (at, self.count, f if i == 0 else f.copy()))

    def next_at(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def due(self, now: float) -> list[Frame]:
        out = []
        while self.heap and self.heap[0][0] <= now:
            out.append(heapq.heappop(self.heap)[2])
        self.stats.delivered += len(out)
        return out


# -- applications ----------------------------------------------------------------------------


class Source:
    """Streams ``total`` pseudo-random bytes (from ``seed``) into an endpoint as fast as it
    takes them, hashing what it handed over; shuts down after the last byte if ``close``."""

    CHUNK = 256 * 1024

    def __init__(self, total: int, seed: int = 1, close: bool = True):
        self.total = total
        self.rng = random.Random(seed)
        self.close = close
        self.offered = 0  # bytes taken by the endpoint
        self.sha = hashlib.sha256()
        self._pending = memoryview(b"")
        self.shut = False

    def pump(self, ep: TcpEndpoint, now: float) -> None:
        while self.offered < self.total and ep.send_room:
            if not self._pending:
                n = min(self.CHUNK, self.total - self.offered - 0)
                self._pending = memoryview(self.rng.randbytes(n))
            n = ep.send(self._pending, now)
            if not n:
                break
            self.sha.update(self._pending[:n])
            self._pending = self._pending[n:]
            self.offered += n
        if self.close and not self.shut and self.offered >= self.total:
            self.shut = True
            ep.shutdown(now)

    @property
    def done(self) -> bool:
        return self.offered >= self.total


class Sink:
    """Reads what an endpoint received (all of it, or ``rate`` bytes per second of
    simulated time), hashing it; ``eof`` once the peer's FIN was read past."""

    def __init__(self, rate: float | None = None):
        self.rate = rate
        self.received = 0
        self.sha = hashlib.sha256()
        self.eof = False
        self._credit_at: float | None = None
        self.max_buffered = 0

    def pump(self, ep: TcpEndpoint, now: float) -> None:
        self.max_buffered = max(self.max_buffered, ep.buffered)
        if self.rate is None:
            size = ep.readable
        else:
            last = now if self._credit_at is None else self._credit_at
            size = int((now - last) * self.rate)
            if size <= 0:
                if self._credit_at is None:
                    self._credit_at = now
                return
            self._credit_at = now
        while size > 0 and ep.readable:
            data = ep.read(size, now)
            self.sha.update(data)
            self.received += len(data)
            size -= len(data)
        if ep.eof:
            self.eof = True


# -- two endpoints over the link ------------------------------------------------------------------


@dataclass
class Side:
    """One end of a simulated connection: the endpoint, its apps and its events."""

    name: str
    config: EndpointConfig
    ep: TcpEndpoint | None = None
    source: Source | None = None
    sink: Sink | None = field(default_factory=Sink)
    events: list[tuple[float, Event]] = field(default_factory=list)

    def kinds(self) -> list[type]:
        return [type(e) for _, e in self.events]

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Closed) for _, e in self.events)

    @property
    def aborted(self) -> Aborted | None:
        for _, e in self.events:
            if isinstance(e, Aborted):
                return e
        return None


class Sim:
    """Two :class:`TcpEndpoint` over a :class:`Direction` each way, on a virtual clock.

    ``a`` opens actively toward ``b``; ``b`` is created by :meth:`TcpEndpoint.passive` from
    the first SYN that reaches it and accepts at once (or after ``accept_delay``).
    """

    def __init__(self, cfg_a: EndpointConfig, cfg_b: EndpointConfig | None = None, *,
                 ab: LinkParams | None = None, ba: LinkParams | None = None, seed: int = 0,
                 v6: bool = False, iss_a: int | None = None, iss_b: int | None = None,
                 accept_delay: float = 0.0, start: float = 1000.0, keep: bool = False):
        self.rng = random.Random(seed)
        self.now = start
        self.a = Side("A", cfg_a)
        self.b = Side("B", cfg_b or cfg_a)
        self.ab = Direction(ab or LinkParams(), random.Random(self.rng.getrandbits(64)))
        self.ba = Direction(ba or LinkParams(), random.Random(self.rng.getrandbits(64)))
        self.ab.keep = self.ba.keep = keep  # tap every frame (for checks afterwards)
        self.iss_a, self.iss_b = iss_a, iss_b
        self.accept_delay = accept_delay
        self._accept_at: float | None = None
        self.steps = 0
        self.addrs = addrs_ab(v6)
        self.a.ep = TcpEndpoint.active(self.addrs, cfg_a, self.now, iss=iss_a)
        self._collect()

    # each side's endpoint
    @property
    def ep_a(self) -> TcpEndpoint:
        assert self.a.ep is not None
        return self.a.ep

    @property
    def ep_b(self) -> TcpEndpoint:
        assert self.b.ep is not None, "B never saw a SYN"
        return self.b.ep

    def _sides(self) -> Iterable[tuple[Side, Direction]]:
        yield self.a, self.ab
        yield self.b, self.ba

    def _collect(self) -> None:
        """Move outboxes onto the link, events into the logs, and let the apps run."""
        for _ in range(4):
            moved = False
            for side, out in self._sides():
                ep = side.ep
                if ep is None:
                    continue
                if side.source is not None:
                    side.source.pump(ep, self.now)
                if side.sink is not None:
                    side.sink.pump(ep, self.now)
                if ep.events:
                    side.events.extend((self.now, e) for e in ep.events)
                    ep.events.clear()
                if ep.outbox:
                    frames, ep.outbox = ep.outbox, []
                    for f in frames:
                        out.push(f, self.now)
                    moved = True
            if not moved:
                break

    def _deliver(self, side: Side, frame: Frame) -> None:
        if side.ep is None:
            pkt = Packet(frame)
            t = pkt.tcp
            if t is None or t.flags & (SYN | ACK | RST) != SYN:
                return  # nothing listens: a real host would answer RST; not needed here
            side.ep = TcpEndpoint.passive(pkt, side.config, self.now, iss=self.iss_b)
            if self.accept_delay:
                self._accept_at = self.now + self.accept_delay
            else:
                side.ep.accept(self.now)
            return
        side.ep.receive(Packet(frame), self.now)

    def next_time(self) -> float | None:
        times = [self.ab.next_at(), self.ba.next_at(), self._accept_at]
        for side, _ in self._sides():
            if side.ep is not None:
                times.append(side.ep.poll_at())
            if side.sink is not None and side.sink.rate is not None and side.ep is not None \
                    and side.ep.readable:
                times.append(self.now + 0.001)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def step(self) -> bool:
        """Advance to the next thing that happens; False when nothing is left."""
        t = self.next_time()
        if t is None:
            return False
        self.steps += 1
        self.now = max(self.now, t)
        now = self.now
        if self._accept_at is not None and now >= self._accept_at:
            self._accept_at = None
            self.ep_b.accept(now)
        for f in self.ab.due(now):
            self._deliver(self.b, f)
        for f in self.ba.due(now):
            self._deliver(self.a, f)
        self._collect()
        for side, _ in self._sides():
            ep = side.ep
            if ep is not None:
                at = ep.poll_at()
                if at is not None and at <= now:
                    ep.on_timer(now)
        self._collect()
        return True

    def run(self, until: Callable[[], bool], *, max_steps: int = 1_000_000,
            max_time: float = 600.0) -> None:
        """Step until ``until()``; :class:`Stalled` past the budgets or when idle."""
        deadline = self.now + max_time
        limit = self.steps + max_steps
        while not until():
            if self.steps >= limit or self.now > deadline:
                raise Stalled(f"budget exhausted: {self.describe()}")
            if not self.step():
                raise Stalled(f"nothing left to happen: {self.describe()}")

    def run_for(self, seconds: float, max_steps: int = 1_000_000) -> None:
        """Step until ``seconds`` of simulated time have passed (or nothing is left)."""
        end = self.now + seconds
        limit = self.steps + max_steps
        while True:
            t = self.next_time()
            if t is None or t > end:
                self.now = max(self.now, end)
                return
            if self.steps >= limit:
                raise Stalled(f"step budget exhausted: {self.describe()}")
            self.step()

    def describe(self) -> str:
        parts = [f"t={self.now:.3f} steps={self.steps}"]
        for side, out in self._sides():
            ep = side.ep
            if ep is None:
                parts.append(f"{side.name}: none")
                continue
            src = side.source
            parts.append(
                f"{side.name}: {ep.state.name} una={ep.sbuf.una} nxt={ep.nxt} "
                f"max_sent={ep.max_sent} end={ep.sbuf.end} wnd_edge={ep.wnd_edge} "
                f"cwnd={ep.cwnd} rcv_nxt_off={ep.rbuf.nxt} unread={ep.readable} "
                f"ooo={ep.rbuf.ooo_bytes} poll_at={ep.poll_at()} "
                f"offered={src.offered if src else '-'} "
                f"read={side.sink.received if side.sink else '-'} "
                f"events={[type(e).__name__ for _, e in side.events][-6:]} link={out.stats}")
        return "; ".join(parts)


def transfer(sim: Sim, a_to_b: int = 0, b_to_a: int = 0, *, max_time: float = 600.0,
             max_steps: int = 2_000_000, close: bool = True) -> Sim:
    """Move ``a_to_b`` bytes from A to B and ``b_to_a`` from B to A at the same time, then
    (with ``close``) close both ways; checks both byte streams arrived intact."""
    sim.a.source = Source(a_to_b, seed=11, close=close)
    sim.a.sink = Sink()
    sim.b.sink = Sink()
    b_source = Source(b_to_a, seed=22, close=close)

    def attach_b() -> bool:
        if sim.b.ep is not None and sim.b.source is None:
            sim.b.source = b_source
        return False

    def finished() -> bool:
        attach_b()
        if close:
            return sim.a.closed and sim.b.closed
        return (sim.b.sink.received >= a_to_b and sim.a.sink.received >= b_to_a
                and sim.a.source.done and b_source.done)

    sim._collect()
    sim.run(finished, max_time=max_time, max_steps=max_steps)
    assert sim.a.aborted is None and sim.b.aborted is None, sim.describe()
    assert sim.b.sink.received == a_to_b, sim.describe()
    assert sim.a.sink.received == b_to_a, sim.describe()
    assert sim.b.sink.sha.digest() == sim.a.source.sha.digest()
    assert sim.a.sink.sha.digest() == b_source.sha.digest()
    if close:
        assert sim.a.sink.eof and sim.b.sink.eof
    return sim


# -- a scripted peer (the VM), with scapy as the oracle ------------------------------------------


def wire_frames(frames: Iterable[Frame]) -> list[Frame]:
    """Frames as they would be on the wire: GSO cut, checksums finished (copies)."""
    out: list[Frame] = []
    for f in frames:
        out.extend(complete_offloads(f.copy()))
    return out


def checksums_ok(s) -> bool:
    """scapy recomputes the IP and TCP checksums of a dissected packet and compares."""
    ip = s[IP] if IP in s else s[IPv6]
    tcp = s[TCP]
    fresh = Ether(bytes(s))
    if IP in s:
        del fresh[IP].chksum
    del fresh[TCP].chksum
    again = Ether(bytes(fresh))
    ok_ip = IP not in s or again[IP].chksum == ip.chksum
    return ok_ip and again[TCP].chksum == tcp.chksum


@dataclass
class Seen:
    """One segment the endpoint sent, as scapy read it."""

    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    options: TcpOptions
    raw_options: bytes
    pkt: object  # the scapy packet

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & ACK)

    @property
    def tsval(self) -> int | None:
        return self.options.timestamps[0] if self.options.timestamps else None

    def __repr__(self) -> str:
        names = "".join(n for b, n in ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"),
                                        (ACK, "A")) if self.flags & b)
        return f"Seen({names} seq={self.seq} ack={self.ack} win={self.window} " \
               f"len={len(self.payload)})"


def dissect(frame: Frame) -> Seen:
    """One frame read by scapy, checksums checked (a partial checksum is finished first;
    a GSO super-frame shows as its first wire segment)."""
    if frame.vnet is not None:
        frame = complete_offloads(frame.copy())[0]
    s = Ether(bytes(frame.data))
    assert TCP in s, f"not TCP: {s!r}"
    assert checksums_ok(s), f"bad checksum from the endpoint: {s!r}"
    t = s[TCP]
    raw_opts = bytes(t)[20 : t.dataofs * 4]
    return Seen(t.seq, t.ack, int(t.flags), t.window, bytes(t.payload), TcpOptions.decode(raw_opts),
                raw_opts, s)


def quick(frame: Frame) -> Seen:
    """One frame read by vtl.packet (no scapy, no checksum check, GSO frames whole)."""
    p = Packet(frame)
    t = p.tcp
    assert t is not None
    raw_opts = bytes(p.data[t.off + 20 : t.payload_offset])
    return Seen(t.seq, t.ack, t.flags, t.window, bytes(p.data[t.payload_offset : t.end]),
                TcpOptions.decode(raw_opts), raw_opts, p)


class Peer:
    """The VM, one segment at a time. It keeps its own send and receive sequence numbers
    (``snd_nxt``, ``rcv_nxt``) and builds segments toward the endpoint under test; what the
    endpoint sends back is read with :meth:`take`."""

    def __init__(self, *, isn: int = 5000, v6: bool = False, port: int = 40000,
                 ep_port: int = 80, mss: int = 1460, wscale: int | None = 7,
                 sack: bool = True, timestamps: bool = True, window: int = 65535,
                 ts_start: int = 100):
        self.isn = isn
        self.snd_nxt = isn
        self.rcv_nxt = 0
        self.v6 = v6
        a = addrs_ab(v6, ep_port, port)
        self.ep_addrs = a  # endpoint -> VM
        self.mac, self.ep_mac = MAC_B, MAC_A
        self.ip, self.ep_ip = a.dst_ip, a.src_ip
        self.port, self.ep_port = port, ep_port
        self.mss, self.wscale, self.sack, self.timestamps = mss, wscale, sack, timestamps
        self.window = window  # the raw window field it sends
        self.tsval = ts_start
        self.ts_ok = False  # timestamps negotiated (set by the handshake helpers)
        self.ts_recent = 0
        self.received = bytearray()

    # building segments
    def syn_options(self) -> TcpOptions:
        return TcpOptions(mss=self.mss, wscale=self.wscale, sack_permitted=self.sack,
                          timestamps=(self.tsval, 0) if self.timestamps else None)

    def options(self, sack: tuple[tuple[int, int], ...] = (), ts: tuple[int, int] | None = None
                ) -> TcpOptions | None:
        if ts is None and self.ts_ok:
            ts = (self.tsval, self.ts_recent)
        if ts is None and not sack:
            return None
        return TcpOptions(timestamps=ts, sack_blocks=sack)

    def seg(self, flags: int, *, seq: int | None = None, ack: int | None = None,
            payload: bytes = b"", window: int | None = None,
            options: TcpOptions | bytes | None | bool = True, advance: bool = False) -> Packet:
        """A segment from the VM; ``options=True`` adds timestamps if negotiated."""
        if options is True:
            options = self.options()
        elif options is False:
            options = None
        s = self.snd_nxt if seq is None else seq
        a = self.rcv_nxt if ack is None else ack
        raw = build.tcp_segment(self.mac, self.ep_mac, self.ip, self.ep_ip, self.port,
                                self.ep_port, s, a, flags,
                                self.window if window is None else window, options, payload)
        if advance:
            self.snd_nxt = (s + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        return Packet(raw)

    def syn(self, **kw) -> Packet:
        self.snd_nxt = self.isn
        return self.seg(SYN, ack=0, options=self.syn_options(), advance=True, **kw)

    def data(self, payload: bytes, flags: int = ACK | PSH, **kw) -> Packet:
        return self.seg(flags, payload=payload, advance=True, **kw)

    def ack(self, **kw) -> Packet:
        return self.seg(ACK, **kw)

    def fin(self, **kw) -> Packet:
        return self.seg(FIN | ACK, advance=True, **kw)

    def rst(self, **kw) -> Packet:
        return self.seg(RST | kw.pop("flags", 0), options=kw.pop("options", False), **kw)

    # reading what the endpoint sent
    def take(self, ep: TcpEndpoint, learn: bool = True, oracle: bool = True) -> list[Seen]:
        """Everything in the endpoint's outbox, as wire segments read by scapy (with
        ``oracle=False``: frames as they are, GSO super-frames whole, read by vtl.packet,
        much faster). With ``learn`` the peer keeps in-order bytes and the endpoint's TSval."""
        frames, ep.outbox = ep.outbox, []
        out = [dissect(f) for f in wire_frames(frames)] if oracle else [quick(f) for f in frames]
        if learn:
            for s in out:
                self.learn(s)
        return out

    def learn(self, s: Seen) -> None:
        if s.syn:
            self.rcv_nxt = (s.seq + 1) & 0xFFFFFFFF
        elif s.payload and s.seq == self.rcv_nxt:
            self.received += s.payload
            self.rcv_nxt = (self.rcv_nxt + len(s.payload)) & 0xFFFFFFFF
        if s.fin and (s.seq + len(s.payload)) & 0xFFFFFFFF == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
        if s.options.timestamps is not None:
            self.ts_recent = s.options.timestamps[0]

    def tick(self, n: int = 1) -> None:
        self.tsval = (self.tsval + n) & 0xFFFFFFFF


def events(ep: TcpEndpoint) -> list[Event]:
    """The endpoint's events so far (taken)."""
    out, ep.events = ep.events, []
    return out


def kinds(evs: Iterable[Event]) -> list[type]:
    return [type(e) for e in evs]


def passive_established(cfg: EndpointConfig | None = None, peer: Peer | None = None, *,
                        now: float = 100.0, iss: int = 1_000_000) -> tuple[TcpEndpoint, Peer]:
    """An endpoint in ESTABLISHED after the VM's SYN, accept(), and the VM's ACK."""
    cfg = cfg or EndpointConfig(offload=False)
    peer = peer or Peer()
    ep = TcpEndpoint.passive(peer.syn(), cfg, now, iss=iss)
    ep.accept(now)
    synack = peer.take(ep)
    assert len(synack) == 1 and synack[0].syn and synack[0].has_ack
    peer.ts_ok = peer.timestamps and synack[0].options.timestamps is not None
    ep.receive(peer.ack(), now)
    assert ep.state.name == "ESTABLISHED", ep.state
    events(ep)
    return ep, peer


def active_established(cfg: EndpointConfig | None = None, peer: Peer | None = None, *,
                       now: float = 100.0, iss: int = 1_000_000) -> tuple[TcpEndpoint, Peer]:
    """An endpoint in ESTABLISHED after its SYN, the VM's SYN-ACK and its ACK."""
    cfg = cfg or EndpointConfig(offload=False)
    peer = peer or Peer()
    ep = TcpEndpoint.active(peer.ep_addrs, cfg, now, iss=iss)
    syn = peer.take(ep)
    assert len(syn) == 1 and syn[0].syn and not syn[0].has_ack
    peer.ts_ok = peer.timestamps and syn[0].options.timestamps is not None and cfg.timestamps
    peer.snd_nxt = peer.isn
    ep.receive(peer.seg(SYN | ACK, options=peer.syn_options(), advance=True), now)
    assert ep.state.name == "ESTABLISHED", ep.state
    ack = peer.take(ep)
    assert len(ack) == 1 and ack[0].has_ack and ack[0].ack == peer.snd_nxt
    events(ep)
    return ep, peer


def to_state(name: str, cfg: EndpointConfig | None = None, peer: Peer | None = None, *,
             now: float = 100.0, iss: int = 1_000_000) -> tuple[TcpEndpoint, Peer]:
    """An endpoint brought into RFC 9293 state ``name`` (a ``TcpState`` member name) by a
    scripted VM, outbox and events emptied. The peer's ``rcv_nxt`` covers what the
    endpoint sent (its FIN included); in CLOSING the VM has not acknowledged our FIN."""
    cfg = cfg or EndpointConfig(offload=False)
    peer = peer or Peer()
    if name == "LISTEN":
        ep = TcpEndpoint.passive(peer.syn(), cfg, now, iss=iss)
    elif name == "SYN_SENT":
        ep = TcpEndpoint.active(peer.ep_addrs, cfg, now, iss=iss)
        peer.take(ep)
        peer.ts_ok = peer.timestamps and cfg.timestamps
    elif name == "SYN_RECEIVED":
        ep = TcpEndpoint.passive(peer.syn(), cfg, now, iss=iss)
        ep.accept(now)
        synack = peer.take(ep)
        peer.ts_ok = peer.timestamps and synack[0].options.timestamps is not None
    elif name == "ESTABLISHED":
        ep, peer = passive_established(cfg, peer, now=now, iss=iss)
    elif name in ("FIN_WAIT_1", "FIN_WAIT_2", "CLOSING", "TIME_WAIT"):
        ep, peer = passive_established(cfg, peer, now=now, iss=iss)
        ep.shutdown(now)
        assert [s.fin for s in peer.take(ep)] == [True]
        if name in ("FIN_WAIT_2", "TIME_WAIT"):
            ep.receive(peer.ack(), now)
            assert ep.state.name == "FIN_WAIT_2"
        if name == "CLOSING":
            ep.receive(peer.fin(ack=(peer.rcv_nxt - 1) & 0xFFFFFFFF), now)
        elif name == "TIME_WAIT":
            ep.receive(peer.fin(), now)
    elif name in ("CLOSE_WAIT", "LAST_ACK", "CLOSED"):
        ep, peer = passive_established(cfg, peer, now=now, iss=iss)
        ep.receive(peer.fin(), now)
        if name in ("LAST_ACK", "CLOSED"):
            ep.shutdown(now)
        if name == "CLOSED":
            peer.take(ep)
            ep.receive(peer.ack(), now)
    else:
        raise ValueError(name)
    assert ep.state.name == name, (name, ep.state)
    peer.take(ep)
    events(ep)
    return ep, peer


__all__ = [
    "ACK", "FIN", "PSH", "RST", "SYN", "DataReady", "Writable", "Direction", "LinkParams",
    "Peer", "Seen", "Sim", "Sink", "Source", "Stalled", "active_established", "addrs_ab",
    "dissect", "events", "kinds", "passive_established", "to_state", "transfer", "wire_frames",
]
