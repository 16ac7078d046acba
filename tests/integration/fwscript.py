"""The firewall differential test's traces: the scripted one, its rule set, and random ones.

:func:`scripted_trace` is the issue's list (handshakes both ways, data,
half-close, out-of-window segments, bare RST and ACK, SYN+FIN, ICMP echo, UDP
request/reply, ICMP errors quoting known and unknown flows, a DHCP broadcast,
IPv6) for the rule set :data:`SCRIPTED_OPTIONS`, which has a rule of every kind
the kernel reference can express. :func:`random_traces` is a hypothesis
strategy: a few flows (5-tuples), each step a segment of one of them with
random flags and sequence and acknowledgement numbers at or near the edges of
the window, over :data:`RANDOM_OPTIONS`.
"""

from __future__ import annotations

from fwtrace import IN4, IN6, OUT4, OUT4B, OUT6, OUT6B, Step, TcpFlow
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

# -- the scripted trace -----------------------------------------------------------------

#: the rule set the scripted trace exercises (a firewall options dict, as in the TOML)
SCRIPTED_OPTIONS: dict[str, object] = {
    "default_in": "drop", "default_out": "accept", "established": True, "invalid": "drop",
    "liberal": False, "loose": True,
    "sets": {"trusted": [f"{OUT4B}/32", f"{OUT6B}/128"]},
    # short enough for the trace to see an entry expire (the random traces send no
    # ICMP, so no step of theirs sits near this edge)
    "timeouts": {"icmp": 2},
    "rules": [
        {"name": "web", "dir": "in", "proto": "tcp", "dport": [8000, "8080-8090"],
         "action": "accept"},
        {"name": "rst9000", "dir": "in", "proto": "tcp", "dport": [9000], "action": "reject"},
        {"name": "unr9001", "dir": "in", "proto": "udp", "dport": [9001], "action": "reject"},
        {"name": "adm9002", "dir": "in", "proto": "tcp", "dport": [9002], "action": "reject",
         "reject_with": "icmp-admin-prohibited"},
        {"name": "mdns", "dir": "in", "proto": "udp", "dport": [5353], "action": "accept"},
        {"name": "ping", "dir": "in", "proto": "icmp", "icmp_type": [8], "action": "accept"},
        {"name": "ping6", "dir": "in", "proto": "icmpv6", "icmp_type": [128],
         "action": "accept"},
        {"name": "trusted", "dir": "in", "proto": "tcp", "dport": [7000],
         "saddr": ["@trusted"], "action": "accept"},
        {"name": "smtp", "dir": "out", "proto": "tcp", "dport": [25], "action": "reject"},
        {"name": "blackhole", "dir": "out", "proto": "udp", "dport": [9999],
         "action": "drop"},
        {"name": "ssh", "dir": "in", "proto": "tcp", "dport": [2222], "tcp_flags": "syn,!ack",
         "limit": "1/second", "burst": 2, "limit_per": "source", "action": "accept"},
    ],
}


def _udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"x" * 8) -> Packet:
    from scapy.layers.inet import UDP
    return (IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)) / UDP(
        sport=sport, dport=dport) / data


def _icmp_error(src: str, dst: str, quoted: Packet, typ: int = 3, code: int = 3) -> Packet:
    """An ICMP(v6) error from ``src`` to ``dst`` quoting ``quoted`` (as it was sent)."""
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6DestUnreach
    body = bytes(quoted)[:64]
    if ":" in src:
        return IPv6(src=src, dst=dst) / ICMPv6DestUnreach(code=code) / body
    return IP(src=src, dst=dst) / ICMP(type=typ, code=code) / body


