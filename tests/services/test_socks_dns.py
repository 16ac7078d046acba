"""Tests of the ``socks`` service's DNS resolver, sans-IO: queries built and replies parsed
with dnspython, upstream streams played by FakeStream, time passed in explicitly."""

from __future__ import annotations

import logging
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vtl.models.splitlog import FAILURE_LINES
from vtl.services.socks.dns import LOG_EVERY_S, DnsResolver, parse_mode
from vtl.services.socks.fakeip import FakeIpPool

from vtl.stream import StreamRequest
from vtl.testing import FakeContext

TCP_MODE = "tcp://9.9.9.9:53"


class Replies:
    """The reply callback: records (wire, now)."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, float]] = []

    def __call__(self, wire: bytes, now: float) -> None:
        assert isinstance(wire, bytes)
        self.got.append((wire, now))

    def one(self) -> dns.message.Message:
        assert len(self.got) == 1, self.got
        return dns.message.from_wire(self.got[0][0])


class Upstream:
    """The ``upstream`` callable: records (host, port, command)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, host: str, port: int, command: str) -> StreamRequest:
        self.calls.append((host, port, command))
        return StreamRequest("socks5", host, port, options={"command": command})


def make(mode: str, ctx: FakeContext | None = None, **kw):
    ctx = ctx or FakeContext("socks")
    up = Upstream()
    pool = kw.pop("pool", FakeIpPool(ttl=kw.get("ttl", 60)) if mode == "fake-ip" else None)
    return DnsResolver(mode, ctx, pool=pool, upstream=up, **kw), ctx, up


def query(name: str, rdtype: str | int = "A", **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = kw.pop("id", 0x4242)
    return q


def ask(resolver: DnsResolver, q: dns.message.Message | bytes, now: float = 0.0,
        transport: str = "udp") -> Replies:
    r = Replies()
    wire = q if isinstance(q, bytes) else q.to_wire()
    resolver.answer(wire, now, r, transport=transport)
    return r


def upstream_response(q: dns.message.Message, *rrs: tuple[str, str]) -> dns.message.Message:
    resp = dns.message.make_response(q)
    for rdtype, text in rrs:
        resp.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", rdtype, text))
    return resp


def framed(msg: dns.message.Message | bytes) -> bytes:
    wire = msg if isinstance(msg, bytes) else msg.to_wire(max_size=65535)
    return len(wire).to_bytes(2, "big") + wire


def answers(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


# -- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [
    ("fake-ip", ("fake_ip", None)),
    ("tor-resolve", ("tor_resolve", None)),
    ("tcp://9.9.9.9:53", ("tcp", ("9.9.9.9", 53))),
    ("tcp://1.1.1.1", ("tcp", ("1.1.1.1", 53))),
    ("tcp://[2620:fe::fe]:5353", ("tcp", ("2620:fe::fe", 5353))),
    ("tcp://[2620:fe::fe]", ("tcp", ("2620:fe::fe", 53))),
])
def test_parse_mode(mode, expected):
    assert parse_mode(mode) == expected


@pytest.mark.parametrize(("mode", "words"), [
    ("udp://9.9.9.9:53", "expected"),
    ("fakeip", "expected"),
    ("", "expected"),
    ("tcp://dns.example:53", "not an IP address"),
    ("tcp://9.9.9.9:0", "not in 1..65535"),
    ("tcp://9.9.9.9:65536", "not in 1..65535"),
    ("tcp://9.9.9.9:x", "bad port"),
    ("tcp://9.9.9.9:", "bad port"),
    ("tcp://2620:fe::fe:53", "brackets"),
    ("tcp://[2620:fe::fe:53", "']'"),
    ("tcp://[9.9.9.9]:53", "only for IPv6"),
    ("tcp://[::1]53", "bad port"),
])
def test_bad_modes(mode, words):
    with pytest.raises(ValueError) as exc:
        make(mode)
    assert words in str(exc.value)


def test_fake_ip_needs_a_pool():
    with pytest.raises(ValueError, match="pool"):
        DnsResolver("fake-ip", FakeContext(), pool=None, upstream=Upstream())


@pytest.mark.parametrize("kw", [{"timeout_s": 0}, {"ttl": -1}, {"max_pending": 0}])
def test_bad_numbers(kw):
    with pytest.raises(ValueError):
        make("tor-resolve", **kw)


# -- fake-ip -------------------------------------------------------------------------------


