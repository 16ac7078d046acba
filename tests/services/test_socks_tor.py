"""socks joined to the real SOCKS5 transport and a scripted Tor, sans-IO.

The service runs on a :class:`FakeContext`; :class:`TorBridge` plays the bridge's part
for every stream it opens: the request is checked as ``StreamManager.open`` checks it,
the REAL :class:`Socks5Transport` handshake for that request runs against a fresh
:class:`TorPeer` (Tor's SocksPort, byte for byte; ``transports_socks5peer``), and the
stream gets what the bridge would deliver: ``StreamConnected`` with the handshake's
reply, or ``StreamClosed`` with the :class:`TransportError`'s reason and message; a
stream the service closes gets its ``StreamClosed("local")``. Every peer shares one
:class:`TorNet`: names -> addresses, addresses -> names, CONNECT failures, and the
record of (credentials, command, target) of every stream, which is what Tor's
IsolateSOCKSAuth keys circuits on.

The guest's side is frames built with scapy, as in ``test_socks.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP, Ether, TCPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from transports_socks5peer import (
    ONION_BAD_ADDRESS,
    ONION_BAD_AUTH,
    ONION_DESC_INVALID,
    ONION_DESC_NOT_FOUND,
    ONION_INTRO_FAILED,
    ONION_INTRO_TIMEOUT,
    ONION_MISSING_AUTH,
    ONION_REND_FAILED,
    Outcome,
    TorNet,
    TorPeer,
    TorStream,
    exchange,
)
from vtl.bridge.transports import builtin_transports
from vtl.services.socks import Socks, SocksOptions

from vtl import CONSUMED, Direction, Frame
from vtl.errors import LocalProtocolError
from vtl.packet.offload import complete_offloads
from vtl.stream import StreamHandler, StreamRequest
from vtl.testing import FakeContext, FakeStream, run_timers

UP = Direction.TO_UPLINK
DOWN = Direction.TO_GUEST
GW = "02:00:5e:00:00:01"
TOR = ("127.0.0.1", 9050)
TOR_URL = "socks5://127.0.0.1:9050"
TOR_LABEL = "SOCKS proxy 127.0.0.1:9050"
DNS4, DNS6 = "10.0.0.53", "fd00::53"

# what the scripted Tor network knows (global addresses where PTR must go upstream)
WWW, WWW_IP = "www.example.org", "93.184.215.14"
V6ONLY, V6ONLY_IP = "v6only.example.net", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
DUAL, DUAL_V4, DUAL_V6 = "dual.example.com", "151.101.1.69", "2a04:4e42::323"
ONION = "exampleonionaddressxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.onion"
NAMES: dict[str, str | tuple[str, ...]] = {
    WWW: WWW_IP, V6ONLY: V6ONLY_IP, DUAL: (DUAL_V4, DUAL_V6),
    "a.example.org": "192.0.2.10", "b.example.org": "192.0.2.11",
}
PTRS = {WWW_IP: WWW, V6ONLY_IP: V6ONLY}


@dataclass(frozen=True)
class Guest:
    mac: str
    ip: str
    ip6: str

    @property
    def user(self) -> bytes:
        return b"vtl-" + self.mac.replace(":", "").encode()


VM1 = Guest("02:00:00:00:00:01", "10.0.0.1", "fd00::1")
VM2 = Guest("02:00:00:00:00:09", "10.0.0.9", "fd00::9")


# -- the bridge's part: the real transport against a scripted Tor ---------------------------


class TorContext(FakeContext):
    """A FakeContext whose ``open_stream`` refuses what ``StreamManager.open`` refuses."""

    def open_stream(self, request: StreamRequest, handler: StreamHandler) -> FakeStream:
        transport = builtin_transports().get(request.kind)
        if transport is None:
            raise LocalProtocolError(f"open_stream(): no stream kind {request.kind!r}")
        if request.read_chunk < 1 or request.write_buffer < 1 or not request.timeout_s > 0:
            raise LocalProtocolError("open_stream(): bad read_chunk/write_buffer/timeout_s")
        transport.check(request)
        return super().open_stream(request, handler)


class TorBridge:
    """Runs each new stream's SOCKS5 handshake against a fresh :class:`TorPeer` of ``net``
    and delivers the result to it, as the bridge's stream manager does."""

    def __init__(self, net: TorNet):
        self.net = net
        self.outcomes: list[Outcome] = []
        self._served = 0

    def pump(self, ctx: TorContext) -> None:
        while True:
            while self._served < len(ctx.streams):
                stream = ctx.streams[self._served]
                self._served += 1
                self._serve(stream)
            if not any(s.local and s.final is None for s in ctx.streams):
                return
            ctx.deliver_local_closes()

    def _serve(self, stream: FakeStream) -> None:
        request = stream.request
        transport = builtin_transports()[request.kind]
        assert request.kind == "socks5", request
        assert transport.endpoint(request) == TOR  # the proxy, never the destination
        out = exchange(transport.handshake(request), TorPeer(self.net))
        self.outcomes.append(out)
        assert not out.stalled, f"the handshake waits for bytes Tor does not owe: {out}"
        if stream.local is not None:
            return  # the service gave up first: nothing more to deliver but the close
        if out.error is not None:
            stream.closed(out.error.reason, out.error.message)
        else:
            assert out.leftover == b"", "Tor sends nothing after its reply"
            stream.connect(reply=out.reply)


