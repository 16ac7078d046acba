"""firewall: a stateful firewall outside the VM's reach, with the kernel's conntrack semantics.

Synopsis
    [[services]]
    use = "firewall"
    default_in = "drop"            # toward the guest, when no rule matches
    default_out = "accept"         # from the guest
    [[services.rules]]
    dir = "in"
    proto = "tcp"
    dport = [22, 8000, "8080-8090"]
    action = "accept"
    [[services.rules]]
    dir = "in"
    proto = "tcp"
    dport = [9000]
    action = "reject"              # a TCP reset (ICMP port unreachable for other protocols)

What it does to frames
    Every IPv4 and IPv6 packet, both directions, is looked up in a connection
    table that follows Linux conntrack (states new, established, related,
    invalid, untracked; TCP window tracking; UDP and ICMP echo; ICMP errors
    related to the flow they quote). Then, as the usual nftables chain:
    established and related traffic passes (``established``), invalid packets
    are dropped (``invalid``), and the rules of the frame's direction are tried
    in order (``in``: toward the guest, ``out``: from it); the first that
    matches decides: ``accept``, ``drop``, or ``reject`` (a TCP reset, or an
    ICMP / ICMPv6 unreachable of ``reject_with``, sent back from the address the
    packet was for, as the host itself would refuse it). No rule: the
    direction's default. A new connection is kept only when its first packet is
    accepted. ARP and IPv6 neighbour discovery pass outside conntrack
    (``allow_arp_nd``); other non-IP frames get the direction's default.

    With ``guest_macs`` / ``guest_ips`` (or ``learn_guest``) frames from the guest
    must carry its MAC and addresses, its ARP and neighbour advertisements may
    not claim other addresses, and DHCP / router-advertisement server traffic
    from it is dropped (as libvirt's clean-traffic filter).

Notes
    - The rules live in the bridge, not in the VM: nothing the guest sends
      changes them. They change at run time with a reload (or ``vtl ctl NAME set``
      for scalar options): a frame sees the old rule set or the new one.
    - ``liberal`` and ``loose`` are nf_conntrack_tcp_be_liberal and _loose;
      ``timeouts`` takes the kernel's names (tcp_established, udp, icmp ...).
    - Bounded: ``max_entries`` connections (the non-assured go first when full),
      per-source limit buckets, fragment ids.
    - Counters: per rule (``vtl ctl NAME status``), per verdict and state;
      ``vtl ctl NAME connections`` lists the tracked flows.
    - Checksums are not verified (the kernel drops bad ones as invalid when
      nf_conntrack_checksum is on); later fragments follow their first one.

See also
    docs/firewall.md; nftables' ct state and limit; libvirt nwfilter clean-traffic.
"""

from __future__ import annotations

from typing import Any

from vtl.services.firewall.antispoof import AntiSpoof
from vtl.services.firewall.conntrack import (
    ESTABLISHED,
    INVALID,
    NEW,
    RELATED,
    UNTRACKED,
    Conntrack,
)
from vtl.services.firewall.options import REJECT_WITH, FirewallOptions
from vtl.services.firewall.parse import Parsed, parse
from vtl.services.firewall.rules import Compiled, RuleSet

from vtl import CONSUMED, DROP, PASS, Direction, Frame, Service, ServiceContext, Verdict
from vtl.errors import PacketError
from vtl.packet import build
from vtl.packet.packet import Packet
from vtl.ratelimit import Bucket

TO_GUEST, TO_UPLINK = Direction.TO_GUEST, Direction.TO_UPLINK
ETH_ARP = 0x0806
ND_TYPES = frozenset((133, 134, 135, 136, 137))