def test_fake_ip_a_and_aaaa():
    resolver, ctx, up = make("fake-ip", ttl=30)
    r = ask(resolver, query("www.Example.com.", "A"))
    msg = r.one()
    assert msg.id == 0x4242 and msg.flags & dns.flags.QR and msg.flags & dns.flags.RA
    assert msg.flags & dns.flags.RD
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.question[0].name == dns.name.from_text("www.example.com.")
    assert answers(msg) == ["198.18.0.1"]
    assert msg.answer[0].ttl == 30 and msg.answer[0].rdtype == dns.rdatatype.A
    assert ask(resolver, query("www.example.com", "AAAA")).one().answer[0].to_text() == \
        "www.example.com. 30 IN AAAA fd98:18::1"
    assert answers(ask(resolver, query("other.example", "A")).one()) == ["198.18.0.2"]
    assert answers(ask(resolver, query("WWW.example.COM", "A")).one()) == ["198.18.0.1"]
    assert up.calls == [] and ctx.streams == []
    assert ctx.extra("dns_fake_ip_noerror") == 4


def test_fake_ip_onion_names():
    resolver, ctx, _ = make("fake-ip")
    onion = "duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion"
    msg = ask(resolver, query(onion, "A")).one()
    assert resolver.pool.name(answers(msg)[0], 1.0) == onion


def test_fake_ip_ptr():
    resolver, ctx, _ = make("fake-ip")
    ask(resolver, query("a.example", "A"))
    ask(resolver, query("b.example", "AAAA"))
    msg = ask(resolver, query("1.0.18.198.in-addr.arpa.", "PTR")).one()
    assert answers(msg) == ["a.example."]
    assert msg.answer[0].name == dns.name.from_text("1.0.18.198.in-addr.arpa.")
    v6 = dns.reversename.from_address("fd98:18::1")
    assert answers(ask(resolver, query(v6.to_text(), "PTR")).one()) == ["b.example."]
    assert answers(ask(resolver, query("1.0.18.198.IN-ADDR.ARPA.", "PTR")).one()) == \
        ["a.example."]
    for name in ("2.0.18.198.in-addr.arpa.",  # in the pool, not allocated
                 "8.8.8.8.in-addr.arpa.",  # outside
                 "0.18.198.in-addr.arpa.",  # not a full address
                 "x.1.0.18.198.in-addr.arpa.",
                 "example.com."):
        assert ask(resolver, query(name, "PTR")).one().rcode() == dns.rcode.NXDOMAIN, name
    assert ctx.extra("dns_fake_ip_nxdomain") == 5
    assert ctx.extra("dns_fake_ip_noerror") == 5


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "ANY", "SRV", "HTTPS", "SOA", "NS", "CNAME"])
def test_fake_ip_other_types_notimp(rdtype):
    resolver, ctx, _ = make("fake-ip")
    msg = ask(resolver, query("example.com", rdtype)).one()
    assert msg.rcode() == dns.rcode.NOTIMP
    assert msg.question[0].rdtype == dns.rdatatype.from_text(rdtype)
    assert not msg.answer
    assert ctx.extra("dns_fake_ip_notimp") == 1


def test_fake_ip_unsendable_names():
    resolver, ctx, _ = make("fake-ip")
    msg = ask(resolver, query(dns.name.Name([b"a b", b"example", b""]), "A")).one()
    assert msg.rcode() == dns.rcode.NXDOMAIN
    msg = ask(resolver, query(dns.name.Name([b"caf\xc3\xa9", b"example", b""]), "A")).one()
    assert msg.rcode() == dns.rcode.NXDOMAIN
    msg = ask(resolver, query(".", "A")).one()
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer
    assert ctx.extra("dns_fake_ip_nodata") == 1
    assert resolver.pool.report()["v4"]["in_use"] == 0


def test_fake_ip_exhausted_is_servfail():
    pool = FakeIpPool("10.9.0.0/30", ttl=60)
    resolver, ctx, _ = make("fake-ip", pool=pool)
    assert ask(resolver, query("a", "A")).one().rcode() == dns.rcode.NOERROR
    assert ask(resolver, query("b", "A")).one().rcode() == dns.rcode.NOERROR
    assert ask(resolver, query("c", "A"), now=10.0).one().rcode() == dns.rcode.SERVFAIL
    assert ctx.extra("dns_fake_ip_servfail") == 1
    assert answers(ask(resolver, query("c", "A"), now=120.0).one()) == ["10.9.0.1"]


def test_fake_ip_report():
    resolver, _, _ = make("fake-ip")
    ask(resolver, query("a", "A"))
    rep = resolver.report()
    assert rep["dns_mode"] == "fake-ip" and rep["dns_pending"] == 0
    assert rep["dns_fake_ip_pool"]["v4"]["in_use"] == 1
    assert resolver.poll_at() is None


# -- tor-resolve ---------------------------------------------------------------------------


