"""Forged puzzles, replayed answers and SYN floods for the puzzle tests (raw sockets).

Usage (run inside a namespace of :mod:`puzzlenet`):

    puzzleforge.py PCAP CLIENT SERVER WAIT_S
        from the router: a forged puzzle to CLIENT (a nonce it never made), then the
        last answered SYN of PCAP replayed to SERVER from another source and with each
        byte of its answer option flipped (but the type byte), then, WAIT_S later (past
        its expiry), as it was.
    puzzleforge.py - CLIENT SERVER flood COUNT SECONDS [KIND [SERVER_TS]]
        from the attacker: COUNT SYNs to SERVER:8080 from the spoofed sources
        10.71.3.100-199 within SECONDS: KIND ``mixed`` (the default: half with a
        client-info option, half without), ``info`` (all with) or ``wrong`` (with a
        wrong answer stamped SERVER_TS, so that the server hashes to refuse it).

Prints one JSON line: what was sent.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap
from vtl.services.puzzle import wire
from vtl.services.puzzle.cookie import Puzzle

from vtl.packet.packet import Packet


def raw_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    return s


def send_ip(s: socket.socket, frame: bytes | bytearray) -> None:
    """Send the IPv4 packet of an untagged Ethernet frame as it is."""
    ip = bytes(frame[14:])
    dst = socket.inet_ntoa(ip[16:20])
    s.sendto(ip, (dst, 0))


def fixed(frame: bytearray) -> bytearray:
    Packet(frame).ip.fix_checksum()  # type: ignore[union-attr]
    return frame


def replay(pcap: str, client: str, server: str, wait_s: float) -> dict[str, int]:
    s = raw_socket()
    syns = [p for p in rdpcap(pcap) if IP in p and TCP in p and p[TCP].flags == "S"
            and p[IP].ihl == 13 and p[IP].src == client]
    frame = bytearray(bytes(syns[-1]))
    if not isinstance(syns[-1], Ether):
        raise SystemExit("the capture must be Ethernet")
    opts = wire.parse_options(frame, 14)
    assert opts and opts.nonce is not None and opts.answer is not None
    # 1. a puzzle the client never asked for: its echoed nonce is not the proxy's
    fake = Puzzle(opts.server_ts, 0, 4, 15, os.urandom(8), 0, 14, os.urandom(8))
    send_ip(s, wire.build_puzzle(frame, 14, fake, opts.nonce ^ 0x5A5A5A5A, opts.client_ts))
    sent = 0
    # 2. from another source
    other = bytearray(frame)
    other[26:30] = socket.inet_aton(client.rsplit(".", 1)[0] + ".99")
    send_ip(s, fixed(other))
    sent += 1
    # 3. each byte of the answer option flipped (the type byte would make it another
    # option: the packet then carries client info alone and gets a puzzle)
    at = 14 + 20 + wire.INFO_LEN
    for i in range(1, wire.ANSWER_LEN):
        bad = bytearray(frame)
        bad[at + i] ^= 0x01
        send_ip(s, fixed(bad))
        sent += 1
    # 4. as it was, once expired
    time.sleep(wait_s)
    send_ip(s, frame)
    sent += 1
    return {"sent": sent, "forged_puzzles": 1}


def flood(server: str, count: int, seconds: float, kind: str = "mixed",
          server_ts: int = 0) -> dict[str, int | float]:
    """``count`` SYNs to ``server``:8080 from the spoofed sources within ``seconds``:
    ``mixed`` (half with client info, half without), ``info`` (all with), ``wrong``
    (client info and an answer stamped ``server_ts`` that is not the puzzle's)."""
    s = raw_socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    dst = socket.inet_aton(server)
    info = wire.client_info(0x12345678, 1000)
    answer = wire.answer_option(0xDEADBEEF, server_ts, 0, 10, bytes(8))
    options = {"mixed": (info, b""), "info": (info,), "wrong": (info + answer,)}[kind]
    packets = []  # prebuilt: the loop only sends
    for n in range(4096):
        src = socket.inet_aton(f"10.71.3.{100 + n % 100}")
        opts = options[n % len(options)]
        ihl = 5 + len(opts) // 4
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + 20, 0, 0, 64, 6, 0,
                         src, dst) + opts
        # the kernel fills the IP checksum; the TCP one is left 0 (wrong), which matters
        # not: nothing of it must reach a stack
        tcp = struct.pack("!HHIIBBHHH", 1024 + n, 8080, n, 0, 5 << 4, 0x02, 64240, 0, 0)
        packets.append(ip + tcp)
    host = socket.inet_ntoa(dst)
    sendto = s.sendto
    sent, start = 0, time.monotonic()
    deadline = start + seconds
    while sent < count and time.monotonic() < deadline:
        for pkt in packets[:min(len(packets), count - sent)]:
            try:
                sendto(pkt, (host, 0))
            except BlockingIOError:
                continue
            sent += 1
    return {"sent": sent, "seconds": round(time.monotonic() - start, 3)}


def main() -> None:
    if sys.argv[1] == "-":
        _, _, _client, server, mode, count, seconds, *rest = sys.argv
        assert mode == "flood"
        kind = rest[0] if rest else "mixed"
        out = flood(server, int(count), float(seconds), kind, int(rest[1]) if rest[1:] else 0)
    else:
        _, pcap, client, server, wait_s = sys.argv
        out = replay(pcap, client, server, float(wait_s))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