def scripted_trace() -> list[Step]:
    """The issue's trace for :data:`SCRIPTED_OPTIONS`: handshakes both ways, data,
    half-close, out-of-window segments, bare RST and ACK, SYN+FIN, ICMP echo, UDP
    request/reply, ICMP errors quoting known and unknown flows, a DHCP broadcast,
    rejects of each kind, a named set, a per-source rate limit, and IPv6."""
    from scapy.layers.inet import ICMP, UDP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest
    steps: list[Step] = []
    add = steps.append
    # A: a connection from outside to an open port, with data, half-close, junk
    a = TcpFlow("outside", OUT4, IN4, 40001, 8080)
    add(a.seg("A01 in-syn", "c", "S"))
    add(a.seg("A02 synack", "s", "SA"))
    add(a.seg("A03 ack", "c", "A"))
    add(a.seg("A04 data-in", "c", "PA", b"q" * 100))
    add(a.seg("A05 ack", "s", "A"))
    add(a.seg("A06 data-out", "s", "PA", b"r" * 50))
    add(a.seg("A07 ack", "c", "A"))
    add(a.seg("A08 out-of-window seq", "c", "PA", b"z" * 10, seq_off=1 << 30))
    add(a.seg("A09 ack beyond sent", "c", "A", ack_off=1 << 30))
    add(a.seg("A10 rst out-of-window", "c", "R", seq_off=1 << 30))
    add(a.seg("A11 fin from inside", "s", "FA"))
    add(a.seg("A12 ack of fin", "c", "A"))
    add(a.seg("A13 data half-closed", "c", "PA", b"h" * 20))
    add(a.seg("A14 ack", "s", "A"))
    add(a.seg("A15 fin from outside", "c", "FA"))
    add(a.seg("A16 last ack", "s", "A"))
    add(a.seg("A17 data after close", "c", "PA", b"late"))
    # B: a connection from inside (default_out accept), reset by the inside
    b = TcpFlow("inside", IN4, OUT4, 40002, 443, cisn=77777, sisn=3_000_000_000)
    add(b.seg("B01 out-syn", "c", "S"))
    add(b.seg("B02 synack", "s", "SA"))
    add(b.seg("B03 ack", "c", "A"))
    add(b.seg("B04 data-out", "c", "PA", b"GET / HTTP/1.0\r\n\r\n"))
    add(b.seg("B05 data-in", "s", "PA", b"HTTP/1.0 200 OK\r\n\r\n"))
    add(b.seg("B06 rst in window", "c", "R"))
    add(b.seg("B07 data after rst", "s", "PA", b"more"))
    # C: rejects and drops from outside
    add(TcpFlow("outside", OUT4, IN4, 40003, 9000).seg("C01 syn to reject", "c", "S"))
    add(Step("C02 udp to reject", "outside", _udp(OUT4, IN4, 40004, 9001)))
    add(TcpFlow("outside", OUT4, IN4, 40005, 9002).seg("C03 syn admin-prohib", "c", "S"))
    add(TcpFlow("outside", OUT4, IN4, 40006, 1234).seg("C04 syn no rule", "c", "S"))
    add(Step("C05 udp no rule", "outside", _udp(OUT4, IN4, 40007, 5000)))
    # D: rules toward the outside
    add(TcpFlow("inside", IN4, OUT4, 40008, 25).seg("D01 out syn smtp", "c", "S"))
    add(Step("D02 out udp blackhole", "inside", _udp(IN4, OUT4, 40009, 9999)))
    # E: segments without a connection, bad flags
    add(TcpFlow("outside", OUT4, IN4, 40010, 8081).seg("E01 bare ack open", "c", "A"))
    add(TcpFlow("outside", OUT4, IN4, 40011, 1234).seg("E02 bare ack closed", "c", "A"))
    add(TcpFlow("outside", OUT4, IN4, 40012, 8082).seg("E03 bare rst", "c", "R"))
    add(TcpFlow("outside", OUT4, IN4, 40013, 8083).seg("E04 syn+fin", "c", "SF"))
    add(TcpFlow("outside", OUT4, IN4, 40014, 8084).seg("E05 syn+rst", "c", "SR"))
    add(TcpFlow("outside", OUT4, IN4, 40015, 8085).seg("E06 no flags", "c", ""))
    add(TcpFlow("inside", IN4, OUT4, 40016, 80).seg("E07 out bare ack", "c", "A"))
    add(TcpFlow("inside", IN4, OUT4, 40017, 80).seg("E08 out syn+fin", "c", "SF"))
    # F: ICMP echo both ways, an unsolicited reply
    add(Step("F01 ping in", "outside", IP(src=OUT4, dst=IN4) / ICMP(type=8, id=7, seq=1)))
    add(Step("F02 pong", "inside", IP(src=IN4, dst=OUT4) / ICMP(type=0, id=7, seq=1)))
    add(Step("F03 ping out", "inside", IP(src=IN4, dst=OUT4) / ICMP(type=8, id=8, seq=1)))
    add(Step("F04 pong", "outside", IP(src=OUT4, dst=IN4) / ICMP(type=0, id=8, seq=1)))
    add(Step("F05 unsolicited pong", "outside",
             IP(src=OUT4, dst=IN4) / ICMP(type=0, id=9, seq=1)))
    add(Step("F06 timestamp in", "outside", IP(src=OUT4, dst=IN4) / ICMP(type=13, id=10)))
    add(Step("F07 ping out", "inside", IP(src=IN4, dst=OUT4) / ICMP(type=8, id=11, seq=1)))
    add(Step("F08 pong after timeout", "outside",
             IP(src=OUT4, dst=IN4) / ICMP(type=0, id=11, seq=1), pause=3.0))
    # G: UDP request/reply both ways
    dns = _udp(IN4, OUT4, 40020, 53)
    add(Step("G01 udp out request", "inside", dns))
    add(Step("G02 udp reply", "outside", _udp(OUT4, IN4, 53, 40020)))
    add(Step("G03 udp in allowed", "outside", _udp(OUT4, IN4, 40021, 5353)))
    add(Step("G04 udp reply", "inside", _udp(IN4, OUT4, 5353, 40021)))
    # H: ICMP errors quoting a known flow (related) and an unknown one (invalid)
    add(Step("H01 icmp err known udp", "outside", _icmp_error(OUT4, IN4, dns)))
    b_data = TcpFlow("inside", IN4, OUT4, 40002, 443).seg("", "c", "A").pkt
    add(Step("H02 icmp err reset tcp", "outside", _icmp_error(OUT4, IN4, b_data, 3, 4)))
    add(Step("H03 icmp err unknown", "outside",
             _icmp_error(OUT4, IN4, _udp(IN4, OUT4, 40999, 53))))
    add(Step("H04 icmp err by another host", "outside",
             _icmp_error(OUT4B, IN4, a.seg("", "s", "A").pkt, 3, 4)))
    # I: a DHCP discover from the guest (a broadcast; a router never forwards it)
    add(Step("I01 dhcp discover", "inside",
             IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
             / (b"\x01\x01\x06\x00" + b"\x00" * 236 + b"c\x82Sc\x35\x01\x01\xff"),
             broadcast=True))
    # J: a named set, a per-source rate limit on SYNs
    add(TcpFlow("outside", OUT4B, IN4, 40030, 7000).seg("J01 syn trusted", "c", "S"))
    add(TcpFlow("outside", OUT4, IN4, 40031, 7000).seg("J02 syn untrusted", "c", "S"))
    for n in range(4):
        add(TcpFlow("outside", OUT4, IN4, 40040 + n, 2222).seg(f"J{3 + n:02d} ssh syn", "c",
                                                              "S"))
    add(TcpFlow("outside", OUT4B, IN4, 40045, 2222).seg("J07 ssh other src", "c", "S"))
    # K: IPv6
    k = TcpFlow("outside", OUT6, IN6, 40050, 8080)
    add(k.seg("K01 v6 in-syn", "c", "S"))
    add(k.seg("K02 v6 synack", "s", "SA"))
    add(k.seg("K03 v6 ack", "c", "A"))
    add(k.seg("K04 v6 data", "c", "PA", b"six" * 10))
    add(k.seg("K05 v6 out-of-window", "s", "PA", b"w", seq_off=-(1 << 30)))
    add(k.seg("K06 v6 rst", "s", "RA"))
    add(TcpFlow("outside", OUT6, IN6, 40051, 9000).seg("K07 v6 syn to reject", "c", "S"))
    add(Step("K08 v6 udp to reject", "outside", _udp(OUT6, IN6, 40052, 9001)))
    add(TcpFlow("outside", OUT6, IN6, 40053, 1234).seg("K09 v6 syn no rule", "c", "S"))
    add(Step("K10 v6 ping in", "outside", IPv6(src=OUT6, dst=IN6) / ICMPv6EchoRequest(id=5)))
    add(Step("K11 v6 pong", "inside", IPv6(src=IN6, dst=OUT6) / ICMPv6EchoReply(id=5)))
    dns6 = _udp(IN6, OUT6, 40054, 53)
    add(Step("K12 v6 udp out", "inside", dns6))
    add(Step("K13 v6 udp reply", "outside", _udp(OUT6, IN6, 53, 40054)))
    add(Step("K14 v6 icmp err known", "outside", _icmp_error(OUT6, IN6, dns6, code=4)))
    add(Step("K15 v6 icmp err unknown", "outside",
             _icmp_error(OUT6, IN6, _udp(IN6, OUT6, 40998, 53), code=4)))
    add(TcpFlow("outside", OUT6B, IN6, 40055, 7000).seg("K16 v6 syn trusted", "c", "S"))
    add(TcpFlow("outside", OUT6, IN6, 40056, 7000).seg("K17 v6 syn untrusted", "c", "S"))
    add(TcpFlow("inside", IN6, OUT6, 40057, 25).seg("K18 v6 out smtp", "c", "S"))
    return steps


