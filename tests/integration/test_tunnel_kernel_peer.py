"""Interop: bridge A's ``tunnel`` against the Linux kernel's own ``vxlan`` device at site B.

Site B has no VTL (:meth:`TunnelNet.kernel_vxlan`): VM-B's eth0 (MTU 1450) is a
veth into a kernel bridge in host-B that joins it, host-B's uplink and a
``vxlan`` device (VNI 42, local 10.63.0.2, remote 10.63.0.1, UDP 4789 over the
fast path), and VM-B reaches 10.61.1.0/24 (and fd61::/64) on-link through it.
What bridge A sends must be VXLAN the kernel decodes, and what the kernel sends
(from a source port hashed per flow) must be accepted by the service.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tcptools import HTTPSHA, download, upload
from tcptools import expected_sha256 as expected
from tunnelnet import VM_A, VM_A6, VM_B, VM_B6, TunnelNet, open_sites, tunnel_service
from vtl.bridge.topology import parse_ping_rtts

pytestmark = pytest.mark.integration

MB = 1_000_000


@pytest.fixture(params=["kernel", "socket"])
def kpeer(root: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TunnelNet]:
    """Bridge A with either datapath (the socket one is the service's own VXLAN)."""
    with open_sites(tmp_path, wan_delay_ms=0) as net:
        net.start("a", [tunnel_service("a", datapath=request.param)])
        net.kernel_vxlan("b")
        net.warm_up()
        yield net
        assert "Traceback" not in net.bridges["a"].stderr
        bad = net.stop_all()
        assert not bad, f"`vtl run` did not stop cleanly on SIGTERM: {bad}"


class FromB:
    """VM-B as the client for the tcptools helpers (the server runs in VM-A)."""

    def __init__(self, net: TunnelNet):
        self.topo, self.guest, self.peer = net.topo, net.vm_b, net.vm_a
        self.guest_ns, self.peer_ns = net.vmb, net.vma


def pings(run, dest: str, count: int = 5) -> int:
    v6 = ["-6"] if ":" in dest else []
    out = run(["ping", *v6, "-c", str(count), "-i", "0.1", "-W", "2", dest], check=False,
              timeout=30).stdout
    return len(parse_ping_rtts(out))


def test_ping_both_ways_with_a_kernel_vxlan_peer(kpeer: TunnelNet) -> None:
    assert pings(kpeer.vm_a, VM_B) == 5
    assert pings(kpeer.vm_b, VM_A) == 5
    assert pings(kpeer.vm_a, VM_B6) == 5
    assert pings(kpeer.vm_b, VM_A6) == 5
    # the kernel decapsulated them: its bridge learnt VM-A's MAC behind the vxlan device
    fdb = kpeer.run("hb", ["bridge", "fdb", "show", "dev", "vx"]).stdout
    assert "02:00:00:3d:01:0a" in fdb and "dst 10.63.0.1" in fdb, fdb
    peer = kpeer.counters("a")["services"]["tunnel"]["peers"][0]
    assert peer["encapsulated"] >= 10 and peer["decapsulated"] >= 10, peer


def test_100_mb_each_way_with_a_kernel_vxlan_peer(kpeer: TunnelNet) -> None:
    # VM-A the client: VM-B -> VM-A, then VM-A -> VM-B
    assert download(kpeer, 100 * MB, seed=31, host=VM_B, timeout=90) == expected(100 * MB, 31)
    assert upload(kpeer, 100 * MB, seed=32, host=VM_B, timeout=90) == expected(100 * MB, 32)
    # VM-B the client, VM-A the server: connections opened from the kernel's side
    kpeer.topo.spawn(kpeer.vma, [sys.executable, HTTPSHA, VM_A, "8080"])
    kpeer.topo.wait_tcp(kpeer.vma, VM_A, 8080)
    from_b = FromB(kpeer)
    assert download(from_b, 20 * MB, seed=33, host=VM_A, timeout=60) == expected(20 * MB, 33)
    assert upload(from_b, 20 * MB, seed=34, host=VM_A, timeout=60) == expected(20 * MB, 34)
    c = kpeer.counters("a")["services"]["tunnel"]
    assert c["peers"][0]["decapsulated_bytes"] > 100 * MB, c
