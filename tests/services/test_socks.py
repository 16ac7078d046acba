"""socks, sans-IO: what the guest sends, what it gets back, and what goes to the proxy."""

from __future__ import annotations

import logging
from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP, Ether
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    IPv6,
)
from scapy.layers.l2 import ARP
from vtl.bridge.config import parse_config
from vtl.services.socks import Socks, SocksOptions
from vtl.services.socks.options import parse_proxy_url

from vtl import CONSUMED, DROP, Direction, Frame
from vtl.errors import ConfigError
from vtl.packet.offload import complete_offloads
from vtl.testing import FakeContext

G_MAC, G_MAC2, R_MAC = "02:00:00:00:00:01", "02:00:00:00:00:09", "02:00:00:00:00:fe"
GW = "02:00:5e:00:00:01"
G_IP, R_IP = "10.0.0.1", "10.0.0.2"
G_IP6, R_IP6 = "fd00::1", "fd00::2"
UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
PROXY = "socks5://127.0.0.1:1080"


def make(**options: Any) -> tuple[Socks, FakeContext]:
    ctx = FakeContext("socks")
    options = {"proxy": PROXY, "gateway_mac": GW, **options}
    return Socks(SocksOptions(**options), ctx), ctx


def frame(pkt: Any) -> Frame:
    return Frame(bytes(pkt))


def syn(dst: str = R_IP, dport: int = 80, sport: int = 40000, src_mac: str = G_MAC) -> Frame:
    ip = IPv6(src=G_IP6, dst=dst) if ":" in dst else IP(src=G_IP, dst=dst)
    return frame(Ether(src=src_mac, dst=GW) / ip /
                 TCP(sport=sport, dport=dport, flags="S", seq=1000, window=65535,
                     options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]))


def seg(flags: str, seq: int, ack: int, data: bytes = b"", dst: str = R_IP, dport: int = 80,
        sport: int = 40000) -> Frame:
    ip = IPv6(src=G_IP6, dst=dst) if ":" in dst else IP(src=G_IP, dst=dst)
    return frame(Ether(src=G_MAC, dst=GW) / ip /
                 TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535) / data)


def dns_query(name: str, qtype: str = "A", v6: bool = False, sport: int = 5353) -> Frame:
    ip = IPv6(src=G_IP6, dst="fd00::53") if v6 else IP(src=G_IP, dst="10.0.0.53")
    return frame(Ether(src=G_MAC, dst=GW) / ip / UDP(sport=sport, dport=53) /
                 DNS(id=77, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def out(ctx: FakeContext) -> list[Ether]:
    """Everything emitted so far (all must go toward the guest), as wire frames."""
    res = []
    for f, direction in ctx.emitted:
        assert direction is DOWN, "socks never sends anything toward the uplink"
        res += [Ether(bytes(s.data)) for s in complete_offloads(f.copy())]
    ctx.emitted.clear()
    return res


def answer_of(reply: Ether) -> dns.message.Message:
    return dns.message.from_wire(bytes(reply[UDP].payload))


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:8080", "scheme 'http'"),
    ("socks5://127.0.0.1", "no proxy port"),
    ("socks5://:1080", "no proxy host"),
    ("socks5://user@127.0.0.1:1080", "both a user and a password"),
    ("socks5://127.0.0.1:99999", "not a proxy URL"),
    ("socks5://127.0.0.1:1080/path", "no path"),
])
def test_bad_proxy_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValidationError) as exc:
        SocksOptions(proxy=url)
    assert problem in str(exc.value)


def test_proxy_url_with_credentials_and_ipv6() -> None:
    p = parse_proxy_url("socks5://al%40ice:p%3Ass@[2001:db8::1]:9050")
    assert (p.host, p.port, p.username, p.password) == ("2001:db8::1", 9050, "al@ice", "p:ss")
    assert p.where == "[2001:db8::1]:9050"