#: scripted steps whose outcomes may differ, with the reason
SCRIPTED_ALLOWLIST: dict[str, str] = {
    "I01 dhcp discover": "a router never forwards a limited broadcast; a bridge does (or "
                         "its own deny list drops it): not a firewall verdict",
}


# -- random traces ----------------------------------------------------------------------

#: the random traces run over the scripted rule set (one bridge serves both tests)
RANDOM_OPTIONS = SCRIPTED_OPTIONS
#: (client side, client, server, server port): open in, out, rejected, IPv6 in and out
TCP_FLOWS = (("outside", OUT4, IN4, 8080), ("inside", IN4, OUT4, 443),
             ("outside", OUT4, IN4, 9000), ("outside", OUT6, IN6, 8081),
             ("inside", IN6, OUT6, 80))
FLAGS = ("S", "SA", "A", "A", "PA", "PA", "FA", "R", "RA", "F", "SF", "SR", "", "FPU", "SRAF")
#: sequence/ack offsets from the sender's next and the peer's next: in order, and at the
#: edges of a 65535-byte window (just inside, just outside, either end) and far away
OFFSETS = (0, 0, 0, 0, 1, -1, 65534, 65535, 65536, -65535, -65536, -65537, 1 << 31)
WINDOWS = (65535, 65535, 1024, 0)


