"""The ``firewall`` service's options compiled to an nftables ruleset: the kernel reference.

The differential test (issue 16) replays one trace through VTL's firewall and
through a routed namespace whose ``inet`` ``forward`` chain is the same rule set
written for nftables. :func:`compile_nft` writes that chain from a firewall
options dict (the TOML shape of :mod:`vtl.services.firewall.options`, validated
by it first); :func:`sysctls` gives the conntrack switches and timeouts to set
in the router's namespace (after the ruleset is loaded: the ``net.netfilter``
keys exist once ``nf_conntrack`` is in use there).

Directions: ``in`` is toward the protected host (the guest) and ``out`` from it;
in the router that is ``iifname OUTSIDE oifname INSIDE`` and the reverse, and a
``both`` rule matches either of the two. The chain, in order:

1. ``ct state established,related accept`` when ``established`` is on;
2. ``ct state invalid drop`` (or ``accept``) unless ``invalid = "rules"``;
3. the rules, in order, each ending in its verdict (first match wins). A rule
   whose addresses are of one family matches only that family. A ``reject``
   is ``reject with tcp reset`` for TCP and an ICMP/ICMPv6 port unreachable
   for the rest (``reject with icmpx port-unreachable``), unless ``reject_with``
   names a code: ``icmpx`` where nft has one for both families, else one rule
   per family with ``icmp``/``icmpv6``. A reject on a rule of any protocol goes
   to a small verdict chain that picks the reset for TCP and ICMP for the rest.
   ``limit`` is ``limit rate N/unit burst B packets`` (one named limit object
   per rule, shared by its per-family copies; per source, a dynamic set per
   family keyed by the source address, as nft's meters); over the limit, the
   rule does not match and the next one is tried, as in the service;
4. the defaults, one tail rule per direction; the chain's policy is drop, so
   nothing else is ever forwarded.

Named sets are expanded into each rule that uses them (they are static, so the
result is the same and one rule can mix prefixes and sets of both families).
Every rule gets an anonymous ``counter``, for debugging a divergence.

Not representable, so :class:`Unsupported` is raised: a rule with ``match`` (a
libpcap expression; nft does not take BPF here), ``reject_with =
"icmp-proto-unreachable"`` on IPv6 traffic (nft's reject has no ICMPv6
parameter problem), and anti-spoofing (``guest_macs``, ``guest_ips``,
``learn_guest``), which is about frames from the guest that a router never
sees as the bridge does. ``log`` is left out (a log line changes no verdict,
and a namespace's nf_log is off by default). ARP and neighbour discovery
(``allow_arp_nd``) need no rule: a router answers them itself and never
forwards them, so the kernel reference has nothing to compare there.
``max_entries`` is not compiled (``nf_conntrack_max`` is global, not per
namespace); ``tcp_syn_sent2`` has no sysctl (the kernel uses its built-in
value).
"""

from __future__ import annotations

import ipaddress
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

TABLE = "vtlfw"

#: reject_with -> the icmpx code when nft has one (the same code for both families)
ICMPX = {"icmp-port-unreachable": "port-unreachable",
         "icmp-host-unreachable": "host-unreachable",
         "icmp-net-unreachable": "no-route",
         "icmp-admin-prohibited": "admin-prohibited"}
#: reject_with -> (nft's ICMPv4 code name, ICMPv6 code name or None)
PER_FAMILY = {"icmp-proto-unreachable": ("prot-unreachable", None),
              "icmp-host-prohibited": ("host-prohibited", "admin-prohibited"),
              "icmp-net-prohibited": ("net-prohibited", "admin-prohibited")}
#: the service's timeout names -> the kernel's sysctl under net.netfilter
TIMEOUT_SYSCTLS = {
    "tcp_syn_sent": "nf_conntrack_tcp_timeout_syn_sent",
    "tcp_syn_recv": "nf_conntrack_tcp_timeout_syn_recv",
    "tcp_established": "nf_conntrack_tcp_timeout_established",
    "tcp_fin_wait": "nf_conntrack_tcp_timeout_fin_wait",
    "tcp_close_wait": "nf_conntrack_tcp_timeout_close_wait",
    "tcp_last_ack": "nf_conntrack_tcp_timeout_last_ack",
    "tcp_time_wait": "nf_conntrack_tcp_timeout_time_wait",
    "tcp_close": "nf_conntrack_tcp_timeout_close",
    "tcp_retrans": "nf_conntrack_tcp_timeout_max_retrans",
    "tcp_unack": "nf_conntrack_tcp_timeout_unacknowledged",
    "udp": "nf_conntrack_udp_timeout",
    "udp_stream": "nf_conntrack_udp_timeout_stream",
    "icmp": "nf_conntrack_icmp_timeout",
    "icmpv6": "nf_conntrack_icmpv6_timeout",
    "generic": "nf_conntrack_generic_timeout",
}
_UNITS = (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400))