@pytest.mark.parametrize(("opts", "problem"), [
    ({"dns": "udp://1.1.1.1:53"}, "not a DNS mode"),
    ({"dns": "tcp://resolver.example:53"}, "IP address"),
    ({"fake_ip_pool": "fd00::/64"}, "IPv4 network"),
    ({"fake_ip6_pool": "10.0.0.0/8"}, "IPv6 network"),
    ({"gateway_mac": "01:00:5e:00:00:01"}, "unicast"),
    ({"isolate": True, "proxy": "socks5://u:p@127.0.0.1:1080"}, "per-VM credentials"),
])
def test_bad_options_say_what_is_wrong(opts: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as exc:
        SocksOptions(**{"proxy": PROXY, **opts})
    assert problem in str(exc.value)


def test_default_gateway_mac_is_random_unicast_and_locally_administered() -> None:
    macs = {SocksOptions(proxy=PROXY).gateway_mac for _ in range(8)}
    assert len(macs) > 1
    for m in macs:
        first = int(m.split(":")[0], 16)
        assert first & 0x03 == 0x02


@pytest.mark.parametrize(("extra", "problem"), [
    ({"match": "tcp"}, "services[0].match: socks must see every frame"),
    ({"fail": "open"}, "services[0].fail: socks fails closed"),
])
def test_config_refuses_a_filter_or_fail_open(extra: dict[str, Any], problem: str) -> None:
    data = {"ports": {"guest": {"kind": "tap", "ifname": "t0"},
                      "uplink": {"kind": "packet", "ifname": "u0"}},
            "services": [{"use": "socks", "proxy": PROXY, **extra}]}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_config_defaults_to_fail_closed() -> None:
    data = {"ports": {"guest": {"kind": "tap", "ifname": "t0"},
                      "uplink": {"kind": "packet", "ifname": "u0"}},
            "services": [{"use": "socks", "proxy": PROXY}]}
    assert parse_config(data).services[0].fail == "closed"


# -- TCP through the proxy ---------------------------------------------------------------


def test_tcp_goes_through_the_proxy_and_the_syn_waits_for_it() -> None:
    s, ctx = make()
    assert s.process(syn(), UP, 0.0) is CONSUMED
    assert ctx.emitted == []  # nothing before the proxy says connected
    [stream] = ctx.streams
    r = stream.request
    assert (r.kind, r.host, r.port) == ("socks5", R_IP, 80)
    assert r.options == {"proxy": ("127.0.0.1", 1080), "username": None, "password": None,
                         "command": "connect"}
    stream.connect()
    [synack] = out(ctx)
    assert synack[TCP].flags == "SA" and synack[TCP].ack == 1001
    assert (synack[IP].src, synack[Ether].src, synack[Ether].dst) == (R_IP, GW, G_MAC)
    isn = synack[TCP].seq + 1
    s.process(seg("A", 1001, isn), UP, 0.01)
    s.process(seg("PA", 1001, isn, b"GET / HTTP/1.0\r\n\r\n"), UP, 0.02)
    assert bytes(stream.written) == b"GET / HTTP/1.0\r\n\r\n"
    ctx.now = 0.03
    stream.data(b"HTTP/1.0 200 OK\r\n\r\nhello")
    got = b"".join(bytes(p[TCP].payload) for p in out(ctx) if p[TCP].payload)
    assert got == b"HTTP/1.0 200 OK\r\n\r\nhello"


def test_credentials_from_the_url_go_with_every_connect() -> None:
    s, ctx = make(proxy="socks5://alice:secret@[::1]:9050")
    s.process(syn(), UP, 0.0)
    opts = ctx.streams[0].request.options
    assert (opts["proxy"], opts["username"], opts["password"]) == \
        (("::1", 9050), "alice", "secret")


def test_congestion_goes_with_every_connect_and_a_live_change_with_the_next() -> None:
    s, ctx = make(congestion="bbr")
    s.process(syn(), UP, 0.0)
    assert ctx.streams[0].request.options["congestion"] == "bbr"
    assert "congestion" in s.tunable
    s.retune(s.options.model_copy(update={"congestion": "cubic"}), 0.1)
    s.process(syn(sport=40001), UP, 0.2)
    assert ctx.streams[1].request.options["congestion"] == "cubic"


@pytest.mark.parametrize("reason", ["refused", "timeout", "error", "reset"])
def test_a_proxy_failure_resets_the_guest_at_once_and_logs_the_cause(
        reason: str, caplog: pytest.LogCaptureFixture) -> None:
    s, ctx = make()
    s.process(syn(), UP, 0.0)
    ctx.now = 0.001
    message = "SOCKS proxy 127.0.0.1:1080 rejected the username/password (authentication failed)"
    with caplog.at_level(logging.WARNING):
        ctx.streams[0].closed(reason, message)
    [rst] = out(ctx)
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 1001
    assert any("authentication failed" in r.getMessage() for r in caplog.records)
    assert ctx.extra(f"connections_{reason}") == 1


def test_a_destination_the_proxy_cannot_reach_is_icmp_unreachable() -> None:
    s, ctx = make()
    s.process(syn(), UP, 0.0)
    ctx.streams[0].closed("unreachable", "SOCKS proxy 127.0.0.1:1080: host unreachable")
    [err] = out(ctx)
    assert err[ICMP].type == 3 and err[ICMP].code == 1


def test_failure_log_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    s, ctx = make()
    with caplog.at_level(logging.WARNING):
        for i in range(50):
            s.process(syn(sport=41000 + i), UP, i * 0.01)
            ctx.now = i * 0.01
            ctx.streams[-1].closed("refused", "SOCKS proxy 127.0.0.1:1080 is unreachable")
    lines = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(lines) == 1
    assert ctx.extra("connections_refused") == 50


def test_a_segment_of_no_connection_gets_a_reset_never_the_uplink() -> None:
    s, ctx = make()
    assert s.process(seg("PA", 5000, 7000, b"hello"), UP, 0.0) is CONSUMED
    [rst] = out(ctx)
    assert rst[TCP].flags == "R" and rst[TCP].seq == 7000
    assert ctx.extra("tcp_unknown") == 1


def test_ipv6_destinations_are_connected_by_literal() -> None:
    s, ctx = make()
    s.process(syn(dst=R_IP6, dport=443), UP, 0.0)
    r = ctx.streams[0].request
    assert (r.host, r.port) == (R_IP6, 443)
    ctx.streams[0].connect()
    [synack] = out(ctx)
    assert synack[IPv6].src == R_IP6 and synack[TCP].flags == "SA"


def test_isolation_gives_each_vm_its_own_credentials() -> None:
    s, ctx = make(isolate=True)
    s.process(syn(), UP, 0.0)
    s.process(syn(sport=40001), UP, 0.0)
    s.process(syn(sport=40002, src_mac=G_MAC2), UP, 0.0)
    a, b, c = (st_.request.options for st_ in ctx.streams)
    assert a["username"] == b["username"] == "vtl-020000000001"
    assert c["username"] == "vtl-020000000009"
    assert a["password"] == c["password"] and len(a["password"]) == 32
    s2, ctx2 = make(isolate=True)
    s2.process(syn(), UP, 0.0)
    assert ctx2.streams[0].request.options["password"] != a["password"]  # new run, new circuits


# -- DNS ----------------------------------------------------------------------------------------


def test_fake_ip_answers_and_connects_by_name() -> None:
    s, ctx = make()
    assert s.process(dns_query("Web.Example.ORG."), UP, 0.0) is CONSUMED
    [reply] = out(ctx)
    assert (reply[IP].src, reply[IP].dst, reply[UDP].sport, reply[UDP].dport) == \
        ("10.0.0.53", G_IP, 53, 5353)
    assert (reply[Ether].src, reply[Ether].dst) == (GW, G_MAC)
    msg = answer_of(reply)
    assert msg.id == 77 and msg.rcode() == 0
    [rrset] = msg.answer
    addr = rrset[0].address
    assert addr.startswith("198.1")
    s.process(syn(dst=addr), UP, 0.1)
    r = ctx.streams[0].request
    assert (r.kind, r.host, r.port) == ("socks5", "web.example.org", 80)
    assert ctx.extra("dns_fake_ip_noerror") == 1


def test_fake_ip_aaaa_and_ipv6_connect_by_name() -> None:
    s, ctx = make()
    s.process(dns_query("v6.example.org", "AAAA", v6=True), UP, 0.0)
    [reply] = out(ctx)
    msg = answer_of(reply)
    addr = msg.answer[0][0].address
    assert addr.startswith("fd98:18:")
    s.process(syn(dst=addr), UP, 0.1)
    assert ctx.streams[0].request.host == "v6.example.org"


def test_a_fake_address_never_handed_out_is_reset() -> None:
    s, ctx = make()
    s.process(syn(dst="198.18.7.7"), UP, 0.0)
    [rst] = out(ctx)
    assert rst[TCP].flags == "RA"
    assert ctx.streams == [] and ctx.extra("fake_ip_unknown") == 1


def test_dns_over_tcp_from_the_guest_is_answered_locally() -> None:
    s, ctx = make()
    s.process(syn(dst="10.0.0.53", dport=53), UP, 0.0)
    assert ctx.streams == []  # no proxy involved
    [synack] = out(ctx)
    assert synack[TCP].flags == "SA"
    isn = synack[TCP].seq + 1
    s.process(seg("A", 1001, isn, dst="10.0.0.53", dport=53), UP, 0.01)
    q = dns.message.make_query("tcp.example.org", "A").to_wire()
    wire = len(q).to_bytes(2, "big") + q
    s.process(seg("PA", 1001, isn, wire, dst="10.0.0.53", dport=53), UP, 0.02)
    data = b"".join(bytes(p[TCP].payload) for p in out(ctx) if p[TCP].payload)
    n = int.from_bytes(data[:2], "big")
    assert len(data) == 2 + n
    msg = dns.message.from_wire(data[2:])
    assert msg.answer[0][0].address.startswith("198.1")
    # the guest closes: FIN answered by FIN, the connection retires cleanly
    s.process(seg("FA", 1001 + len(wire), isn + len(data), dst="10.0.0.53", dport=53), UP,
              0.03)
    fins = [p for p in out(ctx) if p[TCP].flags & 0x01]
    assert fins


def test_dns_tcp_mode_goes_through_a_socks_connect_to_the_resolver() -> None:
    s, ctx = make(dns="tcp://192.0.2.53:53")
    s.process(dns_query("name.example.org"), UP, 0.0)
    [stream] = ctx.streams
    r = stream.request
    assert (r.kind, r.host, r.port, r.options["command"]) == \
        ("socks5", "192.0.2.53", 53, "connect")


# -- the local network -------------------------------------------------------------------------


def arp(op: int, psrc: str, pdst: str) -> Frame:
    return frame(Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=op, hwsrc=G_MAC, psrc=psrc, pdst=pdst))


