"""AF_PACKET port sending GSO frames to an interface whose TSO is off.

The qdisc-bypass (direct-xmit) path cannot segment: the kernel drops such a
frame and ``send`` fails with ENOBUFS. The port must then turn the bypass off
and resend, so the qdisc path segments the frame in software and the segments
reach the peer end of the veth.
"""

from __future__ import annotations

import errno
import logging
import select
import struct
import subprocess
import sys

import pytest
from portsnet import mac_bytes, netns, sh, veth_into
from vtl.bridge.ports import PacketPortConfig, make_port
from vtl.bridge.ports.packet import PACKET_QDISC_BYPASS, SOL_PACKET

pytestmark = pytest.mark.integration

SPORT, DPORT = 40123, 40124
PAYLOAD = 4000
MSS = 1448

# Counts TCPv4 payload bytes from SPORT seen on an interface; prints "frames bytes biggest".
RECEIVER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((sys.argv[1], 3))
want, sport = int(sys.argv[2]), int(sys.argv[3])
s.settimeout(0.1)
print("ready", flush=True)
frames = total = biggest = 0
deadline = time.monotonic() + float(sys.argv[4])
while total < want and time.monotonic() < deadline:
    try:
        f = s.recv(70000)
    except TimeoutError:
        continue
    if len(f) < 54 or f[12:14] != b"\x08\x00" or f[23] != 6:
        continue
    ihl = (f[14] & 15) * 4
    if struct.unpack_from("!H", f, 14 + ihl)[0] != sport:
        continue
    iplen = struct.unpack_from("!H", f, 16)[0]
    doff = (f[14 + ihl + 12] >> 4) * 4
    frames += 1
    total += iplen - ihl - doff
    biggest = max(biggest, len(f))
