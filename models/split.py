"""Split-TCP connection table: the VM's TCP connections a service terminates.

Theory of operation. A service that stands in for the far end of the VM's TCP
connections (``pep``, ``socks``, ``udt``) keeps one :class:`~vtl.models.relay.Relay`
per connection: a passive :class:`~vtl.models.tcp_endpoint.TcpEndpoint` facing
the VM joined to an upstream :class:`~vtl.stream.Stream`. :class:`SplitTable`
is that bookkeeping, shared so each service only says *where* a connection goes:

- :meth:`SplitTable.open` answers a SYN: it makes the endpoint, refuses with RST
  over ``max_connections``, and asks the service's ``connect`` callback for the
  stream (``ctx.open_stream`` with the service's own request, or an in-process
  stream);
- :meth:`SplitTable.open_active` is the other way round (``udt`` at the far
  bridge): an active endpoint opens toward the VM on behalf of a remote client;
  once the VM answered, the ``accept`` callback gives the stream (the inbound
  offer is accepted), and if it never does, ``refuse`` is told the outcome
  (``refused``, ``timeout``...) exactly once;
- :meth:`SplitTable.release` forgets a connection without a word to the guest
  (a service falling back to letting the flow pass);
- :meth:`SplitTable.segment` feeds later segments to their relay, and answers
  stray segments of a recently closed connection with RST for
  :data:`TOMBSTONE_S` seconds, so they never leak past the service;
- stream events come back through the handler ``open`` installs, or through
  :meth:`SplitTable.post` for in-process streams (queued and delivered after
  the current call returns, never re-entrantly);
- one heap of timers drives every endpoint (:meth:`poll_at`, :meth:`on_timer`);
- ``bytes_up`` and ``bytes_down`` are live: brought up to date after every
  call that moved bytes (and at stop for connections still open);
- a finished relay is retired with counter ``connections_<outcome>``;
- log lines (:mod:`vtl.models.splitlog`): at DEBUG one per connection opened and
  one per connection ended (flow, outcome, bytes, duration), and a WARNING when
  one did not end cleanly; both rate-limited per service, whatever the guest does.

Frames the relays produce are emitted toward the guest through the service's
context. The table does no I/O and reads no clock: ``now`` is passed in.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from pydantic import Field
from vtl.models.relay import Relay
from vtl.models.splitlog import SplitLog
from vtl.models.tcp_endpoint import EndpointConfig, TcpEndpoint
from vtl.models.tcp_state import TcpState

from vtl.errors import PacketError
from vtl.flow import FlowKey, FlowTable
from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, RST, SYN
from vtl.service import Direction, Service, ServiceContext, ServiceOptions, Verdict
from vtl.stream import Stream, StreamEvent, StreamFlow, StreamHandler, StreamRequest

_tuple_new = tuple.__new__
Connector = Callable[[StreamHandler], Stream]
Refuser = Callable[[str, str], None]  # (outcome, message) of an active open that failed
TOMBSTONE_S = 5.0  # how long stray segments of a closed connection get RST answers
TO_GUEST = Direction.TO_GUEST
DEFAULT_ICMP = frozenset({"timeout", "unreachable"})
NOT_FAILED = frozenset({"closed", "", "refused", "passthrough", "prohibited"})
NOT_LOGGED = frozenset({"closed", "", "passthrough", "prohibited"})  # (the egress policy logs)
# TCP teardown left to do once the upstream is finished and nothing is buffered: such a
# relay costs a small entry in ``closing``, not one of ``max_connections``
LINGERING = frozenset({TcpState.FIN_WAIT_2, TcpState.TIME_WAIT, TcpState.LAST_ACK,
                       TcpState.CLOSING, TcpState.FIN_WAIT_1})


class Budget(NamedTuple):
    """A service's per-connection memory, as the guest-facing endpoint's config and the
    sizes of the upstream stream (read chunk and write buffer)."""

    endpoint: EndpointConfig
    chunk: int

    def request(self, kind: str, host: str, port: int, *, timeout_s: float = 10.0,
                options: dict[str, Any] | None = None,
                flow: StreamFlow | None = None) -> StreamRequest:
        """A :class:`~vtl.stream.StreamRequest` with this budget's sizes filled in."""
        return StreamRequest(kind, host, port, timeout_s=timeout_s, read_chunk=self.chunk,
                             write_buffer=self.chunk, options=options or {}, flow=flow)