def test_tor_resolve_a():
    resolver, ctx, up = make("tor-resolve", ttl=45)
    r = ask(resolver, query("Example.COM.", "A"), now=1.0)
    assert r.got == []
    assert up.calls == [("Example.COM", 0, "resolve")]
    (stream,) = ctx.streams
    assert stream.request.kind == "socks5"
    assert resolver.report()["dns_pending"] == 1
    assert resolver.poll_at() == 6.0
    ctx.now = 2.5
    stream.connect(reply=("93.184.216.34", 0))
    msg = r.one()
    assert r.got[0][1] == 2.5
    assert answers(msg) == ["93.184.216.34"] and msg.answer[0].ttl == 45
    assert msg.question[0].name == dns.name.from_text("Example.COM.")
    assert stream.local == "close"
    ctx.deliver_local_closes()
    assert len(r.got) == 1
    assert resolver.poll_at() is None and resolver.report()["dns_pending"] == 0
    assert ctx.extra("dns_tor_resolve_noerror") == 1


@pytest.mark.parametrize(("rdtype", "result", "expect"), [
    ("A", "192.0.2.7", ["192.0.2.7"]),
    ("A", "2001:db8::7", []),
    ("AAAA", "2001:db8::7", ["2001:db8::7"]),
    ("AAAA", "192.0.2.7", []),
])
def test_tor_resolve_families(rdtype, result, expect):
    resolver, ctx, _ = make("tor-resolve")
    r = ask(resolver, query("example.com", rdtype))
    ctx.streams[0].connect(reply=(result, 0))
    msg = r.one()
    assert msg.rcode() == dns.rcode.NOERROR
    assert answers(msg) == expect
    assert ctx.extra("dns_tor_resolve_" + ("noerror" if expect else "nodata")) == 1


def test_tor_resolve_ptr():
    resolver, ctx, up = make("tor-resolve")
    r = ask(resolver, query("8.8.8.8.in-addr.arpa.", "PTR"))
    assert up.calls == [("8.8.8.8", 0, "resolve_ptr")]
    ctx.streams[0].connect(reply=("dns.google", 0))
    msg = r.one()
    assert answers(msg) == ["dns.google."]
    v6 = dns.reversename.from_address("2001:4860:4860::8888").to_text()
    r = ask(resolver, query(v6, "PTR"))
    assert up.calls[-1] == ("2001:4860:4860::8888", 0, "resolve_ptr")
    ctx.streams[1].connect(reply=("dns.google.", 0))
    assert answers(r.one()) == ["dns.google."]


@pytest.mark.parametrize("name", ["1.1.168.192.in-addr.arpa.", "1.0.0.127.in-addr.arpa.",
                                  "1.0.18.198.in-addr.arpa.", "3.2.1.in-addr.arpa.",
                                  "example.com."])
def test_tor_resolve_ptr_local_nxdomain(name):
    resolver, ctx, up = make("tor-resolve")
    assert ask(resolver, query(name, "PTR")).one().rcode() == dns.rcode.NXDOMAIN
    assert up.calls == []


@pytest.mark.parametrize(("reason", "rcode"), [
    ("unreachable", dns.rcode.NXDOMAIN),
    ("refused", dns.rcode.SERVFAIL),
    ("timeout", dns.rcode.SERVFAIL),
    ("error", dns.rcode.SERVFAIL),
    ("reset", dns.rcode.SERVFAIL),
])
def test_tor_resolve_failures(reason, rcode):
    resolver, ctx, _ = make("tor-resolve")
    r = ask(resolver, query("nonexistent.example", "A"))
    ctx.now = 3.0
    ctx.streams[0].closed(reason, "socks reply")
    msg = r.one()
    assert msg.rcode() == rcode and r.got[0][1] == 3.0
    key = "nxdomain" if rcode == dns.rcode.NXDOMAIN else "servfail"
    assert ctx.extra(f"dns_tor_resolve_{key}") == 1
    assert resolver.poll_at() is None