def random_traces(steps: int = 20) -> object:
    """A hypothesis strategy of random trace specs: ``(isns, handshakes, moves)`` where
    ``moves`` are ``(flow, who, flags, seq_off, ack_off, window, payload)`` for a TCP flow
    of :data:`TCP_FLOWS` or ``(len(TCP_FLOWS), who, ...)`` for a UDP exchange; pure data,
    so a divergence's spec can be printed and replayed (:func:`build_trace`)."""
    from hypothesis import strategies as st
    n = len(TCP_FLOWS)
    move = st.tuples(st.integers(0, n), st.sampled_from("cs"), st.sampled_from(FLAGS),
                     st.sampled_from(OFFSETS), st.sampled_from(OFFSETS),
                     st.sampled_from(WINDOWS), st.sampled_from((0, 0, 1, 100)))
    isn = st.integers(0, 2**32 - 1) | st.sampled_from((0, 2**32 - 1, 2**32 - 100))
    return st.tuples(st.lists(st.tuples(isn, isn), min_size=n, max_size=n),
                     st.lists(st.booleans(), min_size=n, max_size=n),
                     st.lists(move, min_size=steps, max_size=steps))


def build_trace(spec: tuple, base_port: int) -> list[Step]:
    """The steps of a :func:`random_traces` spec; flow ``i`` uses source port
    ``base_port + i`` (each example its own ports, so no state carries over)."""
    isns, handshakes, moves = spec
    flows = [TcpFlow(side, c, s, base_port + i, port, cisn=ci, sisn=si)  # type: ignore[arg-type]
             for i, ((side, c, s, port), (ci, si)) in enumerate(zip(TCP_FLOWS, isns,
                                                                    strict=True))]
    out: list[Step] = []
    for i, (flow, shake) in enumerate(zip(flows, handshakes, strict=True)):
        if shake:
            out += [flow.seg(f"f{i} syn", "c", "S"), flow.seg(f"f{i} synack", "s", "SA"),
                    flow.seg(f"f{i} ack", "c", "A")]
    udp_port = base_port + len(flows)
    for k, (fi, who, flags, seq_off, ack_off, window, size) in enumerate(moves):
        data = bytes(size)
        if fi == len(flows):
            src, dst, sp, dp = (IN4, OUT4, udp_port, 53) if who == "c" else (
                OUT4, IN4, 53, udp_port)
            out.append(Step(f"m{k:02d} udp {who}", "inside" if who == "c" else "outside",
                            _udp(src, dst, sp, dp, data or b"u")))
            continue
        out.append(flows[fi].seg(f"m{k:02d} f{fi} {who} {flags or '-'} {seq_off:+d}/"
                                 f"{ack_off:+d} w{window} {size}", who, flags, data,
                                 seq_off=seq_off, ack_off=ack_off, window=window))
    return out


