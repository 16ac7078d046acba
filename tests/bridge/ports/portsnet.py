"""Helpers for the port tests: namespaces, veths, hand-built frames, a fake peer.

Everything created here carries the prefix ``vtpt`` plus a random suffix and is
removed by the context managers even when a test fails. Traffic is only sent
inside namespaces the tests create (or on veths whose peer lives there).
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

from vtl.packet.checksum import checksum

ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
VNET_LEN = 10


def suffix() -> str:
    return secrets.token_hex(3)


def sh(cmd: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def link_exists(ifname: str, netns: str | None = None) -> bool:
    ns = f"-n {netns} " if netns else ""
    return sh(f"ip {ns}link show dev {ifname}", check=False).returncode == 0


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = "vtpt" + suffix()
    sh(f"ip netns add {name}")
    try:
        sh(f"ip -n {name} link set lo up")
        yield name
    finally:
        sh(f"ip netns del {name}", check=False)


@contextlib.contextmanager
def veth_into(ns: str, addr: str) -> Iterator[tuple[str, str]]:
    """A veth pair: host end (up, no IP, IPv6 off) and peer end in ``ns`` with ``addr``."""
    host, peer = "vtpt" + suffix() + "h", "vtpt" + suffix() + "p"
    sh(f"ip link add {host} type veth peer name {peer} netns {ns}")
    try:
        sh(f"sysctl -qw net.ipv6.conf.{host}.disable_ipv6=1", check=False)
        sh(f"ip link set {host} up")
        sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.{peer}.disable_ipv6=1", check=False)
        sh(f"ip -n {ns} addr add {addr} dev {peer}")
        sh(f"ip -n {ns} link set {peer} up")
        yield host, peer
    finally:
        sh(f"ip link del {host}", check=False)


# ----------------------------------------------------------------------------- frames


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def parse_arp(frame: bytes) -> tuple[int, bytes, bytes, bytes, bytes] | None:
    """(op, sender mac, sender ip, target mac, target ip) of an ARP frame, else None."""
    if len(frame) < 42 or ETH.unpack_from(frame)[2] != 0x0806:
        return None
    _, _, _, _, op, sha, spa, tha, tpa = ARP.unpack_from(frame, 14)
    return op, sha, spa, tha, tpa


def arp_reply(my_mac: bytes, my_ip: bytes, to_mac: bytes, to_ip: bytes) -> bytes:
    return ETH.pack(to_mac, my_mac, 0x0806) + ARP.pack(
        1, 0x0800, 6, 4, 2, my_mac, my_ip, to_mac, to_ip
    )


def icmp_echo_request_to(frame: bytes, ip: bytes) -> bool:
    if len(frame) < 34 or ETH.unpack_from(frame)[2] != 0x0800:
        return False
    ihl = (frame[14] & 0x0F) * 4
    return frame[23] == 1 and frame[30:34] == ip and frame[14 + ihl] == 8


def icmp_echo_reply(request: bytes, my_mac: bytes) -> bytes:
    """The echo reply to an Ethernet/IPv4/ICMP echo request, checksums complete."""
    dst_mac, src_mac, _ = ETH.unpack_from(request)
    ihl = (request[14] & 0x0F) * 4
    total = struct.unpack_from("!H", request, 16)[0]
    ip = bytearray(request[14:14 + ihl])
    ip[12:16], ip[16:20] = request[30:34], request[26:30]
    ip[8] = 64
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
    icmp = bytearray(request[14 + ihl:14 + total])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    return ETH.pack(src_mac, my_mac, 0x0800) + bytes(ip) + bytes(icmp)


class FakePeer:
    """A host that exists only as frames: answers ARP who-has and ICMP echo for its IP."""

    def __init__(self, mac: str, ip: str):
        self.mac = mac_bytes(mac)
        self.ip = socket.inet_aton(ip)
        self.sent: list[bytes] = []

    def answer(self, frame: bytes) -> bytes | None:
        arp = parse_arp(frame)
        if arp is not None:
            op, sha, spa, _tha, tpa = arp
            if op == 1 and tpa == self.ip:
                return arp_reply(self.mac, self.ip, sha, spa)
            return None
        if icmp_echo_request_to(frame, self.ip):
            return icmp_echo_reply(frame, self.mac)
        return None


def serve(port, peer: FakePeer, cmd: str, timeout: float = 8.0) -> tuple[int | None, list[bytes]]:
    """Run ``cmd`` while ``peer`` answers through ``port``; (exit code, frames seen).

    Frames are returned without a virtio-net header. Bounded by ``timeout``.
    """
    off = VNET_LEN if port.vnet else 0
    seen: list[bytes] = []
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            select.select([port.fileno()], [], [], 0.05)
            for raw in port.recv_batch(64):
                frame = raw[off:]
                seen.append(frame)
                reply = peer.answer(frame)
                if reply is not None:
                    wire = bytes(VNET_LEN if port.vnet_tx else 0) + reply
                    assert port.send(wire), "send of a reply failed"
                    peer.sent.append(reply)
            if proc.poll() is not None:
                break
        return proc.poll(), seen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def collect(port, timeout: float, until=None) -> list[bytes]:
    """Frames read from ``port`` (raw, header included) for up to ``timeout`` seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([port.fileno()], [], [], 0.05)
        got.extend(port.recv_batch(64))
        if until is not None and until(got):
            break
    return got