def test_upstream_failure_lines_naming_thousands_of_names_are_bounded(caplog):
    """Each failure quotes the guest's name, so per-cause limiting alone would log each:
    the resolver's upstream lines are bounded altogether (FAILURE_LINES per LOG_EVERY_S)."""
    resolver, ctx, _ = make("tor-resolve", timeout_s=1.0)
    n, span = 3000, 30.0
    with caplog.at_level(logging.INFO, logger=ctx.log.name):
        for i in range(n):
            now = span * i / n
            ask(resolver, query(f"n{i}.example", "A", id=i), now=now)
            if i % 2:
                ctx.now = now
                ctx.streams[-1].closed("error", f"SOCKS proxy could not resolve n{i}.example")
            else:
                resolver.on_timer(now + 1.0)  # timed out
    lines = [r.getMessage() for r in caplog.records if r.name == ctx.log.name]
    assert 0 < len(lines) <= FAILURE_LINES * (span // LOG_EVERY_S + 1)
    assert any("left out before this one" in ln for ln in lines)
    assert ctx.extra("dns_tor_resolve_servfail") == n


@pytest.mark.parametrize("bad", [None, ("not-an-ip", 0), ("", 0)])
def test_tor_resolve_bad_reply_is_servfail(bad):
    resolver, ctx, _ = make("tor-resolve")
    r = ask(resolver, query("example.com", "A"))
    ctx.streams[0].connect(reply=bad)
    assert r.one().rcode() == dns.rcode.SERVFAIL
    assert ctx.streams[0].local == "abort"


def test_tor_resolve_bad_ptr_reply_is_servfail():
    resolver, ctx, _ = make("tor-resolve")
    r = ask(resolver, query("8.8.8.8.in-addr.arpa.", "PTR"))
    ctx.streams[0].connect(reply=("a" * 70 + ".example", 0))  # label too long
    assert r.one().rcode() == dns.rcode.SERVFAIL


def test_tor_resolve_timeout():
    resolver, ctx, _ = make("tor-resolve", timeout_s=2.0)
    r1 = ask(resolver, query("slow.example", "A"), now=10.0)
    r2 = ask(resolver, query("slower.example", "A"), now=11.0)
    assert resolver.poll_at() == 12.0
    resolver.on_timer(11.9)
    assert r1.got == [] and r2.got == []
    resolver.on_timer(12.0)
    assert r1.one().rcode() == dns.rcode.SERVFAIL and r1.got[0][1] == 12.0
    assert r2.got == []
    assert ctx.streams[0].local == "abort"
    assert resolver.poll_at() == 13.0
    # a late answer for the timed-out query is ignored
    ctx.streams[0].connect(reply=("192.0.2.1", 0))
    ctx.deliver_local_closes()
    assert len(r1.got) == 1
    ctx.streams[1].connect(reply=("192.0.2.2", 0))
    assert answers(r2.one()) == ["192.0.2.2"]
    assert resolver.poll_at() is None
    assert ctx.extra("dns_tor_resolve_servfail") == 1


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "ANY", "SRV", "CAA"])
def test_tor_resolve_other_types_notimp(rdtype):
    resolver, ctx, up = make("tor-resolve")
    assert ask(resolver, query("example.com", rdtype)).one().rcode() == dns.rcode.NOTIMP
    assert up.calls == []
    assert ctx.extra("dns_tor_resolve_notimp") == 1


def test_tor_resolve_unsendable_name():
    resolver, ctx, up = make("tor-resolve")
    msg = ask(resolver, query(dns.name.Name([b"a\x00b", b"example", b""]), "A")).one()
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert up.calls == []


def test_stream_ended_or_data_in_tor_mode():
    resolver, ctx, _ = make("tor-resolve")
    r = ask(resolver, query("example.com", "A"))
    ctx.streams[0].connected = True
    ctx.streams[0].data(b"junk")  # ignored
    assert r.got == []
    ctx.streams[0].end()
    assert r.one().rcode() == dns.rcode.SERVFAIL


def test_open_stream_failure_is_servfail():
    ctx = FakeContext()

    def broken(host, port, command):
        raise ValueError("no proxy")

    resolver = DnsResolver("tor-resolve", ctx, pool=None, upstream=broken)
    assert ask(resolver, query("example.com", "A")).one().rcode() == dns.rcode.SERVFAIL
    assert resolver.poll_at() is None


def test_handler_called_inside_open_stream():
    """A bridge may fail a stream at once; the reply must still be exactly one."""
    ctx = FakeContext()
    original = ctx.open_stream

    def eager(request, handler):
        stream = original(request, handler)
        stream.closed("unreachable", "at once")
        return stream

    ctx.open_stream = eager
    resolver = DnsResolver("tor-resolve", ctx, pool=None, upstream=Upstream())
    r = ask(resolver, query("example.com", "A"))
    assert r.one().rcode() == dns.rcode.NXDOMAIN
    assert resolver.poll_at() is None and resolver.report()["dns_pending"] == 0


def test_stop_aborts_without_replies():
    resolver, ctx, _ = make("tor-resolve")
    r = ask(resolver, query("a.example", "A"))
    ask(resolver, query("b.example", "AAAA"))
    resolver.stop(0.0)
    assert [s.local for s in ctx.streams] == ["abort", "abort"]
    ctx.deliver_local_closes()
    assert r.got == []
    assert resolver.poll_at() is None and resolver.report()["dns_pending"] == 0


def test_max_pending():
    resolver, ctx, _ = make("tor-resolve", max_pending=2)
    ask(resolver, query("a.example", "A"))
    ask(resolver, query("b.example", "A"))
    r = ask(resolver, query("c.example", "A"))
    assert r.one().rcode() == dns.rcode.SERVFAIL
    assert len(ctx.streams) == 2 and ctx.extra("dns_overload") == 1
    ctx.streams[0].connect(reply=("192.0.2.1", 0))
    ask(resolver, query("d.example", "A"))
    assert len(ctx.streams) == 3


