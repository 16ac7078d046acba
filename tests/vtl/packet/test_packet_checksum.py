"""Checksums: full against scapy, incremental (RFC 1624) against full recompute."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from vtl.frame import VIRTIO_NET_HDR_F_NEEDS_CSUM, Frame, VnetHeader
from vtl.packet import Packet, fix_checksums, verify_checksums
from vtl.packet.checksum import checksum, csum_replace, csum_replace16, ones_sum

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
port = st.integers(0, 0xFFFF)


@given(st.binary(max_size=200))
def test_checksum_matches_scapy(data: bytes) -> None:
    assert checksum(data) == scapy_checksum(data)


@given(st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0), st.data())
def test_incremental_equals_full(data: bytes, draw: st.DataObject) -> None:
    i = draw.draw(st.integers(0, len(data) // 2 - 1)) * 2
    new_word = draw.draw(st.binary(min_size=2, max_size=2))
    hc = checksum(data)
    changed = data[:i] + new_word + data[i + 2 :]
    if any(changed):  # an all-zero buffer has no canonical non-zero sum
        assert csum_replace(hc, data[i : i + 2], new_word) == checksum(changed)
        assert csum_replace16(hc, int.from_bytes(data[i : i + 2], "big"),
                              int.from_bytes(new_word, "big")) == checksum(changed)


def _scapy_fixed(raw: bytes) -> bytes:
    """``raw`` with scapy's own checksums. The transport's payload is kept as raw bytes:
    scapy dissects it by port (139 is NetBIOS once another test loaded those layers) and
    may rebuild it differently."""
    s = Ether(raw)
    for layer in (TCP, UDP):
        if layer in s:
            l4 = s[layer]
            start = 14 + (s[IP].ihl * 4 if IP in s else 40)
            start += l4.dataofs * 4 if layer is TCP else 8
            l4.remove_payload()
            l4.add_payload(Raw(raw[start:]))
    for layer in (IP, TCP, UDP):
        if layer in s:
            del s[layer].chksum
    return bytes(s)


@given(addr4, addr4, port, port, st.binary(max_size=64), st.booleans())
def test_ipv4_address_and_port_rewrite_keeps_checksums(a: bytes, b: bytes, sp: int, dp: int,
                                                        payload: bytes, tcp: bool) -> None:
    l4 = TCP(sport=1000, dport=2000) if tcp else UDP(sport=1000, dport=2000)
    p = Packet(bytearray(bytes(E / IP(src="10.0.0.1", dst="10.0.0.2") / l4 / Raw(payload))))
    p.ipv4.set_src(a)
    p.ipv4.set_dst(b)
    p.l4.set_sport(sp)
    p.l4.set_dport(dp)
    p.ipv4.update("ttl", 7)
    assert bytes(p.data) == _scapy_fixed(bytes(p.data))
    assert verify_checksums(p)


@given(addr6, addr6, port, st.binary(max_size=64), st.booleans())
def test_ipv6_rewrite_keeps_checksums(a: bytes, b: bytes, sp: int, payload: bytes,
                                      tcp: bool) -> None:
    l4 = TCP(sport=1000, dport=2000) if tcp else UDP(sport=1000, dport=2000)
    p = Packet(bytearray(bytes(E / IPv6(src="::1", dst="::2") / l4 / Raw(payload))))
    p.ipv6.set_src(a)
    p.ipv6.set_dst(b)
    p.l4.set_sport(sp)
    assert bytes(p.data) == _scapy_fixed(bytes(p.data))


def test_udp_zero_checksum_ipv4_stays_zero() -> None:
    p = Packet(bytearray(bytes(E / IP() / UDP(chksum=0) / Raw(b"abc"))))
    p.ipv4.set_src("1.2.3.4")
    p.udp.set_sport(99)
    assert p.udp.checksum == 0 and p.verify_checksums()


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    # find a payload whose checksum would be 0
    base = E / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)
    raw = bytearray(bytes(base / Raw(b"\0\0")))
    p = Packet(raw)
    p.udp.fix_checksum()
    c = p.udp.checksum
    raw[-2:] = c.to_bytes(2, "big")  # the payload now cancels the sum
    p = Packet(raw)
    p.udp.fix_checksum()
    assert p.udp.checksum == 0xFFFF and p.verify_checksums()


def test_fix_checksums_matches_scapy() -> None:
    raw = bytearray(bytes(E / IP() / TCP() / Raw(b"x" * 33)))
    raw[-1] ^= 0xFF
    p = Packet(raw)
    assert not verify_checksums(p)
    fix_checksums(p)
    assert bytes(raw) == _scapy_fixed(bytes(raw))


def _partial_frame(tcp: bool = True) -> Frame:
    l4 = TCP(sport=1, dport=2) if tcp else UDP(sport=1, dport=2)
    raw = bytearray(bytes(E / IP(src="10.0.0.1", dst="10.0.0.2") / l4 / Raw(b"y" * 100)))
    vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34,
                      csum_offset=16 if tcp else 6)
    f = Frame(raw, vnet)
    Packet(f).fix_checksums()  # writes the partial pseudo-header sum
    return f


def _kernel_complete(f: Frame) -> bytes:
    d = bytearray(f.data)
    v = f.vnet
    c = ~ones_sum(d, v.csum_start) & 0xFFFF
    d[v.csum_start + v.csum_offset : v.csum_start + v.csum_offset + 2] = c.to_bytes(2, "big")
    return bytes(d)


@given(addr4, port, st.booleans())
def test_partial_checksum_updates_only_pseudo_header(a: bytes, sp: int, tcp: bool) -> None:
    f = _partial_frame(tcp)
    p = Packet(f)
    assert p.l4.partial and p.l4.checksum == p.ipv4.pseudo_sum()
    p.ipv4.set_dst(a)
    p.l4.set_sport(sp)  # must not be folded into the partial sum
    assert p.l4.checksum == Packet(f).ipv4.pseudo_sum() and p.verify_checksums()
    done = _kernel_complete(f)
    assert done == _scapy_fixed(done)
