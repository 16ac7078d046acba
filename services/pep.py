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

import ipaddress
from typing import Any

from pydantic import Field
from vtl.models.split import SplitTable, budget, guest_key

from vtl import CONSUMED, DROP, PASS, Direction, Frame, Service, ServiceContext, ServiceOptions
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, RST, SYN
from vtl.service import Verdict
from vtl.stream import Stream, StreamHandler, StreamRequest

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
        ep_config, self.chunk = budget(options.buffer_bytes)
        self.table = SplitTable(ctx, ep_config, max_connections=options.max_connections)

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        pkt = Packet(frame)
        t = pkt.tcp
        if t is None:
            return PASS
        key = guest_key(pkt)
        if direction is TO_GUEST:
            key = (key[2], key[3], key[0], key[1])
            return DROP if key in self.table else PASS
        if self.table.segment(key, pkt, now):
            return CONSUMED
        if t.flags & (SYN | ACK | RST) == SYN:
            host = str(ipaddress.ip_address(key[2]))
            request = StreamRequest("tcp", host, key[3], timeout_s=self.options.connect_timeout_s,
                                    read_chunk=self.chunk, write_buffer=self.chunk)

            def connect(handler: StreamHandler) -> Stream:
                return self.ctx.open_stream(request, handler)

            self.table.open(key, pkt, now, connect)
            return CONSUMED
        return PASS  # a connection that existed before the service started

    def poll_at(self) -> float | None:
        return self.table.poll_at()

    def on_timer(self, now: float) -> None:
        self.table.on_timer(now)

    def stop(self, now: float) -> None:
        self.table.stop(now)

    def report(self) -> dict[str, Any]:
        return self.table.report()