def test_deadline_heap_stays_small():
    resolver, ctx, _ = make("tor-resolve")
    for i in range(1000):
        ask(resolver, query(f"n{i}.example", "A"), now=float(i))
        ctx.streams[-1].connect(reply=("192.0.2.1", 0))
    assert len(resolver._deadlines) < 100
    assert resolver.poll_at() is None


# -- tcp:// --------------------------------------------------------------------------------


def test_tcp_forward_in_pieces():
    resolver, ctx, up = make(TCP_MODE)
    q = query("example.com", "A", use_edns=0, payload=1232)
    wire = q.to_wire()
    r = ask(resolver, wire, now=1.0)
    assert up.calls == [("9.9.9.9", 53, "connect")]
    stream = ctx.streams[0]
    assert stream.written == b""
    stream.connect()
    assert bytes(stream.written) == framed(wire)  # the query as received
    resp = upstream_response(q, ("A", "192.0.2.1"), ("A", "192.0.2.2"))
    data = framed(resp)
    for i in range(len(data)):
        assert r.got == []
        ctx.now = 2.0 + i
        stream.data(data[i:i + 1])
    assert r.got == [(resp.to_wire(), 2.0 + len(data) - 1)]
    assert stream.local == "close"
    ctx.deliver_local_closes()
    assert len(r.got) == 1
    assert ctx.extra("dns_tcp_noerror") == 1


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 10])
def test_tcp_forward_with_trailing_garbage(cut):
    resolver, ctx, _ = make(TCP_MODE)
    q = query("example.com", "AAAA")
    r = ask(resolver, q)
    ctx.streams[0].connect()
    resp = upstream_response(q, ("AAAA", "2001:db8::1"))
    data = framed(resp) + b"\x00\x10garbage-garbage" + framed(resp)
    ctx.streams[0].data(data[:cut])
    ctx.streams[0].data(data[cut:])
    assert r.got[0][0] == resp.to_wire()
    assert len(r.got) == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_tcp_forward_any_split(sizes):
    resolver, ctx, _ = make(TCP_MODE)
    q = query("split.example", "TXT")
    r = ask(resolver, q)
    ctx.streams[0].connect()
    resp = upstream_response(q, ("TXT", '"' + "x" * 200 + '"'))
    data = framed(resp) + b"trailing"
    pos = 0
    for n in sizes:
        if pos >= len(data) or r.got:
            break
        ctx.streams[0].data(data[pos:pos + n])
        pos += n
    if not r.got:
        ctx.streams[0].data(data[pos:])
    assert r.got[0][0] == resp.to_wire() and len(r.got) == 1


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "PTR", "MX", "TXT", "ANY"])
def test_tcp_forwards_every_type(rdtype):
    resolver, ctx, _ = make(TCP_MODE)
    name = "4.3.2.1.in-addr.arpa." if rdtype == "PTR" else "example.com."
    q = query(name, rdtype)
    r = ask(resolver, q)
    ctx.streams[0].connect()
    assert bytes(ctx.streams[0].written) == framed(q)
    rr = {"A": ("A", "192.0.2.1"), "AAAA": ("AAAA", "2001:db8::1"),
          "PTR": ("PTR", "host.example."), "MX": ("MX", "10 mx.example."),
          "TXT": ("TXT", '"v=spf1 -all"'), "ANY": ("A", "192.0.2.9")}[rdtype]
    resp = upstream_response(q, rr)
    ctx.streams[0].data(framed(resp))
    msg = r.one()
    assert msg.id == q.id and answers(msg) == [rr[1]]


def test_tcp_relays_nxdomain():
    resolver, ctx, _ = make(TCP_MODE)
    q = query("nope.example", "A")
    r = ask(resolver, q)
    ctx.streams[0].connect()
    resp = dns.message.make_response(q)
    resp.set_rcode(dns.rcode.NXDOMAIN)
    ctx.streams[0].data(framed(resp))
    assert r.one().rcode() == dns.rcode.NXDOMAIN
    assert ctx.extra("dns_tcp_nxdomain") == 1
    resp.set_rcode(dns.rcode.REFUSED)
    r = ask(resolver, q)
    ctx.streams[1].connect()
    ctx.streams[1].data(framed(resp))
    assert r.one().rcode() == dns.rcode.REFUSED
    assert ctx.extra("dns_tcp_refused") == 1


def test_tcp_id_mismatch():
    resolver, ctx, _ = make(TCP_MODE)
    q = query("example.com", "A")
    r = ask(resolver, q)
    ctx.streams[0].connect()
    resp = upstream_response(q, ("A", "192.0.2.1"))
    resp.id = q.id ^ 1
    ctx.streams[0].data(framed(resp))
    msg = r.one()
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.id == q.id and not msg.answer
    assert ctx.extra("dns_upstream_mismatch") == 1
    assert ctx.extra("dns_tcp_servfail") == 1
    assert ctx.streams[0].local == "abort"


