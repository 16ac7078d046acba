"""A hostile guest aims crafted SYNs at the bridge host itself: nothing reaches the host.

::

    guest netns (VM)  --TAP--  vtl run [pep | socks]  --AF_PACKET-- veth --eth0-- peer netns
    scapy SYNs to 127.0.0.1,     bridge netns (the "host", a namespace of this test):
    ::1, the host's uplink       lo 127.0.0.1, ::1, 169.254.169.254 (cloud metadata)
    addresses, 169.254.169.254   uplink veth 10.201.0.1/24, fd00:201::1/64
                                 a listener on each of those addresses, danted on
                                 127.0.0.1 (socks), allowed to connect anywhere

The bridge runs inside a namespace of the test's own (``ip netns exec``), so the
"host's own addresses" are that namespace's and nothing is added to the root
namespace; removing the namespaces removes everything. The guest's SYNs are
crafted with scapy (its own kernel would never send them: 127.0.0.1 is martian on
a wire) and every answer is sniffed on the guest's TAP, with bounded waits.

Each destination must get a RST or an ICMP error and the listener at it must see
no connection. A control run of ``pep`` with those prefixes in ``[bridge] allow``
shows that the same SYNs do reach the listeners when the policy lets them (so the
test can fail), and that danted would connect to the host's loopback if asked.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from udtnet import NsVtl
from vtl.bridge.topology import Topology, ip
from vtlnet import to_toml, wait_for

pytestmark = pytest.mark.integration

HOST_IP, HOST_IP6, PEER_IP = "10.201.0.1", "fd00:201::1", "10.201.0.2"
GUEST_IP, GUEST_IP6 = "10.201.0.10", "fd00:201::10"
GUEST_MAC, GW_MAC = "02:00:00:c9:00:0a", "02:00:00:c9:00:fe"
METADATA = "169.254.169.254"
TARGETS = ("127.0.0.1", "::1", HOST_IP, HOST_IP6, METADATA)
PORT = 7777

LISTENER = """
import json, select, socket, sys
port, addrs = int(sys.argv[1]), sys.argv[2:]
socks = []
for a in addrs:
    s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a, port))
    s.listen(64)
    socks.append(s)
