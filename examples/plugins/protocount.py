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
    log; ``report()`` returns the totals.

Notes
    - One file, public API only (``from vtl import ...``): it shows the hooks a plugin
      uses (``start``, ``process``, ``poll_at``, ``on_timer``, ``report``) and the
      sans-IO rule: time only comes in as ``now``, the log goes through the context.
    - Parsing is done with ``struct`` on the frame's bytes: 802.1Q/802.1ad tags are
      skipped, and IPv6 extension headers (hop-by-hop, routing, fragment, destination
      options) are walked to find the transport. Truncated frames count as ``other``
      of their family. The packet API (``vtl.packet``) offers the same queries.
    - Install it as a package with an entry point in the group ``vtl.services``, or
      load it straight from the file as in the synopsis.

See also
    ``capture`` (the frames themselves), ``vtl services``.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

from pydantic import Field

from vtl import PASS, Direction, Frame, Service, ServiceContext, ServiceOptions, Verdict

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
IPV4_PROTOS = {1: "ipv4/icmp", 6: "ipv4/tcp", 17: "ipv4/udp"}
IPV6_PROTOS = {58: "ipv6/icmpv6", 6: "ipv6/tcp", 17: "ipv6/udp"}
IPV6_EXT = (0, 43, 44, 60)  # hop-by-hop, routing, fragment, destination options
_U16 = struct.Struct("!H")


def classify(data: bytes | bytearray | memoryview) -> str:
    """Protocol class of one Ethernet frame."""
    off = 12
    if len(data) < off + 2:
        return "other"
    (ethertype,) = _U16.unpack_from(data, off)
    while ethertype in VLAN_TPIDS and len(data) >= off + 6:
        off += 4
        (ethertype,) = _U16.unpack_from(data, off)
    off += 2
    if ethertype == ETH_P_ARP:
        return "arp"
    if ethertype == ETH_P_IP:
        if len(data) < off + 20 or data[off] >> 4 != 4:
            return "ipv4/other"
        return IPV4_PROTOS.get(data[off + 9], "ipv4/other")
    if ethertype == ETH_P_IPV6:
        if len(data) < off + 40 or data[off] >> 4 != 6:
            return "ipv6/other"
        nxt, off = data[off + 6], off + 40
        while nxt in IPV6_EXT:
            if len(data) < off + 8:
                return "ipv6/other"
            hdr_len = 8 if nxt == 44 else (data[off + 1] + 1) * 8
            nxt, off = data[off], off + hdr_len
        return IPV6_PROTOS.get(nxt, "ipv6/other")
    return "other"


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
        self.counts[direction][classify(frame.data)] += 1
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

    def report(self) -> dict[str, Any]:
        return {d.value: dict(sorted(c.items())) for d, c in self.counts.items()}