@pytest.fixture
def net() -> TorNet:
    return TorNet(names=dict(NAMES), ptrs=dict(PTRS))


def make(net: TorNet, **options: Any) -> tuple[Socks, TorContext, TorBridge]:
    ctx = TorContext("socks")
    options = {"proxy": TOR_URL, "gateway_mac": GW, "dns": "tor-resolve", **options}
    return Socks(SocksOptions(**options), ctx), ctx, TorBridge(net)


def out(ctx: FakeContext) -> list[Ether]:
    """Everything emitted so far (all toward the guest), as wire frames; then forget it."""
    res = []
    for f, direction in ctx.emitted:
        assert direction is DOWN, "socks never sends anything toward the uplink"
        res += [Ether(bytes(s.data)) for s in complete_offloads(f.copy())]
    ctx.emitted.clear()
    return res


def send(svc: Socks, ctx: TorContext, bridge: TorBridge, pkt: Any,
         now: float = 0.0) -> list[Ether]:
    """The guest sends ``pkt``; the bridge serves whatever streams that opened, then runs
    the service's timers that are due (``poll_at() <= now``), as its engine loop does."""
    ctx.now = now
    assert svc.process(Frame(bytes(pkt)), UP, now) is CONSUMED
    bridge.pump(ctx)
    for _ in range(100):
        due = svc.poll_at()
        if due is None or due > now:
            break
        svc.on_timer(now)
        bridge.pump(ctx)
    else:
        raise AssertionError(f"poll_at() stays due at {svc.poll_at()} after on_timer({now})")
    return out(ctx)


# -- frames from the guest --------------------------------------------------------------------


def dns_udp(name: str, qtype: str = "A", guest: Guest = VM1, v6: bool = False,
            qid: int = 77) -> Any:
    ip = IPv6(src=guest.ip6, dst=DNS6) if v6 else IP(src=guest.ip, dst=DNS4)
    return Ether(src=guest.mac, dst=GW) / ip / UDP(sport=5353, dport=53) / \
        DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype))


def tcp(flags: str, dst: str, dport: int, *, guest: Guest = VM1, sport: int = 40000,
        seq: int = 1000, ack: int = 0, data: bytes = b"") -> Any:
    ip = IPv6(src=guest.ip6, dst=dst) if ":" in dst else IP(src=guest.ip, dst=dst)
    options = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)] if flags == "S" else []
    return Ether(src=guest.mac, dst=GW) / ip / TCP(sport=sport, dport=dport, flags=flags,
                                                   seq=seq, ack=ack, window=65535,
                                                   options=options) / data