@pytest.mark.parametrize("target", ["10.0.0.254", "10.0.0.2", "192.168.1.1"])
def test_every_arp_request_is_answered_with_the_gateway_mac(target: str) -> None:
    s, ctx = make()
    assert s.process(arp(1, G_IP, target), UP, 0.0) is CONSUMED
    [reply] = out(ctx)
    a = reply[ARP]
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, GW, target, G_MAC, G_IP)


@pytest.mark.parametrize(("psrc", "pdst"), [("0.0.0.0", G_IP), (G_IP, G_IP)])
def test_arp_probes_and_announcements_stay_unanswered(psrc: str, pdst: str) -> None:
    s, ctx = make()
    s.process(arp(1, psrc, pdst), UP, 0.0)
    assert out(ctx) == [] and ctx.extra("arp_ignored") == 1


def test_neighbour_solicitations_are_answered_but_not_dad() -> None:
    s, ctx = make()
    ns = Ether(src=G_MAC, dst="33:33:ff:00:00:fe") / \
        IPv6(src=G_IP6, dst="ff02::1:ff00:fe", hlim=255) / ICMPv6ND_NS(tgt="fd00::fe")
    s.process(frame(ns), UP, 0.0)
    [na] = out(ctx)
    assert na[ICMPv6ND_NA].tgt == "fd00::fe" and na[ICMPv6ND_NA].R == 1
    assert na[Ether].src == GW and na[IPv6].dst == G_IP6
    dad = Ether(src=G_MAC, dst="33:33:ff:00:00:01") / \
        IPv6(src="::", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=G_IP6)
    s.process(frame(dad), UP, 0.0)
    assert out(ctx) == []


