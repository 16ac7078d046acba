"""Learning-switch rule and robustness against garbage from the network."""

from __future__ import annotations

import sys

import pytest
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import GUEST_MAC, PEER_IP, wait_for

pytestmark = pytest.mark.integration

SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
for dst_hex, tag in [(sys.argv[1], b"VTL-UNKNOWN-DST"), (sys.argv[2], b"VTL-TO-GUEST")]:
    dst = bytes.fromhex(dst_hex.replace(":", ""))
    for _ in range(5):
        s.send(dst + src + b"\\x88\\xb5" + tag + bytes(40))
"""

GARBAGE = """
import os, random, socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
rng = random.Random(1)
dst = bytes.fromhex(os.environ["GUEST_MAC"].replace(":", ""))
for i in range(3000):
    n = rng.randint(20, 1514)
    body = rng.randbytes(n - 14)
    etype = rng.choice([b"\\x08\\x00", b"\\x86\\xdd", b"\\x08\\x06", b"\\x81\\x00", body[:2]])
    s.send(dst + b"\\x02\\x00\\x00\\x00\\x00\\x99" + etype + body[2:])
"""


def test_unicast_to_a_mac_not_behind_the_guest_does_not_reach_it(net):
    vtl = net.start()
    net.guest(["ping", "-c", "1", "-W", "2", PEER_IP], timeout=10)  # the guest is known now
    err = net.tmp / "tcpdump.stderr"
    with open(err, "wb") as f:
        cap = net.topo.spawn(net.guest_ns, ["tcpdump", "-i", net.tap, "-p", "-n", "-e", "-c",
                                            "5", "ether proto 0x88b5"], stdout=-1, stderr=f)
    started = wait_for(lambda: "listening on" in err.read_text() or cap.poll() is not None, 10)
    assert started and cap.poll() is None, f"tcpdump did not start: {err.read_text()}"
    net.peer([sys.executable, "-c", SEND, "02:00:00:de:ad:01", GUEST_MAC], timeout=20)
    try:
        out, _ = cap.communicate(timeout=10)
    except Exception:
        net.topo.stop_proc(cap)
        out, _ = cap.communicate()
    text = out.decode(errors="replace")
    assert text.count(f"> {GUEST_MAC}") == 5, text
    assert "02:00:00:de:ad:01" not in text
    vtl.stop()
    assert '"not_for_guest": 5' in vtl.stderr


def test_garbage_from_the_network_never_stops_the_bridge(net):
    vtl = net.start([{"use": "netem", "delay_ms": 1}, {"use": "capture", "path": str(
        net.tmp / "g.pcap")}])
    net.guest(["ping", "-c", "1", "-W", "2", PEER_IP], timeout=10)
    net.peer(["env", f"GUEST_MAC={GUEST_MAC}", sys.executable, "-c", GARBAGE], timeout=60)
    out = net.guest(["ping", "-c", "3", "-i", "0.2", "-W", "2", PEER_IP], timeout=20).stdout
    assert len(parse_ping_rtts(out)) == 3
    assert vtl.proc.poll() is None
    assert vtl.stop() == 0
