"""The ``firewall`` service's options: rules, sets, defaults, conntrack and anti-spoofing.

The shape of a rule (tests and scripts rely on these names)::

    [[services.rules]]
    dir = "in"                     # in (toward the guest) | out (from it) | both
    proto = "tcp"                  # tcp | udp | icmp | icmpv6 | any, or a protocol number
    saddr = ["10.0.0.0/8", "@office"]   # prefixes (IPv4, IPv6) or named sets
    daddr = ["fd00::/64"]
    sport = [53]
    dport = [8000, "8080-8090"]    # ports and ranges
    icmp_type = [8]                # ICMP or ICMPv6 types
    tcp_flags = "syn,!ack"         # flags that must be set, !flags that must be clear
    state = ["new"]                # conntrack: new | established | related | invalid | untracked
    match = "ip[8] < 10"           # a libpcap filter expression
    action = "accept"              # accept | drop | reject
    reject_with = "tcp-reset"      # or icmp-port-unreachable, icmp-host-unreachable,
                                   # icmp-net-unreachable, icmp-admin-prohibited, ...
    limit = "10/second"            # the rule matches only within this rate (then falls
    burst = 5                      # through, as nft's limit does); per rule or per source
    limit_per = "rule"
    log = true                     # rate-limited log lines, with a prefix
    log_prefix = "fw-ssh "
    name = "web"                   # for counters and control requests
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vtl import ServiceOptions

Action = Literal["accept", "drop", "reject"]
State = Literal["new", "established", "related", "invalid", "untracked"]
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "any": None}
TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20,
             "ecn": 0x40, "cwr": 0x80}
#: reject_with -> (ICMPv4 type, code, ICMPv6 type, code); tcp-reset is separate
REJECT_WITH = {
    "icmp-port-unreachable": (3, 3, 1, 4),
    "icmp-host-unreachable": (3, 1, 1, 3),
    "icmp-net-unreachable": (3, 0, 1, 0),
    "icmp-proto-unreachable": (3, 2, 4, 1),
    "icmp-admin-prohibited": (3, 13, 1, 1),
    "icmp-host-prohibited": (3, 10, 1, 1),
    "icmp-net-prohibited": (3, 9, 1, 1),
}
TIMEOUTS = {  # the kernel's defaults (seconds)
    "tcp_syn_sent": 120, "tcp_syn_recv": 60, "tcp_established": 432000, "tcp_fin_wait": 120,
    "tcp_close_wait": 60, "tcp_last_ack": 30, "tcp_time_wait": 120, "tcp_close": 10,
    "tcp_syn_sent2": 120, "tcp_retrans": 300, "tcp_unack": 300,
    "udp": 30, "udp_stream": 120, "icmp": 30, "icmpv6": 30, "generic": 600,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(second|minute|hour|day)\s*$")
_PER = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_ports(items: list[int | str], key: str) -> list[tuple[int, int]]:
    """``[80, "8080-8090"]`` -> ``[(80, 80), (8080, 8090)]``; ValueError naming ``key``."""
    out = []
    for item in items:
        if isinstance(item, int):
            lo = hi = item
        else:
            a, sep, b = str(item).partition("-")
            try:
                lo, hi = int(a), int(b if sep else a)
            except ValueError:
                raise ValueError(f"{key}: {item!r} is not a port or a range PORT-PORT") from None
        if not 0 <= lo <= hi <= 65535:
            raise ValueError(f"{key}: {item!r} is not a port range within 0..65535")
        out.append((lo, hi))
    return out


def parse_flags(text: str) -> tuple[int, int]:
    """``"syn,!ack"`` -> (mask, value): flags in the mask must equal the value."""
    mask = value = 0
    for word in (w.strip().lower() for w in text.split(",") if w.strip()):
        neg = word.startswith("!")
        bit = TCP_FLAGS.get(word.lstrip("!"))
        if bit is None:
            raise ValueError(f"tcp_flags: unknown flag {word!r} (know {', '.join(TCP_FLAGS)})")
        mask |= bit
        if not neg:
            value |= bit
    return mask, value


def parse_rate(text: str) -> float:
    """``"10/second"`` -> 10.0 per second."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"limit: {text!r} is not N/second, N/minute, N/hour or N/day")
    return float(m.group(1)) / _PER[m.group(2)]


