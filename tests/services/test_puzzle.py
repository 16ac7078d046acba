"""puzzle, sans-IO: a client proxy and a server firewall wired frame to frame.

The client's harness plays the client VM's side, the server's the protected VM's;
frames cross between them as the uplinks would carry them, and the client's
solves run through the fake context's jobs (``run_jobs``), as the bridge's workers
would run them.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from vtl.services.puzzle import Puzzle
from vtl.services.puzzle import wire as pw

from vtl import CONSUMED, DROP, PASS, Direction, Frame, VnetHeader
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet, verify_checksums
from vtl.testing import ServiceHarness

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
C_MAC, S_MAC, GW = "52:54:00:00:01:0a", "52:54:00:00:02:14", "02:00:00:00:00:01"
C_IP, S_IP = "10.70.1.10", "10.70.2.20"


def harnesses(server: dict | None = None, client: dict | None = None
              ) -> tuple[ServiceHarness[Puzzle], ServiceHarness[Puzzle]]:
    c = ServiceHarness(Puzzle, {"role": "client", **(client or {})})
    s = ServiceHarness(Puzzle, {"role": "server", "difficulty": 64, **(server or {})})
    c.start(0.0)
    s.start(0.0)
    c.ctx.run_jobs(0.0)  # the client's warm-up of the bridge's workers
    return c, s


def syn(sport: int = 40000, src: str = C_IP, **ip: object) -> bytes:
    return bytes(Ether(src=C_MAC, dst=GW) / IP(src=src, dst=S_IP, **ip)
                 / TCP(sport=sport, dport=80, flags="S", options=[("MSS", 1460)]))


def data_pkt(payload: bytes = b"GET / HTTP/1.0\r\n\r\n") -> bytes:
    return bytes(Ether(src=C_MAC, dst=GW) / IP(src=C_IP, dst=S_IP)
                 / TCP(sport=40000, dport=80, flags="PA") / payload)


def cross(src: ServiceHarness[Puzzle], direction: Direction) -> list[Frame]:
    """What ``src`` let out toward ``direction`` (passed or emitted) since last asked."""
    return [o.frame for o in src.take(direction)]


def handshake(c: ServiceHarness[Puzzle], s: ServiceHarness[Puzzle], now: float = 0.1
              ) -> Frame:
    """Client SYN -> puzzle -> solve -> SYN with the answer; what the server VM gets."""
    assert c.send(syn(), UP, now=now) is PASS
    [first] = cross(c, UP)
    assert s.send(first, DOWN, now=now) is DROP
    [puzzle] = cross(s, UP)
    assert c.send(puzzle, DOWN, now=now + 0.001) is DROP, "puzzles never reach the guest"
    assert c.take(DOWN) == []
    c.ctx.run_jobs(now + 0.01)
    [again] = cross(c, UP)
    assert s.send(again, DOWN, now=now + 0.02) is PASS
    [delivered] = cross(s, DOWN)
    return delivered


def test_a_syn_is_admitted_after_its_puzzle_is_solved() -> None:
    c, s = harnesses()
    delivered = handshake(c, s)
    e = Ether(bytes(delivered.data))
    assert e[IP].ihl == 5 and not e[IP].options, "the server VM sees a plain SYN"
    assert e[TCP].flags == "S" and dict(e[TCP].options)["MSS"] == 1500 - 40 - 32
    assert verify_checksums(Packet(delivered))
    assert c.extra("puzzles_solved") == 1 and c.extra("syn_resent") == 1
    assert s.extra("puzzles_issued") == 1 and s.extra("answers_valid") == 1
    # later packets carry the answer; the server strips it and checks nothing
    assert c.send(data_pkt(), UP, now=0.5) is PASS
    [d] = cross(c, UP)
    assert len(d.data) == len(data_pkt()) + 32
    assert s.send(d, DOWN, now=0.5) is PASS
    [clean] = cross(s, DOWN)
    assert bytes(clean.data) == data_pkt()
    assert c.report()["solve_time"]["<=0.01s"] == 1  # asked at 0.101, solved at 0.11


def test_the_first_syn_carries_client_info_only() -> None:
    c, _ = harnesses()
    c.send(syn(), UP, now=0.1)
    [first] = cross(c, UP)
    opts = pw.parse_options(first.data, 14)
    assert opts and opts.nonce is not None and opts.answer is None
    assert Ether(bytes(first.data))[IP].ihl == 8 and verify_checksums(Packet(first))


def test_a_host_without_the_proxy_never_reaches_the_server_vm() -> None:
    _, s = harnesses()
    for i in range(5):
        assert s.send(syn(40000 + i), DOWN, now=0.1) is DROP
    assert s.take(DOWN) == [] and s.take(UP) == [], "no SYN delivered, no puzzle either"
    assert s.extra("legacy_dropped") == 5
    _, p = harnesses(server={"legacy": "pass"})
    assert p.send(syn(), DOWN, now=0.1) is PASS
    six = Ether(src=C_MAC, dst=GW) / IPv6(src="fd70::10", dst="fd70::20") / TCP(flags="S")
    assert s.send(bytes(six), DOWN, now=0.2) is DROP, "IPv6 has no options: legacy"


def answered_syn(c: ServiceHarness[Puzzle], s: ServiceHarness[Puzzle]) -> bytes:
    handshake(c, s)
    c.send(syn(40001), UP, now=0.3)
    [f] = cross(c, UP)
    assert pw.parse_options(f.data, 14).answer is not None  # type: ignore[union-attr]
    return bytes(f.data)


def test_replays_are_refused() -> None:
    c, s = harnesses(server={"expiry": 3})
    good = answered_syn(c, s)
    assert s.send(good, DOWN, now=0.4) is PASS
    s.take(DOWN)
    # from another source address: the cookie covers it
    other = bytearray(good)
    other[26:30] = bytes([10, 70, 1, 99])
    Packet(Frame(other)).ip.fix_checksum()  # type: ignore[union-attr]
    assert s.send(bytes(other), DOWN, now=0.5) is DROP
    assert s.extra("answers_invalid") == 1
    assert len(s.take(UP)) == 1, "a new puzzle, as for a first packet (budgets apply)"
    # any byte of the answer option flipped
    at = 14 + 20 + pw.INFO_LEN
    for i in range(pw.ANSWER_LEN):
        bad = bytearray(good)
        bad[at + i] ^= 0x01
        assert s.send(bytes(bad), DOWN, now=0.6) is DROP, f"byte {i} of the answer flipped"
    assert s.take(DOWN) == []
    s.take(UP)
    # after expiry: refused, and a fresh puzzle goes back (the flips got theirs too)
    assert s.send(good, DOWN, now=5.0) is DROP
    assert s.extra("answers_expired") == 1 and len(s.take(UP)) == 1


def test_a_restarted_server_asks_again_instead_of_locking_the_client_out() -> None:
    c, s = harnesses()
    handshake(c, s)
    s2 = ServiceHarness(Puzzle, {"role": "server", "difficulty": 64})  # new keys
    s2.start(0.0)
    c.send(syn(40002), UP, now=0.5)
    [held] = cross(c, UP)
    assert pw.parse_options(held.data, 14).answer is not None  # type: ignore[union-attr]
    assert s2.send(held, DOWN, now=0.5) is DROP
    [puzzle] = cross(s2, UP)
    c.send(puzzle, DOWN, now=0.51)
    c.ctx.run_jobs(0.52)
    [again] = cross(c, UP)
    assert s2.send(again, DOWN, now=0.53) is PASS, "through after one more puzzle"


def test_the_client_ignores_spoofed_and_stale_puzzles() -> None:
    c, s = harnesses()
    c.send(syn(), UP, now=0.1)
    [first] = cross(c, UP)
    s.send(first, DOWN, now=0.1)
    [puzzle] = cross(s, UP)
    forged = bytearray(puzzle.data)
    icmp = 14 + 20
    forged[icmp + 12] ^= 0xFF  # the echoed nonce
    Packet(Frame(forged)).l4.fix_checksum()  # type: ignore[union-attr]
    assert c.send(bytes(forged), DOWN, now=0.2) is DROP
    wrong_from = Ether(bytes(puzzle.data))
    wrong_from[IP].src = "10.70.9.9"
    del wrong_from[IP].chksum
    assert c.send(bytes(wrong_from), DOWN, now=0.2) is DROP
    assert c.send(puzzle, DOWN, now=60.0) is DROP  # beyond nonce_window_s
    assert c.extra("puzzles_spoofed") == 2 and c.extra("puzzles_stale") == 1
    assert not [j for j in c.ctx.jobs if not j.done] and c.take(DOWN) == []


def test_the_client_abstains_above_max_difficulty() -> None:
    c, s = harnesses(server={"difficulty": 5000}, client={"max_difficulty": 4096})
    c.send(syn(), UP, now=0.1)
    s.send(cross(c, UP)[0], DOWN, now=0.1)
    assert c.send(cross(s, UP)[0], DOWN, now=0.2) is DROP
    assert c.extra("puzzles_abstained") == 1 and not [j for j in c.ctx.jobs if not j.done]


def test_puzzles_stay_within_their_budgets() -> None:
    c, s = harnesses(server={"client_rate": 5, "client_burst": 10})
    c.send(syn(), UP, now=0.1)
    [with_info] = cross(c, UP)
    for _ in range(100):
        s.send(with_info, DOWN, now=0.2)
    assert len(s.take(UP)) == 10 and s.extra("puzzles_limited_client") == 90
    for _ in range(20):
        s.send(with_info, DOWN, now=1.2)  # one second later: 5 more
    assert len(s.take(UP)) == 5
    assert s.take(DOWN) == []


def test_under_load_asks_only_above_the_rate() -> None:
    c, s = harnesses(server={"mode": "under_load", "load_high": 50, "load_low": 10})
    c.send(syn(), UP, now=0.1)
    [with_info] = cross(c, UP)
    assert s.send(with_info, DOWN, now=0.2) is PASS
    assert Ether(bytes(s.take(DOWN)[0].frame.data))[IP].ihl == 5, "stripped all the same"
    for _ in range(100):
        s.send(with_info, DOWN, now=0.5)
    s.take(DOWN)
    assert s.send(with_info, DOWN, now=1.1) is DROP, "above load_high: puzzles"
    assert s.extra("load_on") == 1 and s.report()["active"] is True
    s.advance(3.5)
    assert s.extra("load_off") == 1


def test_the_difficulty_follows_the_target_rate() -> None:
    c, s = harnesses(server={"target_rate": 2, "difficulty": 64})
    handshake(c, s)
    for i in range(4):  # five admitted flows in the first second: the answer is held
        c.send(syn(41000 + i), UP, now=0.3)
        assert s.send(cross(c, UP)[0], DOWN, now=0.3) is PASS
    s.advance(1.05)
    assert s.report()["difficulty"] == 128
    s.advance(4.05)
    assert s.report()["difficulty"] == 16


def test_gso_frames_keep_their_offloads() -> None:
    c, s = harnesses()
    handshake(c, s)
    payload = bytes(range(256)) * 16
    raw = bytearray(bytes(Ether(src=C_MAC, dst=GW) / IP(src=C_IP, dst=S_IP, flags="DF")
                          / TCP(sport=40000, dport=80, flags="A") / payload))
    frame = Frame(raw, VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1400,
                                  csum_start=34, csum_offset=16))
    assert c.send(frame, UP, now=0.5) is PASS
    [out] = cross(c, UP)
    assert out.vnet is not None and (out.vnet.csum_start, out.vnet.hdr_len) == (66, 86)
    segs = complete_offloads(out.copy())
    assert len(segs) == 3 and all(verify_checksums(Packet(f)) for f in segs)
    assert all(len(f.data) - 14 <= 1500 for f in segs)
    assert s.send(out, DOWN, now=0.5) is PASS
    [clean] = cross(s, DOWN)
    assert clean.vnet is not None and clean.vnet.csum_start == 34
    back = complete_offloads(clean)
    assert b"".join(bytes(Ether(bytes(f.data))[TCP].payload) for f in back) == payload


def test_a_df_packet_that_no_longer_fits_gets_fragmentation_needed() -> None:
    c, _ = harnesses()
    big = bytes(Ether(src=C_MAC, dst=GW) / IP(src=C_IP, dst=S_IP, flags="DF")
                / UDP(sport=5, dport=6) / (b"z" * 1472))
    assert c.send(big, UP, now=0.1) is CONSUMED
    icmp = Ether(bytes(c.take(DOWN)[0].frame.data))
    assert icmp[ICMP].type == 3 and icmp[ICMP].code == 4 and icmp[ICMP].nexthopmtu == 1488


@pytest.mark.parametrize(("bad", "key"), [
    ({"ring": 100}, "ring"), ({"expiry": 300}, "expiry"), ({"maturity": 5, "expiry": 2},
                                                            "maturity"),
    ({"difficulty": 10, "difficulty_min": 20}, "difficulty"), ({"role": "proxy"}, "role"),
    ({"load_low": 9, "load_high": 5}, "load_low"),
])
def test_bad_options_name_their_key(bad: dict, key: str) -> None:
    with pytest.raises(ValidationError, match=key):
        Puzzle.Options(**{"role": "server", **bad})


def udp(sport: int, payload: bytes = b"q") -> bytes:
    return bytes(Ether(src=C_MAC, dst=GW) / IP(src=C_IP, dst=S_IP)
                 / UDP(sport=sport, dport=53) / payload)


def test_udp_new_asks_once_per_flow() -> None:
    c, s = harnesses(server={"require": "udp-new"})
    c.send(udp(5000), UP, now=0.1)
    assert s.send(cross(c, UP)[0], DOWN, now=0.1) is DROP, "a new flow: a puzzle"
    assert c.send(cross(s, UP)[0], DOWN, now=0.1) is DROP
    c.ctx.run_jobs(0.11)
    c.send(udp(5000), UP, now=0.2)  # now with the held answer
    assert s.send(cross(c, UP)[0], DOWN, now=0.2) is PASS
    assert s.report()["udp_flows"] == 1
    plain = udp(5000, b"again")  # that flow is admitted: no option needed any more
    assert s.send(plain, DOWN, now=0.3) is PASS
    assert s.send(udp(5001), DOWN, now=0.3) is DROP, "another flow without an answer"


def test_require_all_checks_every_packet() -> None:
    c, s = harnesses(server={"require": "all"})
    assert s.send(data_pkt(), DOWN, now=0.1) is DROP, "no client info: legacy"
    handshake(c, s, now=0.2)
    c.send(data_pkt(), UP, now=0.3)
    assert s.send(cross(c, UP)[0], DOWN, now=0.3) is PASS, "the held answer admits it"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=120), st.integers(0, 2), st.booleans())
def test_garbage_never_raises(tail: bytes, head: int, down: bool) -> None:
    """Random bytes after an Ethernet + IPv4 header start (with our option type, or an
    ICMP puzzle type) are counted and dropped or passed, never an exception."""
    c, s = harnesses()
    starts = [b"\x08\x00\x4f", b"\x08\x00\x48\x00\x00\x40\x00\x00\x00\x00\x40\x01",
              b"\x08\x00\x45\x00\x00\x60\x00\x00\x00\x00\x40\x06"]
    frame = bytes.fromhex("525400000214525400000101") + starts[head] + tail
    for h in (c, s):
        h.send(frame, DOWN if down else UP, now=0.1)
