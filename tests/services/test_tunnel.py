"""tunnel, sans-IO: encapsulation toward peers, decapsulation toward the guest, the
router's work (TTL, MSS, too big), resolution through the tunnel, config errors,
bounds and hostile datagrams."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6PacketTooBig,
    IPv6,
)
from scapy.layers.l2 import ARP, Ether
from vtl.services.tunnel import Tunnel
from vtl.services.tunnel.peers import StaticPeers, parse_endpoint
from vtl.services.tunnel.wire import vxlan_header

from vtl import CONSUMED, PASS, Direction, Frame, VnetHeader
from vtl.packet.addr import mac_bytes
from vtl.packet.packet import Packet, verify_checksums
from vtl.testing import ServiceHarness

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
VM_A, GW_A_MAC = "52:54:00:00:0a:0a", "02:00:00:00:0a:01"
VM_B = "52:54:00:00:0b:14"
A_IP, B_IP, GW_A = "10.61.1.10", "10.62.2.20", "10.61.1.1"
A6, B6, GW_A6 = "fd61::10", "fd62::20", "fd61::1"
PEER = ("10.63.0.2", 4789)
OPTS = {"local": "10.63.0.1", "vni": 42, "gateway": [GW_A, GW_A6], "datapath": "socket",
        "peers": [{"prefix": "10.62.2.0/24", "remote": "10.63.0.2"},
                  {"prefix": "fd62::/64", "remote": "10.63.0.2"}]}


def harness(**kw: object) -> ServiceHarness[Tunnel]:
    h = ServiceHarness(Tunnel, {**OPTS, **kw})
    h.start(0.0)
    return h


def to_b(payload: bytes = b"x" * 100, **ip: object) -> bytes:
    return bytes(Ether(src=VM_A, dst=GW_A_MAC) / IP(src=A_IP, dst=B_IP, **ip)
                 / TCP(sport=40000, dport=5001, flags="A") / payload)


def datagram(inner: bytes, vni: int = 42) -> bytes:
    return vxlan_header(vni) + inner


def sent(h: ServiceHarness[Tunnel]) -> list[tuple[Ether, tuple[str, int]]]:
    """What went into the tunnel: (inner frame, destination); the header checked."""
    out = []
    for data, dest in h.ctx.datagrams[0].sent:
        assert data[:8] == vxlan_header(42)
        out.append((Ether(data[8:]), dest))
    return out


def resolve_b(h: ServiceHarness[Tunnel], now: float = 0.5) -> None:
    """The far side answers the ARP request the service sent for VM-B."""
    reply = Ether(src=VM_B, dst=VM_A) / ARP(op=2, hwsrc=VM_B, psrc=B_IP, hwdst=VM_A, pdst=A_IP)
    h.advance(now)
    h.ctx.datagrams[0].deliver(datagram(bytes(reply)), ("10.63.0.2", 51234), now)


def test_traffic_to_other_destinations_passes_untouched() -> None:
    h = harness()
    frame = bytes(Ether(src=VM_A, dst=GW_A_MAC) / IP(src=A_IP, dst="192.0.2.7") / UDP())
    assert h.send(frame, UP) is PASS
    assert bytes(h.take()[0].frame.data) == frame
    back = bytes(Ether(src=GW_A_MAC, dst=VM_A) / IP(src="192.0.2.7", dst=A_IP) / UDP())
    assert h.send(back, DOWN) is PASS
    assert h.ctx.datagrams[0].sent == []
    assert h.ctx.datagrams[0].request.host == "10.63.0.1"
    assert h.ctx.datagrams[0].request.port == 4789


def test_first_frame_waits_for_the_far_side_to_answer_then_goes_with_its_mac() -> None:
    h = harness()
    assert h.send(to_b(), UP) is CONSUMED
    [(ask, dest)] = sent(h)
    assert dest == PEER
    assert ask[ARP].op == 1 and ask[ARP].pdst == B_IP
    assert ask[ARP].psrc == A_IP and ask[ARP].hwsrc == VM_A  # asked as the guest
    resolve_b(h)
    [_, (inner, _)] = sent(h)
    assert inner.dst == VM_B and inner.src == VM_A
    assert inner[IP].ttl == 63  # the bypassed router's decrement
    assert verify_checksums(Packet(bytes(inner)))
    # the answer is delivered to the guest too (it ignores answers it did not ask for)
    assert [o.packet.arp is not None for o in h.take(DOWN)] == [True]
    # from now on at once
    h.send(to_b(b"y" * 10), UP)
    assert sent(h)[-1][0].dst == VM_B
    assert h.service.peers.peers()[0].encapsulated == 3  # the question and two frames


def test_decapsulated_frames_come_from_the_gateway_to_the_vm() -> None:
    h = harness()
    h.send(to_b(), UP)  # teaches VM-A's MAC and the gateway's
    inner = Ether(src=VM_B, dst="02:00:00:00:0b:01") / IP(src=B_IP, dst=A_IP, ttl=63) / \
        TCP(sport=5001, dport=40000, flags="A") / b"reply"
    h.ctx.datagrams[0].deliver(datagram(bytes(inner)), ("10.63.0.2", 40001), 0.1)
    [out] = h.take(DOWN)
    e = Ether(bytes(out.frame.data))
    assert e.src == GW_A_MAC and e.dst == VM_A
    assert e[IP].ttl == 63 and bytes(e[TCP].payload) == b"reply"
    assert verify_checksums(out.packet)
    assert h.service.peers.peers()[0].decapsulated == 1
    assert h.service.resolver.lookup(bytes([10, 62, 2, 20]), 0.2) == mac_bytes(VM_B)


@pytest.mark.parametrize("case,counter", [
    ("unknown", "unknown_peer"), ("vni", "bad_vni"), ("flags", "bad_flags"),
    ("short", "malformed"), ("spoofed", "spoofed"), ("other", "other_dropped")])
def test_hostile_datagrams_are_counted_and_never_reach_the_guest(case: str,
                                                                  counter: str) -> None:
    h = harness()
    inner = bytes(Ether(src=VM_B, dst=VM_A) / IP(src=B_IP, dst=A_IP) / UDP() / b"z")
    source = ("10.63.0.2", 4789)
    data = datagram(inner)
    if case == "unknown":
        source = ("10.63.0.99", 4789)
    elif case == "vni":
        data = datagram(inner, vni=43)
    elif case == "flags":
        data = b"\x00" + data[1:]
    elif case == "short":
        data = data[:15]
    elif case == "spoofed":
        data = datagram(bytes(Ether(src=VM_B, dst=VM_A) / IP(src="10.61.1.99", dst=A_IP) / UDP()))
    elif case == "other":
        data = datagram(bytes(Ether(src=VM_B, dst=VM_A, type=0x88B5) / (b"\0" * 50)))
    h.ctx.datagrams[0].deliver(data, source, 0.1)
    assert h.take(DOWN) == []
    assert h.extra(counter) == 1


def test_syn_mss_is_clamped_both_ways() -> None:
    h = harness()
    syn = bytes(Ether(src=VM_A, dst=GW_A_MAC) / IP(src=A_IP, dst=B_IP)
                / TCP(sport=40000, dport=5001, flags="S", options=[("MSS", 1460), ("NOP", None),
                                                                   ("WScale", 7)]))
    h.send(syn, UP)
    resolve_b(h)
    inner = sent(h)[-1][0]
    assert dict(inner[TCP].options)["MSS"] == 1410
    assert verify_checksums(Packet(bytes(inner)))
    synack = Ether(src=VM_B, dst=VM_A) / IP(src=B_IP, dst=A_IP) / \
        TCP(sport=5001, dport=40000, flags="SA", options=[("MSS", 1460)])
    h.ctx.datagrams[0].deliver(datagram(bytes(synack)), ("10.63.0.2", 4789), 1.0)
    out = [o for o in h.take(DOWN) if o.packet.tcp is not None][0]
    assert dict(Ether(bytes(out.frame.data))[TCP].options)["MSS"] == 1410
    assert verify_checksums(out.packet)
    assert h.extra("mss_clamped") == 2


def test_too_big_with_df_gets_fragmentation_needed_from_the_gateway() -> None:
    h = harness()
    big = to_b(b"x" * 1472, flags="DF")  # 1512-byte IP packet
    assert h.send(big, UP) is CONSUMED
    [err] = h.emitted(DOWN)
    e = Ether(bytes(err.data))
    assert e[IP].src == GW_A and e[IP].dst == A_IP
    assert e[ICMP].type == 3 and e[ICMP].code == 4 and e[ICMP].nexthopmtu == 1450
    assert h.ctx.datagrams[0].sent == [] and h.extra("too_big_sent") == 1
    # without DF the packet goes (the outer packet may be fragmented by the host)
    h.send(to_b(b"x" * 1472), UP)
    assert len(h.ctx.datagrams[0].sent) == 1  # the ARP request; the frame waits


def test_ipv6_too_big_gets_packet_too_big() -> None:
    h = harness()
    big = bytes(Ether(src=VM_A, dst=GW_A_MAC) / IPv6(src=A6, dst=B6) / UDP() / (b"x" * 1420))
    h.send(big, UP)
    [err] = h.emitted(DOWN)
    e = Ether(bytes(err.data))
    assert e[IPv6].src == GW_A6 and e[ICMPv6PacketTooBig].mtu == 1450


def test_ttl_one_expires_at_the_gateway() -> None:
    h = harness()
    h.send(to_b(ttl=1), UP)
    [err] = h.emitted(DOWN)
    e = Ether(bytes(err.data))
    assert e[IP].src == GW_A and e[ICMP].type == 11
    assert h.extra("ttl_expired") == 1
    h2 = harness(ttl_decrement=False)
    h2.send(to_b(ttl=1), UP)
    assert h2.emitted(DOWN) == []


def test_a_gso_frame_is_cut_to_the_tunnel_mtu() -> None:
    h = harness()
    h.send(to_b(b"a"), UP)
    resolve_b(h)
    payload = bytes(range(256)) * 40  # 10240 bytes
    raw = bytearray(to_b(payload, flags="DF"))
    frame = Frame(raw, VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1398,
                                  csum_start=34, csum_offset=16))
    assert h.send(frame, UP) is CONSUMED
    segs = [e for e, _ in sent(h)[2:]]
    assert len(segs) == 8
    assert all(len(e[IP]) <= 1450 for e in segs)
    assert b"".join(bytes(e[TCP].payload) for e in segs) == payload
    assert all(verify_checksums(Packet(bytes(e))) for e in segs)
    assert all(e.dst == VM_B and e[IP].ttl == 63 for e in segs)
    assert h.extra("segmented") == 1
    sock = h.ctx.datagrams[0]
    assert sock.trains == [8], "the segments went out in one train"
    peer = h.service.peers.peers()[0]
    assert peer.encapsulated == 10 and peer.send_failed == 0
    assert peer.encapsulated_bytes == sum(len(d) - 8 for d, _ in sock.sent)


def gso_frame(payload: bytes) -> Frame:
    return Frame(bytearray(to_b(payload, flags="DF")),
                 VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1398, csum_start=34,
                            csum_offset=16))


def test_a_gso_frame_waiting_for_the_mac_goes_out_once_it_is_learnt() -> None:
    h = harness()
    payload = bytes(range(256)) * 16  # 4096 bytes: 3 segments
    assert h.send(gso_frame(payload), UP) is CONSUMED
    asked = sent(h)
    assert len(asked) == 1 and ARP in asked[0][0], "only the question went out"
    assert h.ctx.datagrams[0].trains == []
    resolve_b(h)
    segs = [e for e, _ in sent(h)[1:]]
    assert b"".join(bytes(e[TCP].payload) for e in segs) == payload
    assert all(e.dst == VM_B for e in segs)


def test_a_train_that_is_not_sent_counts_each_segment() -> None:
    h = harness()
    h.send(to_b(b"a"), UP)
    resolve_b(h)
    h.ctx.datagrams[0].fail_sends = True
    assert h.send(gso_frame(bytes(4096)), UP) is CONSUMED
    assert h.extra("send_failed") == 3
    peer = h.service.peers.peers()[0]
    assert peer.send_failed == 3 and peer.encapsulated == 2


def test_answer_arp_and_nd_for_a_site_without_a_gateway() -> None:
    h = harness(answer_arp=True)
    who = Ether(src=VM_A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=VM_A, psrc=A_IP, pdst=GW_A)
    assert h.send(bytes(who), UP) is CONSUMED
    [ans] = h.emitted(DOWN)
    assert Ether(bytes(ans.data))[ARP].hwsrc == "02:76:74:6c:00:01"
    ns = Ether(src=VM_A, dst="33:33:ff:00:00:01") / IPv6(src=A6, dst="ff02::1:ff00:1", hlim=255) \
        / ICMPv6ND_NS(tgt=GW_A6)
    assert h.send(bytes(ns), UP) is CONSUMED
    na = Ether(bytes(h.emitted(DOWN)[-1].data))
    assert na[ICMPv6ND_NA].tgt == GW_A6 and na[ICMPv6ND_NA].R == 1
    # and frames from the tunnel come from that MAC
    h.send(to_b(), UP)
    h.ctx.datagrams[0].deliver(datagram(bytes(Ether(src=VM_B, dst=VM_A) / IP(src=B_IP, dst=A_IP)
                                              / UDP())), PEER, 0.1)
    assert Ether(bytes(h.emitted(DOWN)[-1].data)).src == "02:76:74:6c:00:01"


def test_ipv6_resolution_by_solicitation_through_the_tunnel() -> None:
    h = harness()
    frame = bytes(Ether(src=VM_A, dst=GW_A_MAC) / IPv6(src=A6, dst=B6) / UDP() / b"v6")
    h.send(frame, UP)
    [(ns, _)] = sent(h)
    assert ns[ICMPv6ND_NS].tgt == B6 and ns[IPv6].src == A6 and ns[IPv6].hlim == 255
    assert verify_checksums(Packet(bytes(ns)))
    na = Ether(src=VM_B, dst=VM_A) / IPv6(src=B6, dst=A6, hlim=255) / \
        ICMPv6ND_NA(tgt=B6, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=VM_B)
    h.ctx.datagrams[0].deliver(datagram(bytes(na)), PEER, 0.2)
    inner = sent(h)[-1][0]
    assert inner.dst == VM_B and inner[IPv6].hlim == 63


def test_guest_answers_about_its_addresses_go_through_the_tunnel() -> None:
    h = harness()
    # the far VM asks for VM-A; the question reaches the guest, the answer goes back
    ask = Ether(src=VM_B, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=VM_B, psrc=B_IP, pdst=A_IP)
    h.ctx.datagrams[0].deliver(datagram(bytes(ask)), PEER, 0.1)
    assert Ether(bytes(h.emitted(DOWN)[0].data))[ARP].pdst == A_IP
    answer = Ether(src=VM_A, dst=VM_B) / ARP(op=2, hwsrc=VM_A, psrc=A_IP, hwdst=VM_B, pdst=B_IP)
    assert h.send(bytes(answer), UP) is CONSUMED
    assert sent(h)[-1][0][ARP].op == 2
    # and the question taught VM-B's MAC: no resolution needed
    h.send(to_b(), UP)
    assert sent(h)[-1][0].dst == VM_B


def test_unanswered_resolution_drops_the_waiting_frames_after_a_while() -> None:
    h = harness()
    for i in range(12):
        h.send(to_b(bytes([i])), UP, now=i * 0.1)
    asks = [e for e, _ in sent(h) if ARP in e]
    assert len(asks) == 2  # at 0 and after a second
    assert len(h.service.resolver.waiting[bytes([10, 62, 2, 20])].frames) == 8
    h.advance(5.0)
    assert not h.service.resolver.waiting
    assert h.extra("unresolved_dropped") == 12


def test_two_sites_talk_through_their_services() -> None:
    """Site A's and site B's services wired datagram to datagram: a round trip."""
    a = harness()
    b = ServiceHarness(Tunnel, {"local": "10.63.0.2", "vni": 42, "gateway": ["10.62.2.1"],
                                "datapath": "socket",
                                "peers": [{"prefix": "10.61.1.0/24", "remote": "10.63.0.1"}]})
    b.start(0.0)

    def carry(src: ServiceHarness[Tunnel], dst: ServiceHarness[Tunnel], frm: str,
              now: float) -> None:
        for data, _ in src.ctx.datagrams[0].sent:
            dst.ctx.datagrams[0].deliver(data, (frm, 4789), now)
        src.ctx.datagrams[0].sent.clear()

    a.send(to_b(b"hello"), UP, now=0.1)
    carry(a, b, "10.63.0.1", 0.1)  # the ARP request reaches VM-B
    [ask] = b.take(DOWN)
    assert ask.packet.arp is not None
    b.send(bytes(Ether(src=VM_B, dst=VM_A) / ARP(op=2, hwsrc=VM_B, psrc=B_IP, hwdst=VM_A,
                                                   pdst=A_IP)), UP, now=0.2)
    carry(b, a, "10.63.0.2", 0.2)  # the answer releases the frame
    carry(a, b, "10.63.0.1", 0.3)
    got = [o for o in b.take(DOWN) if o.packet.tcp is not None]
    assert bytes(Ether(bytes(got[0].frame.data))[TCP].payload) == b"hello"
    assert Ether(bytes(got[0].frame.data)).dst == VM_B


@pytest.mark.parametrize("kw,key", [
    ({"local": "10.63.0"}, "local"),
    ({"peers": [{"prefix": "10.62.2.0/33", "remote": "10.63.0.2"}]}, "peers[0].prefix"),
    ({"peers": [{"prefix": "10.62.2.0/24", "remote": "fd63::2"}]}, "peers"),
    ({"gateway": [GW_A]}, "gateway: no IPv6"),
    ({"gateway": ["gw"]}, "gateway[0]"),
    ({"vni": 1 << 24}, "vni"),
    ({"peers": [{"prefix": "10.62.2.0/24", "remote": "10.63.0.2", "port": 1}]}, "port"),
])
def test_bad_config_names_the_key(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as e:
        Tunnel.Options(**{**OPTS, **kw})
    assert key in str(e.value)


def test_peer_table_longest_prefix_and_endpoints() -> None:
    t = StaticPeers([("10.0.0.0/8", "192.0.2.1", None), ("10.1.0.0/16", "192.0.2.2:5000", None),
                     ("fd00::/8", "192.0.2.1", None)])
    assert t.route(4, bytes([10, 1, 2, 3])).remote == ("192.0.2.2", 5000)
    assert t.route(4, bytes([10, 2, 2, 3])).remote == ("192.0.2.1", 4789)
    assert t.route(4, bytes([11, 0, 0, 1])) is None
    assert t.route(6, bytes([0xFD]) + bytes(15)).remote == ("192.0.2.1", 4789)
    assert len(t.peers()) == 2
    assert t.by_source("192.0.2.2").name == "192.0.2.2:5000"
    assert parse_endpoint("[fd63::1]:4790", "local") == ("fd63::1", 4790)
    with pytest.raises(ValueError, match="local"):
        parse_endpoint("[fd63::1", "local")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=200), st.sampled_from(["10.63.0.2", "10.63.0.9"]))
def test_random_datagrams_never_raise(tail: bytes, source: str) -> None:
    h = harness()
    h.send(to_b(), UP)
    for data in (tail, vxlan_header(42) + tail,
                 vxlan_header(42) + bytes(Ether(src=VM_B, dst=VM_A) / IP(src=B_IP, dst=A_IP))[:14]
                 + tail):
        h.ctx.datagrams[0].deliver(data, (source, 4789), 0.1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=120), st.sampled_from([0x0800, 0x86DD, 0x0806]))
def test_random_frames_from_the_guest_never_raise(tail: bytes, et: int) -> None:
    h = harness(answer_arp=True)
    head = bytes(Ether(src=VM_A, dst=GW_A_MAC, type=et))
    body = bytearray(tail)
    if et == 0x0800 and len(body) >= 20:
        body[16:20] = bytes([10, 62, 2, 20])  # toward the peer
    h.send(head + bytes(body), UP)
    h.send(head + bytes(body), DOWN)


def test_neighbour_answers_go_by_destination_and_link_local_probes_are_answered_here() -> None:
    h = harness()
    h.send(bytes(Ether(src=VM_A, dst=GW_A_MAC) / IPv6(src=A6, dst=B6) / UDP()), UP)  # NS sent
    # the guest's answer to the far VM's question: target is the guest's own address
    na = Ether(src=VM_A, dst=VM_B) / IPv6(src=A6, dst=B6, hlim=255) / \
        ICMPv6ND_NA(tgt=A6, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=VM_A)
    assert h.send(bytes(na), UP) is CONSUMED
    assert sent(h)[-1][0][ICMPv6ND_NA].tgt == A6
    # learn VM-B, then the guest's reachability probe from fe80:: is answered by the service
    reply = Ether(src=VM_B, dst=VM_A) / IPv6(src=B6, dst=A6, hlim=255) / \
        ICMPv6ND_NA(tgt=B6, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=VM_B)
    h.ctx.datagrams[0].deliver(datagram(bytes(reply)), PEER, 0.1)
    probe = Ether(src=VM_A, dst=VM_B) / IPv6(src="fe80::5054:ff:fe00:a0a", dst=B6, hlim=255) / \
        ICMPv6ND_NS(tgt=B6)
    n = len(sent(h))
    assert h.send(bytes(probe), UP, now=0.2) is CONSUMED
    assert len(sent(h)) == n  # not tunnelled
    ans = Ether(bytes(h.emitted(DOWN)[-1].data))
    assert ans[ICMPv6ND_NA].tgt == B6 and ans.src == VM_B
    # and the far VM's probe from its link-local address is answered for the guest
    far = Ether(src=VM_B, dst=VM_A) / IPv6(src="fe80::1", dst=A6, hlim=255) / ICMPv6ND_NS(tgt=A6)
    h.ctx.datagrams[0].deliver(datagram(bytes(far)), PEER, 0.3)
    back = sent(h)[-1][0]
    assert back[ICMPv6ND_NA].tgt == A6 and back[IPv6].dst == "fe80::1" and back.src == VM_A
    assert h.extra("spoofed") == 0 and h.extra("nd_answered") == 2


def test_every_option_but_local_changes_at_run_time() -> None:
    h = harness()
    h.send(to_b(), UP)
    resolve_b(h)
    sock = h.ctx.datagrams[0]
    assert "local" not in Tunnel.tunable and "peers" in Tunnel.tunable
    new = Tunnel.Options(**{**OPTS, "mtu": 1400, "peers": OPTS["peers"] + [
        {"prefix": "10.70.0.0/16", "remote": "10.63.0.3"}]})
    h.service.retune(new, 1.0)
    assert h.ctx.datagrams == [sock] and not sock.closed  # the socket stays
    assert h.service.peers.route(4, bytes([10, 70, 1, 1])).remote == ("10.63.0.3", 4789)
    assert h.service.peers.by_source("10.63.0.2").encapsulated == 2  # counters kept
    h.send(to_b(b"z" * 1380, flags="DF"), UP, now=1.1)  # 1420 bytes: now too big
    assert Ether(bytes(h.emitted(DOWN)[-1].data))[ICMP].nexthopmtu == 1400
    h.send(to_b(), UP, now=1.2)
    assert sent(h)[-1][0].dst == VM_B  # learnt MACs stay
