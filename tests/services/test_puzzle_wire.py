"""The puzzle service's wire formats: options in and out of IPv4 headers, the ICMP puzzle.

scapy is the independent oracle: frames are built with it, changed by
``wire``, and parsed again by scapy, whose recomputed checksums and lengths
must match what ``wire`` wrote.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet as ScapyPacket
from vtl.services.puzzle import wire
from vtl.services.puzzle.cookie import Puzzle

COOKIE = bytes(range(1, 9))
PHASH = bytes(range(0xA0, 0xA8))


def frame(*, vlan: bool = False, options: list[IPOption] | None = None,
          l4: ScapyPacket | None = None, payload: bytes = b"") -> tuple[bytearray, int]:
    """An Ethernet frame (optionally 802.1Q tagged) and its L3 offset."""
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if vlan:
        eth = eth / Dot1Q(vlan=7)
    ip = IP(src="10.0.0.1", dst="10.0.0.2", options=options or [])
    l4 = TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460)]) if l4 is None else l4
    return bytearray(bytes(eth / ip / l4 / payload)), 18 if vlan else 14


def rechecked(buf: bytearray) -> tuple[ScapyPacket, ScapyPacket]:
    """scapy's parse of ``buf`` and the same packet with its checksums and lengths
    recomputed by scapy."""
    got = Ether(bytes(buf))
    fresh = got.copy()
    del fresh[IP].chksum, fresh[IP].len, fresh[IP].ihl
    for layer in (TCP, UDP, ICMP):
        if fresh.haslayer(layer):
            del fresh[layer].chksum
    return got, Ether(bytes(fresh))


def assert_sound(buf: bytearray) -> ScapyPacket:
    got, fresh = rechecked(buf)
    assert got[IP].chksum == fresh[IP].chksum
    assert got[IP].ihl == fresh[IP].ihl
    assert got[IP].len == fresh[IP].len
    for layer in (TCP, UDP, ICMP):
        if got.haslayer(layer):
            assert got[layer].chksum == fresh[layer].chksum, layer.__name__
    return got


def splice_options(buf: bytearray, l3: int, opts: bytes) -> None:
    """Put raw ``opts`` (a multiple of 4 bytes, well formed or not) into the option-less
    header at ``l3``, with IHL, total length and checksum computed here (RFC 1071)."""
    assert buf[l3] == 0x45 and not len(opts) % 4
    buf[l3 + 20 : l3 + 20] = opts
    buf[l3] = 0x45 + len(opts) // 4
    buf[l3 + 2 : l3 + 4] = (len(buf) - l3).to_bytes(2, "big")
    buf[l3 + 10 : l3 + 12] = b"\0\0"
    words = sum(int.from_bytes(buf[i : i + 2]) for i in range(l3, l3 + 20 + len(opts), 2))
    while words > 0xFFFF:
        words = (words & 0xFFFF) + (words >> 16)
    buf[l3 + 10 : l3 + 12] = (~words & 0xFFFF).to_bytes(2, "big")


INFO = wire.client_info(0x11223344, 0x55667788)
ANSWER = wire.answer_option(0xDEADBEEF, 0x1234, 2, 30, COOKIE)


@pytest.mark.parametrize("vlan", [False, True])
@pytest.mark.parametrize("opts", [INFO, INFO + ANSWER, ANSWER])
def test_insert_fixes_header_and_keeps_l4_checksum(vlan: bool, opts: bytes) -> None:
    buf, l3 = frame(vlan=vlan)
    original = bytes(buf)
    assert wire.insert_options(buf, l3, opts)
    got = assert_sound(buf)
    assert got[IP].ihl == 5 + len(opts) // 4
    assert got[TCP].chksum == Ether(original)[TCP].chksum  # pseudo-header unaffected
    assert bytes(buf[l3 + 20 : l3 + 22]) == opts[:2]
    assert wire.strip_options(buf, l3)
    assert bytes(buf) == original


def test_fields_round_trip() -> None:
    buf, l3 = frame()
    assert wire.insert_options(buf, l3, INFO + ANSWER)
    assert wire.parse_options(buf, l3) == wire.PuzzleOptions(
        0x11223344, 0x55667788, 0xDEADBEEF, 0x1234, 2, 30, COOKIE)
    buf, l3 = frame()
    assert wire.insert_options(buf, l3, INFO)
    assert wire.parse_options(buf, l3) == wire.PuzzleOptions(
        0x11223344, 0x55667788, None, 0, 0, 0, b"")
    buf, l3 = frame()
    assert wire.insert_options(buf, l3, ANSWER + INFO)  # other order: the slow path
    assert wire.parse_options(buf, l3) == wire.PuzzleOptions(
        0x11223344, 0x55667788, 0xDEADBEEF, 0x1234, 2, 30, COOKIE)
    assert wire.parse_options(*frame()) is None


def test_other_options_kept_around_ours() -> None:
    rr = IPOption(b"\x07\x07\x04\x00\x00\x00\x00")  # record route, one slot
    buf, l3 = frame(options=[rr], l4=UDP(sport=5, dport=6), payload=b"hello")
    original = bytes(buf)
    assert wire.insert_options(buf, l3, INFO + ANSWER)
    got = assert_sound(buf)
    assert [o.option for o in got[IP].options][:3] == [30, 30, 7]
    assert wire.parse_options(buf, l3).answer == 0xDEADBEEF  # type: ignore[union-attr]
    assert wire.strip_options(buf, l3)
    assert bytes(buf) == original


def test_strip_ours_from_the_middle_with_odd_alignment() -> None:
    rr = b"\x07\x07\x04\x00\x00\x00\x00"  # record route, one slot
    buf, l3 = frame()
    splice_options(buf, l3, b"\x01" + INFO + rr)  # NOP: ours at an odd offset
    assert_sound(buf)
    assert wire.parse_options(buf, l3).nonce == 0x11223344  # type: ignore[union-attr]
    assert wire.strip_options(buf, l3)
    got = assert_sound(buf)
    assert got[IP].ihl == 7
    assert bytes(buf[l3 + 20 : l3 + 28]) == b"\x01" + rr
    assert wire.parse_options(buf, l3) is None


def test_insert_refuses_beyond_40_bytes_and_leaves_the_frame() -> None:
    buf, l3 = frame()
    splice_options(buf, l3, b"\x07\x0b\x04" + bytes(8) + b"\x00")  # 12 bytes
    original = bytes(buf)
    assert not wire.insert_options(buf, l3, INFO + ANSWER)
    assert bytes(buf) == original
    assert wire.insert_options(buf, l3, ANSWER)  # 32 bytes in all: fits
    assert_sound(buf)


@pytest.mark.parametrize("mutate", [
    lambda b, l3: b.__setitem__(l3, 0x65),  # IPv6 version nibble
    lambda b, l3: b.__setitem__(l3, 0x44),  # IHL 4
    lambda b, l3: b.__setitem__(slice(l3 + 2, l3 + 4), b"\xff\xff"),  # beyond the buffer
    lambda b, l3: b.__delitem__(slice(l3 + 10, None)),  # truncated header
])
def test_unsound_headers_are_refused_without_change(mutate: object) -> None:
    buf, l3 = frame()
    assert wire.insert_options(buf, l3, INFO)
    mutate(buf, l3)  # type: ignore[operator]
    before = bytes(buf)
    assert wire.parse_options(buf, l3) is wire.MALFORMED
    assert not wire.strip_options(buf, l3)
    assert not wire.insert_options(buf, l3, INFO)
    assert bytes(buf) == before


@pytest.mark.parametrize("opts", [
    bytes((0x9E, 20, 0x11, 0)) + bytes(16),  # client info with an answer's length
    bytes((0x9E, 12, 0x13, 0)) + bytes(8),  # unknown kind
    bytes((0x9E, 12, 0x11, 1)) + bytes(8),  # reserved byte set
    INFO + INFO,  # a kind twice
    bytes((0x07, 0, 0, 0)),  # option length 0
    bytes((0x07, 9, 0, 0)),  # option running past the header
])
def test_malformed_option_lists(opts: bytes) -> None:
    buf, l3 = frame()
    splice_options(buf, l3, opts)
    before = bytes(buf)
    assert wire.parse_options(buf, l3) is wire.MALFORMED
    assert not wire.strip_options(buf, l3)
    assert bytes(buf) == before


def test_someone_elses_0x9e_is_left_alone() -> None:
    theirs = bytes((0x9E, 8, 0x21, 0, 1, 2, 3, 4))  # version 2
    buf, l3 = frame()
    splice_options(buf, l3, theirs)
    assert wire.parse_options(buf, l3) is None
    assert wire.insert_options(buf, l3, INFO)
    assert wire.strip_options(buf, l3)
    assert bytes(Ether(bytes(buf))[IP].options[0]) == theirs


def _puzzle() -> Puzzle:
    return Puzzle(0xBEEF, 1, 30, 1000, COOKIE, 0xFFFFFE00, 0xFFFFFE00 + 999 - 2**32, PHASH)


@pytest.mark.parametrize("vlan", [False, True])
def test_puzzle_frame_against_scapy(vlan: bool) -> None:
    trigger, l3 = frame(vlan=vlan)
    assert wire.insert_options(trigger, l3, INFO)
    pz = _puzzle()
    out = wire.build_puzzle(trigger, l3, pz, 0x11223344, 0x55667788, ident=7, seq=9)
    got = assert_sound(out)
    t = Ether(bytes(trigger))
    assert (got.src, got.dst) == (t.dst, t.src)
    assert (got[IP].src, got[IP].dst, got[IP].ttl, got[IP].flags) == ("10.0.0.2", "10.0.0.1",
                                                                      64, 0)
    assert got.haslayer(Dot1Q) == vlan and (not vlan or got[Dot1Q].vlan == 7)
    icmp = bytes(got[ICMP])
    assert (icmp[0], icmp[1]) == (38, 1)
    hl = t[IP].ihl * 4
    assert icmp[52:] == bytes(trigger[l3 : l3 + hl + 8])  # IP header with options + 8 bytes
    assert icmp[28:36] == COOKIE and icmp[44:52] == PHASH
    m = wire.parse_puzzle(out, l3)
    assert m == wire.PuzzleMessage(7, 9, 6, 0x11223344, 0x55667788, pz, l3 + 20 + 52)


def test_puzzle_type_is_configurable_and_checked() -> None:
    trigger, l3 = frame()
    out = wire.build_puzzle(trigger, l3, _puzzle(), 1, 2, icmp_type=253)
    assert_sound(out)
    assert wire.parse_puzzle(out, l3) is None
    assert wire.parse_puzzle(out, l3, icmp_type=253) is not None


def test_puzzle_quote_of_a_short_packet() -> None:
    trigger, l3 = frame(l4=UDP(sport=1, dport=2))  # header + exactly 8 bytes
    out = wire.build_puzzle(trigger, l3, _puzzle(), 1, 2)
    assert bytes(Ether(bytes(out))[ICMP])[52:] == bytes(trigger[l3 : l3 + 28])


def test_bad_puzzles_are_not_puzzles() -> None:
    trigger, l3 = frame()
    good = wire.build_puzzle(trigger, l3, _puzzle(), 1, 2)
    assert wire.parse_puzzle(good, l3) is not None
    for i in range(l3 + 20, len(good)):  # any changed byte breaks the ICMP checksum
        bad = bytearray(good)
        bad[i] ^= 0x40
        assert wire.parse_puzzle(bad, l3) is None, i
    wrong = Puzzle(*_puzzle()[:6], 5, PHASH)  # range max not min + D - 1
    assert wire.parse_puzzle(wire.build_puzzle(trigger, l3, wrong, 1, 2), l3) is None
    assert wire.parse_puzzle(good[: l3 + 20 + 60], l3) is None
    assert wire.parse_puzzle(*frame(l4=ICMP())) is None


def test_syn_without_ack() -> None:
    assert wire.syn_without_ack(*frame())
    assert wire.syn_without_ack(*frame(vlan=True))
    assert not wire.syn_without_ack(*frame(l4=TCP(flags="SA")))
    assert not wire.syn_without_ack(*frame(l4=TCP(flags="A")))
    assert not wire.syn_without_ack(*frame(l4=UDP()))
    buf, l3 = frame()
    buf[l3 + 7] = 1  # a later fragment
    assert not wire.syn_without_ack(buf, l3)
    assert not wire.syn_without_ack(buf[: l3 + 20], l3)


# -- properties ----------------------------------------------------------------------

# options whose layout scapy reads back faithfully (it reads a router alert as 4 bytes
# whatever its length, and source routes change the pseudo-header it checks against)
other_option = st.one_of(
    st.just(b"\x01"),
    st.lists(st.binary(min_size=4, max_size=4), max_size=2).map(
        lambda hops: bytes((0x07, 3 + 4 * len(hops), 4)) + b"".join(hops)),  # record route
    st.binary(min_size=0, max_size=6).map(lambda d: bytes((0x9F, 2 + len(d))) + d),
)


@st.composite
def ours_and_others(draw: st.DrawFn) -> tuple[bytes, bytes]:
    ours = draw(st.sampled_from([INFO, ANSWER, INFO + ANSWER]))
    room = 40 - len(ours)
    others = b"".join(draw(st.lists(other_option, max_size=4)))[: room]
    others = others if _well_formed(others) else b""
    others += b"\x00" * (-len(others) % 4)
    return ours, others


def _well_formed(opts: bytes) -> bool:
    i = 0
    while i < len(opts):
        if opts[i] == 1:
            i += 1
        elif i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            return False
        else:
            i += opts[i + 1]
    return True


@settings(max_examples=150, deadline=None)
@given(ours_and_others(), st.booleans(), st.binary(max_size=40))
def test_insert_strip_round_trip(opts: tuple[bytes, bytes], vlan: bool, payload: bytes) -> None:
    ours, others = opts
    buf, l3 = frame(vlan=vlan, l4=UDP(sport=1, dport=2), payload=payload)
    splice_options(buf, l3, others)
    original = bytes(buf)
    assert wire.insert_options(buf, l3, ours)
    assert_sound(buf)
    parsed = wire.parse_options(buf, l3)
    assert isinstance(parsed, wire.PuzzleOptions)
    assert (parsed.nonce is not None) == (INFO in ours)
    assert (parsed.answer is not None) == (ANSWER in ours)
    assert wire.strip_options(buf, l3)
    assert bytes(buf) == original


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(-2, 60), st.binary(min_size=0, max_size=40))
def test_random_bytes_never_raise(data: bytes, l3: int, opts: bytes) -> None:
    buf = bytearray(data)
    wire.parse_options(buf, l3)
    wire.parse_puzzle(buf, l3)
    wire.syn_without_ack(buf, l3)
    before = bytes(buf)
    if not wire.strip_options(buf, l3):
        assert bytes(buf) == before
    before = bytes(buf)
    if not wire.insert_options(buf, l3, opts[: len(opts) & ~3]):
        assert bytes(buf) == before


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=4, max_size=40).map(lambda b: b[: len(b) & ~3]))
def test_random_option_areas(opts: bytes) -> None:
    """Any option area: parse never raises; when it finds ours, strip removes them and
    a header whose checksum was right still has a right one."""
    buf, l3 = frame(l4=UDP(sport=1, dport=2))
    splice_options(buf, l3, opts)
    parsed = wire.parse_options(buf, l3)
    stripped = wire.strip_options(buf, l3)
    assert stripped == (parsed is not wire.MALFORMED)
    if stripped:
        assert wire.parse_options(buf, l3) is None
        hl = (buf[l3] & 15) * 4
        assert int.from_bytes(buf[l3 : l3 + hl]) % 0xFFFF == 0  # ones' sum 0xFFFF: valid
        assert int.from_bytes(buf[l3 + 2 : l3 + 4]) == len(buf) - l3