class Rule(BaseModel):
    """One rule; the first that matches a frame decides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = Field(None, description="a name for counters and control requests")
    dir: Literal["in", "out", "both"] = Field("both", description="in: toward the guest; "
                                                                  "out: from it")
    proto: str | int = Field("any", description="tcp, udp, icmp, icmpv6, any or a number")
    saddr: list[str] | None = Field(None, description="source prefixes or @sets")
    daddr: list[str] | None = Field(None, description="destination prefixes or @sets")
    sport: list[int | str] | None = Field(None, description="source ports and ranges")
    dport: list[int | str] | None = Field(None, description="destination ports and ranges")
    icmp_type: list[int] | None = Field(None, description="ICMP / ICMPv6 types")
    tcp_flags: str | None = Field(None, description='e.g. "syn,!ack"')
    state: list[State] | None = Field(None, description="conntrack states")
    match: str | None = Field(None, description="a libpcap filter expression")
    action: Action = Field(description="accept, drop or reject")
    reject_with: str | None = Field(None, description="tcp-reset or an icmp-* code")
    limit: str | None = Field(None, description='"N/second" (minute, hour, day)')
    burst: int = Field(5, ge=1, le=1_000_000, description="the limit's burst")
    limit_per: Literal["rule", "source"] = Field("rule", description="one budget, or one "
                                                                     "per source address")
    log: bool = Field(False, description="log matches (rate-limited)")
    log_prefix: str = Field("", max_length=64, description="the log line's prefix")

    @field_validator("proto")
    @classmethod
    def _proto(cls, v: str | int) -> str | int:
        if isinstance(v, int):
            if not 0 <= v <= 255:
                raise ValueError(f"proto: {v} is not 0..255")
        elif v not in PROTOS:
            raise ValueError(f"proto: {v!r} is not one of {', '.join(PROTOS)} or a number")
        return v

    @field_validator("sport", "dport")
    @classmethod
    def _ports(cls, v: list[int | str] | None, info: object) -> list[int | str] | None:
        if v is not None:
            parse_ports(v, getattr(info, "field_name", "port"))
        return v

    @field_validator("tcp_flags")
    @classmethod
    def _flags(cls, v: str | None) -> str | None:
        if v is not None:
            parse_flags(v)
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: str | None) -> str | None:
        if v is not None:
            parse_rate(v)
        return v

    @field_validator("reject_with")
    @classmethod
    def _reject_with(cls, v: str | None) -> str | None:
        if v is not None and v != "tcp-reset" and v not in REJECT_WITH:
            raise ValueError(f"reject_with: {v!r} is not tcp-reset or one of "
                             f"{', '.join(REJECT_WITH)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if (self.sport or self.dport) and self.proto not in ("tcp", "udp", 6, 17, 132, 33):
            raise ValueError("sport/dport: need proto tcp or udp")
        if self.tcp_flags and self.proto not in ("tcp", 6):
            raise ValueError("tcp_flags: need proto tcp")
        if self.icmp_type and self.proto not in ("icmp", "icmpv6", 1, 58):
            raise ValueError("icmp_type: need proto icmp or icmpv6")
        if self.reject_with == "tcp-reset" and self.proto not in ("tcp", 6):
            raise ValueError("reject_with: tcp-reset needs proto tcp")
        if self.reject_with and self.action != "reject":
            raise ValueError("reject_with: only with action reject")
        return self


class FirewallOptions(ServiceOptions):
    """Options of the ``firewall`` service."""

    default_in: Action = Field("drop", description="toward the guest, when no rule matches")
    default_out: Action = Field("accept", description="from the guest, when no rule matches")
    rules: list[Rule] = Field(default_factory=list, description="ordered; the first match "
                                                                 "decides")
    sets: dict[str, list[str]] = Field(default_factory=dict, description="named sets of "
                                                                         "prefixes (@name)")
    established: bool = Field(True, description="accept established and related traffic "
                                                "before the rules (nft's usual first rule)")
    invalid: Literal["drop", "accept", "rules"] = Field(
        "drop", description="what happens to invalid packets: dropped before the rules, "
                            "accepted, or left to the rules (state = [\"invalid\"])")
    allow_arp_nd: bool = Field(True, description="ARP and IPv6 neighbour discovery pass, "
                                                 "outside conntrack")
    liberal: bool = Field(False, description="only out-of-window RSTs are invalid "
                                             "(nf_conntrack_tcp_be_liberal)")
    loose: bool = Field(True, description="pick up TCP connections mid-stream "
                                          "(nf_conntrack_tcp_loose)")
    max_entries: int = Field(65536, ge=16, le=10_000_000, description="tracked flows at most; "
                                                                      "non-assured go first")
    timeouts: dict[str, float] = Field(default_factory=dict,
                                       description="conntrack timeouts in seconds, by the "
                                                   "kernel's names (tcp_established, udp ...)")
    log_rate: float = Field(5.0, gt=0, description="log lines per second at most")
    guest_macs: list[str] = Field(default_factory=list, description="anti-spoofing: the MACs "
                                                                    "the guest may send from")
    guest_ips: list[str] = Field(default_factory=list, description="anti-spoofing: the "
                                                                   "addresses it may use")
    learn_guest: bool = Field(False, description="anti-spoofing: learn the guest's MAC and "
                                                 "addresses from its first DHCP/ARP")
    block_servers: bool = Field(True, description="anti-spoofing on: drop DHCP-server and "
                                                  "router-advertisement traffic from the guest")

    @field_validator("timeouts")
    @classmethod
    def _timeouts(cls, v: dict[str, float]) -> dict[str, float]:
        for k, t in v.items():
            if k not in TIMEOUTS:
                raise ValueError(f"timeouts: unknown {k!r} (know {', '.join(TIMEOUTS)})")
            if not 0 < t <= 10 * 432000:
                raise ValueError(f"timeouts.{k}: {t} is not a positive number of seconds")
        return v

    @field_validator("sets")
    @classmethod
    def _sets(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, items in v.items():
            for i, p in enumerate(items):
                try:
                    ipaddress.ip_network(p, strict=False)
                except ValueError:
                    raise ValueError(f"sets.{name}[{i}]: {p!r} is not a prefix") from None
        return v

    @field_validator("guest_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for i, a in enumerate(v):
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ValueError(f"guest_ips[{i}]: {a!r} is not an address") from None
        return v

    @field_validator("guest_macs")
    @classmethod
    def _macs(cls, v: list[str]) -> list[str]:
        for i, m in enumerate(v):
            if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", m):
                raise ValueError(f"guest_macs[{i}]: {m!r} is not a MAC address")
        return v

    @model_validator(mode="after")
    def _refs(self) -> FirewallOptions:
        for i, rule in enumerate(self.rules):
            for key in ("saddr", "daddr"):
                for j, item in enumerate(getattr(rule, key) or []):
                    if item.startswith("@"):
                        if item[1:] not in self.sets:
                            raise ValueError(f"rules[{i}].{key}[{j}]: no set {item[1:]!r}")
                        continue
                    try:
                        ipaddress.ip_network(item, strict=False)
                    except ValueError:
                        raise ValueError(f"rules[{i}].{key}[{j}]: {item!r} is not a prefix "
                                         "or @set") from None
        return self