print(json.dumps({"listening": addrs}), flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, peer = s.accept()
        print(json.dumps({"accepted": s.getsockname()[0], "peer": peer[0]}), flush=True)
        c.close()
"""

PROBE = """
import json, sys, threading, time
from scapy.all import AsyncSniffer, Ether, IP, IPv6, TCP, ICMP, sendp
from scapy.layers.inet import IPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6
iface, mac, gw, src4, src6, port = sys.argv[1:7]
targets = sys.argv[7:]
started = threading.Event()
seen = []
sniffer = AsyncSniffer(iface=iface, filter="tcp or icmp or icmp6", store=False,
                       prn=seen.append, started_callback=started.set)
sniffer.start()
started.wait(10)
by_sport = {}
for i, t in enumerate(targets):
    sport = 41000 + i
    by_sport[sport] = t
    l3 = IPv6(src=src6, dst=t) if ":" in t else IP(src=src4, dst=t)
    sendp(Ether(src=mac, dst=gw) / l3 / TCP(sport=sport, dport=int(port), flags="S",
                                             seq=1000 + i), iface=iface, verbose=False)

def classify(pkts):
    got = {t: [] for t in targets}
    for p in pkts:
        if Ether not in p or p[Ether].src == mac:
            continue  # our own SYNs
        if TCP in p and IPerror not in p and IPerror6 not in p:
            t = by_sport.get(p[TCP].dport)
            if t is not None:
                got[t].append("rst" if p[TCP].flags & 0x04 else f"tcp {p[TCP].flags}")
        elif ICMP in p and IPerror in p:
            if p[IPerror].dst in got:
                got[p[IPerror].dst].append(f"icmp {p[ICMP].type}/{p[ICMP].code}")
        elif ICMPv6DestUnreach in p and IPerror6 in p:
            if p[IPerror6].dst in got:
                got[p[IPerror6].dst].append(f"icmp6 1/{p[ICMPv6DestUnreach].code}")
    return got

deadline = time.monotonic() + 8
while time.monotonic() < deadline:
    time.sleep(0.2)
    if all(classify(list(seen)).values()):
        break
time.sleep(0.3)  # anything later (a SYN-ACK after an ICMP) is seen too
sniffer.stop()
print(json.dumps(classify(list(seen))))
"""

DANTED = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: {ext}
external: lo
external.rotation: route
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
  from: 127.0.0.0/8 to: 0/0
  log: error
}}
socks pass {{
  from: 0/0 to: 0/0
  command: connect
  log: connect error
}}
"""


class HostNet:
    """The namespaces of the module docstring; :meth:`close` (via the fixture) removes them."""

    def __init__(self, topo: Topology, tag: str, tmp: Path):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.host = topo.netns(f"{tag}-br")
        self.vm = topo.netns(f"{tag}-vm")
        self.peer = topo.netns(f"{tag}-pe")
        self.tap, self.uplink = f"{tag}t", f"{tag}u"
        # the uplink veth lives in the bridge's namespace: gone with it, never in the root
        ip("-n", self.host, "link", "add", self.uplink, "type", "veth", "peer", "name", "eth0",
           "netns", self.peer)
        self.hrun(["sysctl", "-qw", f"net.ipv6.conf.{self.uplink}.disable_ipv6=0"])
        topo.addr(self.host, self.uplink, f"{HOST_IP}/24")
        ip("-n", self.host, "-6", "addr", "add", f"{HOST_IP6}/64", "dev", self.uplink, "nodad")
        ip("-n", self.host, "addr", "add", f"{METADATA}/32", "dev", "lo")
        topo.addr(self.peer, "eth0", f"{PEER_IP}/24")
        self.listen_log = tmp / "listener.log"
        script = tmp / "listener.py"
        script.write_text(LISTENER)
        with open(self.listen_log, "wb") as out:
            topo.spawn(self.host, [sys.executable, str(script), str(PORT), *TARGETS], stdout=out)
        for t in TARGETS:
            topo.wait_tcp(self.host, f"[{t}]" if ":" in t else t, PORT)
        (tmp / "probe.py").write_text(PROBE)
        self.bridges: list[NsVtl] = []
        self.dante_port = 0

    def hrun(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.topo.run(self.host, cmd, timeout=timeout)

    def start(self, services: list[dict[str, Any]], allow: list[str] | None = None,
              **bridge: Any) -> NsVtl:
        cfg = {"bridge": {"name": self.tag, "stats_interval_s": 0, **bridge},
               "ports": {"guest": {"kind": "tap", "ifname": self.tap, "netns": self.vm,
                                   "mac": GUEST_MAC},
                         "uplink": {"kind": "packet", "ifname": self.uplink}},
               "services": services}
        path = self.tmp / f"bridge{len(self.bridges)}.toml"
        text = to_toml(cfg)
        if allow:  # to_toml writes scalars only
            text = text.replace("[bridge]\n", f"[bridge]\nallow = {json.dumps(allow)}\n", 1)
        path.write_text(text)
        vtl = NsVtl(self.host, path)
        self.bridges.append(vtl)
        vtl.wait_ready()
        if not self.topo.run(self.vm, ["ip", "-br", "addr", "show", self.tap]).stdout.count(
                GUEST_IP):
            self.topo.addr(self.vm, self.tap, f"{GUEST_IP}/24")
            self.topo.run(self.vm, ["ip", "-6", "addr", "add", f"{GUEST_IP6}/64", "dev",
                                    self.tap, "nodad"])
        return vtl

    def probe(self) -> dict[str, list[str]]:
        """Crafted SYNs from the guest to every target; the answers each got."""
        proc = self.topo.run(self.vm, [sys.executable, str(self.tmp / "probe.py"), self.tap,
                                       GUEST_MAC, GW_MAC, GUEST_IP, GUEST_IP6, str(PORT),
                                       *TARGETS], timeout=60)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def accepted(self) -> list[str]:
        lines = self.listen_log.read_text().splitlines()
        return [json.loads(x)["accepted"] for x in lines if '"accepted"' in x]

    def start_dante(self) -> None:
        self.dante_port = 20000 + secrets.randbelow(20000)
        conf = self.tmp / "danted.conf"
        conf.write_text(DANTED.format(log=self.tmp / "danted.log", port=self.dante_port,
                                      ext=self.uplink))
        self.topo.spawn(self.host, ["danted", "-f", str(conf), "-p",
                                    str(self.tmp / "danted.pid")])
        self.topo.wait_tcp(self.host, "127.0.0.1", self.dante_port)

    def socks_connect_from_host(self, host: str, port: int) -> int:
        """A SOCKS5 CONNECT through danted from the bridge's namespace: the reply code."""
        code = (
            "import socket, struct, sys\n"
            f"s = socket.create_connection(('127.0.0.1', {self.dante_port}), timeout=5)\n"
            "s.sendall(b'\\x05\\x01\\x00'); assert s.recv(2) == b'\\x05\\x00'\n"
            f"s.sendall(b'\\x05\\x01\\x00\\x01' + socket.inet_aton('{host}') + "
            f"struct.pack('>H', {port}))\n"
            "print(s.recv(10)[1])\n")
        return int(self.topo.run(self.host, [sys.executable, "-c", code]).stdout.strip())

    def stop_all(self) -> None:
        for b in self.bridges:
            b.stop()


@pytest.fixture
def hnet(root: None, tmp_path: Path) -> Iterator[HostNet]:
    tag = "vth" + secrets.token_hex(3)
    topo = Topology(tag)
    h: HostNet | None = None
    try:
        h = HostNet(topo, tag, tmp_path)
        yield h
    finally:
        if h is not None:
            h.stop_all()
        topo.close()


def assert_refused_everywhere(got: dict[str, list[str]]) -> None:
    for target in TARGETS:
        answers = got[target]
        assert answers, f"{target}: no RST or ICMP within the probe's wait ({got})"
        assert all(a == "rst" or a.startswith(("icmp 3/", "icmp6 1/")) for a in answers), \
            f"{target}: {answers}"


def test_pep_keeps_a_hostile_guest_out_of_the_host(hnet: HostNet) -> None:
    vtl = hnet.start([{"use": "pep", "connect_timeout_s": 2.0}])
    got = hnet.probe()
    time.sleep(0.5)
    vtl.stop()
    assert_refused_everywhere(got)
    assert hnet.accepted() == [], "a guest's SYN reached a listener on the host"
    for t in TARGETS:  # administratively prohibited, in either family
        assert got[t] == (["icmp6 1/1"] if ":" in t else ["icmp 3/13"]), (t, got[t])
    snap = vtl.stats()
    assert snap["egress"]["refused"] == len(TARGETS), snap["egress"]
    assert snap["egress"]["refused_by_class"] == {"loopback": 2, "own address": 2,
                                                  "link-local": 1}, snap["egress"]
    pep = snap["services"]["pep"]
    assert pep["errors"] == 0 and pep["connections_prohibited"] == len(TARGETS), pep
    assert "refused a tcp stream to 127.0.0.1 port 7777: loopback" in vtl.stderr


def test_control_the_same_syns_reach_the_host_when_the_operator_allows_them(
        hnet: HostNet) -> None:
    vtl = hnet.start([{"use": "pep", "connect_timeout_s": 2.0}], allow=list(TARGETS))
    hnet.probe()
    assert wait_for(lambda: len(hnet.accepted()) >= len(TARGETS), 10), hnet.accepted()
    vtl.stop()
    assert sorted(hnet.accepted()) == sorted(TARGETS)
    assert vtl.stats()["egress"]["refused"] == 0


def test_socks_keeps_a_hostile_guest_out_of_the_host(hnet: HostNet) -> None:
    hnet.start_dante()
    # control: this danted would connect to the host's loopback listener if asked
    assert hnet.socks_connect_from_host("127.0.0.1", PORT) == 0
    assert wait_for(lambda: hnet.accepted() == ["127.0.0.1"], 5), hnet.accepted()
    vtl = hnet.start([{"use": "socks", "proxy": f"socks5://127.0.0.1:{hnet.dante_port}",
                       "connect_timeout_s": 5}])
    got = hnet.probe()
    time.sleep(0.5)
    vtl.stop()
    assert_refused_everywhere(got)
    assert hnet.accepted() == ["127.0.0.1"], "a guest's SYN reached a listener on the host"
    snap = vtl.stats()
    socks = snap["services"]["socks"]
    # loopback and link-local: socks itself, the proxy never asked
    assert socks.get("refused_destination") == 3, socks
    # the host's own addresses: socks does not know them; the bridge's policy refuses them
    assert snap["egress"]["refused_by_class"] == {"own address": 2}, snap["egress"]
    log = (hnet.tmp / "danted.log").read_text() if (hnet.tmp / "danted.log").exists() else ""
    assert HOST_IP not in log and METADATA not in log, log[-2000:]