class Unsupported(ValueError):
    """A firewall option with no nftables equivalent in a routed namespace."""


def options_of(opts: dict[str, Any] | FirewallOptions) -> FirewallOptions:
    """The validated options (a dict as in the TOML, ``use`` and common keys allowed)."""
    if isinstance(opts, FirewallOptions):
        return opts
    own = {k: v for k, v in opts.items() if k not in ("use", "name", "match", "fail")}
    return FirewallOptions.model_validate(own)


def nft_rate(text: str) -> str:
    """``"10/second"`` -> ``"10/second"``; a fraction goes to the unit where it is whole
    (``"0.5/second"`` -> ``"30/minute"``), since nft takes integers."""
    per_s = parse_rate(text)
    for unit, secs in _UNITS:
        n = per_s * secs
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{round(n)}/{unit}"
    return f"{max(1, round(per_s * 86400))}/day"


def _prefixes(items: list[str] | None, sets: dict[str, list[str]]) -> list[Any] | None:
    if items is None:
        return None
    out: list[Any] = []
    for item in items:
        for p in (sets[item[1:]] if item.startswith("@") else [item]):
            out.append(ipaddress.ip_network(p, strict=False))
    return out


def _set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _l4(proto: str | int) -> int | None:
    return PROTOS[proto] if isinstance(proto, str) else proto


