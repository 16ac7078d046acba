"""TAP and AF_PACKET ports back to back with virtio-net headers: TCP and GSO frames.

A tiny two-thread pass-through (no engine) joins a guest namespace behind a TAP
to a peer namespace behind a veth. TCP must work both ways with the headers
passed through untouched, and the guest's TSO must hand us frames far larger
than the MTU.
"""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time

import pytest
from portsnet import VNET_LEN, netns, sh, suffix, veth_into
from vtl.bridge.ports import PacketPortConfig, TapPortConfig, make_port

from vtl.frame import VnetHeader

pytestmark = pytest.mark.integration

NBYTES = 32 * 1024 * 1024

SINK = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 5201)); s.listen(1); s.settimeout(15)\n"
    "c,_=s.accept(); c.settimeout(15); n=0\n"
    "while True:\n"
    "    b=c.recv(1<<20)\n"
    "    if not b: break\n"
    "    n+=len(b)\n"
    "print(n)\n"
)
SOURCE = (
    "import socket,sys,time\n"
    "for i in range(50):\n"
    "    try:\n"
    "        c=socket.create_connection((sys.argv[1], 5201), timeout=3); break\n"
    "    except OSError: time.sleep(0.1)\n"
    "c.settimeout(15); buf=b'x'*(1<<20); n=int(sys.argv[2])\n"
    "while n>0:\n"
    "    c.sendall(buf[:n]); n-=min(n,len(buf))\n"
    "c.close()\n"
)


class Pump(threading.Thread):
    def __init__(self, src, dst, stop: threading.Event):
        super().__init__(daemon=True)
        self.src, self.dst, self.stop = src, dst, stop
        self.biggest = 0
        self.gso = 0

    def run(self) -> None:
        while not self.stop.is_set():
            select.select([self.src.fileno()], [], [], 0.05)
            for raw in self.src.recv_batch(64):
                if len(raw) - VNET_LEN > 1514:
                    self.gso += 1
                    self.biggest = max(self.biggest, len(raw) - VNET_LEN)
                    assert VnetHeader.unpack(raw).is_gso
                self.dst.send(raw)


@pytest.fixture
def pair():
    with netns() as guest_ns, netns() as peer_ns, veth_into(peer_ns, "10.253.0.2/24") as veth:
        tap_cfg = TapPortConfig(kind="tap", ifname="vtpt" + suffix() + "t", netns=guest_ns)
        guest = make_port("guest", tap_cfg)
        uplink = make_port("uplink", PacketPortConfig(kind="packet", ifname=veth[0]))
        stop = threading.Event()
        pumps = []
        try:
            guest.open()
            uplink.open()
            sh(f"ip -n {guest_ns} addr add 10.253.0.1/24 dev {tap_cfg.ifname}")
            pumps = [Pump(guest, uplink, stop), Pump(uplink, guest, stop)]
            for p in pumps:
                p.start()
            yield guest_ns, peer_ns, pumps
        finally:
            stop.set()
            for p in pumps:
                p.join(5)
            guest.close()
            uplink.close()


def transfer(src_ns: str, dst_ns: str, dst_ip: str) -> tuple[int, float]:
    sink = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, sys.executable, "-c", SINK],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        sh(f"ip netns exec {src_ns} {sys.executable} -c \"{SOURCE}\" {dst_ip} {NBYTES}",
           timeout=30)
        out, err = sink.communicate(timeout=20)
        return int(out.strip() or 0), time.monotonic() - t0
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)


def test_tcp_both_ways_with_gso(pair):
    guest_ns, peer_ns, (to_uplink, to_guest) = pair
    assert sh(f"ip netns exec {guest_ns} ping -c1 -W2 10.253.0.2", check=False).returncode == 0
    got, secs = transfer(guest_ns, peer_ns, "10.253.0.2")
    assert got == NBYTES
    print(f"guest->peer {NBYTES * 8 / secs / 1e9:.2f} Gbit/s, biggest frame "
          f"{to_uplink.biggest} B, {to_uplink.gso} GSO frames")
    assert to_uplink.gso > 0 and to_uplink.biggest > 16000, "guest TSO did not reach the TAP"
    got, secs = transfer(peer_ns, guest_ns, "10.253.0.1")
    assert got == NBYTES
    print(f"peer->guest {NBYTES * 8 / secs / 1e9:.2f} Gbit/s, biggest frame "
          f"{to_guest.biggest} B, {to_guest.gso} GSO frames")
