"""pep: split-TCP performance-enhancing proxy (RFC 3135) for the VM's connections.

Synopsis
    [[services]]
    use = "pep"
    match = "tcp and not port 22"   # which connections to split (default: all TCP)
    connect_timeout_s = 5
    buffer_bytes = 2097152           # per connection, both directions together
    max_connections = 1024

What it does to frames
    A SYN from the guest opens a host TCP connection to the SYN's destination;
    the guest's SYN is answered (SYN-ACK from the destination's address) only once
    that connection is made. From then on the service is the guest's TCP peer: it
    CONSUMES every segment of the connection from the guest, acknowledges data
    locally, and emits its own segments toward the guest (GSO super-frames with
    checksums left to the kernel; the bridge finishes them for ports without
    virtio-net headers). The bytes travel over the host connection. Frames from
    the uplink that belong to a split connection are DROPPED (the real far end is
    not part of it). Everything else PASSes: non-TCP, and TCP connections that were
    open before the service started (their first segment seen is not a SYN).

    Failures reach the guest as its stack expects: refused -> RST; unreachable or
    no answer within ``connect_timeout_s`` -> ICMP destination unreachable (host);
    the upstream resetting -> RST; over ``max_connections`` -> RST.

Notes
    - Memory per connection is bounded: ``buffer_bytes`` split between the send and
      receive buffers of the virtual endpoint, plus one upstream read chunk
      (``buffer_bytes // 8``, at most 256 KiB) and the bridge's stream write buffer
      of the same size. Back-pressure is end to end: when the upstream cannot take
      more, the window advertised to the guest closes; when the guest stops
      reading, the host socket stops being read and its peer is pushed back.
    - The host connection's source is the host's own address (this is a proxy, not
      a NAT): the destination must be reachable from the host.
    - After a connection closes, stray segments of it are answered with RST for a
      few seconds, so they never leak to the uplink.
    - The guest is told MSS 1460 (IPv6: 1440), window scale 9, SACK and timestamps,
      each only if its SYN offered it.

See also
    RFC 3135 (PEPs), RFC 9293 (TCP); ``vtl.models.tcp_endpoint`` (the virtual TCP
    endpoint), ``vtl.models.relay``; ``socks`` and ``udt`` (the same machinery
    with other upstreams).
"""

from __future__ import annotations

import heapq
import ipaddress
from typing import Any

from pydantic import Field
from vtl.models.relay import Relay
from vtl.models.tcp_endpoint import EndpointConfig, TcpEndpoint

from vtl import CONSUMED, DROP, PASS, Direction, Frame, Service, ServiceContext, ServiceOptions
from vtl.errors import PacketError
from vtl.packet import build
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, RST, SYN
from vtl.service import Verdict
from vtl.stream import StreamEvent, StreamRequest

FlowKey = tuple[bytes, int, bytes, int]  # guest ip, guest port, remote ip, remote port
TOMBSTONE_S = 5.0  # how long stray segments of a closed connection get RST answers
TO_GUEST = Direction.TO_GUEST


class PepOptions(ServiceOptions):
    """Options of the ``pep`` service (``match`` is the generic per-service filter)."""

    connect_timeout_s: float = Field(5.0, gt=0, le=300,
                                     description="give up connecting upstream after this long")
    buffer_bytes: int = Field(2 * 1024 * 1024, ge=16 * 1024, le=1 << 30,
                              description="memory per connection, both directions together")
    max_connections: int = Field(1024, ge=1, le=1_000_000,
                                 description="split connections at once; more get RST")


