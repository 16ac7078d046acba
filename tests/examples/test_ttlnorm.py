"""The second sample plugin, examples/plugins/ttlnorm.py: sans-IO through vtl.testing's harness,
and loaded from a config into a real chain. scapy is the oracle for every checksum."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, Ether, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q
from scapy.packet import Raw
from vtl.bridge.chain import Chain
from vtl.bridge.config import parse_config

from vtl import PASS, Direction, Frame, Packet, VnetHeader
from vtl.errors import ConfigError
from vtl.frame import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
)
from vtl.testing import ServiceHarness

ROOT = Path(__file__).resolve().parents[2]
UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
G_MAC, R_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def frame(v6: bool = False, vlan: bool = False, ttl: int = 3, l4: str = "udp",
          sport: int = 40000, dst: str | None = None, payload: bytes = b"hello",
          options: bool = False):
    """A scapy frame from the guest: IPv4 or IPv6, UDP or TCP, maybe VLAN-tagged."""
    eth = Ether(src=G_MAC, dst=R_MAC)
    if vlan:
        eth = eth / Dot1Q(vlan=42)
    if v6:
        ip = IPv6(src="fd00::1", dst=dst or "fd00::2", hlim=ttl)
    else:
        ip = IP(src="10.0.0.1", dst=dst or "10.0.0.2", ttl=ttl,
                options=[IPOption_RR()] if options else [])
    t = UDP(sport=sport, dport=53) if l4 == "udp" else TCP(sport=sport, dport=80, flags="PA")
    return eth / ip / t / Raw(payload)


def ttl_of(p) -> int:
    return p[IPv6].hlim if IPv6 in p else p[IP].ttl


def checksums_ok(p) -> bool:
    """scapy recomputes every checksum of ``p``; True when the frame carried the same."""
    again = p.copy()
    for layer, fld in ((IP, "chksum"), (TCP, "chksum"), (UDP, "chksum")):
        if layer in again:
            setattr(again[layer], fld, None)
    again = Ether(bytes(again))
    return bytes(again) == bytes(p)


def harness(mod, **opts) -> ServiceHarness:
    h = ServiceHarness(mod.TtlNorm, **opts)
    h.start(0.0)
    return h


# -- what it does to frames -------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("vlan", [False, True], ids=["untagged", "vlan"])
@pytest.mark.parametrize("l4", ["udp", "tcp"])
def test_raises_a_low_ttl_and_checksums_stay_valid(ttlnorm, v6, vlan, l4):
    h = harness(ttlnorm, min_ttl=64)
    sent = frame(v6, vlan, ttl=3, l4=l4)
    before = bytes(sent)
    assert checksums_ok(Ether(before))
    assert h.send(sent, UP, 1.0) is PASS
    [out] = h.take(UP)
    assert not out.injected and out.packet.ip.ttl == 64
    p = out.scapy()
    assert ttl_of(p) == 64 and checksums_ok(p)
    assert (Dot1Q in p) is vlan and p[Dot1Q].vlan == 42 if vlan else True
    changed = [i for i, (a, b) in enumerate(zip(before, bytes(out.frame.data), strict=True))
               if a != b]
    l3 = 18 if vlan else 14
    allowed = {l3 + 7} if v6 else {l3 + 8, l3 + 10, l3 + 11}  # hop limit / TTL + header csum
    assert changed and set(changed) <= allowed
    assert h.extra("raised") == 1 and h.counters.frames_out == 1


@settings(max_examples=150, deadline=None)
@given(ttl=st.integers(0, 255), floor=st.integers(1, 255), v6=st.booleans(),
       vlan=st.booleans(), options=st.booleans())
def test_ttl_is_at_least_the_floor_and_never_lowered(ttlnorm, ttl, floor, v6, vlan, options):
    h = harness(ttlnorm, min_ttl=floor)
    h.send(frame(v6, vlan, ttl=ttl, options=options), UP, 0.0)
    [out] = h.take(UP)
    p = out.scapy()
    assert ttl_of(p) == max(ttl, floor) and checksums_ok(p)
    assert h.extra("raised") == (1 if ttl < floor else 0)
    assert len(h.service.flows) == h.extra("raised")


@pytest.mark.parametrize("sent", [
    frame(ttl=1, dst="224.0.0.251"),  # mDNS: TTL is a scope there
    frame(v6=True, ttl=1, dst="ff02::fb"),
    frame(ttl=1, dst="255.255.255.255"),
    Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.0.1", dst="10.0.0.255", ttl=1)
    / UDP(),  # subnet broadcast: only the MAC says so
    Ether(src=G_MAC, dst=R_MAC) / ARP(),
], ids=["mdns4", "mdns6", "broadcast", "subnet-broadcast", "arp"])
def test_leaves_groups_and_non_ip_alone(ttlnorm, sent):
    h = harness(ttlnorm)
    assert h.send(sent, UP, 0.0) is PASS
    assert [bytes(o.frame.data) for o in h.take(UP)] == [bytes(sent)]
    assert h.extra("raised") == 0 and len(h.service.flows) == 0


def test_frames_toward_the_guest_pass_untouched(ttlnorm):
    h = harness(ttlnorm)
    for v6 in (False, True):
        sent = frame(v6, ttl=2)
        assert h.send(sent, DOWN, 0.0) is PASS
        [out] = h.take(DOWN)
        assert bytes(out.frame.data) == bytes(sent)
    assert h.extra("raised") == 0


def gso_frame(v6: bool, vlan: bool) -> Frame:
    """A TCP super-frame as a guest's kernel hands it over a virtio port: partial checksum."""
    s = frame(v6, vlan, ttl=5, l4="tcp", payload=bytes(range(256)) * 20)
    raw = bytearray(bytes(s))
    t = Packet(raw).tcp
    assert t is not None
    f = Frame(raw, VnetHeader(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len=t.payload_offset, gso_size=1400, csum_start=t.off, csum_offset=16))
    Packet(f).fix_checksums()  # the pseudo-header sum only, as the guest leaves it
    return f


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("vlan", [False, True], ids=["untagged", "vlan"])
def test_offloaded_super_frame_segments_with_the_new_ttl(ttlnorm, v6, vlan):
    h = harness(ttlnorm, min_ttl=64)
    f = gso_frame(v6, vlan)
    vnet_before = f.vnet.pack()
    assert h.send(f, UP, 0.0) is PASS
    [out] = h.take(UP)
    assert out.frame is f and f.vnet.pack() == vnet_before  # offload metadata untouched
    segments = out.wire()
    assert len(segments) == -(-5120 // 1400)
    for p in segments:
        assert ttl_of(p) == 64 and checksums_ok(p)
    assert b"".join(bytes(p[TCP].payload) for p in segments) == bytes(range(256)) * 20


def test_malformed_ip_changes_nothing_and_the_failure_policy_decides(ttlnorm):
    h = ServiceHarness(ttlnorm.TtlNorm, fail="open")
    h.start(0.0)
    bad_ip = bytearray(bytes(frame(ttl=1)))
    bad_ip[16:18] = (4000).to_bytes(2, "big")  # total length beyond the frame
    bad_tcp = bytearray(bytes(frame(ttl=1, l4="tcp")))
    bad_tcp[14 + 20 + 12] = 0x20  # TCP data offset 2 words: shorter than a TCP header
    for bad in (bad_ip, bad_tcp):
        assert h.send(bytes(bad), UP, 0.0) is PASS
    assert [bytes(o.frame.data) for o in h.take(UP)] == [bytes(bad_ip), bytes(bad_tcp)]
    assert h.counters.malformed == 2 and h.counters.errors == 0
    assert h.extra("raised") == 0
    with pytest.raises(Exception, match="IPv4"):  # without a policy the error reaches the test
        harness(ttlnorm).send(bytes(bad_ip), UP, 0.0)


# -- per-flow state ---------------------------------------------------------------------------


def test_flows_are_counted_reported_and_age_out(ttlnorm):
    h = harness(ttlnorm, min_ttl=64, flow_timeout_s=30)
    for t, (sport, ttl) in enumerate([(1000, 3), (1000, 9), (2000, 7), (1000, 5)]):
        h.send(frame(sport=sport, ttl=ttl), UP, float(t))
    h.send(frame(v6=True, sport=3000, ttl=1), UP, 4.0)
    rep = h.report(4.0)
    assert rep["flows"] == 3 and rep["flows_inserted"] == 3 and rep["min_ttl"] == 64
    assert rep["top"][0] == "udp 10.0.0.1:1000 -> 10.0.0.2:53: raised 3, lowest ttl 3"
    assert "udp [fd00::1]:3000 -> [fd00::2]:53: raised 1, lowest ttl 1" in rep["top"]
    assert h.poll_at() == 32.0  # the flow of sport 2000 was last seen at 2.0
    h.advance(to=32.5)
    assert len(h.service.flows) == 2 and h.timers == [32.0]
    h.advance(to=40.0)
    assert h.report(40.0)["flows"] == 0 and h.report(40.0)["flows_expired"] == 3
    assert h.timers == [32.0, 33.0, 34.0] and h.poll_at() is None
    assert h.extra("raised") == 5


def test_the_flow_table_is_bounded(ttlnorm):
    h = harness(ttlnorm, max_flows=2)
    for i in range(10):
        h.send(frame(sport=5000 + i, ttl=1), UP, float(i))
    rep = h.report(10.0)
    assert rep["flows"] == 2 and rep["flows_evicted"] == 8
    assert [k.sport for k in h.service.flows] == [5008, 5009]  # the least recently used went
    h.stop(11.0)
    assert len(h.service.flows) == 0


@pytest.mark.parametrize("bad", [{"min_ttl": 0}, {"min_ttl": 256}, {"max_flows": 0},
                                 {"flow_timeout_s": 0}, {"ttl": 64}])
def test_invalid_options(ttlnorm, bad):
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
        ttlnorm.TtlNormOptions(**bad)


# -- loaded from a config, in a real chain ------------------------------------------------------

CONFIG = """
[ports.guest]
kind = "tap"
ifname = "vtl-t0"

[ports.uplink]
kind = "packet"
ifname = "eth9"

[[services]]
use = "examples/plugins/ttlnorm.py:TtlNorm"
min_ttl = 100
flow_timeout_s = 5

[[services]]
use = "examples/plugins/protocount.py:ProtoCount"
"""


def test_loaded_from_a_config_in_a_chain(ttlnorm):
    # relative to the config file's folder: a config at the repository's root
    cfg = parse_config(tomllib.loads(CONFIG), ROOT / "inline.toml")
    norm, count = cfg.services
    assert (norm.name, norm.options.min_ttl, norm.fail) == ("ttlnorm", 100, "open")
    assert norm.cls.__name__ == "TtlNorm" and count.cls.__name__ == "ProtoCount"
    chain = Chain(cfg.services, logging.getLogger("test.ttlnorm"))
    chain.start(0.0)
    bad = bytearray(bytes(frame(ttl=1)))
    bad[16:18] = (4000).to_bytes(2, "big")
    for i, f in enumerate([frame(ttl=1), frame(v6=True, vlan=True, ttl=99), frame(ttl=200),
                           bad]):
        chain.process(Frame(bytes(f)), UP, float(i))
    chain.process(Frame(bytes(frame(ttl=1))), DOWN, 4.0)
    out = [Ether(bytes(f.data)) for f in chain.out_uplink]
    assert [ttl_of(p) for p in out[:3]] == [100, 100, 200]
    assert all(checksums_ok(p) for p in out[:3])
    assert bytes(chain.out_uplink[3].data) == bytes(bad)  # malformed: passed as it was
    assert ttl_of(Ether(bytes(chain.out_guest[0].data))) == 1
    slot = chain.slots[0]
    assert slot.counters.malformed == 1 and slot.counters.errors == 0
    assert slot.counters.extra["raised"] == 2
    assert slot.report(4.0)["flows"] == 2
    assert chain.next_deadline() == pytest.approx(5.0)
    chain.run_timers(5.5)
    assert slot.report(5.5)["flows"] == 1  # the IPv4 flow (seen at 0.0) went, the IPv6 one stays
    assert chain.next_deadline() == pytest.approx(6.0)
    assert chain.slots[1].report(6.0)["to_uplink"]["ipv6/udp"] == 1
    chain.stop(7.0)


def test_a_config_with_a_bad_option_names_it():
    text = CONFIG.replace("min_ttl = 100", "min_ttl = 0")
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(text), ROOT / "inline.toml")
    assert any("min_ttl" in p for p in e.value.problems)
