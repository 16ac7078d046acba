"""ttlnorm: raise the TTL / hop limit of the guest's outgoing packets to a floor.

Synopsis
    [[services]]
    use = "examples/plugins/ttlnorm.py:TtlNorm"
    min_ttl = 64

What it does to frames
    An IPv4 or IPv6 packet from the guest (toward the uplink) whose TTL (hop limit)
    is below ``min_ttl`` leaves with ``min_ttl``; VLAN-tagged frames too. Nothing
    else changes and every frame PASSes, both ways. Packets to a multicast or
    broadcast address keep their TTL: there it is a scope (IGMP, mDNS, SSDP), and
    raising it would carry link-local traffic further than its sender meant.

    Each flow that had a packet raised is remembered (``max_flows`` at most, the
    least recently used forgotten first, idle ones after ``flow_timeout_s``) with how
    many packets were raised and the lowest TTL seen; ``report(now)`` lists the busiest.

Example config
    [[services]]
    use = "examples/plugins/ttlnorm.py:TtlNorm"
    min_ttl = 64
    max_flows = 4096
    flow_timeout_s = 60

Notes
    - Checksums: the IPv4 TTL is covered only by the IPv4 header checksum, which
      ``ip.update("ttl", ...)`` patches incrementally (RFC 1624); IPv6 has no header
      checksum and the hop limit is in no pseudo-header. So TCP/UDP checksums are
      never touched, and a frame with a partial checksum or a GSO super-frame from a
      virtio port stays valid: the kernel copies the patched header to each segment.
    - A guest's traceroute stops working through this service (every probe leaves
      with ``min_ttl``); that is what a normalizer is for.
    - A malformed IP header raises ``vtl.PacketError`` before anything is changed;
      the chain counts the frame as malformed and its failure policy (open) passes it.
    - Per-flow state lives in a ``vtl.FlowTable``: bounded, aged with ``now`` as it
      comes in, expired from ``on_timer`` at the table's ``poll_at``.

See also
    ``protocount`` (the other sample plugin), ``vtl.flow``, ``vtl.testing.ServiceHarness``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from vtl import (
    PASS,
    Direction,
    FlowKey,
    FlowTable,
    Frame,
    Packet,
    Service,
    ServiceContext,
    ServiceOptions,
    Verdict,
)
from vtl.packet import IPv4, IPv6, classify

TOP_FLOWS = 5  # flows listed by report()


class TtlNormOptions(ServiceOptions):
    min_ttl: int = Field(64, ge=1, le=255,
                         description="lowest TTL / hop limit a guest's packet leaves with")
    max_flows: int = Field(4096, ge=1, description="flows remembered at most")
    flow_timeout_s: float = Field(60.0, gt=0, description="a flow idle this long is forgotten")


def to_a_group(pkt: Packet, ip: IPv4 | IPv6) -> bool:
    """Sent to a multicast or broadcast MAC, or to an IP group address (IPv4 224/3:
    multicast, class E and broadcast; IPv6 ff00::/8)."""
    first = ip.dst[0]
    return classify.is_multicast(pkt) or (first >= 224 if ip.version_number == 4
                                          else first == 0xFF)


@dataclass(slots=True)
class FlowStats:
    raised: int = 0  # packets whose TTL was raised
    lowest: int = 255  # the lowest TTL the guest sent


class TtlNorm(Service):
    name = "ttlnorm"
    summary = "raise the TTL / hop limit of the guest's packets to a floor"
    Options = TtlNormOptions

    options: TtlNormOptions

    def __init__(self, options: TtlNormOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.flows: FlowTable[FlowKey, FlowStats] = FlowTable(
            options.max_flows, timeout=options.flow_timeout_s)

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        if direction is not Direction.TO_UPLINK:
            return PASS
        pkt = Packet(frame)
        ip = pkt.ip
        if ip is None or ip.ttl >= self.options.min_ttl or to_a_group(pkt, ip):
            return PASS
        key = FlowKey.of(pkt)  # before any change: a malformed L4 header raises here
        assert key is not None  # an IP packet always has a key
        stats = self.flows.get(key, now)
        if stats is None:
            stats = FlowStats()
            self.flows.put(key, stats, now)
        else:
            self.flows.touch(key, now)
        stats.raised += 1
        stats.lowest = min(stats.lowest, ip.ttl)
        # update() writes the field and patches the header's checksum (IPv4; IPv6 has none)
        ip.update("ttl" if ip.version_number == 4 else "hop_limit", self.options.min_ttl)
        self.ctx.count("raised")
        return PASS

    def poll_at(self) -> float | None:
        return self.flows.poll_at()

    def on_timer(self, now: float) -> None:
        self.flows.expire(now)

    def stop(self, now: float) -> None:
        self.flows.clear()

    def report(self, now: float) -> dict[str, Any]:
        busiest = sorted(self.flows.items(), key=lambda kv: -kv[1].raised)[:TOP_FLOWS]
        return {
            "min_ttl": self.options.min_ttl,
            "flows": len(self.flows),
            **{f"flows_{k}": v for k, v in self.flows.stats().items() if k != "entries"},
            "top": [f"{key}: raised {s.raised}, lowest ttl {s.lowest}" for key, s in busiest],
        }