#: what the kernel reference must do at the scripted trace's landmark steps (pass or
#: "----", then the replies), so that a broken topology or compiler cannot pass as
#: agreement; window-tracking subtleties that vary between kernels are left out
KERNEL_LANDMARKS: dict[str, str] = {
    "A01 in-syn": "pass", "A02 synack": "pass", "A04 data-in": "pass",
    "A08 out-of-window seq": "----", "A10 rst out-of-window": "----",
    "A11 fin from inside": "pass", "A13 data half-closed": "pass",
    "B01 out-syn": "pass", "B02 synack": "pass", "B05 data-in": "pass",
    "C01 syn to reject": "---- rst+ack 0/1001", "C02 udp to reject": "---- icmp 3/3",
    "C03 syn admin-prohib": "---- icmp 3/13", "C04 syn no rule": "----",
    "C05 udp no rule": "----", "D01 out syn smtp": "---- rst+ack 0/1001",
    "D02 out udp blackhole": "----",
    "E01 bare ack open": "pass", "E02 bare ack closed": "----", "E03 bare rst": "----",
    "E04 syn+fin": "----", "F01 ping in": "pass", "F02 pong": "pass",
    "F05 unsolicited pong": "----", "F07 ping out": "pass", "F08 pong after timeout": "----",
    "G01 udp out request": "pass", "G02 udp reply": "pass",
    "H01 icmp err known udp": "pass", "H03 icmp err unknown": "----",
    "I01 dhcp discover": "----", "J01 syn trusted": "pass", "J02 syn untrusted": "----",
    "J03 ssh syn": "pass", "J04 ssh syn": "pass", "J05 ssh syn": "----",
    "J07 ssh other src": "pass", "K01 v6 in-syn": "pass", "K02 v6 synack": "pass",
    "K07 v6 syn to reject": "---- rst+ack 0/1001", "K08 v6 udp to reject": "---- icmp6 1/4",
    "K09 v6 syn no rule": "----", "K10 v6 ping in": "pass", "K14 v6 icmp err known": "pass",
    "K15 v6 icmp err unknown": "----", "K16 v6 syn trusted": "pass",
    "K17 v6 syn untrusted": "----", "K18 v6 out smtp": "---- rst+ack 0/1001",
}