class Firewall(Service):
    name = "firewall"
    summary = "stateful firewall outside the VM: conntrack, ordered rules, anti-spoofing"
    Options = FirewallOptions
    default_fail = "closed"
    tunable = frozenset(FirewallOptions.model_fields) - {"max_entries"}
    actions = {"conntrack-flush": "forget every tracked connection (established flows are "
                                "picked up again if loose)"}

    options: FirewallOptions

    def __init__(self, options: FirewallOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.ct = Conntrack(options.max_entries, options.timeouts, options.liberal,
                            options.loose)
        self.rules = RuleSet(options, ctx.compile_filter)
        self.spoof = AntiSpoof(options.guest_macs, options.guest_ips, options.learn_guest,
                               options.block_servers)
        self.spoof_on = self.spoof.active  # fixed by the options
        self.log_bucket = Bucket(options.log_rate, max(1, int(options.log_rate * 2)), 0.0)

    def retune(self, options: FirewallOptions, now: float) -> None:
        """New rules, sets, defaults, timeouts or anti-spoofing, all at once: the rule
        set is built first and swapped in whole; tracked connections stay."""
        rules = RuleSet(options, self.ctx.compile_filter)
        spoof = self.spoof
        o = self.options
        if (options.guest_macs, options.guest_ips, options.learn_guest,
                options.block_servers) != (o.guest_macs, o.guest_ips, o.learn_guest,
                                           o.block_servers):
            spoof = AntiSpoof(options.guest_macs, options.guest_ips, options.learn_guest,
                              options.block_servers)
        self.ct.configure(options.timeouts, options.liberal, options.loose)
        self.rules, self.spoof, self.options = rules, spoof, options
        self.spoof_on = spoof.active
        self.log_bucket = Bucket(options.log_rate, max(1, int(options.log_rate * 2)), now)

    def act(self, action: str, now: float) -> dict[str, Any]:
        if action == "conntrack-flush":
            return {"flushed": self.ct.clear()}
        return super().act(action, now)

    # -- per frame ----------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        data = frame.data
        inbound = direction is TO_GUEST
        if self.spoof_on:
            spoof = self.spoof
            if inbound:
                spoof.inbound(data, now)
            else:
                reason = spoof.outbound(data, now)
                if reason is not None:  # (the slot's own "malformed" is for exceptions)
                    self.ctx.count("unparsable" if reason == "malformed" else reason)
                    self._log(f"anti-spoofing: {reason}", data, now)
                    return DROP
        o = self.options
        if o.established:
            fast = self.ct.fast(data, now, self.rules.generation)
            if fast is not None:  # most packets of a busy flow: see .fastpath
                if fast == NEW:
                    self.ctx.count("accepted_new")
                return PASS
        p = parse(data)
        if p is None:
            if len(data) >= 14 and data[12] == 0x08 and data[13] == 0x06 \
                    and self.options.allow_arp_nd:
                return PASS
            return self._default(inbound, data)
        state, conn, d = self.ct.lookup(data, p, now)
        if state == UNTRACKED and o.allow_arp_nd and p.itype in ND_TYPES:
            return PASS
        if (state in (ESTABLISHED, RELATED)) and o.established:
            return PASS
        if state == INVALID and o.invalid != "rules":
            self.ctx.count("invalid")
            if o.invalid == "drop":
                return DROP
            return PASS
        action, rule = self.rules.decide(inbound, data, p, state, now)
        if rule is not None and rule.rule.log:
            self._log(f"{rule.rule.log_prefix}{rule.name} {action}", data, now)
        if action == "accept":
            if conn is not None and not conn.confirmed:
                self.ct.confirm(conn, now)
            if state == NEW and conn is not None and conn.proto == 17 and \
                    self.rules.repeatable(inbound, p, rule):
                conn.verdict = (self.rules.generation, rule)  # the fast path's, next time
            self.ctx.count(f"accepted_{state}")
            return PASS
        self.ctx.count(f"{action}ed" if action == "reject" else "dropped_by_rule"
                       if rule is not None else "dropped_by_default")
        if action == "reject":
            return self._reject(frame, p, rule, inbound, now)
        return DROP

    def _default(self, inbound: bool, data: bytearray) -> Verdict:
        action = self.options.default_in if inbound else self.options.default_out
        if action == "accept":
            return PASS
        self.ctx.count("non_ip_dropped")
        return DROP

    def _reject(self, frame: Frame, p: Parsed, rule: Compiled | None, inbound: bool,
                now: float) -> Verdict:
        """Answer the packet as the host it was for would refuse it, toward its sender.
        A reset goes through conntrack as the kernel's own does (it closes the flow)."""
        kind, codes = rule.reject if rule is not None else (
            "auto", REJECT_WITH["icmp-port-unreachable"])
        back = TO_UPLINK if inbound else TO_GUEST
        try:
            pkt = Packet(frame)
            if kind == "tcp-reset" or (kind == "auto" and p.proto == 6):
                if p.proto != 6 or p.flags & 0x04:
                    return DROP  # never a reset for a reset (nor for non-TCP)
                reply = build.tcp_reset(pkt)
                rp = parse(reply)
                if rp is not None:
                    self.ct.lookup(reply, rp, now)
            else:
                assert codes is not None
                t4, c4, t6, c6 = codes
                reply = build.icmp_error(pkt, t4, c4) if p.version == 4 else \
                    build.icmp6_error(pkt, t6, c6)
        except PacketError:
            return DROP  # an ICMP error about an ICMP error, a broadcast...
        self.ctx.emit(Frame(reply), back)
        return CONSUMED

    def _log(self, what: str, data: bytearray, now: float) -> None:
        if self.log_bucket.take(now):
            p = parse(data)
            self.ctx.log.info("%s: %s", what, p if p is not None else data[:14].hex())
        else:
            self.ctx.count("log_suppressed")

    # -- time, reports ------------------------------------------------------------------

    def poll_at(self) -> float | None:
        return self.ct.poll_at()

    def on_timer(self, now: float) -> None:
        self.ct.expire(now)

    def report(self, now: float) -> dict[str, Any]:
        return {"tracked": len(self.ct.table), "conntrack": self.ct.stats(),
                "rules": self.rules.report(), "antispoof": self.spoof.report()}

    def connections(self, now: float) -> list[dict[str, Any]]:
        return self.ct.connections(now)