def answer_of(frames: list[Ether], qid: int = 77) -> dns.message.Message:
    [reply] = frames
    msg = dns.message.from_wire(bytes(reply[UDP].payload))
    assert msg.id == qid
    return msg


def addresses(msg: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in msg.answer for rr in rrset]


# -- DNS in tor-resolve mode: A / AAAA through RESOLVE -------------------------------------------


@pytest.mark.parametrize("qname", [WWW, "WwW.eXaMpLe.OrG"])  # DNS 0x20 case randomisation
def test_an_a_query_answers_the_ipv4_tor_resolves(net: TorNet, qname: str) -> None:
    svc, ctx, bridge = make(net)
    frames = send(svc, ctx, bridge, dns_udp(qname))
    msg = answer_of(frames)
    assert msg.rcode() == dns.rcode.NOERROR and addresses(msg) == [WWW_IP]
    assert msg.question[0].name.to_text() == qname + "."  # the question as asked
    [reply] = frames
    assert (reply[IP].src, reply[IP].dst, reply[UDP].sport, reply[UDP].dport) == \
        (DNS4, VM1.ip, 53, 5353)
    # exactly one stream, a RESOLVE of the name as asked, no credentials (no isolation)
    assert net.streams == [TorStream(None, None, "resolve", (qname, 0), 0)]
    [stream] = ctx.streams
    assert stream.request.options["command"] == "resolve"
    assert bridge.outcomes[0].sent[:3] == b"\x05\x01\x00"  # offered no auth only
    assert stream.local == "close" and stream.final is not None  # done with it
    assert ctx.extra("dns_tor_resolve_noerror") == 1


@pytest.mark.parametrize(("qname", "qtype", "flags", "expected"), [
    (V6ONLY, "AAAA", {}, [V6ONLY_IP]),
    (WWW, "AAAA", {}, []),  # Tor has only IPv4 for it: NODATA
    (V6ONLY, "A", {}, []),  # only IPv6: NODATA
    # RESOLVE gives ONE address of a dual-stack name: IPv4 without PreferIPv6...
    (DUAL, "A", {}, [DUAL_V4]),
    (DUAL, "AAAA", {}, []),
    # ...IPv6 with PreferIPv6 (+ IPv6Traffic): then the A query is NODATA (a limitation
    # of RESOLVE, documented in dns.py; PreferIPv6 is Tor's default since 0.4.3)
    (DUAL, "AAAA", {"prefer_ipv6": True}, [DUAL_V6]),
    (DUAL, "A", {"prefer_ipv6": True}, []),
    (V6ONLY, "AAAA", {"ipv6_traffic": False}, None),  # no usable address: REP 4, NXDOMAIN
])
def test_aaaa_answers_the_ipv6_tor_resolves_and_nodata_for_the_other_family(
        net: TorNet, qname: str, qtype: str, flags: dict[str, bool],
        expected: list[str] | None) -> None:
    for key, value in flags.items():
        setattr(net, key, value)
    svc, ctx, bridge = make(net)
    msg = answer_of(send(svc, ctx, bridge, dns_udp(qname, qtype, v6=qtype == "AAAA")))
    if expected is None:
        assert msg.rcode() == dns.rcode.NXDOMAIN and net.streams[0].rep == 4
    else:
        assert msg.rcode() == dns.rcode.NOERROR
        assert addresses(msg) == expected
        if expected:
            assert msg.answer[0].rdtype == dns.rdatatype.from_text(qtype)
    assert [(s.command, s.target) for s in net.streams] == [("resolve", (qname, 0))]