def test_tcp_question_mismatch_and_not_a_response():
    resolver, ctx, _ = make(TCP_MODE)
    q = query("example.com", "A")
    other = query("evil.example", "A")
    r = ask(resolver, q)
    ctx.streams[0].connect()
    ctx.streams[0].data(framed(upstream_response(other, ("A", "192.0.2.66"))))
    assert r.one().rcode() == dns.rcode.SERVFAIL
    r = ask(resolver, q)
    ctx.streams[1].connect()
    ctx.streams[1].data(framed(q))  # QR clear: an echo, not a reply
    assert r.one().rcode() == dns.rcode.SERVFAIL
    assert ctx.extra("dns_upstream_mismatch") == 2


def test_tcp_unparseable_reply():
    resolver, ctx, _ = make(TCP_MODE)
    q = query("example.com", "A")
    r = ask(resolver, q)
    ctx.streams[0].connect()
    bad = struct.pack("!HHHHHH", q.id, 0x8180, 1, 5, 0, 0) + b"\x07example"
    ctx.streams[0].data(framed(bad))
    assert r.one().rcode() == dns.rcode.SERVFAIL


def test_tcp_zero_length_reply():
    resolver, ctx, _ = make(TCP_MODE)
    r = ask(resolver, query("example.com", "A"))
    ctx.streams[0].connect()
    ctx.streams[0].data(b"\x00\x00")
    assert r.one().rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("how", ["refused", "timeout", "unreachable", "reset", "eof", "timer"])
def test_tcp_upstream_failures(how):
    resolver, ctx, _ = make(TCP_MODE, timeout_s=3.0)
    q = query("example.com", "A")
    r = ask(resolver, q, now=5.0)
    stream = ctx.streams[0]
    if how == "eof":
        stream.connect()
        stream.data(framed(upstream_response(q, ("A", "192.0.2.1")))[:10])
        stream.end()
    elif how == "timer":
        stream.connect()
        resolver.on_timer(8.0)
        assert stream.local == "abort"
    else:
        stream.closed(how)
    msg = r.one()
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.id == q.id
    assert ctx.extra("dns_tcp_servfail") == 1
    assert resolver.poll_at() is None


def test_tcp_short_writes():
    resolver, ctx, _ = make(TCP_MODE)
    q = query("example.com", "A")
    r = ask(resolver, q)
    stream = ctx.streams[0]
    stream.room = 5
    stream.connect()
    assert bytes(stream.written) == framed(q)[:5]
    stream.writable(7)
    assert bytes(stream.written) == framed(q)[:12]
    stream.writable()
    assert bytes(stream.written) == framed(q)
    stream.writable()
    assert bytes(stream.written) == framed(q)
    stream.data(framed(upstream_response(q, ("A", "192.0.2.1"))))
    assert answers(r.one()) == ["192.0.2.1"]


def test_tcp_to_ipv6_upstream():
    resolver, ctx, up = make("tcp://[2620:fe::fe]:853")
    ask(resolver, query("example.com", "A"))
    assert up.calls == [("2620:fe::fe", 853, "connect")]


def test_tcp_zone_transfer_notimp():
    resolver, ctx, up = make(TCP_MODE)
    for rdtype in ("AXFR", "IXFR"):
        assert ask(resolver, query("example.com", rdtype),
                   transport="tcp").one().rcode() == dns.rcode.NOTIMP
    assert up.calls == []
    assert ctx.extra("dns_tcp_notimp") == 2


# -- sizes and truncation ------------------------------------------------------------------


def big_exchange(n: int, **kw) -> tuple[dns.message.Message, dns.message.Message]:
    q = query("big.example", "A", **kw)
    resp = upstream_response(q, *[("A", f"10.0.{i // 256}.{i % 256}") for i in range(n)])
    return q, resp


def relay(q: dns.message.Message, resp: dns.message.Message, transport: str = "udp"):
    resolver, ctx, _ = make(TCP_MODE)
    r = ask(resolver, q, transport=transport)
    ctx.streams[0].connect()
    ctx.streams[0].data(framed(resp))
    return r, ctx


@pytest.mark.parametrize(("edns", "limit"), [
    (None, 512), (300, 512), (512, 512), (1000, 1000), (1232, 1232), (4096, 1232),
    (65535, 1232)])
