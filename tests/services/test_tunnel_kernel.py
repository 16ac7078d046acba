"""tunnel with ``datapath = "kernel"``, sans-IO: whole GSO frames to the bridge's VXLAN link
(the router's work done on them once), questions through the socket, frames from the link
checked by their inner source, the link following the options."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether
from vtl.services.tunnel import Tunnel
from vtl.services.tunnel.wire import vxlan_header

from vtl import CONSUMED, Direction, Frame, VnetHeader
from vtl.packet.checksum import fold, pseudo_sum_v4
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet, verify_checksums
from vtl.testing import FakeVxlanLink, ServiceHarness

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
VM_A, GW_A_MAC, VM_B = "52:54:00:00:0a:0a", "02:00:00:00:0a:01", "52:54:00:00:0b:14"
A_IP, B_IP, GW_A = "10.61.1.10", "10.62.2.20", "10.61.1.1"
OPTS = {"local": "10.63.0.1", "vni": 42, "gateway": [GW_A, "fd61::1"],
        "peers": [{"prefix": "10.62.2.0/24", "remote": "10.63.0.2"},
                  {"prefix": "fd62::/64", "remote": "10.63.0.2"},
                  {"prefix": "10.70.0.0/16", "remote": "10.63.0.3"}]}


def harness(**kw: object) -> ServiceHarness[Tunnel]:
    h = ServiceHarness(Tunnel, {**OPTS, **kw})
    h.start(0.0)
    return h


def link(h: ServiceHarness[Tunnel]) -> FakeVxlanLink:
    return h.ctx.links[-1]


def to_b(payload: bytes = b"x" * 100, **tcp: object) -> bytes:
    return bytes(Ether(src=VM_A, dst=GW_A_MAC) / IP(src=A_IP, dst=B_IP, flags="DF")
                 / TCP(sport=40000, dport=5001, **({"flags": "A"} | tcp)) / payload)


def gso(payload: bytes, gso_size: int = 1398) -> Frame:
    return Frame(bytearray(to_b(payload)), VnetHeader(flags=1, gso_type=1, hdr_len=54,
                                                      gso_size=gso_size, csum_start=34,
                                                      csum_offset=16))


def resolve_b(h: ServiceHarness[Tunnel], now: float = 0.5) -> None:
    """VM-B's answer to the ARP request, as the kernel's link hands it over."""
    h.advance(now)
    link(h).deliver(bytes(Ether(src=VM_B, dst=VM_A) / ARP(
        op=2, hwsrc=VM_B, psrc=B_IP, hwdst=VM_A, pdst=A_IP)), now)


def test_the_link_is_asked_for_and_the_socket_only_sends() -> None:
    h = harness()
    req = link(h).request
    assert (req.local, req.vni, req.port, req.mtu) == ("10.63.0.1", 42, 4789, 1450)
    assert req.remotes == ("10.63.0.2", "10.63.0.3")  # each remote once
    assert h.ctx.datagrams[0].request.port == 0, "4789 belongs to the kernel's device"
    assert h.report()["datapath"] == "kernel"


def test_a_gso_frame_goes_to_the_link_whole_once_the_mac_is_known() -> None:
    h = harness()
    payload = bytes(range(256)) * 40  # 10240 bytes: 8 segments of 1398
    assert h.send(gso(payload), UP) is CONSUMED
    asked = h.ctx.datagrams[0].sent
    assert len(asked) == 1 and asked[0][1] == ("10.63.0.2", 4789)
    assert asked[0][0][:8] == vxlan_header(42) and ARP in Ether(asked[0][0][8:])
    assert link(h).sent == [], "the frame waits for VM-B's MAC"
    resolve_b(h)
    assert h.emitted(DOWN)[-1].data[12:14] == b"\x08\x06", "the answer reaches the guest"
    [(frame, remote)] = link(h).sent
    assert remote == "10.63.0.2"
    assert frame.vnet is not None and frame.vnet.gso_size == 1398, "still one GSO frame"
    e = Ether(bytes(frame.data))
    assert e.dst == VM_B and e[IP].ttl == 63 and bytes(e[TCP].payload) == payload
    segs = complete_offloads(frame)  # what the kernel will send: checksums right
    assert len(segs) == 8 and all(verify_checksums(Packet(s)) for s in segs)
    peer = h.service.peers.peers()[0]
    # the question (42 bytes) and the 8 segments of the frame
    assert peer.encapsulated == 9 and peer.encapsulated_bytes == 42 + len(frame.data)


def test_a_gso_frame_whose_segments_do_not_fit_gets_too_big() -> None:
    h = harness()
    resolve_b(h, 0.1)
    assert h.send(gso(b"y" * 5000, gso_size=1448), UP) is CONSUMED
    assert link(h).sent == []
    icmp = Ether(bytes(h.emitted(DOWN)[-1].data))
    assert icmp[IP].src == GW_A and icmp[ICMP].type == 3 and icmp[ICMP].nexthopmtu == 1450
    assert h.extra("too_big_sent") == 1


def test_a_syn_with_a_partial_checksum_is_clamped_and_stays_right() -> None:
    h = harness()
    resolve_b(h, 0.1)
    raw = bytearray(to_b(b"", flags="S", options=[("MSS", 1460)]))
    # the partial sum the guest's kernel leaves: the pseudo-header's only
    raw[50:52] = fold(pseudo_sum_v4(raw[26:30], raw[30:34], 6, len(raw) - 34)).to_bytes(
        2, "big")
    partial = Frame(raw, VnetHeader(flags=1, csum_start=34, csum_offset=16))
    (sound,) = complete_offloads(partial.copy())
    assert verify_checksums(Packet(sound)), "a sound partial frame to start with"
    h.send(partial, UP)
    [(frame, _)] = link(h).sent
    assert Ether(bytes(frame.data))[TCP].options[0] == ("MSS", 1410)
    assert h.extra("mss_clamped") == 1
    (seg,) = complete_offloads(frame)  # the kernel completes the checksum
    assert verify_checksums(Packet(seg))


def test_frames_from_the_link_are_checked_by_their_inner_source() -> None:
    h = harness()
    h.send(to_b(), UP)  # VM-A's MAC and the gateway's are learnt
    back = Frame(bytearray(bytes(Ether(src=VM_B, dst="02:00:00:00:0b:01") / IP(
        src=B_IP, dst=A_IP) / TCP(sport=5001, dport=40000, flags="A") / (b"z" * 3000))),
        VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1398, csum_start=34,
                   csum_offset=16))
    link(h).deliver(back, 0.2)
    out = h.take(DOWN)[-1].frame
    assert out is back, "the same frame, its GRO header kept"
    e = Ether(bytes(out.data))
    assert (e.src, e.dst) == (GW_A_MAC, VM_A)
    assert h.service.peers.peers()[0].decapsulated == 1
    spoofed = Ether(src=VM_B, dst=VM_A) / IP(src="10.61.1.99", dst=A_IP) / TCP()
    link(h).deliver(bytes(spoofed), 0.3)
    link(h).deliver(b"\x00" * 10, 0.3)
    assert h.extra("spoofed") == 1 and h.extra("malformed") == 1
    assert h.take(DOWN) == []


def test_broadcast_questions_go_by_socket_unicast_answers_by_link() -> None:
    h = harness()
    who_has = Ether(src=VM_A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=VM_A, psrc=A_IP,
                                                          pdst=B_IP)
    assert h.send(bytes(who_has), UP) is CONSUMED
    assert len(h.ctx.datagrams[0].sent) == 1 and link(h).sent == []
    is_at = Ether(src=VM_A, dst=VM_B) / ARP(op=2, hwsrc=VM_A, psrc=A_IP, hwdst=VM_B,
                                           pdst=B_IP)
    assert h.send(bytes(is_at), UP) is CONSUMED
    assert [r for _, r in link(h).sent] == ["10.63.0.2"]


def test_the_link_follows_the_options() -> None:
    h = harness()
    first = link(h)
    fewer = Tunnel.Options(**{**OPTS, "peers": OPTS["peers"][:2]})
    h.service.retune(fewer, 1.0)
    assert link(h) is first and first.remotes == ("10.63.0.2",)
    h.service.retune(Tunnel.Options(**{**OPTS, "vni": 43}), 2.0)
    assert first.closed and link(h) is not first and link(h).request.vni == 43
    assert "datapath" not in Tunnel.tunable
    h.stop(3.0)
    assert link(h).closed


def test_the_kernel_datapath_sends_to_one_port() -> None:
    with pytest.raises(ValidationError, match="peers: remote 10.63.0.9:4790"):
        Tunnel.Options(**{**OPTS, "peers": [{"prefix": "10.9.0.0/16",
                                             "remote": "10.63.0.9:4790"}]})
    Tunnel.Options(**{**OPTS, "datapath": "socket",
                      "peers": [{"prefix": "10.9.0.0/16", "remote": "10.63.0.9:4790"}]})