@pytest.mark.parametrize("qname", ["nowhere.invalid", "unknown.example.org", ONION])
def test_a_name_tor_cannot_resolve_is_nxdomain(net: TorNet, qname: str) -> None:
    svc, ctx, bridge = make(net)
    msg = answer_of(send(svc, ctx, bridge, dns_udp(qname)))
    assert msg.rcode() == dns.rcode.NXDOMAIN and msg.answer == []
    assert net.streams == [TorStream(None, None, "resolve", (qname, 0), 4)]
    # what the bridge told the resolver: Tor's REP 4, named by the transport
    error = bridge.outcomes[0].error
    assert error is not None and error.reason == "unreachable"
    assert error.message.startswith(f"{TOR_LABEL} could not resolve {qname}")
    assert ctx.extra("dns_tor_resolve_nxdomain") == 1


# -- DNS in tor-resolve mode: PTR through RESOLVE_PTR -----------------------------------------


@pytest.mark.parametrize(("addr", "rname", "v6"), [
    (WWW_IP, "14.215.184.93.in-addr.arpa", False),
    (V6ONLY_IP, "c.2.b.8.b.6.f.a.a.d.0.8.0.2.8.6.7.0.b.c.f.1.2.0.0.0.8.2.6.0.6.2.ip6.arpa",
     True),
])
def test_ptr_of_a_global_address_answers_the_name_tor_resolves(
        net: TorNet, addr: str, rname: str, v6: bool) -> None:
    svc, ctx, bridge = make(net)
    msg = answer_of(send(svc, ctx, bridge, dns_udp(rname, "PTR", v6=v6)))
    assert msg.rcode() == dns.rcode.NOERROR
    assert addresses(msg) == [PTRS[addr] + "."]
    assert msg.answer[0].rdtype == dns.rdatatype.PTR
    assert net.streams == [TorStream(None, None, "resolve_ptr", (addr, 0), 0)]
    # the address went as an address literal (ATYP 1 / 4), never as a name
    request = bridge.outcomes[0].sent[3:]
    assert request[:4] == bytes([5, 0xF1, 0, 4 if v6 else 1])


def test_ptr_tor_cannot_resolve_is_nxdomain_and_private_ones_never_leave(net: TorNet) -> None:
    svc, ctx, bridge = make(net)
    msg = answer_of(send(svc, ctx, bridge, dns_udp("1.1.1.1.in-addr.arpa", "PTR")))
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert net.streams == [TorStream(None, None, "resolve_ptr", ("1.1.1.1", 0), 4)]
    msg = answer_of(send(svc, ctx, bridge, dns_udp("2.0.0.10.in-addr.arpa", "PTR", qid=78)),
                    qid=78)
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert len(net.streams) == 1  # RFC 6303: a private address is answered locally


# -- DNS over TCP from the guest, in tor-resolve mode ---------------------------------------------


@dataclass
class TcpDns:
    """A guest's DNS-over-TCP connection after its queries: what it got back at once,
    and its sequence numbers, to send more."""

    data: bytes
    sport: int
    seq: int  # the guest's next sequence number
    ack: int  # the next byte it expects from the endpoint


def dns_over_tcp(svc: Socks, ctx: TorContext, bridge: TorBridge, guest: Guest,
                 qnames: list[str], sport: int = 41000, t: float = 0.0) -> TcpDns:
    """Open a TCP connection to port 53 and send the queries in one segment."""
    opened = len(ctx.streams)
    [synack] = send(svc, ctx, bridge, tcp("S", DNS4, 53, guest=guest, sport=sport), t)
    assert synack[TCP].flags == "SA"
    isn = synack[TCP].seq + 1
    assert len(ctx.streams) == opened  # answered locally: port 53 is never CONNECTed
    send(svc, ctx, bridge, tcp("A", DNS4, 53, guest=guest, sport=sport, seq=1001, ack=isn),
         t + 0.001)
    wire = b""
    for i, qname in enumerate(qnames):
        q = dns.message.make_query(qname, "A")
        q.id = 100 + i
        raw = q.to_wire()
        wire += len(raw).to_bytes(2, "big") + raw
    frames = send(svc, ctx, bridge, tcp("PA", DNS4, 53, guest=guest, sport=sport, seq=1001,
                                        ack=isn, data=wire), t + 0.002)
    return TcpDns(payload(frames, sport), sport, 1001 + len(wire), isn)


