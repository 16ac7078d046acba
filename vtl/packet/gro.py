"""Receive coalescing (a Python GRO): in-order TCP segments of one flow become one GSO frame.

Theory of operation. A service that produces many wire-size TCP segments toward a port
with virtio-net headers (the ``tunnel`` decapsulating a stream, a TCP-terminating
service sending a download) would cost one write, and one pass of the guest's whole
receive stack, per 1.4 KB segment. :func:`coalesce` walks the frames a batch produced,
in order, and merges each run of segments of one TCP flow into one frame with GSO
metadata (``GSO_TCPV4``/``GSO_TCPV6``, ``gso_size`` the segments' payload size,
``NEEDS_CSUM`` with the pseudo-header sum in the checksum field), as the kernel's GRO
does for a NIC: the guest gets the same bytes in one skb.

A run continues while each segment has the same Ethernet, IP and TCP headers as the
first except the IP total length, ID and checksum and the TCP sequence number and
checksum (so the same addresses, ports, TTL, TCP options and window), starts where the
previous one ended, carries only ACK (PSH ends the run, as in Linux), and the previous
segments all had the run's full payload size. Only untagged IPv4 without options or
fragments and IPv6 without extension headers qualify, and no frame bigger than a jumbo
frame (:data:`MAX_SEGMENT`: it was coalesced before). Each segment's TCP checksum is
verified first: a corrupted segment (``netem corrupt``) is left alone, for the guest to
drop, rather than made valid by the partial checksum. Frames that do not qualify keep
their place in the order.
"""

from __future__ import annotations

from vtl.frame import Frame, VnetHeader
from vtl.packet.checksum import checksum, fold, ones_sum, pseudo_sum_v4, pseudo_sum_v6

NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0x01, 1, 4, 0x80
ACK, PSH, CWR = 0x10, 0x08, 0x80
MAX_MERGED = 65000  # bytes of IP packet in one merged frame (the IPv4 length field's room)
# a frame bigger than a jumbo frame was coalesced already (a NIC's or a veth peer's GRO,
# read through pcap): nothing to merge, and verifying its checksum in Python cost the
# pcap peer->guest path half its time
MAX_SEGMENT = 9238


class _Run:
    __slots__ = ("head", "version", "tcp", "hlen", "mss", "next_seq", "payloads", "size",
                 "first", "psh", "count")

    def __init__(self, frame: Frame, version: int, tcp: int, hlen: int, seq: int, plen: int):
        d = frame.data
        self.first = frame
        self.head = d[:tcp + hlen]  # the headers, compared (masked) against later segments
        self.version, self.tcp, self.hlen = version, tcp, hlen
        self.mss = plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.payloads = [memoryview(d)[tcp + hlen:]]
        self.size = len(d) - 14
        self.psh = bool(d[tcp + 13] & PSH)
        self.count = 1

    def takes(self, d: bytearray, tcp: int, hlen: int, seq: int, plen: int) -> bool:
        if self.psh or tcp != self.tcp or hlen != self.hlen or seq != self.next_seq \
                or plen > self.mss or self.payloads[-1].nbytes != self.mss \
                or self.size + plen > MAX_MERGED:
            return False
        h = self.head
        if self.version == 4:
            # Ethernet + version/IHL/TOS; flags/TTL/protocol; addresses; ports; ack..window
            # Ethernet + version/IHL/TOS; flags/TTL/protocol; addresses; ports; ack and
            # data offset; window; options (the flags byte may differ by PSH)
            return d[:16] == h[:16] and d[20:24] == h[20:24] and d[26:38] == h[26:38] \
                and d[42:47] == h[42:47] and d[48:50] == h[48:50] \
                and d[54:tcp + hlen] == h[54:tcp + hlen]
        return d[:18] == h[:18] and d[20:tcp + 4] == h[20:tcp + 4] \
            and d[tcp + 8:tcp + 13] == h[tcp + 8:tcp + 13] \
            and d[tcp + 14:tcp + 16] == h[tcp + 14:tcp + 16] \
            and d[tcp + 18:tcp + hlen] == h[tcp + 18:tcp + hlen]

    def add(self, d: bytearray, plen: int) -> None:
        self.payloads.append(memoryview(d)[self.tcp + self.hlen:])
        self.next_seq = (self.next_seq + plen) & 0xFFFFFFFF
        self.size += plen
        self.psh = bool(d[self.tcp + 13] & PSH)
        self.count += 1

    def frame(self) -> Frame:
        if self.count == 1:
            return self.first
        tcp, hlen = self.tcp, self.hlen
        d = bytearray(self.head)
        d[tcp + 13] = ACK | (PSH if self.psh else 0) | (d[tcp + 13] & CWR)
        d += b"".join(self.payloads)
        l4len = len(d) - tcp
        if self.version == 4:
            d[16:18] = (len(d) - 14).to_bytes(2, "big")
            d[24:26] = b"\0\0"
            d[24:26] = checksum(d, 14, 34).to_bytes(2, "big")
            ps = pseudo_sum_v4(d[26:30], d[30:34], 6, l4len)
            gso = GSO_TCPV4
        else:
            d[18:20] = (len(d) - 54).to_bytes(2, "big")
            ps = pseudo_sum_v6(d[22:38], d[38:54], 6, l4len)
            gso = GSO_TCPV6
        d[tcp + 16:tcp + 18] = ps.to_bytes(2, "big")
        if d[tcp + 13] & CWR:
            gso |= GSO_ECN
        return Frame(d, VnetHeader(flags=NEEDS_CSUM, gso_type=gso, hdr_len=tcp + hlen,
                                   gso_size=self.mss, csum_start=tcp, csum_offset=16))