def test_udp_limits(edns, limit):
    kw = {} if edns is None else {"use_edns": 0, "payload": edns}
    q, resp = big_exchange(200, **kw)
    assert len(resp.to_wire(max_size=65535)) > 1232
    r, ctx = relay(q, resp)
    assert len(r.got[0][0]) <= limit
    msg = r.one()
    # the one RRset does not fit: it goes whole (RFC 2181 9), TC sends the VM to TCP
    assert msg.flags & dns.flags.TC and msg.answer == []
    assert msg.question == q.question
    assert ctx.extra("dns_tcp_truncated") == 1 and ctx.extra("dns_tcp_noerror") == 1
    assert (msg.edns >= 0) == (edns is not None)


def cname_chain(n: int, **kw) -> tuple[dns.message.Message, dns.message.Message]:
    """A reply with ``n`` small RRsets (a CNAME chain): truncation can keep some of them."""
    q = query("c0.chain.example", "A", **kw)
    resp = dns.message.make_response(q)
    for i in range(n):
        resp.answer.append(dns.rrset.from_text(f"c{i}.chain.example.", 60, "IN", "CNAME",
                                               f"c{i + 1}.chain.example."))
    resp.answer.append(dns.rrset.from_text(f"c{n}.chain.example.", 60, "IN", "A", "192.0.2.1"))
    return q, resp


@pytest.mark.parametrize(("edns", "limit"), [
    (None, 512), (300, 512), (700, 700), (1000, 1000), (1232, 1232), (4096, 1232)])
def test_udp_limits_keep_what_fits(edns, limit):
    kw = {} if edns is None else {"use_edns": 0, "payload": edns}
    q, resp = cname_chain(150, **kw)
    r, ctx = relay(q, resp)
    wire = r.got[0][0]
    assert limit - 40 < len(wire) <= limit
    msg = r.one()
    assert msg.flags & dns.flags.TC
    assert 0 < len(msg.answer) < 151
    assert msg.answer == resp.answer[:len(msg.answer)]  # a prefix, whole RRsets
    assert ctx.extra("dns_tcp_truncated") == 1
    r, ctx = relay(q, resp, transport="tcp")
    assert len(r.one().answer) == 151 and not r.one().flags & dns.flags.TC


def test_udp_reply_that_fits_is_untouched():
    q, resp = big_exchange(50, use_edns=0, payload=1232)
    assert 512 < len(resp.to_wire()) <= 1232
    r, ctx = relay(q, resp)
    assert r.got[0][0] == resp.to_wire()
    assert ctx.extra("dns_tcp_truncated") == 0
    q, resp = big_exchange(50)
    r, ctx = relay(q, resp)
    assert r.one().flags & dns.flags.TC and len(r.got[0][0]) <= 512


def test_tcp_transport_gets_everything():
    q, resp = big_exchange(1000)
    assert len(resp.to_wire()) > 10000
    r, ctx = relay(q, resp, transport="tcp")
    msg = r.one()
    assert not msg.flags & dns.flags.TC and len(msg.answer[0]) == 1000
    assert ctx.extra("dns_tcp_truncated") == 0


def test_truncation_keeps_whole_rrsets():
    q = query("big.example", "TXT")
    resp = dns.message.make_response(q)
    resp.answer.append(dns.rrset.from_text("big.example.", 60, "IN", "TXT",
                                           '"' + "a" * 200 + '"', '"' + "b" * 200 + '"',
                                           '"' + "c" * 200 + '"'))
    r, _ = relay(q, resp)
    msg = r.one()
    assert msg.flags & dns.flags.TC and msg.answer == []
    assert msg.question[0].name == dns.name.from_text("big.example.")


def test_replies_advertise_edns_when_asked():
    resolver, _, _ = make("fake-ip")
    msg = ask(resolver, query("example.com", "A", use_edns=0, payload=4096)).one()
    assert msg.edns == 0 and msg.payload == 1232
    msg = ask(resolver, query("example.com", "A")).one()
    assert msg.edns == -1


# -- malformed and unusual queries -----------------------------------------------------------


MODES = ["fake-ip", "tor-resolve", TCP_MODE]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00"])
def test_shorter_than_a_header(mode, garbage):
    resolver, ctx, _ = make(mode)
    assert ask(resolver, garbage).got == []
    assert ctx.extra("dns_malformed") == 1


@pytest.mark.parametrize("mode", MODES)
def test_truncated_question_is_formerr(mode):
    resolver, ctx, up = make(mode)
    key = parse_mode(mode)[0]
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    for wire in (header, header + b"\x07exam", query("example.com").to_wire()[:-1],
                 query("example.com").to_wire() + b"\x00"):
        msg = ask(resolver, wire).one()
        assert msg.rcode() == dns.rcode.FORMERR and msg.id == struct.unpack("!H", wire[:2])[0]
        assert msg.flags & dns.flags.QR
    assert ctx.extra(f"dns_{key}_formerr") == 4
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_zero_questions_is_formerr(mode):
    resolver, ctx, _ = make(mode)
    q = query("example.com")
    q.question = []
    msg = ask(resolver, q).one()
    assert msg.rcode() == dns.rcode.FORMERR and msg.id == q.id


