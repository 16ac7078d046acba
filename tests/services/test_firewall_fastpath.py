"""firewall fast path, sans-IO: a firewall that takes it and one that never does agree on
every verdict, counter and tracked connection, whatever the traffic and the rules.

(``test_firewall_conntrack.py`` checks TCP window tracking the same way on the table
alone; here the whole service, with UDP's remembered decisions and rule changes.)
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from vtl.services.firewall import Firewall

from vtl import PASS, Direction
from vtl.testing import ServiceHarness

IN, OUT = Direction.TO_GUEST, Direction.TO_UPLINK
ETH = Ether(src="52:54:00:00:00:09", dst="52:54:00:00:00:02")  # (MACs given: no lookups)
G, F, G6, F6 = "10.80.0.2", "10.90.0.9", "fd80::2", "fd90::9"

RULES: list[list[dict[str, Any]]] = [
    [],
    [{"dir": "in", "proto": "udp", "dport": [53], "action": "accept"},
     {"dir": "out", "proto": "udp", "dport": [5353], "action": "drop"}],
    [{"dir": "both", "proto": "udp", "match": "udp[8] == 0x61", "action": "accept"},
     {"dir": "in", "proto": "udp", "action": "accept", "limit": "3/second", "burst": 2}],
    [{"dir": "out", "proto": "udp", "dport": ["5000-5999"], "action": "accept", "log": True},
     {"dir": "out", "proto": "udp", "action": "reject"},
     {"dir": "in", "proto": "udp", "sport": [53, 5353], "action": "accept"}],
]


# (v6, the guest's port, the far port): few, so that a trace meets each several times
FLOWS = [(False, 53, 53), (False, 40001, 5000), (True, 40002, 5353), (False, 40003, 9)]


def udp(out: bool, v6: bool, sport: int, dport: int, first: int, trim: int) -> bytes:
    """A UDP datagram from the guest (``out``) or toward it; ``trim`` bytes cut off the
    end of the frame (the IP length then claims more than there is)."""
    ip = (IPv6(src=G6, dst=F6) if out else IPv6(src=F6, dst=G6)) if v6 else \
        (IP(src=G, dst=F) if out else IP(src=F, dst=G))
    raw = bytes(ETH / ip / UDP(sport=sport, dport=dport) / (bytes([first]) + b"q" * 20))
    return raw[:len(raw) - trim]


def tcp_bad(out: bool, doff: int) -> bytes:
    """An ACK with a data offset the full path calls invalid (or a good one)."""
    ip = IP(src=G, dst=F) if out else IP(src=F, dst=G)
    return bytes(ETH / ip / TCP(sport=40000 if out else 80, dport=80 if out else 40000,
                                    flags="A", seq=1001 if out else 5001,
                                    ack=5001 if out else 1001, dataofs=doff))


packets = st.one_of(
    st.tuples(st.just("udp"), st.integers(0, len(FLOWS) - 1), st.booleans(),
              st.sampled_from([0x61, 0x62]), st.sampled_from([0, 0, 0, 3]),
              st.floats(0.0, 2.5)),
    st.tuples(st.just("tcp"), st.booleans(), st.sampled_from([5, 5, 2, 15])),
    st.tuples(st.just("rules"), st.integers(0, len(RULES) - 1)),
)


def state(h: ServiceHarness[Firewall]) -> tuple[Any, ...]:
    fw = h.service
    conns = sorted((c["proto"], c["src"], c["sport"], c["dst"], c["dport"], c["state"],
                    c["assured"], tuple(c["packets"]), tuple(c["bytes"]))
                   for c in fw.connections(h.now))
    return (conns, sorted(h.ctx.counters.extra.items()),  # type: ignore[attr-defined]
            [(r["packets"], r["bytes"], r["limited"]) for r in fw.rules.report()],
            sorted((k, round(v, 6)) for k, v in ((c.key, c.until) for _, c in
                                                 fw.ct.table.items())))


def start(rules: int, fast: bool) -> ServiceHarness[Firewall]:
    h = ServiceHarness(Firewall, {"default_in": "drop", "default_out": "accept",
                                  "rules": RULES[rules],
                                  "timeouts": {"udp": 2.0, "udp_stream": 5.0}})
    h.start(0.0)
    if not fast:
        h.service.ct.fast = lambda *a: None  # type: ignore[method-assign]
    # an established TCP flow for the malformed ACKs to aim at
    for frame, d in ((ETH / IP(src=G, dst=F) / TCP(sport=40000, dport=80, flags="S",
                                                        seq=1000), OUT),
                     (ETH / IP(src=F, dst=G) / TCP(sport=80, dport=40000, flags="SA",
                                                        seq=5000, ack=1001), IN),
                     (ETH / IP(src=G, dst=F) / TCP(sport=40000, dport=80, flags="A",
                                                        seq=1001, ack=5001), OUT)):
        assert h.send(bytes(frame), d) is PASS
    return h


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(RULES) - 1), st.lists(packets, min_size=1, max_size=40))
@example(1, [("udp", 0, False, 0x61, 0, 0.1)] * 2)  # a new flow accepted by a rule, twice
@example(0, [("udp", 1, True, 0x61, 0, 0.1), ("udp", 1, True, 0x61, 3, 0.1)])  # truncated
@example(0, [("udp", 1, out, 0x61, 0, dt) for out, dt in  # answered, then a stream, assured
             ((True, 0.1), (False, 0.5), (True, 0.5), (False, 0.5), (True, 0.7))])
@example(1, [("udp", 0, False, 0x61, 0, 0.1), ("rules", 1), ("udp", 0, False, 0x61, 0, 0.1)])
def test_the_fast_path_changes_nothing_but_the_cost(rules: int, trace: list[tuple]) -> None:
    fast, full = start(rules, True), start(rules, False)
    now = 0.0
    for step in trace:
        if step[0] == "rules":
            for h in (fast, full):
                h.service.retune(Firewall.Options(**{**h.service.options.model_dump(),
                                                     "rules": RULES[step[1]]}), now)
            continue
        if step[0] == "udp":
            _, flow, out, first, trim, dt = step
            v6, gport, fport = FLOWS[flow]
            now += dt
            frame = udp(out, v6, gport if out else fport, fport if out else gport, first, trim)
        else:
            frame, out = tcp_bad(step[1], step[2]), step[1]
        verdicts = [h.send(frame, OUT if out else IN, now=now) for h in (fast, full)]
        assert verdicts[0] is verdicts[1], step
        assert state(fast) == state(full), step


def test_a_one_way_udp_flow_takes_the_fast_path_under_plain_rules() -> None:
    for rules, decided in ((3, 10), (1, 1)):  # set 3 logs each packet; set 1 needs no rule
        h = start(rules, True)
        calls = []
        full = h.service.rules.decide

        def counting(*a: Any, full: Any = full, calls: list[Any] = calls) -> Any:
            calls.append(a)
            return full(*a)

        h.service.rules.decide = counting  # type: ignore[method-assign]
        for i in range(10):
            assert h.send(udp(True, False, 40001, 5000, 0x61, 0), OUT, now=0.1 * i) is PASS
        assert len(calls) == decided, rules
        assert h.ctx.counters.extra["accepted_new"] == 1 + 10  # the SYN in start(), then ours  # type: ignore[attr-defined]
