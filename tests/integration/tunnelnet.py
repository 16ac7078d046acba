"""The subnet-tunneling topology: two sites, two routers, two VTL bridge hosts, a fast path.

::

    VM-A netns                                                       VM-B netns
    eth0 10.61.1.10/24 fd61::10/64                      eth0 10.62.2.20/24 fd62::20/64
     | TAP (bridge A's guest port)                        TAP (bridge B's guest port) |
    host-A netns: [vtl run A] uplink           host-B netns: uplink [vtl run B]
                  fast 10.63.0.1/24 ---------- fast 10.63.0.2/24    (the fast path)
                          | veth                        | veth
    router-A netns: lan 10.61.1.1/24 fd61::1/64   router-B netns: lan 10.62.2.1/24 fd62::1/64
                    wan 10.64.0.1/30 fd64::1/64 -- wan 10.64.0.2/30 fd64::2/64
                                      [wan netns: vtl run, netem delay]

Each site is a subnet behind its gateway router; the routers forward (IPv4 and
IPv6) and route the other site's prefixes over their WAN link. With
``wan_delay_ms`` the WAN link carries that delay each way, so that the slow
routed path and the fast path are told apart by their RTT: this kernel has no
``sch_netem``, so a third bridge in a ``wan`` namespace between the routers runs
VTL's own ``netem`` service; without it the routers' WAN ends are one veth. A
bridge runs in its host's namespace
(``ip netns exec``): its guest port is a ``tap`` port (virtio-net header, TSO:
the VM hands it 64 KB frames as a real VM's NIC does) that VTL creates in the
host namespace and moves into the VM's namespace as ``eth0``; its uplink is a
``packet`` port on the veth to its router's LAN. The fast path is a veth
between the two host namespaces, with static neighbour entries and no IPv6, so
that a capture on it sees nothing but what the bridges send (the tunnel's
VXLAN); its transmit checksum offload is off (unless ``fast_tx_csum``, as the
benchmark has it), so captured UDP checksums are final and tshark can check them.

A site can instead be ``kernel`` (:meth:`TunnelNet.kernel_vxlan`): no bridge;
the VM's ``eth0`` is a veth into a kernel bridge in the host namespace that
joins it, the host's uplink to the router, and a Linux ``vxlan`` device (VNI
42, UDP 4789, over the fast path). The VM's MTU is then 1450 and the other
site's prefixes are on-link (``ip route add 10.61.1.0/24 dev eth0``): what a
site that uses the kernel's own VXLAN looks like.

Namespaces are ``{tag}-vma``, ``{tag}-ha``, ``{tag}-ra``, ``{tag}-rb``,
``{tag}-hb``, ``{tag}-vmb`` (and ``{tag}-wan``); every link lives inside them, so the caller's
:class:`~vtl.bridge.topology.Topology` removes everything. Bridges are named
``{tag}a`` and ``{tag}b`` (control sockets ``/run/vtl/{tag}a.sock``...).

For the tcptools helpers (``download``, ``upload``) a :class:`TunnelNet` looks
like a ``vtlnet.Net``: the "guest" is VM-A and the "peer" is VM-B.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from udtnet import NsVtl, toml_any
from vtl.bridge.topology import Topology, ip
from vtlnet import ctl_json, wait_for

VM_A, VM_B = "10.61.1.10", "10.62.2.20"
VM_A6, VM_B6 = "fd61::10", "fd62::20"
GW_A, GW_B = "10.61.1.1", "10.62.2.1"
GW_A6, GW_B6 = "fd61::1", "fd62::1"
NET_A, NET_B = "10.61.1.0/24", "10.62.2.0/24"
NET_A6, NET_B6 = "fd61::/64", "fd62::/64"
WAN_A, WAN_B = "10.64.0.1", "10.64.0.2"
WAN_A6, WAN_B6 = "fd64::1", "fd64::2"
FAST_A, FAST_B = "10.63.0.1", "10.63.0.2"
MAC_VM_A, MAC_VM_B = "02:00:00:3d:01:0a", "02:00:00:3e:02:14"
MAC_GW_A, MAC_GW_B = "02:00:00:3d:01:01", "02:00:00:3e:02:01"
MAC_FAST_A, MAC_FAST_B = "02:00:00:3f:00:01", "02:00:00:3f:00:02"
VNI = 42
VXLAN_PORT = 4789
TUNNEL_MTU = 1450

# per site: (VM address, VM v6, gateway, gateway v6, own prefix, own v6 prefix, fast-path
# address, VM MAC, gateway MAC); the other site is the other entry
SITES: dict[str, dict[str, str]] = {
    "a": {"vm": VM_A, "vm6": VM_A6, "gw": GW_A, "gw6": GW_A6, "net": NET_A, "net6": NET_A6,
          "fast": FAST_A, "mac": MAC_VM_A, "gwmac": MAC_GW_A, "wan": WAN_A, "wan6": WAN_A6,
          "fastmac": MAC_FAST_A},
    "b": {"vm": VM_B, "vm6": VM_B6, "gw": GW_B, "gw6": GW_B6, "net": NET_B, "net6": NET_B6,
          "fast": FAST_B, "mac": MAC_VM_B, "gwmac": MAC_GW_B, "wan": WAN_B, "wan6": WAN_B6,
          "fastmac": MAC_FAST_B},
}


def other(site: str) -> str:
    return "b" if site == "a" else "a"


def tunnel_service(site: str, **options: Any) -> dict[str, Any]:
    """The ``tunnel`` entry for bridge ``site`` ("a" or "b"), as issue 14 writes it: its
    fast-path address, VNI 42, its gateway's two addresses, the other site's v4 and v6
    prefixes behind the other host's fast-path address."""
    own, far = SITES[site], SITES[other(site)]
    svc: dict[str, Any] = {
        "use": "tunnel", "local": own["fast"], "vni": VNI, "gateway": [own["gw"], own["gw6"]],
        "peers": [{"prefix": far["net"], "remote": far["fast"]},
                  {"prefix": far["net6"], "remote": far["fast"]}],
    }
    svc.update(options)
    return svc


