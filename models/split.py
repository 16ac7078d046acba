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
- a finished relay is retired with counters ``connections_<outcome>``,
  ``bytes_up`` and ``bytes_down``, and a log line (rate-limited per cause)
  when it did not end cleanly.

Frames the relays produce are emitted toward the guest through the service's
context. The table does no I/O and reads no clock: ``now`` is passed in.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import deque
from collections.abc import Callable
from typing import Any

from vtl.models.relay import Relay
from vtl.models.tcp_endpoint import EndpointConfig, TcpEndpoint

from vtl.errors import PacketError
from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, RST, SYN
from vtl.service import Direction, ServiceContext
from vtl.stream import Stream, StreamEvent, StreamHandler

FlowKey = tuple[bytes, int, bytes, int]  # guest ip, guest port, remote ip, remote port
Connector = Callable[[StreamHandler], Stream]
Refuser = Callable[[str, str], None]  # (outcome, message) of an active open that failed
TOMBSTONE_S = 5.0  # how long stray segments of a closed connection get RST answers
LOG_EVERY_S = 10.0  # one log line per distinct failure cause per this long
TO_GUEST = Direction.TO_GUEST
DEFAULT_ICMP = frozenset({"timeout", "unreachable"})
NOT_FAILED = frozenset({"closed", "", "refused", "passthrough"})


