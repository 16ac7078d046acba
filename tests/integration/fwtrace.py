"""Traces for the firewall's differential test: steps, a replayer, what each step did.

A trace is a list of :class:`Step`: which end sends (``outside``, the network, or
``inside``, the protected host) and an IP or IPv6 packet (scapy) with its TCP,
UDP or ICMP layers, flags, sequence numbers and payload. :class:`TcpFlow`
writes the steps of one connection with the right sequence numbers (each end
keeps its next sequence number; a step sent off it leaves it alone).

The replayer sends each step at both setups at once (a :class:`Side` is one
setup: the kernel's router or VTL's bridge, each between an outside and an
inside namespace), on an AF_PACKET socket in the sender's namespace (the socket
is opened there with setns(2) and keeps that namespace), in an Ethernet frame
to the next hop's MAC. Then it watches the sockets of both ends for a bounded
time and records an :class:`Outcome` per side: whether the packet came out at
the other end (same addresses, protocol and transport bytes; the TTL may
differ) and what came back to the sender: a reset (``rst SEQ/0`` or ``rst+ack
SEQ/ACK``, as RFC 793 builds it from the refused segment), ``icmp T/C`` or
``icmp6 T/C`` quoting the step's packet. The source address of an ICMP error is
not compared: the router sends it from its own address, a bridge (which has
none) from the refused packet's destination.
A side is done early once it saw the packet or a reply (plus a short grace
for a second frame); a drop costs the whole wait.

The end hosts' own stacks never answer: their namespaces own none of the
trace's addresses (the router holds static neighbour entries for them, with
the end hosts' MACs), IPv6 is off on their interfaces, and an nft table there
drops every packet in prerouting and output (see :mod:`fwnet`). AF_PACKET taps
see a frame before netfilter, so the sniffer still records it.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Literal

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

#: the trace's addresses: the outside host (two sources) and the inside host
OUT4, OUT4B, IN4 = "10.90.1.10", "10.90.1.11", "10.90.2.20"
OUT6, OUT6B, IN6 = "fd90:1::10", "fd90:1::11", "fd90:2::20"
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
CLONE_NEWNET = 0x40000000
BROADCAST = "ff:ff:ff:ff:ff:ff"
#: ICMPv6 types that are neighbour discovery or MLD: never a reply to a step
ND_MLD = {130, 131, 132, 133, 134, 135, 136, 137, 143}

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_socket(netns: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` in namespace ``netns`` (non-blocking,
    deaf to what it sends itself)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            s.bind((ifname, ETH_P_ALL))
            s.setblocking(False)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return s


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Step:
    """One packet of a trace: ``side`` sends ``pkt`` (IP or IPv6 and up)."""

    name: str
    side: Literal["outside", "inside"]
    pkt: Packet
    broadcast: bool = False  # an Ethernet broadcast (DHCP), not to the next hop
    pause: float = 0.0  # seconds to wait before sending (to let a conntrack entry expire)

    def raw(self) -> bytes:
        return bytes(self.pkt)

    def __str__(self) -> str:
        return f"{self.name} [{self.side}] {self.pkt.summary()}"


@dataclass
class TcpFlow:
    """Steps of one TCP connection; ``client`` is on ``client_side``."""

    client_side: Literal["outside", "inside"]
    client: str
    server: str
    sport: int
    dport: int
    cisn: int = 1000
    sisn: int = 500000
    window: int = 65535
    nxt: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nxt = {"c": self.cisn, "s": self.sisn}

    def seg(self, name: str, who: Literal["c", "s"], flags: str, data: bytes = b"",
            seq_off: int = 0, ack_off: int = 0, window: int | None = None) -> Step:
        """A segment from the client (``c``) or server (``s``): at its next sequence
        number plus ``seq_off``, acking the peer's next plus ``ack_off`` (when ``A``
        is in ``flags``). Only a segment at the next sequence number moves it."""
        from scapy.layers.inet import TCP
        other = "s" if who == "c" else "c"
        src, dst = (self.client, self.server) if who == "c" else (self.server, self.client)
        sport, dport = (self.sport, self.dport) if who == "c" else (self.dport, self.sport)
        seq = (self.nxt[who] + seq_off) % 2**32
        ack = (self.nxt[other] + ack_off) % 2**32 if "A" in flags else 0
        l3 = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
        pkt = l3 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                       window=self.window if window is None else window)
        if data:
            pkt = pkt / data
        if seq_off == 0:
            self.nxt[who] = (self.nxt[who] + len(data) + ("S" in flags)
                             + ("F" in flags)) % 2**32
        side = self.client_side if who == "c" else (
            "inside" if self.client_side == "outside" else "outside")
        return Step(name, side, pkt)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Outcome:
    """What one step did on one side."""

    delivered: bool
    replies: tuple[str, ...] = ()
    detail: str = ""

    def key(self) -> tuple[bool, tuple[str, ...]]:
        return self.delivered, self.replies

    def __str__(self) -> str:
        return ("pass" if self.delivered else "----") + (
            " " + ",".join(self.replies) if self.replies else "")


@dataclass
class Endpoint:
    """One end of a side: its namespace, interface, own MAC and next hop's MAC."""

    netns: str
    ifname: str
    mac: str
    next_hop: str
    sock: socket.socket | None = None

    def open(self) -> socket.socket:
        if self.sock is None:
            self.sock = netns_socket(self.netns, self.ifname)
        return self.sock

    def send(self, step: Step) -> None:
        raw = step.raw()
        ethertype = 0x86DD if raw[0] >> 4 == 6 else 0x0800
        dst = BROADCAST if step.broadcast else self.next_hop
        self.open().send(_mac(dst) + _mac(self.mac) + struct.pack("!H", ethertype) + raw)

    def send_frame(self, frame: bytes) -> None:
        self.open().send(frame)

    def drain(self) -> list[bytes]:
        out = []
        sock = self.open()
        while True:
            try:
                out.append(sock.recv(65535))
            except BlockingIOError:
                return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class Side:
    """One setup under test: a name and its two ends."""

    name: str
    outside: Endpoint
    inside: Endpoint

    def end(self, which: str) -> Endpoint:
        return self.outside if which == "outside" else self.inside

    def close(self) -> None:
        self.outside.close()
        self.inside.close()


