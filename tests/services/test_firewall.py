"""firewall, sans-IO: conntrack states as the kernel's, ordered rules, reject, limits, bounds.

The guest is 10.80.0.2 (fd80::2) behind the service; the far host 10.90.0.9 (fd90::9).
"in" is toward the guest (Direction.TO_GUEST), "out" from it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Ether
from vtl.services.firewall import Firewall

from vtl import CONSUMED, DROP, PASS, Direction
from vtl.testing import ServiceHarness

IN, OUT = Direction.TO_GUEST, Direction.TO_UPLINK
G_MAC, F_MAC = "52:54:00:00:00:02", "52:54:00:00:00:09"
G, F, G6, F6 = "10.80.0.2", "10.90.0.9", "fd80::2", "fd90::9"


def fw(**kw: object) -> ServiceHarness[Firewall]:
    h = ServiceHarness(Firewall, {"default_in": "drop", "default_out": "accept", **kw})
    h.start(0.0)
    return h


def out_tcp(flags: str, seq: int = 1000, ack: int = 0, payload: bytes = b"", sport: int = 40000,
            dport: int = 80, win: int = 64240) -> bytes:
    return bytes(Ether(src=G_MAC, dst=F_MAC) / IP(src=G, dst=F)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=win)
                 / payload)


def in_tcp(flags: str, seq: int = 5000, ack: int = 0, payload: bytes = b"", sport: int = 80,
           dport: int = 40000, win: int = 64240) -> bytes:
    return bytes(Ether(src=F_MAC, dst=G_MAC) / IP(src=F, dst=G)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=win)
                 / payload)


def handshake_out(h: ServiceHarness[Firewall], t: float = 0.1) -> None:
    """Guest connects out: SYN seq 1000, SYN/ACK seq 5000, ACK."""
    assert h.send(out_tcp("S"), OUT, now=t) is PASS
    assert h.send(in_tcp("SA", ack=1001), IN, now=t + 0.1) is PASS
    assert h.send(out_tcp("A", seq=1001, ack=5001), OUT, now=t + 0.2) is PASS


def test_an_outgoing_connection_is_tracked_and_its_replies_pass() -> None:
    h = fw()
    handshake_out(h)
    assert h.send(in_tcp("PA", seq=5001, ack=1001, payload=b"hello"), IN, now=0.4) is PASS
    [conn] = h.service.connections(0.5)
    assert conn["state"] == "ESTABLISHED" and conn["assured"] and conn["dport"] == 80
    assert conn["packets"] == [2, 2]
    # nothing else gets in: the default is drop
    assert h.send(in_tcp("S", dport=22), IN, now=0.6) is DROP
    assert h.extra("dropped_by_default") == 1


def test_a_rst_where_its_senders_last_segment_ended_is_a_train_and_closes() -> None:
    """As the kernel's conntrack: every in-window ACK segment records where it ended, so
    a RST of the same side that starts there ends the connection though the other side
    has not acknowledged those bytes yet (a "train"); in CLOSE any RST passes. Found by
    the random differential trace: the end was only recorded for ignored segments, the
    RST kept the connection, and a later RST was dropped where the kernel passed it."""
    h = fw(invalid="drop")
    handshake_out(h)
    assert h.send(in_tcp("PA", seq=5001, ack=1001, payload=b"x" * 100), IN, now=0.4) is PASS
    assert h.send(in_tcp("R", seq=5101), IN, now=0.5) is PASS  # not ACKed by the guest yet
    [conn] = h.service.connections(0.6)
    assert conn["state"] == "CLOSE"
    far = (1001 + 2**31 + 1) & 0xFFFFFFFF  # "before" the far side's highest ACK
    assert h.send(out_tcp("RA", seq=far, ack=5100), OUT, now=0.7) is PASS


def test_a_dropped_syn_leaves_no_connection() -> None:
    h = fw()
    assert h.send(in_tcp("S", dport=23), IN, now=0.1) is DROP
    assert h.service.connections(0.2) == []
    # the guest's answer is then new, from its side
    assert h.send(out_tcp("SA", sport=23, dport=80, seq=9, ack=5001), OUT, now=0.3) is DROP
    assert h.extra("invalid") == 1, "a SYN/ACK without a SYN is invalid (sNO -> sIV)"


def test_rules_in_order_first_match_wins() -> None:
    rules = [{"dir": "in", "proto": "tcp", "dport": [8000, "8080-8090"], "action": "accept"},
             {"dir": "in", "proto": "tcp", "dport": [8085], "action": "reject"},
             {"dir": "in", "proto": "tcp", "dport": [9000], "action": "reject",
              "name": "nine"}]
    h = fw(rules=rules)
    assert h.send(in_tcp("S", dport=8085), IN, now=0.1) is PASS, "the earlier rule wins"
    assert h.send(in_tcp("S", dport=9000), IN, now=0.2) is CONSUMED
    rst = h.take(OUT)[-1].scapy()
    assert rst[IP].src == G and rst[IP].dst == F and rst[TCP].flags == "RA"
    assert rst[TCP].sport == 9000 and rst[TCP].ack == 5001
    report = {r["name"]: r for r in h.report()["rules"]}
    assert report["rule0"]["packets"] == 1 and report["nine"]["packets"] == 1


def test_reject_answers_udp_and_icmp_with_the_chosen_code() -> None:
    h = fw(rules=[{"dir": "in", "proto": "udp", "dport": [53], "action": "reject"},
                  {"dir": "in", "proto": "udp", "dport": [54], "action": "reject",
                   "reject_with": "icmp-admin-prohibited"}])
    udp = Ether(src=F_MAC, dst=G_MAC) / IP(src=F, dst=G) / UDP(sport=5000, dport=53) / b"q"
    assert h.send(bytes(udp), IN, now=0.1) is CONSUMED
    e = h.take(OUT)[-1].scapy()
    assert (e[ICMP].type, e[ICMP].code, e[IP].src) == (3, 3, G)
    udp[UDP].dport = 54
    h.send(bytes(udp), IN, now=0.2)
    e = h.take(OUT)[-1].scapy()
    assert (e[ICMP].type, e[ICMP].code) == (3, 13)


def test_invalid_packets_are_dropped_before_the_rules() -> None:
    h = fw(rules=[{"dir": "in", "proto": "tcp", "action": "accept"}])
    assert h.send(in_tcp("R", dport=40000), IN, now=0.1) is DROP, "a bare RST"
    assert h.send(in_tcp("SF", dport=80), IN, now=0.1) is DROP, "SYN+FIN"
    assert h.send(in_tcp("", dport=80), IN, now=0.1) is DROP, "no flags"
    assert h.extra("invalid") == 3
    assert h.send(in_tcp("A", dport=81), IN, now=0.2) is PASS, "loose: picked up mid-stream"


def test_out_of_window_segments_are_invalid_unless_liberal() -> None:
    for liberal, verdict in ((False, DROP), (True, PASS)):
        h = fw(liberal=liberal)
        handshake_out(h)
        far = in_tcp("A", seq=5001 + 10_000_000, ack=1001)
        assert h.send(far, IN, now=0.5) is verdict, f"liberal={liberal}"
        assert h.send(in_tcp("A", seq=5001, ack=1001 + 500_000), IN, now=0.6) is verdict, \
            "an ACK of data never sent"


def test_loose_off_refuses_mid_stream_pickup() -> None:
    h = fw(loose=False, rules=[{"dir": "in", "proto": "tcp", "action": "accept"}])
    assert h.send(in_tcp("A", dport=81), IN, now=0.1) is DROP


def test_close_and_reopen() -> None:
    h = fw()
    handshake_out(h)
    assert h.send(out_tcp("FA", seq=1001, ack=5001), OUT, now=1.0) is PASS
    assert h.send(in_tcp("FA", seq=5001, ack=1002), IN, now=1.1) is PASS
    assert h.send(out_tcp("A", seq=1002, ack=5002), OUT, now=1.2) is PASS
    assert h.service.connections(1.3)[0]["state"] == "TIME_WAIT"
    assert h.send(out_tcp("S", seq=90_000), OUT, now=2.0) is PASS, "reopened from TIME_WAIT"
    assert h.service.connections(2.1)[0]["state"] == "SYN_SENT"


def test_icmp_echo_and_related_errors() -> None:
    h = fw()
    req = Ether(src=G_MAC, dst=F_MAC) / IP(src=G, dst=F) / ICMP(type=8, id=7, seq=1)
    rep = Ether(src=F_MAC, dst=G_MAC) / IP(src=F, dst=G) / ICMP(type=0, id=7, seq=1)
    assert h.send(bytes(rep), IN, now=0.1) is DROP, "a reply without a request"
    assert h.send(bytes(req), OUT, now=0.2) is PASS
    assert h.send(bytes(rep), IN, now=0.3) is PASS
    handshake_out(h, 0.35)
    quoted = IP(src=G, dst=F) / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)
    err = Ether(src=F_MAC, dst=G_MAC) / IP(src="10.90.0.1", dst=G) / ICMP(type=3, code=1) / \
        IPerror(bytes(quoted)[:28])
    assert h.send(bytes(err), IN, now=0.7) is PASS, "related to a tracked connection"
    other = IP(src=G, dst=F) / TCP(sport=40001, dport=80)
    stray = Ether(src=F_MAC, dst=G_MAC) / IP(src="10.90.0.1", dst=G) / ICMP(type=3, code=1) \
        / IPerror(bytes(other)[:28])
    assert h.send(bytes(stray), IN, now=0.7) is DROP, "quoting no known flow: invalid"
    assert TCPerror is not None


def test_udp_and_ipv6() -> None:
    h = fw()
    q = Ether(src=G_MAC, dst=F_MAC) / IPv6(src=G6, dst=F6) / UDP(sport=5353, dport=53) / b"q"
    a = Ether(src=F_MAC, dst=G_MAC) / IPv6(src=F6, dst=G6) / UDP(sport=53, dport=5353) / b"a"
    assert h.send(bytes(a), IN, now=0.1) is DROP
    assert h.send(bytes(q), OUT, now=0.2) is PASS
    assert h.send(bytes(a), IN, now=0.3) is PASS
    ping = Ether(src=G_MAC, dst=F_MAC) / IPv6(src=G6, dst=F6) / ICMPv6EchoRequest(id=3)
    pong = Ether(src=F_MAC, dst=G_MAC) / IPv6(src=F6, dst=G6) / ICMPv6EchoReply(id=3)
    assert h.send(bytes(ping), OUT, now=0.4) is PASS and h.send(bytes(pong), IN, now=0.5) is PASS
    ns = Ether(src=F_MAC, dst="33:33:ff:00:00:02") / IPv6(src=F6, dst="ff02::1:ff00:2") / \
        ICMPv6ND_NS(tgt=G6)
    assert h.send(bytes(ns), IN, now=0.6) is PASS, "neighbour discovery: outside conntrack"
    arp = Ether(src=F_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=F, pdst=G)
    assert h.send(bytes(arp), IN, now=0.6) is PASS


def test_a_rate_limited_rule_falls_through_above_its_rate() -> None:
    h = fw(rules=[{"dir": "in", "proto": "icmp", "icmp_type": [8], "limit": "2/second",
                   "burst": 2, "action": "accept"}])
    ping = Ether(src=F_MAC, dst=G_MAC) / IP(src=F, dst=G) / ICMP(type=8, id=1)
    got = [h.send(bytes(ping / bytes([i])), IN, now=0.1) for i in range(5)]
    assert got == [PASS, PASS, DROP, DROP, DROP]
    assert h.report()["rules"][0]["limited"] == 3


def test_the_table_is_bounded_and_assured_flows_survive() -> None:
    h = fw(max_entries=16, rules=[{"dir": "in", "proto": "udp", "action": "accept"}])
    handshake_out(h)
    for i in range(200):
        udp = Ether(src=F_MAC, dst=G_MAC) / IP(src=F, dst=G) / UDP(sport=1000 + i, dport=9)
        h.send(bytes(udp), IN, now=1.0 + i / 1000)
    assert h.report()["tracked"] <= 16 and h.report()["conntrack"]["evicted"] >= 184
    assert h.send(in_tcp("PA", seq=5001, ack=1001, payload=b"x"), IN, now=2.0) is PASS
    ct = h.service.ct
    assert len(ct.fast_tcp) == 2, "the established flow, both ways, in the fast table"
    for i in range(40):  # now TCP flows too: the old one is evicted, and so are its entries
        h.send(in_tcp("S", sport=2000 + i, dport=81), IN, now=3.0 + i / 1000)
    h.service.retune(Firewall.Options(max_entries=16, rules=[{"dir": "in", "proto": "tcp",
                                                              "action": "accept"}]), 3.1)
    for i in range(40):
        h.send(in_tcp("S", sport=3000 + i, dport=81), IN, now=3.2 + i / 1000)
    assert all(c.key in ct.table for c, _ in ct.fast_tcp.values())
    assert len(ct.fast_tcp) <= 2 * len(ct.table)


def test_rules_change_atomically_and_flows_stay() -> None:
    h = fw()
    handshake_out(h)
    assert h.send(in_tcp("S", dport=22), IN, now=1.0) is DROP
    new = Firewall.Options(default_in="drop", rules=[{"dir": "in", "proto": "tcp",
                                                      "dport": [22], "action": "accept"}])
    h.service.retune(new, 1.1)
    assert h.send(in_tcp("S", dport=22), IN, now=1.2) is PASS
    assert h.send(in_tcp("PA", seq=5001, ack=1001, payload=b"y"), IN, now=1.3) is PASS


@pytest.mark.parametrize(("bad", "key"), [
    ({"rules": [{"action": "accept", "dport": [80]}]}, "sport/dport"),
    ({"rules": [{"proto": "tcp", "dport": ["70000"], "action": "drop"}]}, "dport"),
    ({"rules": [{"saddr": ["@nope"], "action": "drop"}]}, "rules.0.saddr|no set"),
    ({"timeouts": {"tcp_forever": 1}}, "timeouts"),
    ({"rules": [{"proto": "tcp", "tcp_flags": "syn,bogus", "action": "drop"}]}, "tcp_flags"),
    ({"rules": [{"proto": "udp", "action": "reject", "reject_with": "tcp-reset"}]},
     "reject_with"),
])
def test_bad_options_name_their_key(bad: dict, key: str) -> None:
    with pytest.raises(ValidationError, match=key):
        Firewall.Options(**bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=100), st.sampled_from([b"\x08\x00\x45", b"\x86\xdd\x60",
                                                  b"\x08\x00\x46", b"\x81\x00\x00\x01\x08\x00"]),
       st.booleans())
def test_garbage_never_raises(tail: bytes, head: bytes, inbound: bool) -> None:
    h = fw()
    frame = bytes.fromhex("525400000002525400000009") + head + tail
    h.send(frame, IN if inbound else OUT, now=0.1)


def test_a_libpcap_match_and_sets() -> None:
    h = fw(sets={"office": ["10.90.0.0/24", "fd90::/64"]},
           rules=[{"dir": "in", "saddr": ["@office"], "match": "tcp dst port 8443",
                   "action": "accept"}])
    assert h.send(in_tcp("S", dport=8443), IN, now=0.1) is PASS
    assert h.send(in_tcp("S", dport=8444), IN, now=0.2) is DROP
    with pytest.raises(ValueError, match=r"rules\[0\].match"):
        fw(rules=[{"match": "tcp port banana", "action": "accept"}])


def test_a_reset_we_send_closes_the_flow_as_the_kernels_does() -> None:
    """(Found by the differential test.) With invalid packets left to a reject rule, the
    RST the firewall sends for an out-of-window segment goes through conntrack too."""
    h = fw(established=True, invalid="rules",
           rules=[{"dir": "in", "state": ["invalid"], "proto": "tcp", "action": "reject"}])
    handshake_out(h)
    assert h.send(in_tcp("A", seq=5001 + (1 << 30), ack=1001), IN, now=0.5) is CONSUMED
    assert h.service.connections(0.6)[0]["state"] == "CLOSE"