def test_udp_and_ping_are_rejected_with_admin_prohibited() -> None:
    s, ctx = make()
    s.process(frame(Ether(src=G_MAC, dst=GW) / IP(src=G_IP, dst=R_IP) / UDP(dport=123)), UP, 0)
    s.process(frame(Ether(src=G_MAC, dst=GW) / IP(src=G_IP, dst=R_IP) / ICMP()), UP, 0)
    s.process(frame(Ether(src=G_MAC, dst=GW) / IPv6(src=G_IP6, dst=R_IP6) /
                    ICMPv6EchoRequest()), UP, 0)
    u, p, p6 = out(ctx)
    assert (u[ICMP].type, u[ICMP].code, u[IP].dst) == (3, 13, G_IP)
    assert (p[ICMP].type, p[ICMP].code) == (3, 13)
    assert (p6[ICMPv6DestUnreach].type, p6[ICMPv6DestUnreach].code) == (1, 1)
    assert ctx.extra("rejected_udp") == 1 and ctx.extra("rejected_icmp") == 1
    assert ctx.extra("rejected_icmp6") == 1


def test_without_reject_the_rest_is_dropped_silently() -> None:
    s, ctx = make(reject=False)
    s.process(frame(Ether(src=G_MAC, dst=GW) / IP(src=G_IP, dst=R_IP) / UDP(dport=123)), UP, 0)
    assert out(ctx) == [] and ctx.extra("rejected_udp") == 1