@pytest.mark.parametrize("mode", MODES)
def test_two_questions_is_notimp(mode):
    resolver, ctx, up = make(mode)
    q = query("example.com", "A")
    q.find_rrset(q.question, dns.name.from_text("example.org."), dns.rdataclass.IN,
                 dns.rdatatype.A, create=True)
    assert len(q.question) == 2
    msg = ask(resolver, q).one()
    assert msg.rcode() == dns.rcode.NOTIMP
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY,
                                    dns.opcode.UPDATE, 7, 15])
def test_other_opcodes_notimp(mode, opcode):
    resolver, ctx, up = make(mode)
    q = query("example.com", "SOA")
    q.set_opcode(opcode)
    msg = ask(resolver, q).one()
    assert msg.rcode() == dns.rcode.NOTIMP and msg.opcode() == opcode and msg.id == q.id
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_chaos_class_notimp(mode):
    resolver, _, up = make(mode)
    q = query("version.bind", "TXT", rdclass="CH")
    assert ask(resolver, q).one().rcode() == dns.rcode.NOTIMP
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_edns_version_1_is_badvers(mode):
    resolver, ctx, up = make(mode)
    msg = ask(resolver, query("example.com", "A", use_edns=1)).one()
    assert msg.rcode() == dns.rcode.BADVERS and msg.edns == 0
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_responses_are_not_answered(mode):
    resolver, ctx, _ = make(mode)
    q = query("example.com", "A")
    resp = dns.message.make_response(q)
    assert ask(resolver, resp).got == []
    assert ctx.extra("dns_malformed") == 1


def test_rd_and_cookie_options():
    resolver, _, _ = make("fake-ip")
    q = query("example.com", "A", use_edns=0, options=[dns.edns.GenericOption(10, b"\x01" * 8)])
    q.flags &= ~dns.flags.RD
    msg = ask(resolver, q).one()
    assert not msg.flags & dns.flags.RD and answers(msg) == ["198.18.0.1"]


def finish(resolver: DnsResolver, ctx: FakeContext, now: float) -> None:
    resolver.on_timer(now + resolver.timeout_s)
    ctx.deliver_local_closes()


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(mode, data):
    resolver, ctx, _ = make(mode)
    r = ask(resolver, data)
    finish(resolver, ctx, 0.0)
    if len(data) < 12 or data[2] & 0x80:
        assert r.got == []
        return
    msg = r.one()
    assert msg.id == struct.unpack("!H", data[:2])[0]
    assert msg.flags & dns.flags.QR
    assert len(r.got[0][0]) <= 1232


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_queries(mode, data):
    """Valid queries with bytes flipped: never raise, exactly one parseable reply."""
    rdtype = data.draw(st.sampled_from(["A", "AAAA", "PTR", "MX", "TXT", "ANY", "SRV"]))
    q = query(data.draw(st.sampled_from(["example.com", "1.0.18.198.in-addr.arpa", "x.onion"])),
              rdtype, use_edns=data.draw(st.sampled_from([None, 0])))
    wire = bytearray(q.to_wire())
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(2, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    wire[2] &= 0x7F  # keep QR clear
    resolver, ctx, _ = make(mode)
    r = ask(resolver, bytes(wire), transport=data.draw(st.sampled_from(["udp", "tcp"])))
    if ctx.streams:
        stream = ctx.streams[0]
        outcome = data.draw(st.sampled_from(["timer", "closed", "connect"]))
        if outcome == "closed":
            stream.closed(data.draw(st.sampled_from(["unreachable", "refused"])))
        elif outcome == "connect":
            stream.connect(reply=("192.0.2.1", 0))
            try:
                sent = dns.message.from_wire(bytes(stream.written[2:]))
                stream.data(framed(upstream_response(sent)))
            except Exception:  # only tcp:// mode writes a query
                assert mode != TCP_MODE
    finish(resolver, ctx, 0.0)
    msg = r.one()
    assert msg.id == q.id


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=100, deadline=None)
@given(name=st.lists(st.binary(min_size=1, max_size=20), min_size=0, max_size=5),
       rdtype=st.integers(1, 300))
def test_arbitrary_names_and_types(mode, name, rdtype):
    resolver, ctx, _ = make(mode)
    q = query(dns.name.Name([*name, b""]), rdtype)
    r = ask(resolver, q)
    if ctx.streams:
        ctx.streams[0].connect(reply=("192.0.2.1", 0))
    finish(resolver, ctx, 0.0)
    msg = r.one()
    assert msg.id == q.id
    assert msg.question[0].name == q.question[0].name
