"""firewall rules: the per-protocol and per-port index picks the rule a full scan would."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vtl.services.firewall.options import FirewallOptions
from vtl.services.firewall.parse import Parsed
from vtl.services.firewall.rules import MAX_INDEXED_PORTS, Index, RuleSet

PORTS = st.integers(0, 40)


@st.composite
def rule(draw: st.DrawFn) -> dict[str, object]:
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "any", 47]))
    r: dict[str, object] = {"proto": proto, "dir": draw(st.sampled_from(["in", "out", "both"])),
                            "action": draw(st.sampled_from(["accept", "drop", "reject"]))}
    if proto in ("tcp", "udp") and draw(st.booleans()):
        r["dport"] = draw(st.lists(st.one_of(PORTS, st.tuples(PORTS, PORTS).map(
            lambda t: f"{min(t)}-{max(t)}")), min_size=1, max_size=3))
    return r


@st.composite
def packet(draw: st.DrawFn) -> Parsed:
    p = Parsed()
    p.proto = draw(st.sampled_from([6, 17, 1, 47, 58]))
    p.dport = draw(PORTS)
    p.frag = draw(st.sampled_from([0, 0, 1, 2]))
    p.src, p.dst = bytes(4), bytes(4)
    return p


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rule(), max_size=12), st.lists(packet(), min_size=1, max_size=10))
def test_the_index_agrees_with_a_full_scan(rules: list[dict[str, object]],
                                           packets: list[Parsed]) -> None:
    rs = RuleSet(FirewallOptions(rules=rules), lambda e: lambda d: True)
    for inbound in (True, False):
        index = rs.rules_in if inbound else rs.rules_out
        for p in packets:
            cands = index.candidates(p)
            first = next((c.index for c in cands if c.matches(b"", p, "new", 0.0)), None)
            scan = next((c.index for c in index.rules if c.matches(b"", p, "new", 0.0)), None)
            assert first == scan
            assert [c.index for c in cands] == sorted(c.index for c in cands), "in order"


def test_too_wide_ranges_are_not_spelled_out() -> None:
    wide = [{"proto": "tcp", "dport": [f"1-{MAX_INDEXED_PORTS // 2}"], "action": "drop"},
            {"proto": "tcp", "dport": [f"2-{MAX_INDEXED_PORTS // 2 + 2}"], "action": "drop"}]
    rs = RuleSet(FirewallOptions(rules=wide), lambda e: lambda d: True)
    assert isinstance(rs.rules_in, Index) and rs.rules_in.by_port == {}
    p = Parsed()
    p.proto, p.dport = 6, 7
    assert [c.index for c in rs.rules_in.candidates(p)] == [0, 1]