def payload(frames: list[Ether], sport: int) -> bytes:
    """The TCP payload toward the guest's port ``sport`` (not retransmissions to others)."""
    return b"".join(bytes(p[TCP].payload) for p in frames
                    if TCP in p and p[TCP].dport == sport and p[TCP].payload)


def flush(svc: Socks, ctx: TorContext, bridge: TorBridge, guest: Guest, conn: TcpDns,
          now: float) -> bytes:
    """The guest sends a pure ACK (any segment would do): the payload it gets back."""
    return payload(send(svc, ctx, bridge, tcp("A", DNS4, 53, guest=guest, sport=conn.sport,
                                              seq=conn.seq, ack=conn.ack), now), conn.sport)


def tcp_messages(data: bytes) -> list[dns.message.Message]:
    msgs = []
    while data:
        n = int.from_bytes(data[:2], "big")
        assert len(data) >= 2 + n, "a DNS message cut short"
        msgs.append(dns.message.from_wire(data[2:2 + n]))
        data = data[2 + n:]
    return msgs


ANSWERS = {100: (dns.rcode.NOERROR, [WWW_IP]), 101: (dns.rcode.NXDOMAIN, [])}
def test_dns_over_tcp_from_the_guest_is_answered_through_tor(net: TorNet) -> None:
    svc, ctx, bridge = make(net)
    conn = dns_over_tcp(svc, ctx, bridge, VM1, [WWW, "nowhere.invalid"])
    assert [(s.command, s.target) for s in net.streams] == \
        [("resolve", (WWW, 0)), ("resolve", ("nowhere.invalid", 0))]
    msgs = tcp_messages(conn.data)  # the answers, as soon as Tor gave them
    assert {m.id: (m.rcode(), addresses(m)) for m in msgs} == ANSWERS


def test_dns_over_tcp_on_an_idle_connection_is_answered_through_tor(net: TorNet) -> None:
    svc, ctx, bridge = make(net)
    [synack] = send(svc, ctx, bridge, tcp("S", DNS4, 53, sport=41000), 0.0)
    isn = synack[TCP].seq + 1
    send(svc, ctx, bridge, tcp("A", DNS4, 53, sport=41000, seq=1001, ack=isn), 0.001)
    run_timers(svc, ctx, 3.0)  # the guest keeps the connection open, idle
    q = dns.message.make_query(WWW, "A")
    q.id = 100
    raw = q.to_wire()
    send(svc, ctx, bridge, tcp("PA", DNS4, 53, sport=41000, seq=1001, ack=isn,
                               data=len(raw).to_bytes(2, "big") + raw), 5.0)
    assert net.seen("resolve") == [TorStream(None, None, "resolve", (WWW, 0), 0)]
    run_timers(svc, ctx, 60.0)  # whatever timers there are, a minute later
    got = tcp_messages(payload(out(ctx), 41000))  # (unacknowledged: maybe retransmitted)
    assert {(m.id, m.rcode(), tuple(addresses(m))) for m in got} == \
        {(100, dns.rcode.NOERROR, (WWW_IP,))}


def test_dns_over_tcp_answers_through_tor_are_right(net: TorNet) -> None:
    """Tor's answers in the guest's TCP stream: an address and an NXDOMAIN, in order,
    and nothing toward the uplink (``out``)."""
    svc, ctx, bridge = make(net)
    conn = dns_over_tcp(svc, ctx, bridge, VM1, [WWW, "nowhere.invalid"])
    assert [(s.command, s.target, s.rep) for s in net.streams] == \
        [("resolve", (WWW, 0), 0), ("resolve", ("nowhere.invalid", 0), 4)]
    data = conn.data + flush(svc, ctx, bridge, VM1, conn, 0.003)
    assert [(m.id, m.rcode(), addresses(m)) for m in tcp_messages(data)] == \
        [(100, *ANSWERS[100]), (101, *ANSWERS[101])]
    assert ctx.extra("dns_tor_resolve_noerror") == ctx.extra("dns_tor_resolve_nxdomain") == 1