print(frames, total, biggest, flush=True)
"""


def gso_frame(dst: bytes, src: bytes, seq: int) -> bytes:
    """A 4000-byte TCPv4 GSO frame with its virtio-net header (NEEDS_CSUM, TCPV4)."""
    payload = b"x" * PAYLOAD
    tcp = struct.pack("!HHIIBBHHH", SPORT, DPORT, seq, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40 + PAYLOAD, 1, 0x4000, 64, 6, 0,
        bytes([10, 252, 7, 1]), bytes([10, 252, 7, 2]),
    )
    vnet = struct.pack("<BBHHHH", 1, 1, 54, MSS, 34, 16)
    return vnet + dst + src + b"\x08\x00" + ip + tcp + payload


class Receiver:
    """An AF_PACKET receiver on ``ifname`` inside ``ns``, run as a subprocess."""

    def __init__(self, ns: str, ifname: str, want: int, timeout: float = 5.0):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", RECEIVER,
             ifname, str(want), str(SPORT), str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"receiver did not start: {self.proc.communicate()[1]}")

    def result(self) -> tuple[int, int, int]:
        try:
            out, err = self.proc.communicate(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=5)
        assert self.proc.returncode == 0, err
        frames, total, biggest = map(int, out.split())
        return frames, total, biggest


@pytest.fixture
def link():
    with netns() as ns, veth_into(ns, "10.252.7.2/24") as (host, peer):
        sh(f"ip netns exec {ns} ethtool -K {peer} gro off", check=False)
        yield ns, host, peer


def _macs(ns: str, host: str, peer: str) -> tuple[bytes, bytes]:
    peer_mac = sh(f"ip netns exec {ns} cat /sys/class/net/{peer}/address").stdout.strip()
    host_mac = sh(f"cat /sys/class/net/{host}/address").stdout.strip()
    return mac_bytes(peer_mac), mac_bytes(host_mac)


def test_gso_frame_to_device_without_tso_is_segmented(link, caplog):
    ns, host, peer = link
    sh(f"ethtool -K {host} tso off")
    dst, src = _macs(ns, host, peer)
    rx = Receiver(ns, peer, want=2 * PAYLOAD)
    with caplog.at_level(logging.INFO, logger="vtl.ports"), make_port(
        "uplink", PacketPortConfig(kind="packet", ifname=host, qdisc_bypass=True)
    ) as port:
        assert port.qdisc_bypass
        assert port.send(gso_frame(dst, src, 1)) is True
        assert not port.qdisc_bypass and port.qdisc_fallbacks == 1
        assert port.send(gso_frame(dst, src, 1 + PAYLOAD)) is True  # through the qdisc now
        assert port.qdisc_fallbacks == 1
        c = port.counters
        assert (c.tx_frames, c.tx_dropped) == (2, 0)
        assert c.tx_bytes == 2 * (14 + 40 + PAYLOAD)
        frames, total, biggest = rx.result()
    assert total == 2 * PAYLOAD, (frames, total, biggest)
    assert frames == 2 * -(-PAYLOAD // MSS) and biggest <= 1514  # segmented in software
    msgs = [r for r in caplog.records if "qdisc" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].levelno == logging.INFO


def test_gso_frame_to_device_with_tso_keeps_bypass(link):
    ns, host, peer = link
    dst, src = _macs(ns, host, peer)
    rx = Receiver(ns, peer, want=PAYLOAD)
    with make_port("uplink", PacketPortConfig(kind="packet", ifname=host,
                                              qdisc_bypass=True)) as port:
        assert port.send(gso_frame(dst, src, 1)) is True
        assert port.qdisc_bypass and port.qdisc_fallbacks == 0
        frames, total, _ = rx.result()
    assert total == PAYLOAD and frames >= 1


class FakeSock:
    def __init__(self, fail: int):
        self.fail, self.sent, self.opts = fail, [], []

    def send(self, raw):
        if self.fail:
            self.fail -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        self.sent.append(bytes(raw))
        return len(raw)

    def sendmsg(self, buffers):
        return self.send(b"".join(bytes(b) for b in buffers))

    def setsockopt(self, *args):
        self.opts.append(args)


def _fake_port(fail: int):
    port = make_port("uplink", PacketPortConfig(kind="packet", ifname="vtptfake0"))
    sock = FakeSock(fail)
    port._sock, port.qdisc_bypass = sock, True  # as after open()
    return port, sock


def test_enobufs_of_plain_frame_is_a_drop():
    port, sock = _fake_port(fail=1)
    plain = b"\x00" * 10 + b"\xff" * 60  # gso_type 0: a full queue, not a GSO refusal
    assert port.send(plain) is False
    assert port.counters.tx_dropped == 1 and port.qdisc_bypass and sock.opts == []
    assert port.send(memoryview(plain)) is True
    assert port.qdisc_bypass and port.qdisc_fallbacks == 0


def test_enobufs_of_gso_frame_turns_bypass_off_once():
    port, sock = _fake_port(fail=2)
    frame = memoryview(gso_frame(b"\x02" * 6, b"\x04" * 6, 1))
    assert port.send(frame) is False  # refused twice: the retry fails too, counted once
    assert sock.opts == [(SOL_PACKET, PACKET_QDISC_BYPASS, 0)]
    assert port.counters.tx_dropped == 1 and port.qdisc_fallbacks == 1
    sock.fail = 1
    assert port.send(frame) is False  # bypass already off: an ordinary drop
    assert len(sock.opts) == 1 and port.qdisc_fallbacks == 1
    assert port.send(frame) is True and port.counters.tx_frames == 1



def test_send_parts_gathers_head_and_body_and_falls_back_like_send():
    port, sock = _fake_port(fail=0)
    plain = b"\xff" * 60
    assert port.send_parts(b"\x00" * 10, bytearray(plain)) is True
    assert sock.sent == [b"\x00" * 10 + plain] and port.counters.tx_bytes == 60
    frame = gso_frame(b"\x02" * 6, b"\x04" * 6, 1)
    sock.fail = 1  # a GSO frame the bypass refuses: the qdisc from now on, then sent
    assert port.send_parts(bytes(frame[:10]), bytearray(frame[10:])) is True
    assert port.qdisc_fallbacks == 1 and sock.sent[-1] == bytes(frame)
