"""Floods for the robustness tests: random source MACs, and seeded mutated frames.

Theory of operation. Two kinds of frame stream, both seeded and reproducible, both
cheap enough per frame to be made and sent at about 100,000 frames a second by one
Python process:

- :func:`mac_flood`: broadcast frames (ethertype 0x88b5, local experimental) from
  distinct source MACs: ``02:`` followed by ``(i * K + offset) mod 2**40`` for an odd
  ``K`` (a bijection, so ``count`` frames carry ``count`` distinct unicast, locally
  administered MACs, in an order that looks random; ``offset`` comes from the seed).
- :class:`Mutator`: a list of well-formed base frames, built once with scapy
  (:func:`base_frames`: TCP with options over IPv4 and IPv6, DNS over UDP and TCP,
  ARP, neighbour discovery, ICMP and ICMPv6 errors with an embedded datagram, IPv4
  options and fragments, IPv6 extension headers, 802.1Q tags, other IP protocols),
  each mutated with plain ``bytearray`` operations: bit flips, bytes and 16-bit
  words set to edge values, truncations, insertions, deletions, addresses set to
  special classes (unspecified, broadcast, loopback, class E, multicast, link-local)
  and ports set to edge values. Most mutations land in the headers (the first bytes
  up to the end of the L4 header). Half the mutants then get their IPv4 header and
  L4 checksums recomputed, so that they pass checksum checks and reach the logic
  behind them; the others keep whatever checksum the mutation left.
- :func:`dns_flood`: DNS queries (A, AAAA) for distinct names, which a fake-ip
  resolver has to remember (its memory bound is the point).

Frame ``i`` of a stream depends only on the seed and ``i``'s position in the
stream: :meth:`Mutator.frames` replays it (``python framefuzz.py dump`` prints one
frame by index, with the base it came from and the operations applied).

Command line (run inside a network namespace; prints one JSON line)::

    framefuzz.py macflood IFNAME --count N --rate R --seconds S --seed K
    framefuzz.py fuzz IFNAME --count N --rate R --seconds S --seed K --src-mac M \
        --dst-mac M --src-ip A --dst-ip A --src-ip6 A --dst-ip6 A --dns-ip A --dns-ip6 A
    framefuzz.py dnsflood IFNAME --count N --rate R --seconds S --seed K [addresses]
    framefuzz.py dump --index I --seed K [same address options]

Sending is paced in bursts to ``rate`` frames a second and stops after ``count``
frames or ``seconds``, whichever comes first. A send that the kernel refuses
(a frame too short or too long for the device) is counted, not retried.

What it does not do: check what comes back; the tests read the bridge's counters
and run real traffic after the flood.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

K_MAC = 0x9E3779B97F & ((1 << 40) - 1) | 1  # odd: i -> i*K mod 2**40 is a bijection
MAC_SPACE = 1 << 40
FLOOD_ETHERTYPE = b"\x88\xb5"
MAX_FRAME = 1514

V4_SPECIAL = [bytes(4), b"\xff\xff\xff\xff", bytes([127, 0, 0, 1]), bytes([240, 0, 0, 1]),
              bytes([224, 0, 0, 1]), bytes([169, 254, 169, 254]), bytes([10, 198, 0, 255]),
              bytes([255, 255, 255, 254])]
V6_SPECIAL = [bytes(16), bytes(15) + b"\x01", b"\xff\x02" + bytes(13) + b"\x01",
              b"\xfe\x80" + bytes(13) + b"\x01", b"\xff" * 16,
              bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])]
EDGE8 = [0, 1, 0x7F, 0x80, 0xFE, 0xFF]
EDGE16 = [0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF, 20, 40, 60, 1500]
PORTS = [0, 53, 80, 443, 65535]


# ---------------------------------------------------------------- MAC flood

def flood_mac(i: int, offset: int) -> bytes:
    """The source MAC of frame ``i``: distinct for distinct ``i`` below 2**40."""
    return b"\x02" + ((i * K_MAC + offset) % MAC_SPACE).to_bytes(5, "big")


def mac_flood(seed: int, count: int) -> Iterator[bytes]:
    """``count`` broadcast frames from ``count`` distinct random source MACs."""
    offset = random.Random(seed).getrandbits(40)
    tail = FLOOD_ETHERTYPE + b"vtl-mac-flood".ljust(46, b"\0")
    bcast = b"\xff" * 6
    for i in range(count):
        yield bcast + flood_mac(i, offset) + tail


# ---------------------------------------------------------------- base frames

@dataclass(frozen=True)
class Addrs:
    """Who the base frames are from and to (the guest's side of a bridge)."""

    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    src_ip6: str
    dst_ip6: str
    dns_ip: str
    dns_ip6: str


@dataclass(frozen=True)
class Base:
    """One well-formed frame and where its layers start (-1: absent)."""

    name: str
    data: bytes
    l3: int  # offset of the IP / ARP header
    l4: int  # offset of the header after IP (TCP, UDP, ICMP, ...)
    hdr_end: int  # end of the last header (where payload starts)
    v6: bool


def base_frames(a: Addrs) -> list[Base]:
    """The seeds of the mutator, built once with scapy (the only scapy use here)."""
    import logging
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_RR
    from scapy.layers.inet6 import (
        ICMPv6DestUnreach,
        ICMPv6EchoRequest,
        ICMPv6ND_NA,
        ICMPv6ND_NS,
        ICMPv6ND_RA,
        ICMPv6ND_RS,
        ICMPv6NDOptPrefixInfo,
        ICMPv6NDOptSrcLLAddr,
        ICMPv6PacketTooBig,
        IPv6,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
    )
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

    eth = Ether(src=a.src_mac, dst=a.dst_mac)
    ip4 = IP(src=a.src_ip, dst=a.dst_ip)
    ip6 = IPv6(src=a.src_ip6, dst=a.dst_ip6)
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (12345, 0)), ("NOP", None),
            ("WScale", 7)]
    ts = [("NOP", None), ("NOP", None), ("Timestamp", (12346, 777))]
    sack = [("NOP", None), ("NOP", None), ("SAck", (1000, 2000, 3000, 4000))]
    dnsq = DNS(id=0x1234, rd=1, qd=DNSQR(qname="web.vtl.test", qtype="A"))
    dnsq6 = DNS(id=0x4321, rd=1, qd=DNSQR(qname="web.vtl.test", qtype="AAAA"))
    dnsptr = DNS(id=7, rd=1, qd=DNSQR(qname="1.0.18.198.in-addr.arpa", qtype="PTR"))
    dns_bytes = bytes(dnsq)
    gw_mac = a.dst_mac
    inner_tcp = IP(src=a.dst_ip, dst=a.src_ip) / TCP(sport=80, dport=40000, flags="SA")
    inner6 = IPv6(src=a.dst_ip6, dst=a.src_ip6) / TCP(sport=80, dport=40001, flags="SA")
    pkts: dict[str, object] = {
        "tcp4-syn-opts": eth / ip4 / TCP(sport=40000, dport=80, flags="S", seq=1000,
                                         options=opts),
        "tcp4-syn-port53": eth / ip4 / TCP(sport=40002, dport=53, flags="S", options=opts),
        "tcp4-ack-data": eth / ip4 / TCP(sport=40000, dport=80, flags="PA", seq=1001,
                                         ack=5000, options=ts) / Raw(b"GET / HTTP/1.0\r\n\r\n"),
        "tcp4-ack-sack": eth / ip4 / TCP(sport=40000, dport=80, flags="A", seq=1001,
                                         ack=5000, options=sack),
        "tcp4-fin": eth / ip4 / TCP(sport=40000, dport=80, flags="FA", seq=1020, ack=5000),
        "tcp4-rst": eth / ip4 / TCP(sport=40000, dport=80, flags="R", seq=1020),
        "tcp4-synack": eth / ip4 / TCP(sport=80, dport=40000, flags="SA", options=opts),
        "tcp4-big": eth / ip4 / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5000)
        / Raw(bytes(range(256)) * 5),
        "tcp4-dns": eth / IP(src=a.src_ip, dst=a.dns_ip) / TCP(
            sport=40003, dport=53, flags="PA", seq=1, ack=1) / Raw(
            len(dns_bytes).to_bytes(2, "big") + dns_bytes),
        "tcp6-syn-opts": eth / ip6 / TCP(sport=40010, dport=80, flags="S", options=opts),
        "tcp6-ack-data": eth / ip6 / TCP(sport=40010, dport=80, flags="PA", seq=1, ack=1)
        / Raw(b"hello"),
        "ip4-options-syn": eth / IP(src=a.src_ip, dst=a.dst_ip, options=[
            IPOption_RR(), IPOption_Router_Alert()]) / TCP(sport=40004, dport=80, flags="S"),
        "ip4-options-udp": eth / IP(src=a.src_ip, dst=a.dns_ip, options=[
            IPOption_Router_Alert()]) / UDP(sport=5353, dport=53) / dnsq,
        "ip4-frag-first": eth / IP(src=a.src_ip, dst=a.dst_ip, flags="MF", id=9) / UDP(
            sport=1, dport=9) / Raw(bytes(64)),
        "ip4-frag-later": eth / IP(src=a.src_ip, dst=a.dst_ip, frag=8, id=9, proto=6) / Raw(
            bytes(40)),
        "udp4-dns-a": eth / IP(src=a.src_ip, dst=a.dns_ip) / UDP(sport=33333, dport=53) / dnsq,
        "udp4-dns-aaaa": eth / IP(src=a.src_ip, dst=a.dns_ip) / UDP(sport=33334, dport=53)
        / dnsq6,
        "udp4-dns-ptr": eth / IP(src=a.src_ip, dst=a.dns_ip) / UDP(sport=33335, dport=53)
        / dnsptr,
        "udp4-dns-answer": eth / IP(src=a.src_ip, dst=a.dns_ip) / UDP(sport=53, dport=53)
        / DNS(id=1, qr=1, qd=DNSQR(qname="x.test"), ancount=0),
        "udp4-other": eth / ip4 / UDP(sport=1234, dport=9999) / Raw(b"x" * 20),
        "udp6-dns-a": eth / IPv6(src=a.src_ip6, dst=a.dns_ip6) / UDP(sport=33336, dport=53)
        / dnsq,
        "arp-who-has": Ether(src=a.src_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=a.src_mac, psrc=a.src_ip, pdst=a.dst_ip),
        "arp-reply": Ether(src=a.src_mac, dst=gw_mac) / ARP(
            op=2, hwsrc=a.src_mac, psrc=a.src_ip, hwdst=gw_mac, pdst=a.dst_ip),
        "arp-gratuitous": Ether(src=a.src_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=a.src_mac, psrc=a.src_ip, pdst=a.src_ip),
        "nd-ns": Ether(src=a.src_mac, dst="33:33:ff:00:00:02") / IPv6(
            src=a.src_ip6, dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(
            tgt=a.dst_ip6) / ICMPv6NDOptSrcLLAddr(lladdr=a.src_mac),
        "nd-dad": Ether(src=a.src_mac, dst="33:33:ff:00:00:01") / IPv6(
            src="::", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=a.src_ip6),
        "nd-na": Ether(src=a.src_mac, dst=gw_mac) / IPv6(src=a.src_ip6, dst=a.dst_ip6,
                                                         hlim=255) / ICMPv6ND_NA(
            tgt=a.src_ip6, R=0, S=1, O=1),
        "nd-rs": Ether(src=a.src_mac, dst="33:33:00:00:00:02") / IPv6(
            src=a.src_ip6, dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
        "nd-ra": Ether(src=a.src_mac, dst="33:33:00:00:00:01") / IPv6(
            src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6ND_RA() / ICMPv6NDOptPrefixInfo(
            prefix="fd00:1::", prefixlen=64),
        "icmp4-echo": eth / ip4 / ICMP(type=8, id=7, seq=1) / Raw(b"ping" * 8),
        "icmp4-unreach": eth / ip4 / ICMP(type=3, code=3) / Raw(bytes(inner_tcp)[:28]),
        "icmp4-frag-needed": eth / ip4 / ICMP(type=3, code=4, nexthopmtu=1280) / Raw(
            bytes(inner_tcp)[:28]),
        "icmp4-time-exceeded": eth / ip4 / ICMP(type=11, code=0) / Raw(bytes(inner_tcp)),
        "icmp6-echo": eth / ip6 / ICMPv6EchoRequest(id=7, seq=1, data=b"ping"),
        "icmp6-unreach": eth / ip6 / ICMPv6DestUnreach(code=4) / Raw(bytes(inner6)[:48]),
        "icmp6-too-big": eth / ip6 / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(inner6)),
        "ip6-hbh-tcp": eth / ip6 / IPv6ExtHdrHopByHop() / TCP(sport=40011, dport=80,
                                                               flags="S"),
        "ip6-frag-udp": eth / ip6 / IPv6ExtHdrFragment(id=5, m=1) / UDP(sport=1, dport=53)
        / dnsq,
        "ip6-routing": eth / ip6 / IPv6ExtHdrRouting(addresses=[a.dst_ip6]) / TCP(
            sport=40012, dport=80, flags="S"),
        "vlan-tcp-syn": eth / Dot1Q(vlan=5) / ip4 / TCP(sport=40005, dport=80, flags="S"),
        "qinq-udp": Ether(src=a.src_mac, dst=a.dst_mac, type=0x88A8) / Dot1Q(vlan=6)
        / Dot1Q(vlan=7) / ip4 / UDP(sport=2, dport=53) / dnsq,
        "ip4-gre": eth / IP(src=a.src_ip, dst=a.dst_ip, proto=47) / Raw(bytes(24)),
        "ip6-sctp": eth / IPv6(src=a.src_ip6, dst=a.dst_ip6, nh=132) / Raw(bytes(28)),
    }
    out = []
    for name, pkt in pkts.items():
        data = bytes(pkt)  # type: ignore[call-overload]
        out.append(_describe(name, data))
    return out


def _describe(name: str, data: bytes) -> Base:
    """Find the layer offsets of a well-formed frame (VLAN tags, IPv4, IPv6 ext headers)."""
    off, et = 12, 0
    while True:
        et = int.from_bytes(data[off:off + 2], "big")
        off += 2
        if et in (0x8100, 0x88A8):
            off += 2
            continue
        break
    l3, l4, end, v6 = off, -1, len(data), False
    if et == 0x0800:
        l4 = l3 + (data[l3] & 15) * 4
        proto = data[l3 + 9]
    elif et == 0x86DD:
        v6 = True
        proto, l4 = data[l3 + 6], l3 + 40
        while proto in (0, 43, 44, 60):
            nxt = data[l4]
            l4 += 8 if proto == 44 else (data[l4 + 1] + 1) * 8
            proto = nxt
    else:
        proto = -1
        end = min(len(data), l3 + 28)
    if l4 >= 0:
        end = min(len(data), l4 + {6: (data[l4 + 12] >> 4) * 4 if l4 + 12 < len(data) else 20,
                                   17: 8, 1: 8, 58: 8}.get(proto, 8))
    return Base(name, data, l3, l4, end, v6)


# ---------------------------------------------------------------- checksums

def _sum(data: bytes | bytearray | memoryview) -> int:
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    r = n % 0xFFFF
    return r if r or not n else 0xFFFF


def fix_checksums(buf: bytearray) -> None:
    """Recompute the IPv4 header and the TCP/UDP/ICMP/ICMPv6 checksums of ``buf`` where
    its headers can be followed as they are now; leave anything else alone."""
    off = 12
    n = len(buf)
    while off + 2 <= n and buf[off:off + 2] in (b"\x81\x00", b"\x88\xa8"):
        off += 4
    if off + 2 > n:
        return
    et = (buf[off] << 8) | buf[off + 1]
    l3 = off + 2
    if et == 0x0800:
        if l3 + 20 > n:
            return
        ihl = (buf[l3] & 15) * 4
        if ihl < 20 or l3 + ihl > n:
            return
        buf[l3 + 10:l3 + 12] = b"\0\0"
        c = ~_sum(memoryview(buf)[l3:l3 + ihl]) & 0xFFFF
        buf[l3 + 10:l3 + 12] = c.to_bytes(2, "big")
        proto = buf[l3 + 9]
        end = l3 + int.from_bytes(buf[l3 + 2:l3 + 4], "big")
        l4 = l3 + ihl
        if end > n or end <= l4 or buf[l3 + 6] & 0x3F or buf[l3 + 7]:  # fragment
            return
        pseudo = _sum(bytes(buf[l3 + 12:l3 + 20])) + proto + (end - l4) if proto != 1 else 0
    elif et == 0x86DD:
        if l3 + 40 > n:
            return
        proto = buf[l3 + 6]
        l4 = l3 + 40
        end = l4 + int.from_bytes(buf[l3 + 4:l3 + 6], "big")
        if end > n or end <= l4:
            return
        pseudo = _sum(bytes(buf[l3 + 8:l3 + 40])) + proto + (end - l4)
    else:
        return
    pos = {6: 16, 17: 6, 1: 2, 58: 2}.get(proto)
    if pos is None or l4 + pos + 2 > end:
        return
    buf[l4 + pos:l4 + pos + 2] = b"\0\0"
    c = ~((_sum(memoryview(buf)[l4:end]) + pseudo) % 0xFFFF or 0xFFFF) & 0xFFFF
    if proto == 17 and c == 0:
        c = 0xFFFF
    buf[l4 + pos:l4 + pos + 2] = c.to_bytes(2, "big")


# ---------------------------------------------------------------- mutations

Op = Callable[[random.Random, bytearray, Base], str]


def _pos(rng: random.Random, buf: bytearray, base: Base) -> int:
    """A position, three times in four inside the headers."""
    end = min(len(buf), base.hdr_end)
    if end > 12 and rng.random() < 0.75:
        return rng.randrange(12, end)
    return rng.randrange(len(buf))


def op_flip(rng: random.Random, buf: bytearray, base: Base) -> str:
    p = _pos(rng, buf, base)
    bit = rng.randrange(8)
    buf[p] ^= 1 << bit
    return f"flip@{p}.{bit}"


def op_byte(rng: random.Random, buf: bytearray, base: Base) -> str:
    p = _pos(rng, buf, base)
    buf[p] = v = rng.choice(EDGE8) if rng.random() < 0.7 else rng.randrange(256)
    return f"byte@{p}={v}"


def op_word(rng: random.Random, buf: bytearray, base: Base) -> str:
    p = _pos(rng, buf, base)
    v = rng.choice(EDGE16)
    buf[p:p + 2] = v.to_bytes(2, "big")
    return f"word@{p}={v}"


def op_truncate(rng: random.Random, buf: bytearray, base: Base) -> str:
    n = rng.randrange(min(len(buf), base.hdr_end + 4)) if rng.random() < 0.8 \
        else rng.randrange(len(buf))
    del buf[n:]
    return f"truncate@{n}"


def op_insert(rng: random.Random, buf: bytearray, base: Base) -> str:
    p = _pos(rng, buf, base)
    k = rng.randint(1, 8)
    buf[p:p] = rng.randbytes(k)
    return f"insert@{p}+{k}"


def op_delete(rng: random.Random, buf: bytearray, base: Base) -> str:
    p = _pos(rng, buf, base)
    k = rng.randint(1, 8)
    del buf[p:p + k]
    return f"delete@{p}-{k}"


def op_addr(rng: random.Random, buf: bytearray, base: Base) -> str:
    if base.l4 < 0 or base.l3 + 20 > len(buf):
        return op_flip(rng, buf, base)
    if base.v6:
        p = base.l3 + rng.choice((8, 24))
        v = rng.choice(V6_SPECIAL)
    else:
        p = base.l3 + rng.choice((12, 16, 16))
        v = rng.choice(V4_SPECIAL)
    buf[p:p + len(v)] = v
    return f"addr@{p}={v.hex()}"


def op_port(rng: random.Random, buf: bytearray, base: Base) -> str:
    if base.l4 < 0 or base.l4 + 4 > len(buf):
        return op_word(rng, buf, base)
    p = base.l4 + rng.choice((0, 2, 2))
    v = rng.choice(PORTS)
    buf[p:p + 2] = v.to_bytes(2, "big")
    return f"port@{p}={v}"


OPS: list[Op] = [op_flip, op_flip, op_flip, op_byte, op_byte, op_word, op_truncate,
                 op_insert, op_delete, op_addr, op_port]


class Mutator:
    """A seeded stream of mutants of :func:`base_frames`."""

    def __init__(self, bases: list[Base], seed: int):
        self.bases = bases
        self.seed = seed

    def frames(self, count: int, explain: bool = False) -> Iterator[tuple[bytes, str]]:
        """``count`` mutants, in order; with ``explain``, each with a description of its
        base and operations (else an empty string, which is faster)."""
        rng = random.Random(self.seed)
        bases, ops = self.bases, OPS
        choice, rand = rng.choice, rng.random
        for _ in range(count):
            base = choice(bases)
            buf = bytearray(base.data)
            steps = []
            for _ in range(1 if rand() < 0.6 else rng.randint(2, 3)):
                if not buf:
                    break
                what = choice(ops)(rng, buf, base)
                if explain:
                    steps.append(what)
            fixed = rand() < 0.5
            if fixed:
                fix_checksums(buf)
            if len(buf) > MAX_FRAME:
                del buf[MAX_FRAME:]
            desc = f"{base.name} {' '.join(steps)}{' +csum' if fixed else ''}" if explain \
                else ""
            yield bytes(buf), desc


# ---------------------------------------------------------------- DNS name flood

def dns_flood(a: Addrs, seed: int, count: int) -> Iterator[bytes]:
    """``count`` DNS queries over UDP/IPv4 from the guest to ``a.dns_ip``, each for a
    distinct name (``q<i>-<random>.flood.test``, about 40 bytes), A and AAAA in turn:
    the names a fake-ip resolver must remember. UDP checksum 0 (none, IPv4)."""
    import ipaddress
    rng = random.Random(seed)
    eth = mac_bytes(a.dst_mac) + mac_bytes(a.src_mac) + b"\x08\x00"
    src, dst = ipaddress.IPv4Address(a.src_ip).packed, ipaddress.IPv4Address(a.dns_ip).packed
    tail = b"\x05flood\x04test\x00"
    for i in range(count):
        label = f"q{i}-{rng.getrandbits(64):016x}".encode()
        qname = bytes([len(label)]) + label + tail
        dns = (i & 0xFFFF).to_bytes(2, "big") + b"\x01\x00\x00\x01" + bytes(6) + qname + \
            (b"\x00\x01" if i & 1 == 0 else b"\x00\x1c") + b"\x00\x01"
        udp = (40000 + (i & 0x3FFF)).to_bytes(2, "big") + b"\x00\x35" + \
            (8 + len(dns)).to_bytes(2, "big") + b"\x00\x00" + dns
        ip = bytearray(b"\x45\x00" + (20 + len(udp)).to_bytes(2, "big") + b"\x00\x00\x40\x00"
                       b"\x40\x11\x00\x00" + src + dst)
        ip[10:12] = (~_sum(ip) & 0xFFFF).to_bytes(2, "big")
        yield eth + bytes(ip) + udp


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


# ---------------------------------------------------------------- sending

def send_paced(ifname: str, frames: Iterator[bytes], rate: float, seconds: float,
               burst: int = 256) -> dict[str, float]:
    """Send ``frames`` on ``ifname`` at about ``rate`` frames a second (bursts of
    ``burst``), for at most ``seconds``; counts of sent and refused frames."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    send = s.send
    print("started", flush=True)  # the host side starts its probes on this line
    sent = refused = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    gap = burst / rate if rate > 0 else 0.0
    next_burst = t0
    n = 0
    try:
        for frame in frames:
            try:
                send(frame)
                sent += 1
            except OSError:
                refused += 1
            n += 1
            if n % burst == 0:
                next_burst += gap
                now = time.monotonic()
                if now >= deadline:
                    break
                if next_burst > now:
                    time.sleep(next_burst - now)
    finally:
        s.close()
    took = time.monotonic() - t0
    return {"frames": n, "sent": sent, "refused": refused, "seconds": round(took, 3),
            "rate": round(n / took) if took > 0 else 0}



def _addrs(ns: argparse.Namespace) -> Addrs:
    return Addrs(ns.src_mac, ns.dst_mac, ns.src_ip, ns.dst_ip, ns.src_ip6, ns.dst_ip6,
                 ns.dns_ip or ns.dst_ip, ns.dns_ip6 or ns.dst_ip6)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", choices=["macflood", "fuzz", "dnsflood", "dump"])
    p.add_argument("ifname", nargs="?", default="")
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=100_000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--index", type=int, nargs="*", default=[])
    p.add_argument("--src-mac", default="02:00:00:c6:00:01")
    p.add_argument("--dst-mac", default="02:00:00:c6:00:02")
    p.add_argument("--src-ip", default="10.198.0.1")
    p.add_argument("--dst-ip", default="10.198.0.2")
    p.add_argument("--src-ip6", default="fd00:198::1")
    p.add_argument("--dst-ip6", default="fd00:198::2")
    p.add_argument("--dns-ip", default="")
    p.add_argument("--dns-ip6", default="")
    ns = p.parse_args(argv)
    if ns.cmd == "macflood":
        out = send_paced(ns.ifname, mac_flood(ns.seed, ns.count), ns.rate, ns.seconds)
    elif ns.cmd == "dnsflood":
        out = send_paced(ns.ifname, dns_flood(_addrs(ns), ns.seed, ns.count), ns.rate,
                         ns.seconds)
    elif ns.cmd == "fuzz":
        mut = Mutator(base_frames(_addrs(ns)), ns.seed)
        out = send_paced(ns.ifname, (f for f, _ in mut.frames(ns.count)), ns.rate,
                         ns.seconds)
    else:
        mut = Mutator(base_frames(_addrs(ns)), ns.seed)
        wanted = set(ns.index)
        last = max(wanted, default=-1)
        found = {}
        for i, (frame, desc) in enumerate(mut.frames(last + 1, explain=True)):
            if i in wanted:
                found[i] = {"desc": desc, "hex": frame.hex()}
        out = {"frames": found}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