def budget(buffer_bytes: int) -> tuple[EndpointConfig, int]:
    """A service's per-connection memory ``buffer_bytes`` as the guest-facing endpoint's
    config (half for sending, half for receiving) and the upstream read chunk (an
    eighth, 4 KiB to 256 KiB, also used as the stream's write buffer)."""
    half = buffer_bytes // 2
    # the VM is one hop away: its RTT is tens of microseconds, so a lost segment
    # is better retransmitted after 30 ms than after the 200 ms floor of WAN stacks
    config = EndpointConfig(send_buffer=half, recv_buffer=half, rto_min=0.03)
    return config, max(4096, min(256 * 1024, buffer_bytes // 8))


def guest_key(pkt: Packet) -> FlowKey:
    """The table key of a TCP segment sent by the guest."""
    ip, t = pkt.ip, pkt.tcp
    assert ip is not None and t is not None
    src, dst = ip.addrs
    sport, dport = t.ports
    return (src, sport, dst, dport)


def describe(key: FlowKey) -> str:
    return (f"{ipaddress.ip_address(key[0])}:{key[1]} -> "
            f"{ipaddress.ip_address(key[2])}:{key[3]}")


class SplitTable:
    """Relays by flow, their timers, tombstones and counters, for one service."""

    def __init__(self, ctx: ServiceContext, ep_config: EndpointConfig, *,
                 max_connections: int, icmp_reasons: frozenset[str] = DEFAULT_ICMP):
        self.ctx = ctx
        self.ep_config = ep_config
        self.max_connections = max_connections
        self.icmp_reasons = icmp_reasons
        self.relays: dict[FlowKey, Relay] = {}
        self.tombstones: dict[FlowKey, float] = {}
        self.buffered_max = 0
        self._timers: list[tuple[float, int, FlowKey]] = []
        self._scheduled: dict[FlowKey, float] = {}
        self._seq = 0
        self._posted: deque[tuple[FlowKey, StreamEvent]] = deque()
        self._draining = False
        self._busy = 0  # depth of table calls in progress (see post)
        self._logged: dict[str, tuple[float, int]] = {}
        self._accepting: dict[FlowKey, tuple[Connector, Refuser]] = {}  # active opens

    def __contains__(self, key: FlowKey) -> bool:
        return key in self.relays

    # -- frames from the guest -------------------------------------------------------

    def segment(self, key: FlowKey, pkt: Packet, now: float) -> bool:
        """Feed a segment from the guest to its connection, or answer it for a recently
        closed one. False when no connection owns it (a SYN then may :meth:`open` one)."""
        relay = self.relays.get(key)
        if relay is not None:
            self._busy += 1
            try:
                relay.on_segment(pkt, now)
                self._after(key, relay, now)
            finally:
                self._busy -= 1
            self._drain(now)
            return True
        until = self.tombstones.get(key)
        if until is None:
            return False
        t = pkt.tcp
        if t is not None and t.flags & (SYN | ACK | RST) == SYN:
            return False  # a new connection on the same ports
        if until <= now:
            del self.tombstones[key]
            return False
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
        assert key not in self.relays, "segment() feeds SYNs of live connections"
        self.tombstones.pop(key, None)
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
        self.relays[key] = relay
        self.ctx.count("connections_opened")

        def handler(event: StreamEvent, now: float, key: FlowKey = key) -> None:
            self.deliver(key, event, now)

        self._busy += 1
        try:
            relay.stream = connect(handler)
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
        assert key not in self.relays, "one connection per flow"
        if len(self.relays) >= self.max_connections:
            self.ctx.count("over_limit")
            refuse("error", "over max_connections")
            return None
        self.tombstones.pop(key, None)
        relay = Relay(endpoint, icmp_reasons=self.icmp_reasons, connect_deadline=deadline)
        self.relays[key] = relay
        self._accepting[key] = (accept, refuse)
        self.ctx.count("connections_opened")
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
        relay = self.relays.get(key)
        if relay is None:
            return None
        relay.stats.outcome = outcome
        if relay.stream is not None and not relay.upstream_closed:
            relay.stream.abort()
        relay.endpoint.outbox = []
        self._accepting.pop(key, None)
        self._retire(key, relay, now, tombstone=False)
        return relay

    # -- stream events -------------------------------------------------------------------

    def deliver(self, key: FlowKey, event: StreamEvent, now: float) -> None:
        """A stream event for ``key`` (the handler ``open`` gives the stream)."""
        relay = self.relays.get(key)
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

    def _after(self, key: FlowKey, relay: Relay, now: float) -> None:
        """Emit what the relay produced, retire it when done, reschedule its timer."""
        self._emit(relay.take_frames())
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
        t = relay.poll_at()
        if t is not None and self._scheduled.get(key) != t:
            self._scheduled[key] = t
            self._seq += 1
            heapq.heappush(self._timers, (t, self._seq, key))

    def _retire(self, key: FlowKey, relay: Relay, now: float, tombstone: bool = True) -> None:
        if self.relays.get(key) is relay:
            del self.relays[key]
        self._scheduled.pop(key, None)
        s = relay.stats
        opener = self._accepting.pop(key, None)
        if opener is not None:  # an active open that never got its stream
            opener[1](s.outcome or "error", s.message or "the connection ended")
        self.ctx.count("bytes_up", s.bytes_up)
        self.ctx.count("bytes_down", s.bytes_down)
        self.ctx.count(f"connections_{s.outcome or 'closed'}")
        if s.outcome not in NOT_FAILED:
            self.ctx.count("connections_failed")  # timeout, unreachable, reset, error
        if s.outcome not in ("closed", "", "passthrough"):
            self._log_failure(key, s.outcome, s.message, now)
        if not tombstone:
            return
        self.tombstones[key] = now + TOMBSTONE_S
        if len(self.tombstones) > 4 * self.max_connections:
            self.tombstones = {k: v for k, v in self.tombstones.items() if v > now}

    def _log_failure(self, key: FlowKey, outcome: str, message: str, now: float) -> None:
        """One line per cause every LOG_EVERY_S: a dead proxy must not flood the log."""
        cause = f"{outcome}: {message}" if message else outcome
        last = self._logged.get(cause)
        if last is not None and now - last[0] < LOG_EVERY_S:
            self._logged[cause] = (last[0], last[1] + 1)
            return
        more = f" ({last[1]} more like it since the last line)" if last and last[1] else ""
        self._logged[cause] = (now, 0)
        if len(self._logged) > 256:
            self._logged = {c: v for c, v in self._logged.items()
                            if now - v[0] < LOG_EVERY_S}
        self.ctx.log.warning("connection %s ended: %s%s", describe(key), cause, more)

    # -- timers ------------------------------------------------------------------------------

    def poll_at(self) -> float | None:
        timers = self._timers
        while timers:
            t, _, key = timers[0]
            if self._scheduled.get(key) == t:
                return t
            heapq.heappop(timers)
        return None

    def on_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            t, _, key = heapq.heappop(timers)
            if self._scheduled.get(key) != t:
                continue
            del self._scheduled[key]
            relay = self.relays.get(key)
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
        for key, relay in list(self.relays.items()):
            relay.abort(now)
            self._emit(relay.take_frames())
            opener = self._accepting.pop(key, None)
            if opener is not None:
                opener[1]("error", "the service is stopping")
        self.relays.clear()
        self._posted.clear()

    def report(self) -> dict[str, Any]:
        return {"connections_active": len(self.relays),
                "buffered_bytes": sum(r.buffered for r in self.relays.values()),
                "buffered_max_per_connection": self.buffered_max}


__all__ = [
    "Connector", "FlowKey", "Refuser", "SplitTable", "TOMBSTONE_S", "budget", "describe",
    "guest_key",
]