def budget(buffer_bytes: int) -> Budget:
    """``buffer_bytes`` per connection: half for the endpoint's send buffer, half for its
    receive buffer; the upstream read chunk (also the stream's write buffer) is an
    eighth, 4 KiB to 256 KiB."""
    half = buffer_bytes // 2
    # the VM is one hop away: its RTT is tens of microseconds, so a lost segment
    # is better retransmitted after 30 ms than after the 200 ms floor of WAN stacks
    config = EndpointConfig(send_buffer=half, recv_buffer=half, rto_min=0.03)
    return Budget(config, max(4096, min(256 * 1024, buffer_bytes // 8)))


def guest_key(pkt: Packet) -> FlowKey:
    """The table key of a TCP segment sent by the guest (guest -> remote)."""
    key = FlowKey.of(pkt)
    assert key is not None
    return key


def describe(key: object) -> str:
    return str(key)


class SplitTable:
    """Relays by flow, their timers, tombstones and counters, for one service."""

    def __init__(self, ctx: ServiceContext, ep_config: EndpointConfig, *,
                 max_connections: int, icmp_reasons: frozenset[str] = DEFAULT_ICMP):
        self.ctx = ctx
        self.ep_config = ep_config
        self.max_connections = max_connections
        self.icmp_reasons = icmp_reasons
        # live connections: each holds buffers, so they count against max_connections
        self.relays: FlowTable[FlowKey, Relay] = FlowTable(max_connections, evict="refuse")
        # connections only finishing their TCP teardown (nothing buffered, upstream done):
        # small, and when there are too many the oldest is forgotten (as Linux drops
        # TIME-WAIT buckets over tcp_max_tw_buckets)
        self.opened: dict[FlowKey, float] = {}  # when each connection was opened
        self.closing: FlowTable[FlowKey, Relay] = FlowTable(
            max(256, 4 * max_connections), evict="lru", on_evict=self._closing_evicted)
        self.tombstones: FlowTable[FlowKey, bool] = FlowTable(
            max(256, 4 * max_connections), timeout=TOMBSTONE_S, evict="lru")
        self.buffered_max = 0
        self._timers: list[tuple[float, int, FlowKey]] = []
        self._scheduled: dict[FlowKey, float] = {}
        self._seq = 0
        self._posted: deque[tuple[FlowKey, StreamEvent]] = deque()
        self._draining = False
        self._busy = 0  # depth of table calls in progress (see post)
        self._last_now = 0.0
        self.lines = SplitLog(ctx.log)
        self._accepting: dict[FlowKey, tuple[Connector, Refuser]] = {}  # active opens

    def __contains__(self, key: FlowKey) -> bool:
        return key in self.relays or key in self.closing

    def get(self, key: FlowKey) -> Relay | None:
        """The connection of ``key``, live or closing."""
        relay = self.relays.lookup(key)
        return relay if relay is not None else self.closing.lookup(key)

    # -- frames from the guest -------------------------------------------------------

    def segment(self, key: FlowKey, pkt: Packet, now: float) -> bool:
        """Feed a segment from the guest to its connection, or answer it for a recently
        closed one. False when no connection owns it (a SYN then may :meth:`open` one)."""
        relay = self.relays.lookup(key)
        if relay is None:
            relay = self.closing.lookup(key)
        if relay is not None:
            self._busy += 1
            try:
                relay.on_segment(pkt, now)
                self._after(key, relay, now)
            finally:
                self._busy -= 1
            self._drain(now)
            return True
        if self.tombstones.get(key, now) is None:
            return False
        t = pkt.tcp
        if t is not None and t.flags & (SYN | ACK | RST) == SYN:
            return False  # a new connection on the same ports
        self.answer_reset(pkt)
        self.ctx.count("stray_segments")
        return True

    def answer_reset(self, pkt: Packet) -> None:
        """Send the guest the RST a closed port would (nothing in answer to a RST)."""
        t = pkt.tcp
        if t is not None and not t.flags & RST:
            self.ctx.emit(Frame(build.tcp_reset(pkt)), TO_GUEST)

    def open(self, key: FlowKey, syn: Packet, now: float, connect: Connector) -> Relay | None:
        """Answer a SYN (no ACK, no RST) from the guest: hold it until ``connect``'s
        stream reports connected. None when the SYN was malformed or over the limit."""
        assert key not in self, "segment() feeds SYNs of live connections"
        self.tombstones.pop(key)
        try:
            endpoint = TcpEndpoint.passive(syn, self.ep_config, now)
        except PacketError:
            self.ctx.count("malformed")
            return None
        if len(self.relays) >= self.max_connections:
            self.ctx.count("over_limit")
            endpoint.refuse(now)
            self._emit(endpoint.outbox)
            endpoint.outbox = []
            return None
        relay = Relay(endpoint, icmp_reasons=self.icmp_reasons)
        self.relays.put(key, relay, now)
        self.opened[key] = now
        self.ctx.count("connections_opened")

        def handler(event: StreamEvent, now: float, key: FlowKey = key) -> None:
            self.deliver(key, event, now)

        self._busy += 1
        try:
            relay.stream = connect(handler)
            self.lines.opened(key, getattr(relay.stream, "request", None), now)
            self._after(key, relay, now)
        finally:
            self._busy -= 1
        self._drain(now)
        return relay

    def open_active(self, key: FlowKey, endpoint: TcpEndpoint, now: float,
                    accept: Connector, refuse: Refuser,
                    deadline: float | None = None) -> Relay | None:
        """Open toward the guest (``endpoint`` from :meth:`TcpEndpoint.active`, its SYN
        in the outbox; ``key`` as the guest will send). When the guest answers,
        ``accept(handler)`` gives the stream; if it refuses, does not answer by
        ``deadline``, or the connection ends before that, ``refuse(outcome, message)``
        is called instead (once). None (and ``refuse`` called) when over the limit."""
        assert key not in self, "one connection per flow"
        if len(self.relays) >= self.max_connections:
            self.ctx.count("over_limit")
            refuse("error", "over max_connections")
            return None
        self.tombstones.pop(key)
        relay = Relay(endpoint, icmp_reasons=self.icmp_reasons, connect_deadline=deadline)
        self.relays.put(key, relay, now)
        self.opened[key] = now
        self._accepting[key] = (accept, refuse)
        self.ctx.count("connections_opened")
        self.lines.opened(key, "toward the guest (inbound)", now)
        self._busy += 1
        try:
            relay.pump(now)
            self._after(key, relay, now)
        finally:
            self._busy -= 1
        self._drain(now)
        return relay

    def release(self, key: FlowKey, outcome: str, now: float) -> Relay | None:
        """Forget ``key``'s connection without a frame to the guest and without a
        tombstone (its later segments are the service's again); counted as
        ``connections_<outcome>``. Its stream, if still open, is aborted."""
        relay = self.get(key)
        if relay is None:
            return None
        relay.stats.outcome = outcome
        if relay.stream is not None and not relay.upstream_closed:
            relay.stream.abort(now)
        relay.endpoint.outbox = []
        self._accepting.pop(key, None)
        self._retire(key, relay, now, tombstone=False)
        return relay

    # -- stream events -------------------------------------------------------------------

    def deliver(self, key: FlowKey, event: StreamEvent, now: float) -> None:
        """A stream event for ``key`` (the handler ``open`` gives the stream)."""
        relay = self.get(key)
        if relay is None or relay.stream is not event.stream:
            return
        self._busy += 1
        try:
            relay.on_stream_event(event, now)
            self._after(key, relay, now)
        finally:
            self._busy -= 1
        self._drain(now)

    def post(self, key: FlowKey, event: StreamEvent, now: float) -> None:
        """An event from an in-process stream. Inside a table call (the stream was
        called by its relay) it is queued and delivered when that call returns, so a
        stream never calls back into its relay; outside one (an answer that came
        later, from another stream's handler) it is delivered at once."""
        self._posted.append((key, event))
        if not self._busy:
            self._drain(now)

    def _drain(self, now: float) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._posted:
                key, event = self._posted.popleft()
                self.deliver(key, event, now)
        finally:
            self._draining = False

    # -- bookkeeping ------------------------------------------------------------------------

    def _emit(self, frames: list[Frame]) -> None:
        for f in frames:
            self.ctx.emit(f, TO_GUEST)

    def _count_bytes(self, relay: Relay) -> None:
        """Bring ``bytes_up``/``bytes_down`` up to what ``relay`` has moved: the counters
        are live, not added when a connection ends."""
        s = relay.stats
        up, down = s.bytes_up - s.counted_up, s.bytes_down - s.counted_down
        if up:
            self.ctx.count("bytes_up", up)
            s.counted_up = s.bytes_up
        if down:
            self.ctx.count("bytes_down", down)
            s.counted_down = s.bytes_down

    def _after(self, key: FlowKey, relay: Relay, now: float) -> None:
        """Emit what the relay produced, retire it when done, reschedule its timer."""
        self._emit(relay.take_frames())
        self._count_bytes(relay)
        if relay.wants_stream and key in self._accepting:
            accept, _ = self._accepting.pop(key)

            def handler(event: StreamEvent, now: float, key: FlowKey = key) -> None:
                self.post(key, event, now)  # accept() may answer at once: never re-enter

            relay.attach(accept(handler), now)
            self._emit(relay.take_frames())
        b = relay.buffered
        if b > self.buffered_max:
            self.buffered_max = b
        if relay.done:
            self._retire(key, relay, now)
            return
        if relay.upstream_closed and relay.buffered == 0 \
                and relay.endpoint.state in LINGERING and self.relays.get(key) is relay:
            self.relays.pop(key)  # only teardown left: give the slot back
            self._last_now = now  # for _closing_evicted
            self.closing.put(key, relay, now)
        t = relay.poll_at()
        if t is not None and self._scheduled.get(key) != t:
            self._scheduled[key] = t
            self._seq += 1
            timers = self._timers
            heapq.heappush(timers, (t, self._seq, key))
            if len(timers) > 4 * len(self._scheduled) + 64:  # stale entries: compact
                self._timers = [(t, i, k) for i, (k, t) in enumerate(self._scheduled.items())]
                heapq.heapify(self._timers)

    def _closing_evicted(self, key: FlowKey, relay: Relay, reason: object) -> None:
        """Too many connections in teardown: the oldest is forgotten (no frame)."""
        self.ctx.count("closing_evicted")
        relay.endpoint.outbox = []
        self._retire(key, relay, self._last_now)

    def _retire(self, key: FlowKey, relay: Relay, now: float, tombstone: bool = True) -> None:
        if self.relays.get(key) is relay:
            self.relays.pop(key)
        elif self.closing.get(key) is relay:
            self.closing.pop(key)
        self._scheduled.pop(key, None)
        since = self.opened.pop(key, now)
        s = relay.stats
        opener = self._accepting.pop(key, None)
        if opener is not None:  # an active open that never got its stream
            opener[1](s.outcome or "error", s.message or "the connection ended")
        self._count_bytes(relay)
        self.ctx.count(f"connections_{s.outcome or 'closed'}")
        if s.outcome not in NOT_FAILED:
            self.ctx.count("connections_failed")  # timeout, unreachable, reset, error
        self.lines.ended(key, s.outcome or "closed", s.message, s.bytes_up, s.bytes_down,
                         now - since, now)
        if s.outcome not in NOT_LOGGED:  # one of a few lines, never one per connection
            self.lines.failed(key, s.outcome, s.message, now)
        if tombstone:
            self.tombstones.put(key, True, now)

    # -- timers ------------------------------------------------------------------------------

    def poll_at(self) -> float | None:
        timers = self._timers
        flush = self.lines.flush_at()
        while timers:
            t, _, key = timers[0]
            if self._scheduled.get(key) == t:
                return t if flush is None or t < flush else flush
            heapq.heappop(timers)
        return flush

    def on_timer(self, now: float) -> None:
        self.lines.flush(now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            t, _, key = heapq.heappop(timers)
            if self._scheduled.get(key) != t:
                continue
            del self._scheduled[key]
            relay = self.get(key)
            if relay is not None:
                self._busy += 1
                try:
                    relay.on_timer(now)
                    self._after(key, relay, now)
                finally:
                    self._busy -= 1
        self._drain(now)

    def stop(self, now: float) -> None:
        """Reset every connection both ways (the service is stopping)."""
        for key, relay in self.relays.items() + self.closing.items():
            self._count_bytes(relay)  # connections still open count what they moved
            s = relay.stats
            self.lines.ended(key, "stopped", "the service is stopping", s.bytes_up,
                             s.bytes_down, now - self.opened.get(key, now), now)
            relay.abort(now)
            self._emit(relay.take_frames())
            opener = self._accepting.pop(key, None)
            if opener is not None:
                opener[1]("error", "the service is stopping")
        self.relays.clear()
        self.closing.clear()
        self.opened.clear()
        self._posted.clear()

    def connections(self, now: float) -> list[dict[str, Any]]:
        """One row per live or closing connection, for the control socket."""
        rows = []
        for table, closing in ((self.relays, False), (self.closing, True)):
            for key, relay in table.items():
                stream = relay.stream
                req = stream.request if stream is not None else None
                rows.append({
                    "flow": describe(key), "state": relay.endpoint.state.value,
                    "closing": closing, "age_s": round(now - self.opened.get(key, now), 3),
                    "bytes_up": relay.stats.bytes_up, "bytes_down": relay.stats.bytes_down,
                    "buffered": relay.buffered,
                    "retransmits": relay.endpoint.retransmits,  # toward the guest
                    "upstream": f"{req.kind} {req.host}:{req.port}" if req else None,
                    "upstream_state": ("closed" if relay.upstream_closed else "connected"
                                       if relay.connected else "connecting"),
                })
        return rows

    def report(self, now: float | None = None) -> dict[str, Any]:
        return {"connections_active": len(self.relays),
                "connections_closing": len(self.closing),
                "buffered_bytes": sum(r.buffered for r in self.relays.values()),
                "buffered_max_per_connection": self.buffered_max,
                "tombstones": len(self.tombstones)}


# -- the base of split-TCP services --------------------------------------------------------

Route = StreamRequest | Connector | Verdict | None


class SplitOptions(ServiceOptions):
    """Options every split-TCP service has (subclass it and add your own)."""

    connect_timeout_s: float = Field(5.0, gt=0, le=300,
                                     description="give up connecting upstream after this long")
    buffer_bytes: int = Field(2 * 1024 * 1024, ge=16 * 1024, le=1 << 30,
                              description="memory per connection, both directions together")
    max_connections: int = Field(1024, ge=1, le=1_000_000,
                                 description="connections at once; more get RST")


class SplitService(Service):
    """A service that terminates the guest's TCP connections and carries their bytes over
    upstream streams. Write one decision, :meth:`route`; the connection table, its
    timers, stop and report come with the base.

    Frames from the guest: a segment of a connection the table holds is CONSUMED; a
    SYN asks :meth:`route`; other TCP goes to :meth:`stray` and non-TCP to
    :meth:`other` (both PASS by default). Frames toward the guest: those of a split
    connection are DROPPED (the real far end is not part of it), the rest go to
    :meth:`from_uplink` (PASS by default).
    """

    Options: ClassVar[type[ServiceOptions]] = SplitOptions
    #: close reasons before connect that the guest hears as ICMP unreachable (else RST)
    icmp_reasons: ClassVar[frozenset[str]] = DEFAULT_ICMP

    def __init__(self, options: Any, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.budget = budget(options.buffer_bytes)
        self.table = SplitTable(ctx, self.budget.endpoint,
                                max_connections=options.max_connections,
                                icmp_reasons=self.icmp_reasons)

    # -- what a subclass writes ------------------------------------------------------

    def route(self, key: FlowKey, syn: Packet, now: float) -> Route:
        """Decide about a new connection from the guest (``key``: guest -> remote): a
        :class:`~vtl.stream.StreamRequest` splits it over that stream (see
        ``self.budget.request``); a :data:`Connector` gives an in-process stream;
        a :class:`~vtl.Verdict` means the service answered the SYN itself; None lets
        it pass untouched."""
        return None

    def other(self, pkt: Packet, direction: Direction, now: float) -> Verdict:
        """A frame that is not TCP."""
        return Verdict.PASS

    def stray(self, key: FlowKey, pkt: Packet, now: float) -> Verdict:
        """A TCP segment from the guest that is not a SYN and belongs to no connection
        the table holds (one open before the service started, or long closed)."""
        return Verdict.PASS

    def from_uplink(self, key: FlowKey, pkt: Packet, now: float) -> Verdict:
        """A TCP segment toward the guest not of a split connection (``key`` as the
        guest would send it)."""
        return Verdict.PASS

    # -- the machinery ------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        pkt = Packet(frame)
        t = pkt.tcp
        if t is None:
            return self.other(pkt, direction, now)
        ip = pkt.ip
        src, dst = ip.addrs  # type: ignore[union-attr]
        sport, dport = t.ports
        # FlowKey.of(pkt), inlined: this runs for every segment of every split connection
        key = _tuple_new(FlowKey, (ip.version_number, 6, src, sport, dst, dport))  # type: ignore[union-attr]
        if direction is TO_GUEST:
            key = key.reversed()
            return Verdict.DROP if key in self.table else self.from_uplink(key, pkt, now)
        if self.table.segment(key, pkt, now):
            return Verdict.CONSUMED
        if t.flags & (SYN | ACK | RST) != SYN:
            return self.stray(key, pkt, now)
        decision = self.route(key, pkt, now)
        if decision is None:
            return Verdict.PASS
        if isinstance(decision, Verdict):
            return decision
        if isinstance(decision, StreamRequest):
            request = decision

            def decision(handler: StreamHandler) -> Stream:
                return self.ctx.open_stream(request, handler)

        self.table.open(key, pkt, now, decision)
        return Verdict.CONSUMED

    def poll_at(self) -> float | None:
        return self.table.poll_at()

    def on_timer(self, now: float) -> None:
        self.table.on_timer(now)

    def stop(self, now: float) -> None:
        self.table.stop(now)

    def report(self, now: float) -> dict[str, Any]:
        return self.table.report(now)

    def connections(self, now: float) -> list[dict[str, Any]]:
        return self.table.connections(now)


__all__ = [
    "Budget", "Connector", "FlowKey", "Refuser", "Route", "SplitOptions", "SplitService",
    "SplitTable", "TOMBSTONE_S", "budget", "describe", "guest_key",
]