def config_toml(name: str, vm_ns: str, vm_mac: str, services: list[dict[str, Any]],
                stats_interval_s: float = 1.0) -> str:
    """Bridge config: TAP ``eth0`` (moved into ``vm_ns``, MAC ``vm_mac``) as the guest,
    ``uplink`` as the uplink, then ``services`` (lists and inline tables as TOML)."""
    lines = ["[bridge]", f"name = {toml_any(name)}", f"stats_interval_s = {stats_interval_s!r}",
             "[ports.guest]", 'kind = "tap"', 'ifname = "eth0"', f"netns = {toml_any(vm_ns)}",
             f"mac = {toml_any(vm_mac)}",
             "[ports.uplink]", 'kind = "packet"', 'ifname = "uplink"']
    for svc in services:
        lines.append("[[services]]")
        lines += [f"{k} = {toml_any(v)}" for k, v in svc.items()]
    return "\n".join(lines) + "\n"


class TunnelNet:
    """The two sites (see the module docstring)."""

    def __init__(self, topo: Topology, tag: str, tmp: Path, wan_delay_ms: float = 5.0,
                 fast_tx_csum: bool = False):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.fast_tx_csum = fast_tx_csum
        self.ns = {role: topo.netns(f"{tag}-{role}")
                   for role in ("vma", "ha", "ra", "rb", "hb", "vmb")}
        self.vma, self.vmb = self.ns["vma"], self.ns["vmb"]
        self.guest_ns, self.peer_ns = self.vma, self.vmb  # tcptools
        self.mode: dict[str, str] = {"a": "none", "b": "none"}  # vtl | kernel | none
        self.chain: dict[str, list[dict[str, Any]]] = {}  # the running bridges' services
        self.bridges: dict[str, NsVtl] = {}
        self._n = 0
        for ns in self.ns.values():
            topo.sysctl("net.ipv6.conf.default.accept_dad", "0", ns)
            topo.sysctl("net.ipv6.conf.all.accept_dad", "0", ns)
        for ns in (self.ns["ha"], self.ns["hb"]):
            # the hosts: no IPv6 on new links (uplink, fast, kernel bridge ports)
            topo.sysctl("net.ipv6.conf.default.disable_ipv6", "1", ns)
        self._veth("ha", "uplink", "ra", "lan")
        self._veth("hb", "uplink", "rb", "lan")
        self._veth("ha", "fast", "hb", "fast")
        self.wan_delay_ms = wan_delay_ms
        if wan_delay_ms:
            self.ns["wan"] = topo.netns(f"{tag}-wan")
            topo.sysctl("net.ipv6.conf.default.disable_ipv6", "1", self.ns["wan"])
            self._veth("ra", "wan", "wan", "side_a")
            self._veth("rb", "wan", "wan", "side_b")
            for dev in ("side_a", "side_b"):
                ip("-n", self.ns["wan"], "link", "set", dev, "up")
        else:
            self._veth("ra", "wan", "rb", "wan")
        for s in ("a", "b"):
            self._router(s)
            self._host(s)
        if wan_delay_ms:
            self.start_wan(wan_delay_ms)

    # -- building ---------------------------------------------------------------------------

    def _veth(self, r1: str, dev1: str, r2: str, dev2: str) -> None:
        ip("-n", self.ns[r1], "link", "add", dev1, "type", "veth", "peer", "name", dev2,
           "netns", self.ns[r2])

    def _router(self, s: str) -> None:
        site, far = SITES[s], SITES[other(s)]
        ns = self.ns["r" + s]
        self.topo.sysctl("net.ipv4.ip_forward", "1", ns)
        self.topo.sysctl("net.ipv6.conf.all.forwarding", "1", ns)
        ip("-n", ns, "link", "set", "lan", "address", site["gwmac"])
        for dev, cidr, cidr6 in (("lan", site["gw"] + "/24", site["gw6"] + "/64"),
                                 ("wan", site["wan"] + "/30", site["wan6"] + "/64")):
            ip("-n", ns, "addr", "add", cidr, "dev", dev)
            ip("-n", ns, "-6", "addr", "add", cidr6, "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "route", "add", far["net"], "via", far["wan"])
        ip("-n", ns, "-6", "route", "add", far["net6"], "via", far["wan6"])

    def _host(self, s: str) -> None:
        site, far = SITES[s], SITES[other(s)]
        ns = self.ns["h" + s]
        ip("-n", ns, "link", "set", "fast", "address", site["fastmac"])
        ip("-n", ns, "addr", "add", site["fast"] + "/24", "dev", "fast")
        for dev in ("uplink", "fast"):
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "neigh", "replace", far["fast"], "lladdr", far["fastmac"], "dev", "fast",
           "nud", "permanent")
        if not self.fast_tx_csum:  # final UDP checksums in what a capture there sees
            self.run("h" + s, ["ethtool", "-K", "fast", "tx", "off"])

    def _vm_addresses(self, s: str, mtu: int | None = None, onlink: bool = False) -> None:
        site, far = SITES[s], SITES[other(s)]
        ns = self.ns["vm" + s]
        if mtu is not None:
            ip("-n", ns, "link", "set", "eth0", "mtu", str(mtu))
        ip("-n", ns, "addr", "add", site["vm"] + "/24", "dev", "eth0")
        ip("-n", ns, "-6", "addr", "add", site["vm6"] + "/64", "dev", "eth0", "nodad")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", site["gw"])
        ip("-n", ns, "-6", "route", "add", "default", "via", site["gw6"], "dev", "eth0")
        if onlink:
            ip("-n", ns, "route", "add", far["net"], "dev", "eth0")
            ip("-n", ns, "-6", "route", "add", far["net6"], "dev", "eth0")

    def start_wan(self, delay_ms: float) -> NsVtl:
        """The WAN's delay: a bridge in the ``wan`` namespace between the routers' WAN
        links whose chain is one ``netem`` of ``delay_ms`` each way (this kernel has no
        ``sch_netem``)."""
        self.stop("wan")
        path = self.tmp / "bridge-wan.toml"
        svc = {"use": "netem", "delay_ms": delay_ms}
        path.write_text("\n".join([
            "[bridge]", f"name = {toml_any(self.tag + 'w')}", "control = false",
            "[ports.guest]", 'kind = "packet"', 'ifname = "side_a"',
            "[ports.uplink]", 'kind = "packet"', 'ifname = "side_b"', "[[services]]",
            *[f"{k} = {toml_any(v)}" for k, v in svc.items()]]) + "\n")
        vtl = NsVtl(self.ns["wan"], path)
        self.bridges["wan"] = vtl
        vtl.wait_ready()
        return vtl

    # -- sites ------------------------------------------------------------------------------

    def start(self, s: str, services: list[dict[str, Any]] | None = None,
              timeout: float = 20.0) -> NsVtl:
        """(Re)start bridge ``s`` ("a" or "b") with ``services`` (empty chain by default),
        its TAP becoming the VM's ``eth0``, and give the VM its addresses and routes."""
        self.stop(s)
        self._unkernel(s)
        self._n += 1
        path = self.tmp / f"bridge-{s}{self._n}.toml"
        path.write_text(config_toml(f"{self.tag}{s}", self.ns["vm" + s], SITES[s]["mac"],
                                    services or []))
        vtl = NsVtl(self.ns["h" + s], path)
        self.bridges[s] = vtl
        vtl.wait_ready(timeout)
        if not wait_for(lambda: self.has_eth0(s), 5):
            raise AssertionError(f"bridge {s}'s TAP never appeared in {self.ns['vm' + s]}")
        self._vm_addresses(s)
        self.mode[s] = "vtl"
        self.chain[s] = list(services or [])
        return vtl

    def chains(self, tunnel: bool, **options: Any) -> None:
        """Both bridges running, with ``tunnel`` (and ``options``) or with empty chains;
        restarted (and warmed up) only when they run something else."""
        for s in ("a", "b"):
            want = [tunnel_service(s, **options)] if tunnel else []
            if self.mode[s] != "vtl" or self.chain.get(s) != want or \
                    self.bridges[s].proc.poll() is not None:
                self.start(s, want)
        self.warm_up()

    def has_eth0(self, s: str) -> bool:
        return ip("-n", self.ns["vm" + s], "link", "show", "eth0", check=False).returncode == 0

    def stop(self, s: str) -> int | None:
        """Stop bridge ``s`` if it runs (its TAP, the VM's eth0, goes with it)."""
        vtl = self.bridges.pop(s, None)
        if vtl is None:
            return None
        code = vtl.stop()
        if s != "wan":
            wait_for(lambda: not self.has_eth0(s), 5)
            self.mode[s] = "none"
        return code

    def stop_all(self) -> dict[str, str]:
        """Stop every bridge; those that did not exit 0: site -> code and stderr tail."""
        bad: dict[str, str] = {}
        for s in list(self.bridges):
            vtl = self.bridges[s]
            code = self.stop(s)
            if code != 0:
                bad[s] = f"exit {code}:\n" + vtl.stderr[-1500:]
        return bad

    def kernel_vxlan(self, s: str) -> None:
        """Site ``s`` without VTL: the VM's eth0 (MTU 1450) is a veth into a kernel bridge
        ``br0`` in the host namespace with the uplink and a ``vxlan`` device ``vx`` (VNI 42,
        local this host's fast-path address, remote the other's, UDP 4789, over ``fast``);
        the other site's prefixes are on-link on the VM."""
        self.stop(s)
        self._unkernel(s)
        site, far = SITES[s], SITES[other(s)]
        h, vm = self.ns["h" + s], self.ns["vm" + s]
        ip("-n", h, "link", "add", "vm", "type", "veth", "peer", "name", "eth0", "netns", vm)
        ip("-n", vm, "link", "set", "eth0", "address", site["mac"])
        ip("-n", h, "link", "add", "vx", "type", "vxlan", "id", str(VNI), "local", site["fast"],
           "remote", far["fast"], "dstport", str(VXLAN_PORT), "dev", "fast")
        ip("-n", h, "link", "add", "br0", "type", "bridge")
        for dev in ("vm", "vx", "uplink"):
            ip("-n", h, "link", "set", dev, "master", "br0")
            ip("-n", h, "link", "set", dev, "up")
        ip("-n", h, "link", "set", "br0", "up")
        self._vm_addresses(s, mtu=TUNNEL_MTU, onlink=True)
        self.mode[s] = "kernel"

    def _unkernel(self, s: str) -> None:
        if self.mode[s] != "kernel":
            return
        h = self.ns["h" + s]
        for dev in ("br0", "vx", "vm"):
            ip("-n", h, "link", "del", dev, check=False)
        self.mode[s] = "none"

    def warm_up(self) -> None:
        """Fresh neighbours: each VM pings its gateway (so its bridge learns its MAC behind
        the guest port) and the other VM, v4 and v6; failures are the caller's to find."""
        for s in ("a", "b"):
            self.run("vm" + s, ["ip", "neigh", "flush", "all"], check=False)
            self.run("vm" + s, ["ip", "route", "flush", "cache"], check=False)
        for s in ("a", "b"):
            site = SITES[s]
            if self.mode[s] == "vtl":
                self.run("vm" + s, ["ping", "-c", "1", "-W", "2", site["gw"]], check=False)
                self.run("vm" + s, ["ping", "-6", "-c", "1", "-W", "2", site["gw6"]], check=False)
        self.run("vma", ["ping", "-c", "2", "-i", "0.2", "-W", "2", VM_B], check=False)
        self.run("vma", ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", VM_B6], check=False)

    # -- observing ---------------------------------------------------------------------------

    def counters(self, s: str) -> dict[str, Any]:
        """``vtl ctl NAME counters --json`` of bridge ``s``."""
        return ctl_json(f"/run/vtl/{self.tag}{s}.sock", "counters")

    def capture(self, role: str, dev: str, name: str, expr: str = "", snaplen: int = 0,
                direction: str = "inout") -> Capture:
        """tcpdump on ``dev`` in namespace ``role`` into ``tmp/NAME.pcap``, running once
        this returns; stop it with :meth:`Capture.stop`."""
        return Capture(self.topo, self.ns[role], dev, self.tmp / f"{name}.pcap", expr,
                       snaplen, direction)

    def run(self, role: str, cmd: list[str] | str, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.topo.run(self.ns[role], cmd, timeout=timeout, check=check)

    def vm_a(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.vma, cmd, timeout=timeout, check=check)

    def vm_b(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.vmb, cmd, timeout=timeout, check=check)

    guest = vm_a
    peer = vm_b


class Capture:
    """A tcpdump writing a pcap (``-U --immediate-mode``: nothing is lost at stop)."""

    def __init__(self, topo: Topology, netns: str, dev: str, pcap: Path, expr: str = "",
                 snaplen: int = 0, direction: str = "inout"):
        self.topo, self.pcap = topo, pcap
        err = pcap.with_suffix(".stderr")
        argv = ["tcpdump", "-nn", "-U", "--immediate-mode", "-Z", "root", "-i", dev,
                "-Q", direction, "-w", str(pcap)]
        if snaplen:
            argv += ["-s", str(snaplen)]
        if expr:
            argv.append(expr)
        with open(err, "wb") as f:
            self.proc = topo.spawn(netns, argv, stderr=f)
        if not wait_for(lambda: "listening on" in err.read_text()
                        or self.proc.poll() is not None, 10):
            raise AssertionError(f"tcpdump on {dev} in {netns} did not start in 10 s")
        if self.proc.poll() is not None:
            raise AssertionError(f"tcpdump exited {self.proc.returncode}: {err.read_text()}")

    def stop(self) -> Path:
        time.sleep(0.3)  # frames in flight
        self.topo.stop_proc(self.proc)
        return self.pcap

    def lines(self, expr: str = "", flags: tuple[str, ...] = ("-e",)) -> list[str]:
        """``tcpdump -nn -r PCAP [flags] [expr]`` output lines."""
        argv = ["tcpdump", "-nn", *flags, "-r", str(self.pcap)]
        if expr:
            argv.append(expr)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise AssertionError(f"tcpdump -r failed: {out.stderr}")
        return out.stdout.splitlines()


def traceroute_hops(output: str) -> list[str]:
    """The address answering each hop of ``traceroute -n`` output ("*" when none did)."""
    hops = []
    for line in output.splitlines()[1:]:
        m = re.match(r"\s*\d+\s+(\S+)", line)
        if m:
            hops.append(m.group(1))
    return hops


def tshark_fields(pcap: Path, fields: list[str], display_filter: str = "",
                  checksums: bool = False) -> list[dict[str, str]]:
    """One dict per frame of ``pcap`` with ``fields`` (tshark ``-T fields``; several
    occurrences joined by ``;``), UDP 4789 decoded as VXLAN; ``checksums``: IP, TCP and
    UDP checksums validated (so ``*.checksum.status`` fields mean something)."""
    argv = ["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={VXLAN_PORT},vxlan",
            "--disable-protocol", "http",  # the seeded bodies are random bytes, not HTTP
            # and no heuristic dissector may guess a protocol in them (thrift did once)
            "-d", "tcp.port==8080,data",
            "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=;"]
    if checksums:
        argv += ["-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
                 "-o", "udp.check_checksum:TRUE"]
    if display_filter:
        argv += ["-Y", display_filter]
    for f in fields:
        argv += ["-e", f]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"tshark failed ({proc.returncode}): {proc.stderr[-500:]}")
    rows = []
    for line in proc.stdout.splitlines():
        values = (line.split("\t") + [""] * len(fields))[: len(fields)]
        rows.append(dict(zip(fields, values, strict=True)))
    return rows


def vm_pair_filter() -> str:
    """A libpcap filter for packets between the two VMs (either way, v4 or v6)."""
    return (f"(ip and host {VM_A} and host {VM_B}) or "
            f"(ip6 and host {VM_A6} and host {VM_B6})")


def require_root() -> None:
    """Fail in CI, skip elsewhere, when not root (as the ``root`` fixture does)."""
    import pytest

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("integration tests need root, and CI runs as root")
        pytest.skip("needs root")


@contextmanager
def open_sites(tmp: Path, wan_delay_ms: float = 5.0,
               fast_tx_csum: bool = False) -> Iterator[TunnelNet]:
    """A :class:`TunnelNet` with a fresh tag, torn down (bridges, namespaces) on exit."""
    tag = "tn" + secrets.token_hex(2)
    topo = Topology(tag)
    net: TunnelNet | None = None
    try:
        net = TunnelNet(topo, tag, tmp, wan_delay_ms, fast_tx_csum)
        yield net
    finally:
        if net is not None:
            net.stop_all()
        topo.close()
