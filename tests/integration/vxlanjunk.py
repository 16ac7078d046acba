"""A bounded flood of bad VXLAN datagrams at a tunnel endpoint (run inside a namespace).

``python3 vxlanjunk.py TARGET COUNT SEED KNOWN UNKNOWN SPOOFED`` sends COUNT
datagrams to TARGET:4789, cycling through the kinds of :data:`KINDS`, each
built by a seeded :class:`random.Random` so a failure can be replayed. Every
datagram is one a tunnel endpoint must drop: from a known peer (a UDP socket
bound to KNOWN) it is broken (random bytes, a wrong VNI, no I flag, truncated,
an inner source outside the peer's prefixes, an inner protocol that is neither
IP nor ARP, a VXLAN header mutated into an invalid one); well-formed datagrams
come only from addresses that are no peer (a UDP socket bound to UNKNOWN, and a
raw socket with ``IP_HDRINCL`` that writes SPOOFED as the source). Every inner
frame is addressed to VM-A and carries :data:`MARKER`, so a capture in VM-A can
look for it. Prints one JSON line: datagrams sent per kind, and send errors.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
from collections.abc import Callable

from vtl.packet.checksum import checksum

PORT = 4789
VNI = 42
MARKER = b"VTLJUNK-0123456789"
VM_A_MAC = bytes.fromhex("0200003d010a")
VM_B_MAC = bytes.fromhex("0200003e0214")
VM_A, VM_B = socket.inet_aton("10.61.1.10"), socket.inet_aton("10.62.2.20")
VM_A6 = socket.inet_pton(socket.AF_INET6, "fd61::10")


def vxlan(vni: int = VNI, flags: int = 0x08) -> bytes:
    return struct.pack("!B3xI", flags, vni << 8)


def ipv4_echo(src: bytes = VM_B, dst: bytes = VM_A) -> bytes:
    """An Ethernet frame to VM-A: ICMP echo request carrying MARKER."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4A4B, 1) + MARKER
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 63, 1, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return VM_A_MAC + VM_B_MAC + b"\x08\x00" + ip + icmp


def ipv6_echo(src: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 128, 0, 0, 0x4A4B, 1) + MARKER  # checksum left 0: bad anyway
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 63, src, VM_A6)
    return VM_A_MAC + VM_B_MAC + b"\x86\xdd" + ip6 + icmp


def valid(rng: random.Random) -> bytes:
    return vxlan() + ipv4_echo()


def k_random(rng: random.Random) -> bytes:
    while True:
        d = rng.randbytes(rng.randrange(0, 1600))
        if len(d) < 8 or not d[0] & 0x08 or int.from_bytes(d[4:7], "big") != VNI:
            return d


def k_wrong_vni(rng: random.Random) -> bytes:
    vni = rng.choice([0, 1, 41, 43, 0xFFFFFF, rng.randrange(1 << 24)])
    return vxlan(vni if vni != VNI else 7) + ipv4_echo()


def k_no_i_flag(rng: random.Random) -> bytes:
    return vxlan(flags=rng.randrange(256) & ~0x08) + ipv4_echo()


def k_truncated(rng: random.Random) -> bytes:
    return valid(rng)[: rng.randrange(0, 8 + 14)]


def k_spoofed_inner(rng: random.Random) -> bytes:
    return vxlan() + ipv4_echo(src=socket.inet_aton(f"10.99.{rng.randrange(256)}.9"))


def k_spoofed_inner6(rng: random.Random) -> bytes:
    return vxlan() + ipv6_echo(socket.inet_pton(socket.AF_INET6, f"fd99::{rng.randrange(1, 9999)}"))


def k_other_ethertype(rng: random.Random) -> bytes:
    frame = bytearray(ipv4_echo())
    frame[12:14] = struct.pack("!H", rng.choice([0x88B5, 0x88CC, 0x8100, 0x0000, 0xFFFF]))
    return vxlan() + bytes(frame)


def k_mutated(rng: random.Random) -> bytes:
    while True:
        d = bytearray(valid(rng))
        for _ in range(rng.randrange(1, 5)):
            d[rng.randrange(8)] ^= 1 << rng.randrange(8)
        if not d[0] & 0x08 or int.from_bytes(d[4:7], "big") != VNI:
            return bytes(d)


# (kind, builder, source): "known" a UDP socket on a peer's address, "unknown" one on an
# address that is no peer, "raw" a raw IPv4 socket writing a spoofed source
KINDS: list[tuple[str, Callable[[random.Random], bytes], str]] = [
    ("random", k_random, "known"),
    ("wrong_vni", k_wrong_vni, "known"),
    ("no_i_flag", k_no_i_flag, "known"),
    ("truncated", k_truncated, "known"),
    ("spoofed_inner", k_spoofed_inner, "known"),
    ("spoofed_inner6", k_spoofed_inner6, "known"),
    ("other_ethertype", k_other_ethertype, "known"),
    ("mutated", k_mutated, "known"),
    ("unknown_source", valid, "unknown"),
    ("raw_spoofed_source", valid, "raw"),
]


def raw_udp(src: bytes, dst: bytes, sport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, PORT, 8 + len(payload), 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    return ip + udp


def main(target: str, count: int, seed: int, known: str, unknown: str, spoofed: str) -> None:
    rng = random.Random(seed)
    socks = {}
    for name, addr in (("known", known), ("unknown", unknown)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 0))
        socks[name] = s
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = {k: 0 for k, _, _ in KINDS}
    errors = 0
    src, dst = socket.inet_aton(spoofed), socket.inet_aton(target)
    for i in range(count):
        kind, build, via = KINDS[i % len(KINDS)]
        payload = build(rng)
        try:
            if via == "raw":
                raw.sendto(raw_udp(src, dst, rng.randrange(1024, 65535), payload), (target, 0))
            else:
                socks[via].sendto(payload, (target, PORT))
            sent[kind] += 1
        except OSError:
            errors += 1
    print(json.dumps({"sent": sent, "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
