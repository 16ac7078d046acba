"""protocount: count frames by protocol and direction (a sample third-party plugin).

Synopsis
    [[services]]
    use = "examples/plugins/protocount.py:ProtoCount"
    interval_s = 10

What it does to frames
    Nothing: every frame PASSes unchanged. Each frame is classified as one of
    ``arp``, ``ipv4/tcp``, ``ipv4/udp``, ``ipv4/icmp``, ``ipv4/other``, ``ipv6/tcp``,
    ``ipv6/udp``, ``ipv6/icmpv6``, ``ipv6/other`` or ``other`` and counted per
    direction. Every ``interval_s`` seconds a one-line summary goes to the service's
    log; ``report(now)`` returns the totals.

Notes
    - One file, public API only (``from vtl import ...``): it shows the hooks a plugin
      uses (``start``, ``process``, ``poll_at``, ``on_timer``, ``report``) and the
      sans-IO rule: time only comes in as ``now``, the log goes through the context.
    - Parsing is done with the packet API (``vtl.Packet``, lazy views over the frame,
      nothing copied): 802.1Q/802.1ad tags are skipped, and IPv6 extension headers
      (hop-by-hop, routing, fragment, destination options) are walked to find the
      transport. A truncated or malformed frame raises ``vtl.PacketError``, which this
      service catches: it counts as ``other`` of its family.
    - Install it as a package with an entry point in the group ``vtl.services``, or
      load it straight from the file as in the synopsis.

See also
    ``capture`` (the frames themselves), ``vtl services``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field

from vtl import (
    PASS,
    Direction,
    Frame,
    Packet,
    PacketError,
    Service,
    ServiceContext,
    ServiceOptions,
    Verdict,
)

FAMILIES = {0x0800: "ipv4", 0x86DD: "ipv6"}  # EtherType -> family
TRANSPORTS = {"ipv4": {1: "icmp", 6: "tcp", 17: "udp"}, "ipv6": {58: "icmpv6", 6: "tcp", 17: "udp"}}


def classify(data: Frame | bytes | bytearray | memoryview) -> str:
    """Protocol class of one Ethernet frame."""
    try:
        pkt = Packet(data)
    except PacketError:  # shorter than an Ethernet header
        return "other"
    if pkt.arp is not None:
        return "arp"
    family = FAMILIES.get(pkt.ethertype)
    if family is None:
        return "other"
    try:
        proto = pkt.l4_proto  # IPv6: after the extension headers
    except PacketError:  # truncated or malformed IP header
        return f"{family}/other"
    return f"{family}/{TRANSPORTS[family].get(proto, 'other')}"


class ProtoCountOptions(ServiceOptions):
    interval_s: float = Field(10.0, gt=0, description="seconds between two log summaries")


class ProtoCount(Service):
    name = "protocount"
    summary = "count frames by protocol and direction, log a summary periodically"
    Options = ProtoCountOptions

    options: ProtoCountOptions

    def __init__(self, options: ProtoCountOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.counts: dict[Direction, Counter[str]] = {d: Counter() for d in Direction}
        self._next_log: float | None = None

    def start(self, now: float) -> None:
        self._next_log = now + self.options.interval_s

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        self.counts[direction][classify(frame)] += 1
        return PASS

    def poll_at(self) -> float | None:
        return self._next_log

    def on_timer(self, now: float) -> None:
        if self._next_log is None or now < self._next_log:
            return
        self.ctx.log.info("%s: %s", self.ctx.name, self.summary_line())
        self._next_log += self.options.interval_s
        if self._next_log <= now:  # we were called late: do not log in a burst
            self._next_log = now + self.options.interval_s

    def summary_line(self) -> str:
        parts = []
        for direction, counts in self.counts.items():
            detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing"
            parts.append(f"{direction.value}: {detail}")
        return "; ".join(parts)

    def report(self, now: float) -> dict[str, Any]:
        return {d.value: dict(sorted(c.items())) for d, c in self.counts.items()}