# -- credentials: isolation per guest, or the URL's ------------------------------------------------


def guest_traffic(svc: Socks, ctx: TorContext, bridge: TorBridge, guest: Guest,
                  tag: str, t: float) -> list[TorStream]:
    """A connection, an A query over UDP, a PTR query and an A query over TCP from
    ``guest`` (new source ports each time); the Tor streams they made."""
    before = len(bridge.net.streams)
    sport = 42000 + len(ctx.streams)
    [synack] = send(svc, ctx, bridge, tcp("S", WWW_IP, 443, guest=guest, sport=sport), t)
    assert synack[TCP].flags == "SA" and synack[TCP].dport == sport
    send(svc, ctx, bridge, tcp("A", WWW_IP, 443, guest=guest, sport=sport, seq=1001,
                               ack=synack[TCP].seq + 1), t)
    answer_of(send(svc, ctx, bridge, dns_udp(f"{tag}.example.org", guest=guest), t))
    answer_of(send(svc, ctx, bridge, dns_udp("14.215.184.93.in-addr.arpa", "PTR",
                                             guest=guest), t))
    conn = dns_over_tcp(svc, ctx, bridge, guest, [f"{tag}.example.org"], sport=sport + 1, t=t)
    data = conn.data + flush(svc, ctx, bridge, guest, conn, t + 0.003)
    [msg] = tcp_messages(data)
    assert msg.rcode() == dns.rcode.NOERROR and addresses(msg) == [NAMES[f"{tag}.example.org"]]
    got = bridge.net.streams[before:]
    assert [s.command for s in got] == ["connect", "resolve", "resolve_ptr", "resolve"]
    return got


def test_isolation_gives_each_guest_its_own_circuits(net: TorNet) -> None:
    svc, ctx, bridge = make(net, isolate=True)
    vm1 = guest_traffic(svc, ctx, bridge, VM1, "a", 0.0)
    vm2 = guest_traffic(svc, ctx, bridge, VM2, "b", 1.0)
    vm1 += guest_traffic(svc, ctx, bridge, VM1, "a", 2.0)  # the same guest again
    assert {s.username for s in vm1} == {VM1.user}  # the same for every stream of a guest
    assert {s.username for s in vm2} == {VM2.user}  # distinct between guests
    assert VM1.user != VM2.user
    [password] = {s.password for s in vm1 + vm2}
    assert password is not None and len(password) == 32
    assert all(s.rep == 0 for s in vm1 + vm2)
    # a new run (another service instance): same users, new password, so new circuits
    svc2, ctx2, bridge2 = make(net, isolate=True)
    again = guest_traffic(svc2, ctx2, bridge2, VM1, "a", 0.0)
    assert {s.username for s in again} == {VM1.user}
    assert {s.password for s in again} == {again[0].password} != {password}


@pytest.mark.parametrize(("url", "creds"), [
    (TOR_URL, (None, None)),  # no credentials: the transport offers no auth only
    ("socks5://alice:wonderland@127.0.0.1:9050", (b"alice", b"wonderland")),
    ("socks5://al%40ice:s3cr%3At@127.0.0.1:9050", (b"al@ice", b"s3cr:t")),
])
def test_without_isolation_tor_sees_exactly_the_urls_credentials(
        net: TorNet, url: str, creds: tuple[bytes | None, bytes | None]) -> None:
    svc, ctx, bridge = make(net, proxy=url)
    seen = guest_traffic(svc, ctx, bridge, VM1, "a", 0.0)
    seen += guest_traffic(svc, ctx, bridge, VM2, "b", 1.0)
    assert {(s.username, s.password) for s in seen} == {creds}