class Pep(Service):
    name = "pep"
    summary = "split-TCP proxy: terminate the VM's TCP locally, relay over host TCP"
    Options = PepOptions

    options: PepOptions

    def __init__(self, options: PepOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        half = options.buffer_bytes // 2
        self.chunk = max(4096, min(256 * 1024, options.buffer_bytes // 8))
        # the VM is one hop away: its RTT is tens of microseconds, so a lost segment
        # is better retransmitted after 30 ms than after the 200 ms floor of WAN stacks
        self.ep_config = EndpointConfig(send_buffer=half, recv_buffer=half, rto_min=0.03)
        self.relays: dict[FlowKey, Relay] = {}
        self.tombstones: dict[FlowKey, float] = {}
        self._timers: list[tuple[float, int, FlowKey]] = []
        self._scheduled: dict[FlowKey, float] = {}
        self._seq = 0
        self.buffered_max = 0

    # -- frames --------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        pkt = Packet(frame)
        t = pkt.tcp
        if t is None:
            return PASS
        ip = pkt.ip
        assert ip is not None
        src, dst = ip.addrs
        sport, dport = t.ports
        if direction is TO_GUEST:
            key = (dst, dport, src, sport)
            return DROP if key in self.relays else PASS
        key = (src, sport, dst, dport)
        relay = self.relays.get(key)
        if relay is not None:
            relay.on_segment(pkt, now)
            self._after(key, relay, now)
            return CONSUMED
        flags = t.flags
        if flags & (SYN | ACK | RST) == SYN:
            self._open(key, pkt, now)
            return CONSUMED
        if key in self.tombstones:
            if self.tombstones[key] > now:
                if not flags & RST:
                    self.ctx.emit(Frame(build.tcp_reset(pkt)), TO_GUEST)
                self.ctx.count("stray_segments")
                return CONSUMED
            del self.tombstones[key]
        return PASS  # a connection that existed before the service started

    def _open(self, key: FlowKey, syn: Packet, now: float) -> None:
        self.tombstones.pop(key, None)
        try:
            endpoint = TcpEndpoint.passive(syn, self.ep_config, now)
        except PacketError:
            self.ctx.count("malformed")
            return
        if len(self.relays) >= self.options.max_connections:
            self.ctx.count("over_limit")
            endpoint.refuse(now)
            self._emit_all(endpoint.outbox)
            endpoint.outbox = []
            return
        relay = Relay(endpoint)
        self.relays[key] = relay
        host = str(ipaddress.ip_address(key[2]))
        request = StreamRequest("tcp", host, key[3], timeout_s=self.options.connect_timeout_s,
                                read_chunk=self.chunk, write_buffer=self.chunk)
        self.ctx.count("connections_opened")

        def handler(event: StreamEvent, now: float, key: FlowKey = key) -> None:
            r = self.relays.get(key)
            if r is None or r.stream is not event.stream:
                return
            r.on_stream_event(event, now)
            self._after(key, r, now)

        relay.stream = self.ctx.open_stream(request, handler)
        self._after(key, relay, now)

    def _emit_all(self, frames: list[Frame]) -> None:
        for f in frames:
            self.ctx.emit(f, TO_GUEST)

    def _after(self, key: FlowKey, relay: Relay, now: float) -> None:
        """Emit what the relay produced, retire it when done, reschedule its timer."""
        self._emit_all(relay.take_frames())
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

    def _retire(self, key: FlowKey, relay: Relay, now: float) -> None:
        del self.relays[key]
        self._scheduled.pop(key, None)
        s = relay.stats
        self.ctx.count("bytes_up", s.bytes_up)
        self.ctx.count("bytes_down", s.bytes_down)
        self.ctx.count(f"connections_{s.outcome or 'closed'}")
        if s.outcome not in ("closed", ""):
            self.ctx.log.info("connection %s:%d -> %s:%d ended: %s",
                              ipaddress.ip_address(key[0]), key[1],
                              ipaddress.ip_address(key[2]), key[3], s.outcome)
        self.tombstones[key] = now + TOMBSTONE_S
        if len(self.tombstones) > 4 * self.options.max_connections:
            self.tombstones = {k: v for k, v in self.tombstones.items() if v > now}

    # -- timers --------------------------------------------------------------------

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
                relay.on_timer(now)
                self._after(key, relay, now)

    def stop(self, now: float) -> None:
        for relay in list(self.relays.values()):
            relay.abort(now)
            self._emit_all(relay.take_frames())
        self.relays.clear()

    def report(self) -> dict[str, Any]:
        return {"connections_active": len(self.relays),
                "buffered_bytes": sum(r.buffered for r in self.relays.values()),
                "buffered_max_per_connection": self.buffered_max}
