"""dns: the ``socks`` service's own DNS resolver, so that no query from the VM reaches the network.

Theory of operation
    The ``socks`` service consumes every DNS query the VM sends (UDP or TCP port 53)
    and hands the message to :meth:`DnsResolver.answer`. Every query whose header is
    complete (12 bytes, QR clear) gets exactly one well-formed reply through the
    ``reply(wire, now)`` callback: at once, or later from a stream event handler
    with that event's ``now``. Nothing is forwarded in the clear: upstream traffic,
    if any, goes through the proxy as streams the bridge opens
    (``ctx.open_stream(upstream(host, port, command), handler)``).

    Modes (the ``dns`` option of ``socks``):

    ``fake-ip``
        A and AAAA get an address from a :class:`~.fakeip.FakeIpPool` (TTL ``ttl``);
        the VM then connects to it and the service CONNECTs by name, so the name is
        resolved at the proxy's exit (Tor's ``AutomapHostsOnResolve``; ``.onion``
        names work too). PTR for a pool address gives the name back; PTR for
        anything else is NXDOMAIN. No upstream at all.
    ``tor-resolve``
        A and AAAA are resolved with Tor's SOCKS RESOLVE extension (command
        ``"resolve"``, port 0; the address arrives as ``StreamConnected.reply``); an
        IPv4 result answers A (AAAA gets NODATA) and vice versa. PTR uses
        RESOLVE_PTR (``"resolve_ptr"`` with the address literal as host), except for
        addresses that are not globally routable (private, loopback, link-local,
        the fake-ip ranges...), which get NXDOMAIN locally (RFC 6303). Tor answers
        REP 4 when resolution fails: a stream closed before connecting with reason
        ``"unreachable"`` is NXDOMAIN, any other failure SERVFAIL.
    ``tcp://ADDR:PORT``
        The VM's query, as received, is sent over DNS-over-TCP (2-byte length
        prefix, RFC 7766) through a SOCKS CONNECT to ADDR:PORT (ADDR an IPv4
        literal or a bracketed IPv6 literal; PORT defaults to 53). One length-
        prefixed response is read (it may arrive in pieces, or with more bytes than
        needed), checked (it parses, QR is set, its id and question match the
        query's) and relayed. One stream per query: simple and private (queries are
        not linked by a shared connection), at the price of a handshake each.

    Every mode serves only opcode QUERY with exactly one question of class IN:
    other opcodes, several questions, other classes and the zone-transfer types get
    NOTIMP; zero questions or an unparseable message (with a complete header) get
    FORMERR; EDNS versions above 0 get BADVERS. In fake-ip and tor-resolve modes
    only A, AAAA and PTR are served (others, ANY included, get NOTIMP); names that
    cannot be sent to a proxy as a host name (bytes outside printable ASCII, dots
    or other characters that need escaping inside a label) get NXDOMAIN.

    Size: a reply over UDP fits the client's limit (512 bytes, or its EDNS payload
    size capped at 1232, RFC 9715); when it does not, whole RRsets are dropped and
    TC is set, so the VM retries over TCP, where replies go up to 65535 bytes (the
    caller adds the 2-byte length prefix). Replies advertise an EDNS payload of
    1232 when the query had EDNS, and RA.

    Upstream deadlines: a query whose upstream has not answered within
    ``timeout_s`` gets SERVFAIL and its stream is aborted (:meth:`poll_at`,
    :meth:`on_timer`). At most ``max_pending`` queries wait on upstreams at once;
    beyond that, queries get SERVFAIL at once.

Counters
    ``dns_{fake_ip|tor_resolve|tcp}_{noerror|nodata|nxdomain|notimp|servfail|formerr|
    badvers}``: one per reply (a relayed upstream reply with another rcode counts
    under that rcode's name, lower case); ``..._truncated`` in addition when TC was
    set here. ``dns_malformed``: messages too short for a header, or with QR set
    (replies are never answered, so two resolvers cannot loop), dropped without
    reply. ``dns_upstream_mismatch``: tcp:// replies whose id or question did not
    match. ``dns_overload``: queries refused because ``max_pending`` were waiting.

What it does not do
    No cache in tor-resolve and tcp:// modes (every query goes upstream; the VM's
    own cache and the TTLs are the cache), no coalescing of identical queries, no
    DNSSEC (no validation; DO/AD/CD are not acted on), no negative-caching SOA in
    NXDOMAIN/NODATA replies, no TSIG, no zone transfers, no DNS over TLS/HTTPS
    toward the VM. Tor cannot resolve ``.onion`` names: use fake-ip for those.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.reversename import to_address
from vtl.models.splitlog import FAILURE_LINES, Window

from vtl.service import ServiceContext
from vtl.stream import (
    Stream,
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamRequest,
    StreamWritable,
)

from .fakeip import FakeIpPool, PoolExhausted

Reply = Callable[[bytes, float], None]
Upstream = Callable[[str, int, str], StreamRequest]

HEADER = 12
UDP_DEFAULT = 512  # RFC 1035 limit without EDNS
UDP_MAX = 1232  # largest EDNS payload honoured over UDP (DNS flag day 2020, RFC 9715)
TCP_MAX = 65535
LOG_EVERY_S = 10.0  # one log line per distinct upstream failure per this long
OUR_PAYLOAD = 1232
A, AAAA, PTR = dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.PTR
NOT_SERVED_ANYWHERE = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}
_PARSE_ERRORS = (dns.exception.DNSException, ValueError, UnicodeError, IndexError, struct.error)
_MODE_HELP = "expected 'fake-ip', 'tor-resolve' or 'tcp://ADDR:PORT' (IPv6 ADDR in brackets)"


def parse_mode(mode: str) -> tuple[str, tuple[str, int] | None]:
    """``(mode key, (address, port) or None)``; ValueError saying what is wrong."""
    if mode == "fake-ip":
        return "fake_ip", None
    if mode == "tor-resolve":
        return "tor_resolve", None
    if not isinstance(mode, str) or not mode.startswith("tcp://"):
        raise ValueError(f"dns mode {mode!r}: {_MODE_HELP}")
    rest = mode[len("tcp://"):]
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"dns mode {mode!r}: missing ']' after the IPv6 address")
    else:
        host, sep, port_text = rest.partition(":")
        if ":" in port_text:
            raise ValueError(f"dns mode {mode!r}: put an IPv6 address in brackets, "
                             f"as in tcp://[2001:db8::53]:53")
        tail = sep + port_text
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"dns mode {mode!r}: {host!r} is not an IP address literal") from None
    if addr.version == 4 and rest.startswith("["):
        raise ValueError(f"dns mode {mode!r}: brackets are only for IPv6 addresses")
    port = 53
    if tail:
        digits = tail[1:]
        if not tail.startswith(":") or not digits.isascii() or not digits.isdigit():
            raise ValueError(f"dns mode {mode!r}: bad port {tail!r}")
        port = int(digits)
        if not 1 <= port <= 65535:
            raise ValueError(f"dns mode {mode!r}: port {port} is not in 1..65535")
    return "tcp", (str(addr), port)


def answer_kind(rcode: int, has_answer: bool) -> str:
    """The counter suffix of a reply: noerror / nodata / nxdomain / servfail / ..."""
    if rcode == dns.rcode.NOERROR:
        return "noerror" if has_answer else "nodata"
    return dns.rcode.to_text(rcode).lower()


def hostname(qname: dns.name.Name) -> str | None:
    """``qname`` as a host name a proxy can be given, or None (root, or needs escapes)."""
    text = qname.to_text(omit_final_dot=True)
    if text in ("", ".") or "\\" in text or not text.isascii():
        return None
    return text


@dataclass(eq=False, slots=True)
class _Pending:
    """A query waiting on an upstream stream."""

    seq: int
    query: dns.message.Message
    wire: bytes  # as received
    limit: int  # largest reply the client takes
    reply: Reply
    deadline: float
    stream: Stream | None = None
    done: bool = False
    out: bytes = b""  # tcp://: not yet written
    buf: bytearray = field(default_factory=bytearray)  # tcp://: response bytes so far


class DnsResolver:
    """Answers the VM's DNS queries without sending them to the network (see module doc).

    ``upstream(host, port, command)`` builds the SOCKS5 :class:`StreamRequest` for
    ``command`` in ``"connect"``, ``"resolve"``, ``"resolve_ptr"``. A bad ``mode``,
    fake-ip without ``pool``, or bad numbers raise ValueError. ``ttl`` is the TTL of
    the answers made here; give the pool the same one, so that it holds an address
    for as long as a VM may cache it.
    """

    def __init__(self, mode: str, ctx: ServiceContext, *, pool: FakeIpPool | None,
                 upstream: Upstream, timeout_s: float = 5.0, ttl: int = 60,
                 max_pending: int = 256):
        self.mode = mode
        self.mode_key, self.target = parse_mode(mode)
        if self.mode_key == "fake_ip" and pool is None:
            raise ValueError("dns mode 'fake-ip' needs a fake-ip pool")
        if not timeout_s > 0:
            raise ValueError(f"dns timeout_s {timeout_s!r}: must be > 0")
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ValueError(f"dns ttl {ttl!r}: must be in 0..2147483647")
        if max_pending < 1:
            raise ValueError(f"dns max_pending {max_pending!r}: must be >= 1")
        self.ctx = ctx
        self.pool = pool
        self.upstream = upstream
        self.timeout_s = float(timeout_s)
        self.ttl = int(ttl)
        self.max_pending = max_pending
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap; entries of finished queries linger
        self._seq = 0
        self._logged: dict[str, float] = {}  # upstream failure cause -> when last logged
        # every upstream failure line together: the guest chooses the names they quote
        self._lines = Window(FAILURE_LINES, LOG_EVERY_S)

    # -- entry point -------------------------------------------------------------------

    def answer(self, query: bytes, now: float, reply: Reply, *, transport: str = "udp") -> None:
        """Answer one DNS message from the VM (without the TCP length prefix)."""
        wire = bytes(query)
        if len(wire) < HEADER:
            self.ctx.count("dns_malformed")
            return
        qid, flags = struct.unpack_from("!HH", wire)
        if flags & dns.flags.QR:
            self.ctx.count("dns_malformed")
            return
        limit = UDP_DEFAULT if transport == "udp" else TCP_MAX
        if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
            self._bare(qid, flags, dns.rcode.NOTIMP, now, reply)
            return
        try:
            msg = dns.message.from_wire(wire)
        except _PARSE_ERRORS:
            self._bare(qid, flags, dns.rcode.FORMERR, now, reply)
            return
        if transport == "udp" and msg.edns >= 0:
            limit = min(max(msg.payload, UDP_DEFAULT), UDP_MAX)
        if msg.edns > 0:
            self._rcode(msg, dns.rcode.BADVERS, limit, now, reply)
        elif not msg.question:
            self._rcode(msg, dns.rcode.FORMERR, limit, now, reply)
        elif (len(msg.question) > 1 or msg.question[0].rdclass != dns.rdataclass.IN
              or msg.question[0].rdtype in NOT_SERVED_ANYWHERE):
            self._rcode(msg, dns.rcode.NOTIMP, limit, now, reply)
        elif self.mode_key == "fake_ip":
            self._fake_ip(msg, limit, now, reply)
        elif self.mode_key == "tor_resolve":
            self._tor_resolve(msg, wire, limit, now, reply)
        else:
            assert self.target is not None
            self._start(msg, wire, limit, now, reply, self.target[0], self.target[1], "connect")

    def _host_or_answer(self, msg: dns.message.Message, limit: int, now: float,
                        reply: Reply) -> str | None:
        """The question's name as a proxy can take it; else answer here (the root name:
        NODATA; a name that needs escapes: NXDOMAIN) and say None."""
        qname = msg.question[0].name
        name = hostname(qname)
        if name is None:
            rcode = dns.rcode.NOERROR if qname == dns.name.root else dns.rcode.NXDOMAIN
            self._rcode(msg, rcode, limit, now, reply)
        return name

    # -- fake-ip -----------------------------------------------------------------------

    def _fake_ip(self, msg: dns.message.Message, limit: int, now: float, reply: Reply) -> None:
        assert self.pool is not None
        q = msg.question[0]
        if q.rdtype in (A, AAAA):
            name = self._host_or_answer(msg, limit, now, reply)
            if name is None:
                return
            try:
                addr = self.pool.address(name, 4 if q.rdtype == A else 6, now)
            except PoolExhausted as e:
                self.ctx.log.warning("%s", e)
                self._rcode(msg, dns.rcode.SERVFAIL, limit, now, reply)
                return
            self._data(msg, q.rdtype, addr, limit, now, reply)
        elif q.rdtype == PTR:
            addr = _reverse(q.name)
            name = self.pool.name(addr, now) if addr is not None else None
            if name is None:
                self._rcode(msg, dns.rcode.NXDOMAIN, limit, now, reply)
            else:
                self._data(msg, PTR, name + ".", limit, now, reply)
        else:
            self._rcode(msg, dns.rcode.NOTIMP, limit, now, reply)

    # -- tor-resolve -------------------------------------------------------------------

    def _tor_resolve(self, msg: dns.message.Message, wire: bytes, limit: int, now: float,
                     reply: Reply) -> None:
        q = msg.question[0]
        if q.rdtype in (A, AAAA):
            name = self._host_or_answer(msg, limit, now, reply)
            if name is not None:
                self._start(msg, wire, limit, now, reply, name, 0, "resolve")
        elif q.rdtype == PTR:
            addr = _reverse(q.name)
            if addr is None or not ipaddress.ip_address(addr).is_global:
                self._rcode(msg, dns.rcode.NXDOMAIN, limit, now, reply)
            else:
                self._start(msg, wire, limit, now, reply, addr, 0, "resolve_ptr")
        else:
            self._rcode(msg, dns.rcode.NOTIMP, limit, now, reply)

    def _on_resolved(self, p: _Pending, event: StreamConnected, now: float) -> None:
        q = p.query.question[0]
        host = event.reply[0] if event.reply else None
        if q.rdtype == PTR:
            try:
                target = dns.name.from_text(host) if host else None
            except _PARSE_ERRORS:
                target = None
            if target is None or target == dns.name.root:
                self._finish(p, dns.rcode.SERVFAIL, now)
            else:
                self._finish(p, dns.rcode.NOERROR, now, (PTR, target.to_text()))
            return
        try:
            ip = ipaddress.ip_address(host) if host else None
        except ValueError:
            ip = None
        if ip is None:
            self._finish(p, dns.rcode.SERVFAIL, now)
        elif ip.version == (4 if q.rdtype == A else 6):
            self._finish(p, dns.rcode.NOERROR, now, (q.rdtype, str(ip)))
        else:
            self._finish(p, dns.rcode.NOERROR, now)  # NODATA

    # -- tcp:// ------------------------------------------------------------------------

    def _send_query(self, p: _Pending, stream: Stream, now: float) -> None:
        taken = stream.write(p.out, now)
        p.out = p.out[taken:]

    def _on_bytes(self, p: _Pending, data: bytes, now: float) -> None:
        p.buf += data
        if len(p.buf) < 2:
            return
        need = 2 + int.from_bytes(p.buf[:2], "big")
        if len(p.buf) < need:
            return
        response = bytes(p.buf[2:need])  # anything after it is ignored
        p.buf = bytearray()
        try:
            resp = dns.message.from_wire(response)
        except _PARSE_ERRORS:
            self.ctx.log.info("upstream DNS reply does not parse")
            self._finish(p, dns.rcode.SERVFAIL, now)
            return
        asked = [(r.name, r.rdtype, r.rdclass) for r in p.query.question]
        got = [(r.name, r.rdtype, r.rdclass) for r in resp.question]
        if resp.id != p.query.id or not resp.flags & dns.flags.QR or (got and got != asked):
            self.ctx.count("dns_upstream_mismatch")
            self._finish(p, dns.rcode.SERVFAIL, now)
            return
        self._close(p, now)
        kind = answer_kind(resp.rcode(), bool(resp.answer))
        if len(response) <= p.limit:
            self._count(kind)
            p.reply(response, now)
        else:
            self._send(resp, p.limit, now, p.reply, kind)

    # -- upstream streams ----------------------------------------------------------------

    def _start(self, msg: dns.message.Message, wire: bytes, limit: int, now: float,
               reply: Reply, host: str, port: int, command: str) -> None:
        if len(self._pending) >= self.max_pending:
            self.ctx.count("dns_overload")
            self._rcode(msg, dns.rcode.SERVFAIL, limit, now, reply)
            return
        self._seq += 1
        p = _Pending(self._seq, msg, wire, limit, reply, now + self.timeout_s)
        if command == "connect":
            p.out = len(wire).to_bytes(2, "big") + wire
        self._pending[p.seq] = p

        def handler(event: StreamEvent, when: float) -> None:
            self._on_event(p, event, when)

        try:
            stream = self.ctx.open_stream(self.upstream(host, port, command), handler)
        except Exception:
            self.ctx.log.warning("cannot open a DNS upstream stream", exc_info=True)
            self._finish(p, dns.rcode.SERVFAIL, now)
            return
        if p.done:  # the handler already ran (and finished it) inside open_stream
            return
        p.stream = stream
        heapq.heappush(self._deadlines, (p.deadline, p.seq))
        if len(self._deadlines) > 2 * len(self._pending) + 64:
            self._deadlines = [(d, s) for d, s in self._deadlines if s in self._pending]
            heapq.heapify(self._deadlines)

    def _on_event(self, p: _Pending, event: StreamEvent, now: float) -> None:
        if p.done:
            return  # late events, and the StreamClosed of our own close()/abort()
        if p.stream is None:
            p.stream = event.stream
        if isinstance(event, StreamConnected):
            if self.mode_key == "tor_resolve":
                self._on_resolved(p, event, now)
            else:
                self._send_query(p, event.stream, now)
        elif isinstance(event, StreamWritable):
            if p.out:
                self._send_query(p, event.stream, now)
        elif isinstance(event, StreamData):
            if self.mode_key == "tcp":
                self._on_bytes(p, event.data, now)
        elif isinstance(event, StreamEnded):
            self._finish(p, dns.rcode.SERVFAIL, now, abort=True)
        elif isinstance(event, StreamClosed):
            p.stream = None  # dead: nothing to close
            unresolved = self.mode_key == "tor_resolve" and event.reason == "unreachable"
            if not unresolved:
                self._log_upstream_failure(f"{event.reason}: {event.message}", now)
            self._finish(p, dns.rcode.NXDOMAIN if unresolved else dns.rcode.SERVFAIL, now)

    def _log_upstream_failure(self, cause: str, now: float) -> None:
        """One line per cause every LOG_EVERY_S (a dead proxy must not flood the log)."""
        last = self._logged.get(cause)
        if last is not None and now - last < LOG_EVERY_S:
            return
        if len(self._logged) > 64:
            self._logged.clear()
        self._logged[cause] = now
        more = self._line(now)
        if more is not None:
            self.ctx.log.warning("DNS upstream failed, answered SERVFAIL: %s%s", cause, more)

    def _line(self, now: float) -> str | None:
        """None when the resolver's upstream lines are used up for now (at most
        FAILURE_LINES every LOG_EVERY_S), else what to add about the ones left out."""
        w = self._lines
        before = w.suppressed
        if not w.take(now):
            return None
        w.suppressed = 0
        return f" ({before} more DNS upstream lines left out before this one)" if before else ""

    def _close(self, p: _Pending, now: float, *, abort: bool = False) -> None:
        p.done = True
        self._pending.pop(p.seq, None)
        if p.stream is not None:
            if abort:
                p.stream.abort(now)
            else:
                p.stream.close(now)

    def _finish(self, p: _Pending, rcode: int, now: float,
                data: tuple[int, str] | None = None, *, abort: bool = False) -> None:
        """Reply to a pending query (answer ``data`` = (rdtype, text) or none) and end it."""
        if p.done:
            return
        self._close(p, now, abort=abort or rcode == dns.rcode.SERVFAIL)
        if data is None:
            self._rcode(p.query, rcode, p.limit, now, p.reply)
        else:
            self._data(p.query, data[0], data[1], p.limit, now, p.reply)

    # -- deadlines -----------------------------------------------------------------------

    def poll_at(self) -> float | None:
        """The earliest upstream deadline, or None."""
        while self._deadlines and self._deadlines[0][1] not in self._pending:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def on_timer(self, now: float) -> None:
        """SERVFAIL every query whose upstream missed its deadline; abort its stream."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq = heapq.heappop(self._deadlines)
            p = self._pending.get(seq)
            if p is not None:
                more = self._line(now)
                if more is not None:
                    self.ctx.log.info("DNS upstream for %s timed out%s",
                                      p.query.question[0].name, more)
                self._finish(p, dns.rcode.SERVFAIL, now, abort=True)

    def stop(self, now: float) -> None:
        """Abort every upstream stream; pending queries get no reply."""
        pending, self._pending = list(self._pending.values()), {}
        self._deadlines = []
        for p in pending:
            self._close(p, now, abort=True)

    def report(self) -> dict[str, Any]:
        """Figures for the service's report (keys prefixed, so they merge with others')."""
        out: dict[str, Any] = {"dns_mode": self.mode, "dns_pending": len(self._pending)}
        if self.pool is not None:
            out["dns_fake_ip_pool"] = self.pool.report()
        return out

    # -- building replies ------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self.ctx.count(f"dns_{self.mode_key}_{kind}")

    def _bare(self, qid: int, flags: int, rcode: int, now: float, reply: Reply) -> None:
        """A header-only reply, for messages that could not be parsed (or not as a QUERY)."""
        resp = dns.message.Message(id=qid)
        resp.flags = dns.flags.QR | dns.flags.RA | (flags & dns.flags.RD)
        resp.set_opcode(dns.opcode.from_flags(flags))
        resp.set_rcode(rcode)
        self._count(answer_kind(rcode, False))
        reply(resp.to_wire(), now)

    def _rcode(self, query: dns.message.Message, rcode: int, limit: int, now: float,
               reply: Reply) -> None:
        resp = dns.message.make_response(query, recursion_available=True,
                                         our_payload=OUR_PAYLOAD)
        resp.set_rcode(rcode)
        self._send(resp, limit, now, reply, answer_kind(rcode, False))

    def _data(self, query: dns.message.Message, rdtype: int, text: str, limit: int,
              now: float, reply: Reply) -> None:
        resp = dns.message.make_response(query, recursion_available=True,
                                         our_payload=OUR_PAYLOAD)
        try:
            rrset = dns.rrset.from_text(query.question[0].name, self.ttl, dns.rdataclass.IN,
                                        rdtype, text)
        except _PARSE_ERRORS:
            self.ctx.log.info("cannot answer %s with %r", query.question[0].name, text)
            self._rcode(query, dns.rcode.SERVFAIL, limit, now, reply)
            return
        resp.answer.append(rrset)
        self._send(resp, limit, now, reply, "noerror")

    def _send(self, resp: dns.message.Message, limit: int, now: float, reply: Reply,
              kind: str) -> None:
        try:
            wire = resp.to_wire(max_size=limit, prefer_truncation=True)
        except dns.exception.DNSException:  # not even the question fits: header only
            bare = dns.message.Message(id=resp.id)
            bare.flags = resp.flags | dns.flags.TC
            wire = bare.to_wire()
        self._count(kind)
        if struct.unpack_from("!H", wire, 2)[0] & dns.flags.TC and not resp.flags & dns.flags.TC:
            self._count("truncated")
        reply(wire, now)


def _reverse(qname: dns.name.Name) -> str | None:
    """The address a complete in-addr.arpa / ip6.arpa name stands for, or None."""
    try:
        return to_address(qname)
    except _PARSE_ERRORS:
        return None
