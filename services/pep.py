"""pep: split-TCP performance-enhancing proxy (RFC 3135) for the VM's connections.

Synopsis
    [[services]]
    use = "pep"
    match = "tcp and not port 22"   # which connections to split (default: all TCP)
    connect_timeout_s = 5
    buffer_bytes = 2097152           # per connection, both directions together
    max_connections = 1024
    congestion = "bbr"               # host connections (default: the kernel's)

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
    - ``congestion`` sets the host connections' congestion control (``TCP_CONGESTION``),
      so a guest whose own stack is cubic gets BBR on the WAN leg: the guest's TCP only
      spans the one hop to the bridge. A name the kernel lacks is a config error
      (``vtl check`` says which it has). It can be changed live (``vtl ctl set``);
      connections already open keep theirs.
    - The guest is told MSS 1460 (IPv6: 1440), window scale 9, SACK and timestamps,
      each only if its SYN offered it.

See also
    RFC 3135 (PEPs), RFC 9293 (TCP); ``vtl.models.tcp_endpoint`` (the virtual TCP
    endpoint), ``vtl.models.relay``; ``socks`` and ``udt`` (the same machinery
    with other upstreams).
"""

from __future__ import annotations

from pydantic import Field
from vtl.models.split import SplitOptions, SplitService

from vtl import FlowKey, Packet, StreamRequest
from vtl.service import TcpCongestion


class PepOptions(SplitOptions):
    """Options of the ``pep`` service (``match`` is the generic per-service filter)."""

    congestion: TcpCongestion = Field(None, description="congestion control of the host "
                                      "connections (TCP_CONGESTION: bbr, cubic, ...; "
                                      "default: the kernel's)")


class Pep(SplitService):
    name = "pep"
    summary = "split-TCP proxy: terminate the VM's TCP locally, relay over host TCP"
    Options = PepOptions
    tunable = frozenset({"congestion"})  # for connections opened from then on

    options: PepOptions

    def route(self, key: FlowKey, syn: Packet, now: float) -> StreamRequest:
        """Every connection goes to its own destination over a host TCP connection."""
        cc = self.options.congestion
        return self.budget.request("tcp", key.dst_ip, key.dport,
                                   timeout_s=self.options.connect_timeout_s,
                                   options={"congestion": cc} if cc else None)
