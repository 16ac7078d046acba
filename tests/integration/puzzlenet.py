"""The IP-puzzle topology: a client VM behind a VTL client proxy, a router, a VTL server firewall.

::

    client VM (cvm)   eth0 10.71.1.10/24
      | veth
    client bridge (cbr): guest [vtl run: puzzle, role client] uplink
      | veth
    router (rt): lanc 10.71.1.1/24, lans 10.71.2.1/24, lana 10.71.3.1/24
      | veth (lans)                                  | veth (lana)
    server bridge (sbr): uplink [vtl run: puzzle, role server] guest
      | veth                                         attacker (atk) eth0 10.71.3.66/24
    server VM (svm)   eth0 10.71.2.20/24

Each VM is a namespace with the kernel's own stack; each bridge runs ``vtl run``
in its own namespace with two ``packet`` ports on veths (the guest's and the
router's), so nothing of VTL runs in the VMs. The router forwards between the
three LANs (Linux forwards IP options it does not know). The attacker is a host
without the proxy, where floods and forged packets come from (raw sockets); it
also holds 10.71.3.0/24's other addresses for spoofed sources.

For the tcptools helpers (``download``, ``connect_result``) a :class:`PuzzleNet`
looks like a ``vtlnet.Net``: the "guest" is the client VM and the "peer" the server VM.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunnelnet import Capture
from udtnet import NsVtl, config_toml
from vtl.bridge.topology import Topology, ip
from vtlnet import ctl_json

CLIENT, SERVER, ATTACKER = "10.71.1.10", "10.71.2.20", "10.71.3.66"
GW_C, GW_S, GW_A = "10.71.1.1", "10.71.2.1", "10.71.3.1"
SPOOF_NET = "10.71.3."  # the attacker's spoofed sources: 10.71.3.100 .. .199

#: role -> (namespace suffix)
ROLES = ("cvm", "cbr", "rt", "sbr", "svm", "atk")


class PuzzleNet:
    """The namespaces, links and bridges (see the module docstring)."""

    def __init__(self, topo: Topology, tag: str, tmp: Path):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.ns = {r: topo.netns(f"{tag}-{r}") for r in ROLES}
        self.guest_ns, self.peer_ns = self.ns["cvm"], self.ns["svm"]  # tcptools
        self.bridges: dict[str, NsVtl] = {}
        self._n = 0
        for ns in self.ns.values():
            topo.sysctl("net.ipv6.conf.default.disable_ipv6", "1", ns)
            topo.sysctl("net.ipv6.conf.all.disable_ipv6", "1", ns)
        self._veth("cvm", "eth0", "cbr", "guest")
        self._veth("cbr", "uplink", "rt", "lanc")
        self._veth("rt", "lans", "sbr", "uplink")
        self._veth("sbr", "guest", "svm", "eth0")
        self._veth("atk", "eth0", "rt", "lana")
        for role, dev in (("cbr", "guest"), ("cbr", "uplink"), ("sbr", "guest"),
                          ("sbr", "uplink")):
            ip("-n", self.ns[role], "link", "set", dev, "up")
        rt = self.ns["rt"]
        topo.sysctl("net.ipv4.ip_forward", "1", rt)
        for dev, cidr in (("lanc", GW_C), ("lans", GW_S), ("lana", GW_A)):
            ip("-n", rt, "addr", "add", f"{cidr}/24", "dev", dev)
            ip("-n", rt, "link", "set", dev, "up")
        for role, addr, gw in (("cvm", CLIENT, GW_C), ("svm", SERVER, GW_S),
                               ("atk", ATTACKER, GW_A)):
            ns = self.ns[role]
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "default", "via", gw)
        for i in range(100, 200):  # spoofed sources the router can route back
            ip("-n", self.ns["atk"], "addr", "add", f"{SPOOF_NET}{i}/32", "dev", "eth0")
        # the router learns the attacker's addresses by ARP; a flood of them must not
        # wait for it
        topo.sysctl("net.ipv4.neigh.lana.gc_thresh3", "4096", rt)

    def _veth(self, r1: str, dev1: str, r2: str, dev2: str) -> None:
        ip("-n", self.ns[r1], "link", "add", dev1, "type", "veth", "peer", "name", dev2,
           "netns", self.ns[r2])

    # -- bridges ----------------------------------------------------------------------

    def start(self, side: str, services: list[dict[str, Any]]) -> NsVtl:
        """(Re)start the ``client`` or ``server`` bridge with ``services``."""
        self.stop(side)
        self._n += 1
        path = self.tmp / f"bridge-{side}{self._n}.toml"
        path.write_text(config_toml(self.name(side), "guest", "uplink", services))
        vtl = NsVtl(self.ns["cbr" if side == "client" else "sbr"], path)
        self.bridges[side] = vtl
        vtl.wait_ready(20)
        # a new bridge delivers to its guest only what goes to a MAC it has seen the guest
        # use: the VM says something (to its gateway) first
        vm, gw = ("cvm", GW_C) if side == "client" else ("svm", GW_S)
        self.run(vm, ["ping", "-c", "1", "-W", "2", gw], timeout=10, check=False)
        return vtl

    def name(self, side: str) -> str:
        return f"{self.tag}{side[0]}"

    def stop(self, side: str) -> int | None:
        vtl = self.bridges.pop(side, None)
        return None if vtl is None else vtl.stop()

    def stop_all(self) -> dict[str, str]:
        bad: dict[str, str] = {}
        for side in list(self.bridges):
            vtl = self.bridges[side]
            code = self.stop(side)
            if code != 0:
                bad[side] = f"{code}: {vtl.stderr[-2000:]}"
        return bad

    def counters(self, side: str) -> dict[str, Any]:
        """The ``puzzle`` service's counters and report on bridge ``side``."""
        return ctl_json(f"/run/vtl/{self.name(side)}.sock", "counters")["services"]["puzzle"]

    def capture(self, role: str, dev: str, name: str, expr: str = "") -> Capture:
        return Capture(self.topo, self.ns[role], dev, self.tmp / f"{name}.pcap", expr)

    # -- running things ---------------------------------------------------------------

    def run(self, role: str, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.ns[role], cmd, timeout=timeout, check=check)

    def guest(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.run("cvm", cmd, timeout, check)

    def peer(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.run("svm", cmd, timeout, check)


@contextmanager
def open_net(tmp: Path) -> Iterator[PuzzleNet]:
    """A :class:`PuzzleNet` with a fresh tag, torn down (bridges, namespaces) on exit."""
    tag = "pz" + secrets.token_hex(2)
    topo = Topology(tag)
    net: PuzzleNet | None = None
    try:
        net = PuzzleNet(topo, tag, tmp)
        yield net
    finally:
        if net is not None:
            net.stop_all()
        topo.close()