# -- CONNECT failures: Tor's extended errors ------------------------------------------------


@pytest.mark.parametrize(("rep", "extended", "answer", "meaning"), [
    (ONION_DESC_NOT_FOUND, True, "icmp", "onion service descriptor can not be found"),
    (ONION_INTRO_FAILED, True, "icmp", "onion service introduction failed"),
    (ONION_REND_FAILED, True, "icmp", "onion service rendezvous failed"),
    (ONION_DESC_INVALID, True, "rst", "onion service descriptor is invalid"),
    (ONION_MISSING_AUTH, True, "rst", "onion service missing client authorization"),
    (ONION_BAD_AUTH, True, "rst", "onion service wrong client authorization"),
    (ONION_BAD_ADDRESS, True, "rst", "onion service invalid address"),
    (ONION_INTRO_TIMEOUT, True, "rst", "onion service introduction timed out"),
    (ONION_DESC_NOT_FOUND, False, "rst", "general SOCKS server failure"),  # no ExtendedErrors
])
@pytest.mark.parametrize("v6", [False, True])
def test_an_onion_connect_error_answers_the_guest_and_names_the_proxy(
        net: TorNet, caplog: pytest.LogCaptureFixture, rep: int, extended: bool, answer: str,
        meaning: str, v6: bool) -> None:
    net.connect_errors[ONION] = rep
    net.extended_errors = extended
    svc, ctx, bridge = make(net, dns="fake-ip")
    msg = answer_of(send(svc, ctx, bridge, dns_udp(ONION, "AAAA" if v6 else "A", v6=v6)))
    [fake] = addresses(msg)
    assert net.streams == []  # fake-ip: the name has not left yet
    with caplog.at_level(logging.WARNING):
        [reply] = send(svc, ctx, bridge, tcp("S", fake, 80), 0.01)
    assert net.streams == [TorStream(None, None, "connect", (ONION, 80),
                                     rep if extended else 1)]
    if answer == "icmp":
        if v6:
            assert ICMPv6DestUnreach in reply, reply.summary()
            assert (reply[ICMPv6DestUnreach].type, reply[ICMPv6DestUnreach].code) == (1, 3)
            assert reply[IPv6].dst == VM1.ip6
        else:
            assert ICMP in reply, reply.summary()
            assert (reply[ICMP].type, reply[ICMP].code) == (3, 1)  # host unreachable
            assert reply[IP].dst == VM1.ip
            assert reply[TCPerror].dport == 80  # about our SYN
    else:
        assert TCP in reply, reply.summary()
        assert reply[TCP].flags == "RA" and reply[TCP].ack == 1001
    lines = [r.getMessage() for r in caplog.records]
    assert any(TOR_LABEL in line and meaning in line and f"REP {(rep if extended else 1):#04x}"
               in line for line in lines), lines
    assert not svc.table.relays  # nothing left behind


def test_a_connect_through_tor_relays_bytes(net: TorNet) -> None:
    svc, ctx, bridge = make(net)
    [synack] = send(svc, ctx, bridge, tcp("S", WWW_IP, 80), 0.0)
    assert synack[TCP].flags == "SA" and synack[TCP].ack == 1001
    assert net.streams == [TorStream(None, None, "connect", (WWW_IP, 80), 0)]
    [stream] = ctx.streams
    assert stream.events[0].reply == ("0.0.0.0", 0)  # Tor's BND for a CONNECT
    isn = synack[TCP].seq + 1
    send(svc, ctx, bridge, tcp("A", WWW_IP, 80, seq=1001, ack=isn), 0.01)
    send(svc, ctx, bridge, tcp("PA", WWW_IP, 80, seq=1001, ack=isn, data=b"GET / HTTP/1.0\r\n"),
         0.02)
    assert bytes(stream.written) == b"GET / HTTP/1.0\r\n"