def _segment(d: bytearray) -> tuple[int, int, int, int, int] | None:
    """(IP version, TCP offset, TCP header length, sequence, payload length) of a plain
    TCP data segment carrying only ACK (or ACK|PSH) with a valid checksum; else None."""
    n = len(d)
    if n < 66 or n > MAX_SEGMENT:
        return None  # too short for TCP data, or already bigger than any wire's frame
    if d[12] == 0x08 and d[13] == 0x00:
        if d[14] != 0x45 or d[23] != 6 or d[20] & 0x3F or d[21] \
                or (d[16] << 8 | d[17]) != n - 14:
            return None
        version, tcp = 4, 34
    elif d[12] == 0x86 and d[13] == 0xDD:
        if d[20] != 6 or (d[18] << 8 | d[19]) != n - 54:
            return None
        version, tcp = 6, 54
    else:
        return None
    if n < tcp + 20 or d[tcp + 13] & ~(PSH | CWR) != ACK:
        return None
    hlen = (d[tcp + 12] >> 4) << 2
    plen = n - tcp - hlen
    if hlen < 20 or plen <= 0:
        return None
    l4len = n - tcp
    ps = pseudo_sum_v4(d[26:30], d[30:34], 6, l4len) if version == 4 else \
        pseudo_sum_v6(d[22:38], d[38:54], 6, l4len)
    if fold(ones_sum(d, tcp) + ps) != 0xFFFF:
        return None  # a corrupted segment: the guest must see it as it is
    return version, tcp, hlen, int.from_bytes(d[tcp + 4:tcp + 8], "big"), plen


def coalesce(frames: list[Frame]) -> list[Frame]:
    """``frames`` in the same order, runs of one TCP flow's segments merged (see above)."""
    out: list[Frame] = []
    run: _Run | None = None
    for f in frames:
        seg = None if f.vnet is not None else _segment(f.data)
        if seg is None:
            if run is not None:
                out.append(run.frame())
                run = None
            out.append(f)
            continue
        version, tcp, hlen, seq, plen = seg
        if run is not None and run.version == version and run.takes(f.data, tcp, hlen, seq,
                                                                    plen):
            run.add(f.data, plen)
            continue
        if run is not None:
            out.append(run.frame())
        run = _Run(f, version, tcp, hlen, seq, plen)
    if run is not None:
        out.append(run.frame())
    return out
