"""The bridge's kernel VXLAN link (``vtl.bridge.vxlan``) against a real namespace peer.

Here: a link on a veth end of this namespace (198.19.N.1); there: a namespace with
two addresses (198.19.N.2, a remote, and 198.19.N.3, not one) and a plain UDP socket
on 4789 that reports what it receives, or sends what it is given. Each test checks
what crossed the wire, the device and filter the bridge made, and that closing
removes them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from vtl.bridge.topology import Topology, ip
from vtl.bridge.vxlan import VxlanEndpoint

from vtl import Frame, VnetHeader
from vtl.vxlan import VxlanRequest

pytestmark = pytest.mark.integration

PEER_SCRIPT = r"""
import json, socket, sys
mode, me = sys.argv[1], sys.argv[2]
if mode == "listen":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((me, 4789)); s.settimeout(2.0)
    print("ready", flush=True)
    got = []
    try:
        while len(got) < int(sys.argv[3]):
            data, src = s.recvfrom(65535)
            got.append(data.hex())
    except TimeoutError:
        pass
    print(json.dumps(got), flush=True)
else:  # send: argv[3] = target, then hex datagrams
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((me, 0))
    for h in sys.argv[4:]:
        s.sendto(bytes.fromhex(h), (sys.argv[3], 4789))
"""


@dataclass
class Site:
    topo: Topology
    ns: str
    net: str
    link: VxlanEndpoint
    frames: list[Frame]

    def peer(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return self.topo.spawn(self.ns, [sys.executable, "-c", PEER_SCRIPT, *args],
                               stdout=subprocess.PIPE, **kw)


@pytest.fixture
def site() -> Iterator[Site]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root (a vxlan device, a namespace)")
    tag = secrets.token_hex(3)
    net = f"198.19.{secrets.randbelow(250)}"
    vni = 7_000_000 + secrets.randbelow(1_000_000)
    with Topology(f"vtvx{tag}") as topo:
        ns = topo.netns(f"vtvx{tag}")
        topo.veth(f"vtvx{tag}a", "peer0", ns)
        ip("addr", "add", f"{net}.1/24", "dev", f"vtvx{tag}a")
        # as on a wire: segmented before the veth (with offloads on, a GSO datagram
        # would cross into the namespace whole)
        subprocess.run(["ethtool", "-K", f"vtvx{tag}a", "tx", "off"], capture_output=True,
                       check=True)
        topo.addr(ns, "peer0", f"{net}.2/24")
        topo.addr(ns, "peer0", f"{net}.3/24")
        frames: list[Frame] = []
        lock = threading.Lock()

        def deliver(batch: list[Frame]) -> bool:
            with lock:
                frames.extend(batch)
            return True

        link = VxlanEndpoint(VxlanRequest(f"{net}.1", vni, (f"{net}.2",), mtu=1450),
                             deliver, logging.getLogger("test.vxlan"))
        link.start()
        try:
            yield Site(topo, ns, net, link, frames)
        finally:
            link.close()
        assert ip("link", "show", link.device, check=False).returncode != 0, "device left"
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True,
                                text=True).stdout
        assert link.table not in tables, "filter left"


def inner(payload: bytes, dst: str = "52:54:00:00:0b:14") -> bytes:
    return bytes(Ether(src="52:54:00:00:0a:0a", dst=dst) / IP(src="10.61.1.10",
                 dst="10.62.2.20") / TCP(sport=1, dport=2, flags="A") / payload)


def test_a_gso_frame_leaves_as_vxlan_segments_to_its_remote(site: Site) -> None:
    rx = site.peer("listen", f"{site.net}.2", "3")
    assert rx.stdout is not None and rx.stdout.readline().strip() == b"ready"
    payload = os.urandom(4000)
    frame = Frame(bytearray(inner(payload)), VnetHeader(flags=1, gso_type=1, hdr_len=54,
                  gso_size=1398, csum_start=34, csum_offset=16))
    assert site.link.send(frame, f"{site.net}.2")
    assert not site.link.send(Frame(bytearray(inner(b"x", "ff:ff:ff:ff:ff:ff"))),
                              f"{site.net}.2"), "a broadcast would flood: refused"
    out, _ = rx.communicate(timeout=10)
    got = [bytes.fromhex(h) for h in json.loads(out)]
    assert len(got) == 3
    vni = site.link.request.vni
    assert all(d[:8] == bytes([8, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0" for d in got)
    segs = [Ether(d[8:]) for d in got]
    assert all(len(e[IP]) <= 1450 and e.dst == "52:54:00:00:0b:14" for e in segs)
    assert b"".join(bytes(e[TCP].payload) for e in segs) == payload
    fdb = subprocess.run(["bridge", "fdb", "show", "dev", site.link.device],
                         capture_output=True, text=True).stdout
    assert f"52:54:00:00:0b:14 dst {site.net}.2" in fdb
    c = site.link.counters()
    assert c["tx"] == 1 and c["tx_multicast"] == 1 and c["macs"] == 1


def test_only_known_senders_of_this_vni_get_through(site: Site) -> None:
    vni = site.link.request.vni
    good = bytes([8, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0" + inner(b"ok")
    other_vni = bytes([8, 0, 0, 0]) + (vni + 1).to_bytes(3, "big") + b"\0" + inner(b"no")
    no_flag = bytes(4) + vni.to_bytes(3, "big") + b"\0" + inner(b"no")
    site.peer("send", f"{site.net}.3", f"{site.net}.1", good.hex()).communicate(timeout=10)
    site.peer("send", f"{site.net}.2", f"{site.net}.1", other_vni.hex(), no_flag.hex(),
              good.hex()).communicate(timeout=10)
    deadline = time.monotonic() + 5
    while not site.frames and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert [bytes(f.data) for f in site.frames] == [inner(b"ok")]
    assert site.link.filter_counters() == {"unknown_peer": 1, "bad_flags": 1, "bad_vni": 1}
    site.link.set_remotes([f"{site.net}.3"])  # now .3 is a peer and .2 is not
    site.peer("send", f"{site.net}.2", f"{site.net}.1", good.hex()).communicate(timeout=10)
    site.peer("send", f"{site.net}.3", f"{site.net}.1", good.hex()).communicate(timeout=10)
    deadline = time.monotonic() + 5
    while len(site.frames) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(site.frames) == 2 and site.link.filter_counters()["unknown_peer"] == 2


def test_a_device_left_behind_is_replaced(site: Site) -> None:
    """A second link of the same VNI (as after a bridge was killed) takes over."""
    req = site.link.request
    site.link.port.close()  # type: ignore[union-attr]  # the first one, as if killed
    again = VxlanEndpoint(req, lambda b: True, logging.getLogger("test.vxlan"))
    try:
        rules = subprocess.run(["nft", "list", "table", "inet", again.table],
                               capture_output=True, text=True).stdout
        assert rules.count("saddr != @peers") == 1, rules
    finally:
        again.close()