# -- parsing what the sniffers saw ------------------------------------------------------

@dataclass(frozen=True)
class L3:
    """The parts of an IP packet the replayer compares."""

    src: str
    dst: str
    proto: int
    l4: bytes

    def sig(self) -> tuple[str, str, int, bytes]:
        return self.src, self.dst, self.proto, self.l4


def parse_ip(raw: bytes) -> L3 | None:
    """An IPv4 (no fragments) or IPv6 (no extension headers) packet, or None."""
    if len(raw) >= 20 and raw[0] >> 4 == 4:
        ihl = (raw[0] & 15) * 4
        total = struct.unpack_from("!H", raw, 2)[0]
        return L3(socket.inet_ntop(socket.AF_INET, raw[12:16]),
                  socket.inet_ntop(socket.AF_INET, raw[16:20]), raw[9], raw[ihl:total])
    if len(raw) >= 40 and raw[0] >> 4 == 6:
        plen = struct.unpack_from("!H", raw, 4)[0]
        return L3(socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                  socket.inet_ntop(socket.AF_INET6, raw[24:40]), raw[6], raw[40:40 + plen])
    return None


def parse_frame(frame: bytes) -> L3 | None:
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype not in (0x0800, 0x86DD):
        return None
    return parse_ip(frame[14:])


