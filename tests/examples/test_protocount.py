"""The sample third-party plugin examples/plugins/protocount.py, loaded from its file as a
config would load it (see conftest.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, Ether
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q

from vtl import PASS, Direction, Frame, Service
from vtl.testing import FakeContext, ServiceHarness

PLUGINS = Path(__file__).resolve().parents[2] / "examples" / "plugins"
UP = Direction.TO_UPLINK
DOWN = Direction.TO_GUEST


@pytest.fixture(scope="module")
def mod(protocount):
    return protocount


E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
CASES = [
    (E / ARP(), "arp"),
    (E / IP() / TCP(), "ipv4/tcp"),
    (E / IP() / UDP(), "ipv4/udp"),
    (E / IP() / ICMP(), "ipv4/icmp"),
    (E / IP(proto=47), "ipv4/other"),
    (E / Dot1Q(vlan=5) / IP() / UDP(), "ipv4/udp"),
    (E / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IP() / TCP(), "ipv4/tcp"),
    (E / IPv6() / TCP(), "ipv6/tcp"),
    (E / IPv6() / UDP(), "ipv6/udp"),
    (E / IPv6() / ICMPv6EchoRequest(), "ipv6/icmpv6"),
    (E / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / UDP(), "ipv6/udp"),
    (E / IPv6(nh=59), "ipv6/other"),
    (Ether(type=0x88CC) / b"lldp", "other"),
]


@pytest.mark.parametrize(("pkt", "expected"), CASES)
def test_classify(mod, pkt, expected):
    assert mod.classify(bytes(pkt)) == expected


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "other"), (bytes(13), "other"), (bytes(E / IP())[:20], "ipv4/other"),
    (bytes(E / IPv6())[:40], "ipv6/other"),
    (bytes(E / IPv6() / IPv6ExtHdrHopByHop() / UDP())[:56], "ipv6/other"),
])
def test_classify_truncated(mod, data, expected):
    assert mod.classify(data) == expected


def test_counts_per_direction_and_passes(mod):
    h = ServiceHarness(mod.ProtoCount, mod.ProtoCountOptions())
    svc = h.start(0.0)
    assert isinstance(svc, Service) and svc.name == "protocount"
    for i, (pkt, _) in enumerate(CASES):
        before = bytes(pkt)
        assert h.send(pkt, UP, 0.0) is PASS
        if i % 2:
            assert h.send(pkt, DOWN, 0.0) is PASS
        assert [bytes(o.frame.data) for o in h.take()] == [before] * (1 + i % 2)  # unchanged
    rep = h.report(0.0)
    assert rep["to_uplink"] == {"arp": 1, "ipv4/icmp": 1, "ipv4/other": 1, "ipv4/tcp": 2,
                                "ipv4/udp": 2, "ipv6/icmpv6": 1, "ipv6/other": 1,
                                "ipv6/tcp": 1, "ipv6/udp": 2, "other": 1}
    assert sum(rep["to_guest"].values()) == len(CASES) // 2
    assert h.ctx.emitted == [] and h.emitted() == []
    assert h.counters.frames_in == h.counters.frames_out == len(CASES) + len(CASES) // 2


def test_logs_a_summary_every_interval(mod, caplog):
    ctx = FakeContext("protocount")
    svc = mod.ProtoCount(mod.ProtoCountOptions(interval_s=5), ctx)
    assert svc.poll_at() is None  # not started yet
    svc.start(100.0)
    assert svc.poll_at() == 105.0
    svc.process(Frame(bytes(E / ARP())), UP, 101.0)
    with caplog.at_level(logging.INFO, logger=ctx.log.name):
        svc.on_timer(105.0)
        assert svc.poll_at() == 110.0
        svc.on_timer(142.0)  # called late: one line, next one interval later
        assert svc.poll_at() == 147.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "to_uplink: arp=1" in lines[0] and "to_guest: nothing" in lines[0]


def test_loads_through_the_bridge_like_a_config_would(mod):
    from vtl.bridge.plugins import load_file

    cls = load_file(f"{PLUGINS / 'protocount.py'}:ProtoCount")
    assert cls is mod.ProtoCount
    assert cls.name == "protocount"
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
        cls.Options(interval_s=0)
