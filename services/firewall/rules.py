"""The firewall's rule sets: the options' rules compiled into matchers, with counters and limits.

A :class:`RuleSet` is built whole from a :class:`FirewallOptions` and never
changed afterwards: the service swaps the reference when the rules change (a
frame sees the old set or the new one, never half of each). Per direction it
keeps the rules that apply (``in``, ``out``, ``both``), in order; the first
whose every condition holds decides.

Conditions are compiled to cheap tests: the protocol number, prefixes as
(version, network integer, mask) triples, port ranges, a set of ICMP types, a
(mask, value) pair for TCP flags, a set of conntrack states, and a libpcap
program for ``match`` (compiled by the bridge, ``ctx.compile_filter``: the costliest,
tested last).

``limit`` behaves as nftables' ``limit rate``: while within the rate (a token
bucket of ``burst``) the rule matches; above it the rule does not match and the
next rules are tried. ``limit_per = "source"`` keeps one bucket per source
address (at most :data:`MAX_SOURCES`, the idlest forgotten).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vtl.services.firewall.options import (
    PROTOS,
    REJECT_WITH,
    FirewallOptions,
    Rule,
    parse_flags,
    parse_ports,
    parse_rate,
)
from vtl.services.firewall.parse import Parsed

from vtl.flow import FlowTable
from vtl.ratelimit import Bucket

MAX_SOURCES = 16384
_GENERATIONS = itertools.count(1)

Prefix = tuple[int, int, int]  # (version, network, mask)


def _prefixes(items: list[str] | None, sets: dict[str, list[str]]) -> list[Prefix] | None:
    if items is None:
        return None
    out: list[Prefix] = []
    for item in items:
        for text in (sets[item[1:]] if item.startswith("@") else [item]):
            net = ipaddress.ip_network(text, strict=False)
            bits = 32 if net.version == 4 else 128
            mask = ((1 << net.prefixlen) - 1) << (bits - net.prefixlen)
            out.append((net.version, int(net.network_address), mask))
    return out


def _in(prefixes: list[Prefix], version: int, addr: bytes) -> bool:
    value = int.from_bytes(addr, "big")
    return any(v == version and value & mask == net for v, net, mask in prefixes)


def _port_in(ranges: list[tuple[int, int]], port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


@dataclass
class Compiled:
    """One rule, ready to match (see the module docstring)."""

    index: int
    rule: Rule
    proto: int | None
    saddr: list[Prefix] | None
    daddr: list[Prefix] | None
    sport: list[tuple[int, int]] | None
    dport: list[tuple[int, int]] | None
    icmp: frozenset[int] | None
    flags: tuple[int, int] | None
    states: frozenset[str] | None
    match: Callable[[bytes | bytearray], bool] | None
    rate: float | None
    bucket: Bucket | None = None
    sources: FlowTable[bytes, Bucket] | None = None
    packets: int = 0
    nbytes: int = 0
    limited: int = 0
    reject: tuple[str, tuple[int, int, int, int] | None] = field(default=("", None))

    @property
    def name(self) -> str:
        return self.rule.name or f"rule{self.index}"

    def matches(self, data: bytearray | bytes, p: Parsed, state: str, now: float) -> bool:
        if self.proto is not None and p.proto != self.proto:
            return False
        if self.states is not None and state not in self.states:
            return False
        if self.saddr is not None and not _in(self.saddr, p.version, p.src):
            return False
        if self.daddr is not None and not _in(self.daddr, p.version, p.dst):
            return False
        if self.sport is not None and (p.frag == 2 or not _port_in(self.sport, p.sport)):
            return False
        if self.dport is not None and (p.frag == 2 or not _port_in(self.dport, p.dport)):
            return False
        if self.icmp is not None and p.itype not in self.icmp:
            return False
        if self.flags is not None and p.flags & self.flags[0] != self.flags[1]:
            return False
        if self.match is not None and not self.match(data):
            return False
        if self.rate is not None and not self._within_rate(p, now):
            self.limited += 1
            return False
        return True

    def _within_rate(self, p: Parsed, now: float) -> bool:
        rule = self.rule
        assert self.rate is not None
        if self.sources is None:
            if self.bucket is None:
                self.bucket = Bucket(self.rate, rule.burst, now)
            return self.bucket.take(now)
        b = self.sources.get(p.src, now)
        if b is None:
            b = Bucket(self.rate, rule.burst, now)
            self.sources.put(p.src, b, now)
        else:
            self.sources.touch(p.src, now)
        return b.take(now)

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "dir": self.rule.dir, "action": self.rule.action,
                "packets": self.packets, "bytes": self.nbytes, "limited": self.limited}


Compiler = Callable[[str], Callable[[bytes | bytearray], bool]]


def compile_rule(i: int, rule: Rule, sets: dict[str, list[str]],
                 compile_filter: Compiler) -> Compiled:
    proto = rule.proto if isinstance(rule.proto, int) else PROTOS[rule.proto]
    rate = parse_rate(rule.limit) if rule.limit else None
    c = Compiled(
        index=i, rule=rule, proto=proto,
        saddr=_prefixes(rule.saddr, sets), daddr=_prefixes(rule.daddr, sets),
        sport=parse_ports(rule.sport, "sport") if rule.sport else None,
        dport=parse_ports(rule.dport, "dport") if rule.dport else None,
        icmp=frozenset(rule.icmp_type) if rule.icmp_type else None,
        flags=parse_flags(rule.tcp_flags) if rule.tcp_flags else None,
        states=frozenset(rule.state) if rule.state else None,
        match=_filter(compile_filter, rule.match, i) if rule.match else None,
        rate=rate)
    if rate is not None and rule.limit_per == "source":
        c.sources = FlowTable(MAX_SOURCES, timeout=max(60.0, rule.burst / rate), evict="lru")
    if rule.action == "reject":
        w = rule.reject_with
        if w is None:  # a TCP reset for TCP, port unreachable for the rest
            c.reject = ("auto", REJECT_WITH["icmp-port-unreachable"])
        elif w == "tcp-reset":
            c.reject = ("tcp-reset", None)
        else:
            c.reject = ("icmp", REJECT_WITH[w])
    return c


def _filter(compile_filter: Compiler, expression: str, i: int
            ) -> Callable[[bytes | bytearray], bool]:
    try:
        return compile_filter(expression)
    except Exception as exc:  # the bridge's ConfigError: name the rule's key
        raise ValueError(f"rules[{i}].match: {exc}") from None


MAX_INDEXED_PORTS = 100_000  # ports the index spells out (ranges expanded), at most


class Index:
    """The rules of one direction that can match a packet of a given protocol and
    destination port, in their order: a superset of those that do match (each is
    still tested whole), so the first match is the same as a scan of every rule's.
    Rules of other protocols, and port rules for other ports, are left out."""

    def __init__(self, rules: list[Compiled]):
        self.rules = rules
        protos = {c.proto for c in rules if c.proto is not None}
        anyproto = [c for c in rules if c.proto is None]
        self.by_proto = {p: [c for c in rules if c.proto in (None, p)] for p in protos}
        self.other = anyproto  # protocols no rule names
        self.by_port: dict[tuple[int, int], list[Compiled]] = {}
        self.no_port: dict[int, list[Compiled]] = {}
        spelled = sum(hi - lo + 1 for c in rules for lo, hi in (c.dport or ()))
        if spelled > MAX_INDEXED_PORTS:
            return  # too wide to spell out: the protocol lists do
        for proto in protos & {6, 17, 132, 33}:
            candidates = self.by_proto[proto]
            self.no_port[proto] = [c for c in candidates if c.dport is None]
            ports = {port for c in candidates for lo, hi in (c.dport or ())
                     for port in range(lo, hi + 1)}
            for port in ports:
                self.by_port[(proto, port)] = [
                    c for c in candidates if c.dport is None
                    or any(lo <= port <= hi for lo, hi in c.dport)]

    def candidates(self, p: Parsed) -> list[Compiled]:
        proto = p.proto
        if proto in self.no_port and p.frag != 2:
            hit = self.by_port.get((proto, p.dport))
            return hit if hit is not None else self.no_port[proto]
        return self.by_proto.get(proto, self.other)


class RuleSet:
    """The rules of both directions, compiled and indexed (immutable once built)."""

    def __init__(self, o: FirewallOptions, compile_filter: Compiler):
        compiled = [compile_rule(i, r, o.sets, compile_filter) for i, r in enumerate(o.rules)]
        self.all = compiled
        self.rules_in = Index([c for c in compiled if c.rule.dir in ("in", "both")])
        self.rules_out = Index([c for c in compiled if c.rule.dir in ("out", "both")])
        self.default_in, self.default_out = o.default_in, o.default_out
        self.generation = next(_GENERATIONS)  # (what a remembered decision was made under)

    def decide(self, inbound: bool, data: bytearray | bytes, p: Parsed, state: str,
               now: float) -> tuple[str, Compiled | None]:
        """(action, the rule that matched or None for the default)."""
        for c in (self.rules_in if inbound else self.rules_out).candidates(p):
            if c.matches(data, p, state, now):
                c.packets += 1
                c.nbytes += p.end - p.l3
                return c.rule.action, c
        return (self.default_in if inbound else self.default_out), None

    def repeatable(self, inbound: bool, p: Parsed, rule: Compiled | None) -> bool:
        """Would every packet with ``p``'s addresses, ports and state get the decision
        ``rule`` made (None: the default)? Yes unless a rule tried on the way looks at
        more than those: the payload (``match``), the time (``limit``), or has a side
        effect per packet (``log``)."""
        for c in (self.rules_in if inbound else self.rules_out).candidates(p):
            if c.match is not None or c.rate is not None or c.rule.log:
                return False
            if c is rule:
                return True
        return rule is None

    def report(self) -> list[dict[str, Any]]:
        return [c.report() for c in self.all]
