"""The firewall in front of a guest, with real programs: what gets in, what the guest can fake.

Topology: :class:`vtlnet.Net` (guest namespace behind ``vtl run``'s TAP, the peer on
the uplink veth). The guest runs servers on 8080 (allowed), 9000 (rejected) and
7000 (dropped by the default); the peer tries them with real sockets. From inside
the guest, as root, frames that fake its MAC and addresses, a gratuitous ARP for
the peer's address and a DHCP offer never reach the peer. A flood of new flows from
the uplink leaves the table at ``max_entries`` while an established download goes
on, and mutated frames from the guest never reach the failure policy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from floodrun import flood, ping_ok, summary
from socksnet import stats
from tcptools import download
from tcptools import expected_sha256 as expected
from tunnelnet import Capture
from vtlnet import GUEST_IP, GUEST_IP6, GUEST_MAC, PEER_IP, PEER_IP6, Net, ctl_json

pytestmark = pytest.mark.integration

MB = 1_000_000
RULES: list[dict[str, Any]] = [
    {"dir": "in", "proto": "tcp", "dport": [8080], "action": "accept"},
    {"dir": "in", "proto": "tcp", "dport": [9000], "action": "reject"},
    {"dir": "in", "proto": "udp", "dport": [9001], "action": "reject"},
]
FW: dict[str, Any] = {"use": "firewall", "default_in": "drop", "default_out": "accept",
                      "rules": RULES}
PROBE = r"""
import json, socket, sys, time
host, kind, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.monotonic()
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=2.0)
        s.close()
        out = "connected"
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2.0)
        s.connect((host, port))
        s.send(b"x")
        s.recv(100)
        out = "answered"
except ConnectionRefusedError:
    out = "refused"
except (TimeoutError, socket.timeout):
    out = "timeout"
except OSError as e:
    out = f"error:{e.errno}"
print(json.dumps([out, round(time.monotonic() - t, 3)]))
"""


def probe(net: Net, kind: str, port: int) -> tuple[str, float]:
    """From the peer: a TCP connect or a UDP request to the guest."""
    out = net.peer([sys.executable, "-c", PROBE, GUEST_IP, kind, str(port)], timeout=20)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res[0], res[1]


def counters(net: Net) -> dict[str, Any]:
    return ctl_json(f"/run/vtl/{net.tag}.sock", "counters")["services"]["firewall"]


def listen(net: Net) -> None:
    """Servers in the guest: TCP 8080, 9000, 7000 and UDP 9001 (echo)."""
    code = ("import socket,threading\n"
            "def tcp(p):\n s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
            " socket.SO_REUSEADDR,1); s.bind(('0.0.0.0',p)); s.listen(64)\n"
            " while True: s.accept()[0].close()\n"
            "for p in (8080,9000,7000): threading.Thread(target=tcp,args=(p,),daemon=True)"
            ".start()\n"
            "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.bind(('0.0.0.0',9001))\n"
            "while True:\n d,a=u.recvfrom(100); u.sendto(d,a)\n")
    net.topo.spawn(net.guest_ns, [sys.executable, "-c", code])
    net.topo.wait_tcp(net.guest_ns, "0.0.0.0", 8080)


def test_allowed_rejected_and_dropped_as_a_kernel_firewall_would(net: Net) -> None:
    net.start([FW])
    listen(net)
    assert probe(net, "tcp", 8080)[0] == "connected"
    outcome, took = probe(net, "tcp", 9000)
    assert outcome == "refused" and took < 0.5, (outcome, took)
    assert probe(net, "tcp", 7000)[0] == "timeout"
    assert probe(net, "udp", 9001)[0] in ("refused", "error:111")
    assert not ping_ok(net.peer, GUEST_IP), "no rule lets a ping in"
    assert ping_ok(net.guest, PEER_IP), "the guest's own traffic and its replies pass"
    assert download(net, 5 * MB, seed=3, timeout=60) == expected(5 * MB, 3)
    c = counters(net)
    by_name = {r["name"]: r for r in c["rules"]}
    assert by_name["rule0"]["packets"] >= 1 and by_name["rule1"]["packets"] >= 1
    conns = ctl_json(f"/run/vtl/{net.tag}.sock", "connections")
    assert any(x["dport"] == 8080 for x in conns["firewall"]) or c["tracked"] >= 1




def test_the_guest_cannot_speak_as_someone_else(net: Net, tmp_path: Path) -> None:
    net.start([{**FW, "guest_macs": [GUEST_MAC], "guest_ips": [GUEST_IP, GUEST_IP6]}])
    assert ping_ok(net.guest, PEER_IP)
    cap = Capture(net.topo, net.peer_ns, "eth0", tmp_path / "spoof.pcap",
                  "not ip6 or not icmp6")
    marker = "spoof-" + net.tag
    net.guest([sys.executable, str(Path(__file__).parent / "fwspoof.py"), net.tap, GUEST_MAC,
               GUEST_IP, GUEST_IP6, PEER_IP, marker], timeout=60)
    time.sleep(0.5)
    cap.stop()
    seen = cap.lines(flags=("-e", "-A"))
    assert not [ln for ln in seen if marker in ln or "02:66:66:66:66:66" in ln
                or "10.198.0.77" in ln or "is-at" in ln and PEER_IP in ln
                or "BOOTP/DHCP, Reply" in ln], seen
    c = counters(net)
    for reason in ("spoofed_mac", "spoofed_ip", "spoofed_arp", "dhcp_server"):
        assert c.get(reason, 0) >= 1, (reason, c)
    assert ping_ok(net.guest, PEER_IP), "its own traffic still flows"
    # nothing the guest does inside changes the rules
    net.guest(["sh", "-c", "nft flush ruleset 2>/dev/null; iptables -F 2>/dev/null; true"])
    listen(net)
    assert probe(net, "tcp", 7000)[0] == "timeout"
    assert probe(net, "tcp", 8080)[0] == "connected"


FLOOD = r"""
import random, socket, struct, sys, time
dst, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
d = socket.inet_aton(dst)
sent, t0 = 0, time.monotonic()
while sent < count and time.monotonic() - t0 < seconds:
    for _ in range(1000):
        src = struct.pack("!I", 0x0A640000 + (sent & 0xFFFF))  # 10.100.x.y: new flows
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, src, d)
        tcp = struct.pack("!HHIIBBHHH", 1024 + (sent >> 16) % 60000, 8080, sent, 0, 0x50,
                          0x02, 65535, 0, 0)
        try:
            s.sendto(ip + tcp, (dst, 0))
        except OSError:
            pass
        sent += 1