def classify_reply(sent: L3, got: L3) -> str | None:
    """What ``got`` (seen at the sender) is as an answer to ``sent``, or None if it is
    none (not to the sender's address, or neighbour discovery)."""
    if got.dst != sent.src:
        return None
    if got.proto == 6 and len(got.l4) >= 14:
        flags = got.l4[13]
        if got.l4[0:2] == sent.l4[2:4] and got.l4[2:4] == sent.l4[0:2]:
            seq, ack = struct.unpack_from("!II", got.l4, 4)
            if flags & 0x04:  # a reset: its ACK flag and numbers as the kernel's must be
                return f"rst{'+ack' if flags & 0x10 else ''} {seq}/{ack if flags & 0x10 else 0}"
            return f"tcp {flags:#04x}"
        return None
    if got.proto in (1, 58) and len(got.l4) >= 8:
        kind = "icmp" if got.proto == 1 else "icmp6"
        typ, code = got.l4[0], got.l4[1]
        if got.proto == 58 and typ in ND_MLD:
            return None
        if (got.proto == 1 and typ in (3, 4, 5, 11, 12)) or (got.proto == 58 and typ < 128):
            inner = parse_ip(got.l4[8:])
            if inner is None or (inner.src, inner.dst) != (sent.src, sent.dst):
                return None
        return f"{kind} {typ}/{code}"
    if (got.proto == 17 and len(got.l4) >= 8 and got.l4[0:2] == sent.l4[2:4]
            and got.l4[2:4] == sent.l4[0:2]):
        return "udp"
    return None


# -- replay -----------------------------------------------------------------------------

def replay(sides: list[Side], steps: list[Step], wait: float = 0.3,
           grace: float = 0.03) -> dict[str, list[Outcome]]:
    """Send every step at every side (in order, the sides together), and record per side
    and step whether it came out at the other end and what came back."""
    results: dict[str, list[Outcome]] = {s.name: [] for s in sides}
    for s in sides:
        for end in (s.outside, s.inside):
            end.open()
            end.drain()
    for step in steps:
        sent = parse_ip(step.raw())
        assert sent is not None, step
        if step.pause:
            time.sleep(step.pause)
        for s in sides:
            s.end(step.side).send(step)
        t0 = time.monotonic()
        state = {s.name: {"delivered": False, "replies": [], "detail": [], "done": None}
                 for s in sides}
        socks: dict[int, tuple[Side, str]] = {}
        for s in sides:
            socks[s.outside.open().fileno()] = (s, "outside")
            socks[s.inside.open().fileno()] = (s, "inside")
        while True:
            # until every side is done (an event plus the grace), at most ``wait``
            done = [st["done"] for st in state.values()]
            end = t0 + wait
            if all(d is not None for d in done):
                end = min(end, max(done))  # type: ignore[type-var]
            now = time.monotonic()
            if now >= end:
                break
            ready, _, _ = select.select(list(socks), [], [], end - now)
            for fd in ready:
                side, where = socks[fd]
                st = state[side.name]
                for frame in side.end(where).drain():
                    got = parse_frame(frame)
                    if got is None:
                        continue
                    if where != step.side:
                        if got.sig() == sent.sig():
                            st["delivered"] = True
                        elif (got.src, got.dst, got.proto) == (sent.src, sent.dst, sent.proto):
                            st["delivered"] = True
                            st["detail"].append("delivered modified")
                        else:
                            continue
                    else:
                        what = classify_reply(sent, got)
                        if what is None:
                            continue
                        st["replies"].append(what)
                        st["detail"].append(f"{what} from {got.src}")
                    if st["done"] is None:
                        st["done"] = time.monotonic() + grace
        for s in sides:
            st = state[s.name]
            results[s.name].append(Outcome(bool(st["delivered"]),
                                           tuple(sorted(st["replies"])),
                                           "; ".join(st["detail"])))
    return results


def table(steps: list[Step], results: dict[str, list[Outcome]]) -> str:
    """A compact table: step, then one column per side."""
    names = list(results)
    width = max(len(s.name) for s in steps)
    lines = [f"{'step':<{width}}  " + "  ".join(f"{n:<26}" for n in names) + "  packet"]
    for i, step in enumerate(steps):
        cols = "  ".join(f"{str(results[n][i]):<26}" for n in names)
        lines.append(f"{step.name:<{width}}  {cols}  [{step.side}] {step.pkt.summary()}")
    return "\n".join(lines)


def divergences(steps: list[Step], a: list[Outcome], b: list[Outcome],
                allow: dict[str, str] | None = None) -> list[str]:
    """Steps whose outcomes differ, except those named in ``allow`` (step -> reason)."""
    allow = allow or {}
    out = []
    for step, x, y in zip(steps, a, b, strict=True):
        if x.key() != y.key() and step.name not in allow:
            out.append(f"{step}: kernel {x} ({x.detail}) / vtl {y} ({y.detail})")
    return out