class _Compiler:
    def __init__(self, fw: FirewallOptions, outside: str, inside: str):
        self.fw, self.outside, self.inside = fw, outside, inside
        self.objects: list[str] = []  # limit objects and meter sets
        self.chains: list[tuple[str, list[str]]] = []  # verdict chains
        self.lines: list[str] = []

    def ifaces(self, direction: str) -> list[str]:
        """The interface matches of a direction (one string per direction)."""
        inward = f'iifname "{self.outside}" oifname "{self.inside}"'
        outward = f'iifname "{self.inside}" oifname "{self.outside}"'
        return {"in": [inward], "out": [outward], "both": [inward, outward]}[direction]

    def run(self) -> str:
        fw = self.fw
        if fw.guest_macs or fw.guest_ips or fw.learn_guest:
            raise Unsupported("guest_macs/guest_ips/learn_guest: anti-spoofing has no "
                              "routed-namespace equivalent")
        if fw.established:
            self.lines.append("ct state established,related counter accept")
        if fw.invalid != "rules":
            self.lines.append(f"ct state invalid counter {fw.invalid}")
        for i, rule in enumerate(fw.rules):
            self.rule(i, rule)
        for direction, action in (("in", fw.default_in), ("out", fw.default_out)):
            (match,) = self.ifaces(direction)
            self.lines += [f"{match} meta l4proto tcp counter reject with tcp reset",
                           f"{match} counter reject"] if action == "reject" else \
                [f"{match} counter {action}"]
        out = [f"table inet {TABLE} {{"]
        out += [f"\t{o}" for o in self.objects]
        for name, body in self.chains:
            out.append(f"\tchain {name} {{")
            out += [f"\t\t{b}" for b in body]
            out.append("\t}")
        out.append("\tchain forward {")
        out.append("\t\ttype filter hook forward priority filter; policy drop;")
        out += [f"\t\t{line}" for line in self.lines]
        out += ["\t}", "}"]
        return "\n".join(out) + "\n"

    def rule(self, i: int, rule: Rule) -> None:
        if rule.match is not None:
            raise Unsupported(f"rules[{i}].match: a libpcap expression has no nft "
                              "equivalent here")
        saddr = _prefixes(rule.saddr, self.fw.sets)
        daddr = _prefixes(rule.daddr, self.fw.sets)
        l4 = _l4(rule.proto)
        families: list[int] = [4, 6]
        if l4 == 1:
            families = [4]
        elif l4 == 58:
            families = [6]
        for addrs in (saddr, daddr):
            if addrs is not None:
                families = [f for f in families if any(a.version == f for a in addrs)]
        if not families:
            return  # e.g. IPv4 sources with an IPv6 destination: matches nothing
        if (rule.action == "reject" and rule.reject_with in PER_FAMILY
                and PER_FAMILY[rule.reject_with][1] is None and 6 in families):
            raise Unsupported(f"rules[{i}].reject_with: {rule.reject_with} has no ICMPv6 "
                              "form in nft's reject")
        limit = self.limit(i, rule)
        verdict = self.verdict(i, rule, l4)
        # one rule for both families unless something in it is per family
        split = (saddr is not None or daddr is not None or rule.limit_per == "source"
                 and rule.limit is not None or rule.reject_with in PER_FAMILY
                 or len(families) == 1)
        for direction in self.ifaces(rule.dir):
            for fam in (families if split else [0]):
                self.lines.append(" ".join(self.matches(direction, fam, rule, l4, saddr,
                                                        daddr) + limit(fam)
                                           + ["counter", verdict(fam)]))

    def matches(self, iface: str, fam: int, rule: Rule, l4: int | None,
                saddr: list[Any] | None, daddr: list[Any] | None) -> list[str]:
        """The match expressions of ``rule`` for family ``fam`` (4, 6, or 0: both)."""
        out = [iface]
        if fam and l4 not in (1, 58):
            out.append(f"meta nfproto ipv{fam}")
        ipkw = "ip" if fam == 4 else "ip6"
        for key, addrs in (("saddr", saddr), ("daddr", daddr)):
            if addrs is not None:
                mine = sorted({str(a) for a in addrs if a.version == fam})
                out.append(f"{ipkw} {key} {_set(mine)}")
        if l4 is not None:
            out.append("meta l4proto " + {6: "tcp", 17: "udp", 1: "icmp",
                                          58: "ipv6-icmp"}.get(l4, str(l4)))
        for key, ports in (("sport", rule.sport), ("dport", rule.dport)):
            if ports is not None:
                items = [str(a) if a == b else f"{a}-{b}" for a, b in parse_ports(ports, key)]
                out.append(f"th {key} {_set(items)}")
        if rule.icmp_type is not None:
            kw = "icmp" if l4 == 1 else "icmpv6"
            out.append(f"{kw} type {_set([str(t) for t in rule.icmp_type])}")
        if rule.tcp_flags is not None:
            mask, value = parse_flags(rule.tcp_flags)
            out.append(f"tcp flags & {mask:#x} == {value:#x}")
        if rule.state is not None:
            out.append(f"ct state {_set(list(rule.state))}")
        return out

    def limit(self, i: int, rule: Rule) -> Any:
        if rule.limit is None:
            return lambda fam: []
        rate = f"rate {nft_rate(rule.limit)} burst {rule.burst} packets"
        spec = f"limit {rate}"
        if rule.limit_per == "rule":
            self.objects.append(f"limit lim{i} {{ {rate} }}")
            return lambda fam: [f'limit name "lim{i}"']
        for fam in (4, 6):
            self.objects.append(f"set src{i}_{fam} {{ type ipv{fam}_addr; size 65535; "
                                f"flags dynamic,timeout; timeout 60s; }}")
        return lambda fam: [f"add @src{i}_{fam} {{ {'ip' if fam == 4 else 'ip6'} saddr "
                            f"{spec} }}"]

    def verdict(self, i: int, rule: Rule, l4: int | None) -> Any:
        if rule.action != "reject":
            return lambda fam: rule.action
        how = rule.reject_with
        if how == "tcp-reset" or (how is None and l4 == 6):
            return lambda fam: "reject with tcp reset"
        if how is None:
            icmp = "reject with icmpx port-unreachable"
        elif how in ICMPX:
            icmp = f"reject with icmpx {ICMPX[how]}"
        else:
            v4, v6 = PER_FAMILY[how]

            def icmp_of(fam: int) -> str:
                return f"reject with icmp {v4}" if fam == 4 else f"reject with icmpv6 {v6}"
            return icmp_of
        if l4 is None and how is None:
            # any protocol: a reset for TCP, port unreachable for the rest
            self.chains.append((f"reject{i}", ["meta l4proto tcp reject with tcp reset",
                                               icmp]))
            return lambda fam: f"jump reject{i}"
        return lambda fam: icmp


def compile_nft(opts: dict[str, Any] | FirewallOptions, outside: str = "out0",
                inside: str = "in0") -> str:
    """The nft ruleset (an ``inet`` table with a ``forward`` chain) equivalent to ``opts``
    in a router whose interface toward the network is ``outside`` and toward the
    protected host ``inside``."""
    return _Compiler(options_of(opts), outside, inside).run()


def sysctls(opts: dict[str, Any] | FirewallOptions) -> dict[str, str]:
    """The ``net.netfilter`` sysctls for the conntrack switches and timeouts of ``opts``."""
    fw = options_of(opts)
    out = {"net.netfilter.nf_conntrack_tcp_be_liberal": "1" if fw.liberal else "0",
           "net.netfilter.nf_conntrack_tcp_loose": "1" if fw.loose else "0"}
    for key, secs in sorted(fw.timeouts.items()):
        if key in TIMEOUT_SYSCTLS:
            out[f"net.netfilter.{TIMEOUT_SYSCTLS[key]}"] = str(max(1, round(secs)))
    return out


__all__ = ["REJECT_WITH", "Unsupported", "compile_nft", "nft_rate", "options_of", "sysctls"]