print(sent, round(time.monotonic() - t0, 2))
"""


def test_a_flood_of_new_flows_keeps_the_table_bounded(net: Net) -> None:
    vtl = net.start([{**FW, "max_entries": 4096}])
    listen(net)
    # the peer reaches 10.100.0.0/16 through the guest's link: routes for the flood's
    # spoofed sources go back to the peer (never answered: they are not real)
    net.peer(["ip", "route", "add", "10.100.0.0/16", "dev", "eth0"])
    rss0 = _rss(vtl.pid)
    flooder = net.topo.spawn(net.peer_ns, [sys.executable, "-c", FLOOD, GUEST_IP, "1000000",
                                           "30"])
    time.sleep(1.0)
    got = download(net, 20 * MB, seed=5, timeout=90)  # an established flow meanwhile
    flooder.wait(60)
    c = counters(net)
    print("flood:", {k: c.get(k) for k in ("tracked", "accepted_new", "invalid")},
          c["conntrack"], "rss growth MB", (_rss(vtl.pid) - rss0) / 1e6)
    assert got == expected(20 * MB, 5)
    assert c["tracked"] <= 4096 and c["conntrack"]["evicted"] > 0
    assert _rss(vtl.pid) - rss0 < 60 * MB
    assert probe(net, "tcp", 8080)[0] == "connected"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_mutated_frames_never_reach_the_failure_policy(net: Net) -> None:
    frames, rate = 60_000, 20_000.0
    vtl = net.start([{**FW, "guest_macs": [GUEST_MAC], "guest_ips": [GUEST_IP, GUEST_IP6]}])
    net.guest(["ping", "-n", "-c", "1", "-W", "2", PEER_IP], timeout=10)
    peer_mac = net.peer(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    timeout = frames / rate * 3 + 30
    args = ["fuzz", net.tap, "--count", str(frames), "--rate", str(rate), "--seconds",
            str(timeout - 15), "--seed", "31", "--src-mac", GUEST_MAC, "--dst-mac", peer_mac,
            "--src-ip", GUEST_IP, "--dst-ip", PEER_IP, "--src-ip6", GUEST_IP6,
            "--dst-ip6", PEER_IP6, "--dns-ip", PEER_IP, "--dns-ip6", PEER_IP6]
    res = flood(net.topo, net.guest_ns, vtl.pid, args, ping=PEER_IP,
                ping_seconds=frames / rate - 1, timeout=timeout)
    net.peer(["ip", "neigh", "flush", "dev", "eth0"])
    assert ping_ok(net.guest, PEER_IP)
    assert vtl.stop() == 0, vtl.stderr[-3000:]
    final = stats(vtl)
    info = summary(res, final, "firewall")
    c = final["services"]["firewall"]
    print(json.dumps(info))
    assert res.sender["frames"] == frames and c["frames_in"] > frames // 10, info
    assert c["errors"] == 0, vtl.stderr[-3000:]