def test_broadcasts_get_no_icmp() -> None:
    s, ctx = make()
    dhcp = Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / \
        IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
    s.process(frame(dhcp), UP, 0)
    assert out(ctx) == [] and ctx.extra("rejected_udp") == 1


def test_nothing_from_the_uplink_reaches_the_guest() -> None:
    s, ctx = make()
    s.process(syn(), UP, 0.0)
    ctx.streams[0].connect()
    out(ctx)
    from_uplink = Ether(src=R_MAC, dst=G_MAC) / IP(src=R_IP, dst=G_IP) / \
        TCP(sport=80, dport=40000, flags="A")
    assert s.process(frame(from_uplink), DOWN, 0.1) is DROP
    assert s.process(frame(Ether(dst=G_MAC) / ARP(op=1)), DOWN, 0.1) is DROP
    assert ctx.extra("from_uplink_dropped") == 2


def _frames() -> st.SearchStrategy[bytes]:
    l4 = st.sampled_from([TCP(flags="S"), TCP(flags="A"), TCP(flags="R"), UDP(dport=53),
                          UDP(dport=1234), ICMP(), ICMP(type=3), DNS()])
    ip = st.sampled_from([IP(src=G_IP, dst=R_IP), IP(src=G_IP, dst="198.18.0.9"),
                          IP(src=G_IP, dst="224.0.0.1"), IPv6(src=G_IP6, dst=R_IP6)])
    built = st.builds(lambda i, t: bytes(Ether(src=G_MAC, dst=GW) / i / t), ip, l4)
    mangled = st.tuples(built, st.integers(0, 80), st.binary(max_size=8)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    return st.one_of(built, mangled, st.binary(min_size=14, max_size=120))


@settings(max_examples=300, deadline=None)
@given(st.lists(_frames(), max_size=8))
def test_no_frame_ever_passes_or_goes_to_the_uplink(frames: list[bytes]) -> None:
    s, ctx = make()
    for i, data in enumerate(frames):
        verdict = s.process(Frame(bytearray(data)), UP, i * 0.01)
        assert verdict is CONSUMED
    assert all(direction is DOWN for _, direction in ctx.emitted)
    s.stop(1.0)


def test_dns_over_tcp_in_tcp_mode_is_answered_as_soon_as_the_resolver_replies() -> None:
    s, ctx = make(dns="tcp://192.0.2.53:53")
    s.process(syn(dst="10.0.0.53", dport=53), UP, 0.0)
    [synack] = out(ctx)
    isn = synack[TCP].seq + 1
    s.process(seg("A", 1001, isn, dst="10.0.0.53", dport=53), UP, 0.01)
    q = dns.message.make_query("late.example.org", "A")
    wire = q.to_wire()
    s.process(seg("PA", 1001, isn, len(wire).to_bytes(2, "big") + wire, dst="10.0.0.53",
                  dport=53), UP, 0.02)
    out(ctx)  # the ACK
    [upstream] = ctx.streams
    assert upstream.request.host == "192.0.2.53"
    ctx.now = 0.5
    upstream.connect()
    assert bytes(upstream.written) == len(wire).to_bytes(2, "big") + wire
    resp = dns.message.make_response(q)
    resp.answer.append(dns.rrset.from_text("late.example.org.", 60, "IN", "A", "192.0.2.80"))
    rw = resp.to_wire()
    upstream.data(len(rw).to_bytes(2, "big") + rw)  # no guest segment, no timer: at once
    data = b"".join(bytes(p[TCP].payload) for p in out(ctx) if p[TCP].payload)
    assert data == len(rw).to_bytes(2, "big") + rw


def test_a_dns_upstream_failure_is_logged_once_per_cause(
        caplog: pytest.LogCaptureFixture) -> None:
    s, ctx = make(dns="tcp://192.0.2.53:53")
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            s.process(dns_query(f"n{i}.example.org", sport=6000 + i), UP, i * 0.01)
            ctx.now = i * 0.01
            ctx.streams[-1].closed("refused", "SOCKS proxy 127.0.0.1:1080 is unreachable")
    replies = [answer_of(r) for r in out(ctx)]
    assert [m.rcode() for m in replies] == [2] * 5  # SERVFAIL each
    lines = [r.getMessage() for r in caplog.records if "DNS upstream failed" in r.getMessage()]
    assert len(lines) == 1 and "SOCKS proxy 127.0.0.1:1080 is unreachable" in lines[0]
