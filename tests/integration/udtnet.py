"""The udt end-to-end topology: two VMs, two VTL bridges, and an emulated WAN between them.

::

    vmA netns: eth0 10.187.1.1/16, fd00:187::1:1/64
      | veth
    brA netns: guest [vtl run A] uplink   (host address 10.186.0.1/24, fd00:186::1/64)
                                   | veth
    wan netns:               side_a [vtl run: netem] side_b
                                                       | veth
    brB netns:                         (10.186.0.2/24, fd00:186::2/64) uplink [vtl run B] guest
                                                                                            | veth
    vmB netns: eth0 10.187.2.1/16, fd00:187::2:1/64 ----------------------------------------+

Everything is one L2 segment. Each bridge host's own address (where the ``udt``
service listens and from where it sends UDT) sits on its uplink interface
itself, as on a real host whose NIC carries both the host's IP and the bridged
VM traffic: the bridge's AF_PACKET uplink port must ignore the host's outgoing
frames (``PACKET_IGNORE_OUTGOING``) and leave frames addressed to the host's MAC
to the host's stack. The guest interfaces of brA/brB carry no IPv6 (no
router solicitations or MLD toward the VMs from the bridge hosts).

The WAN is a third ``vtl run`` whose chain is one ``netem`` (per direction:
``delay_ms`` = RTT/2, the same loss and reordering both ways, ``rate_mbit``
with a queue of about one bandwidth-delay product). So that netem applies its
loss per packet as a real link would, no super-frame may reach it: TSO, GSO and
GRO are off (``ethtool -K``) on the VMs' NICs, the bridges' uplinks and the WAN's
veths (the bridges' guest ends keep TSO: see the comment in ``__init__``), and
:meth:`UdtNet.wan_frame_sizes` reads the WAN bridge's port counters to check it
(mean bytes per frame in the data direction close to the 1514-byte frame).

Namespaces are named ``{tag}-vma`` etc. with a tag unique to the run; the
caller's :class:`~vtl.bridge.topology.Topology` removes them (and every veth
with them: all veths live inside the namespaces, none in the root namespace).

For the tcptools helpers (``download``, ``upload``, ``parallel_downloads``,
``connect_result``), a :class:`UdtNet` looks like a ``vtlnet.Net``: the
"guest" is VM-A and the "peer" is VM-B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vtl.bridge.topology import Topology, ip
from vtlnet import VtlProcess, toml_value

VM_A, VM_B = "10.187.1.1", "10.187.2.1"
VM_A6, VM_B6 = "fd00:187::1:1", "fd00:187::2:1"
VM_NET_A, VM_NET_B = "10.187.1.0/24", "10.187.2.0/24"
VM_NET_A6, VM_NET_B6 = "fd00:187::1:0/112", "fd00:187::2:0/112"
BR_A, BR_B = "10.186.0.1", "10.186.0.2"
BR_A6, BR_B6 = "fd00:186::1", "fd00:186::2"
MAC_VM_A, MAC_VM_B = "02:00:00:bb:01:01", "02:00:00:bb:02:01"
MAC_BR_A, MAC_BR_B = "02:00:00:ba:00:01", "02:00:00:ba:00:02"
UDT_PORT = 9000
FRAME = 1514  # the largest frame a 1500-byte MTU allows on the wire (without FCS)


def toml_any(v: Any) -> str:
    """A TOML value, also lists and inline tables (the udt service's ``peers``)."""
    return toml_value(v)


def config_toml(name: str, guest: str, uplink: str, services: list[dict[str, Any]],
                stats_interval_s: float = 1.0) -> str:
    lines = ["[bridge]", f"name = {toml_any(name)}", f"stats_interval_s = {stats_interval_s!r}",
             "[ports.guest]", 'kind = "packet"', f"ifname = {toml_any(guest)}",
             "[ports.uplink]", 'kind = "packet"', f"ifname = {toml_any(uplink)}"]
    for svc in services:
        lines.append("[[services]]")
        lines += [f"{k} = {toml_any(v)}" for k, v in svc.items()]
    return "\n".join(lines) + "\n"


def udt_service(side: str, **options: Any) -> dict[str, Any]:
    """The ``udt`` entry for bridge ``side`` ("a" or "b"): listens on its host address,
    the other VM's prefixes (v4 and v6) are behind the other bridge."""
    own, other = (BR_A, BR_B) if side == "a" else (BR_B, BR_A)
    nets = (VM_NET_B, VM_NET_B6) if side == "a" else (VM_NET_A, VM_NET_A6)
    svc: dict[str, Any] = {
        "use": "udt", "listen": f"{own}:{UDT_PORT}",
        "peers": [{"prefix": n, "bridge": f"{other}:{UDT_PORT}"} for n in nets],
        "connect_timeout_s": 3,
    }
    svc.update(options)
    return svc


def netem_service(rtt_ms: float, loss: float = 0.0, reorder: float = 0.0,
                  rate_mbit: float = 100.0, seed: int | None = 1) -> dict[str, Any]:
    """netem for the WAN: RTT/2 each way, the same loss and reordering in both directions,
    and a rate queue of about one bandwidth-delay product of full frames (100..1000)."""
    bdp = rate_mbit * 1e6 * rtt_ms / 1000 / ((FRAME + 24) * 8)
    svc: dict[str, Any] = {"use": "netem", "delay_ms": rtt_ms / 2, "loss": loss,
                           "rate_mbit": rate_mbit,
                           "queue_packets": int(max(100, min(1000, round(bdp))))}
    if reorder:
        svc["reorder"] = reorder
    if seed is not None:
        svc["seed"] = seed
    return svc


class NsVtl(VtlProcess):
    """``vtl run CONFIG`` inside a network namespace (``ip netns exec`` execs, so the pid
    is the bridge's own)."""

    def __init__(self, netns: str, config_path: Path):  # noqa: D107 - replaces the argv only
        self.netns = netns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "vtl.bridge.cli", "run",
             str(config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def stats(self) -> dict[str, Any]:
        """The latest ``stats {...}`` (or final ``stopped; {...}``) snapshot it logged."""
        for line in reversed(self.lines):
            for marker in ("stopped; ", "stats "):
                if marker in line:
                    return json.loads(line.split(marker, 1)[1])
        raise AssertionError("no stats line yet:\n" + self.stderr[-2000:])

    def next_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next ``stats {...}`` snapshot it logs (so counters include what just
        happened; needs ``stats_interval_s``, which :func:`config_toml` sets to 1 s)."""
        def count() -> int:
            return sum(1 for ln in list(self.lines) if "stats {" in ln)

        n = count()
        deadline = time.monotonic() + timeout
        while count() <= n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("no new stats line:\n" + self.stderr[-2000:])
            time.sleep(0.05)
        return self.stats()

    def cpu_seconds(self) -> float:
        """utime + stime of the bridge process so far, in seconds."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class UdtNet:
    """VM-A, bridge A, the WAN, bridge B, VM-B (see the module docstring)."""

    def __init__(self, topo: Topology, tag: str, tmp: Path):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.vma = topo.netns(f"{tag}-vma")
        self.vmb = topo.netns(f"{tag}-vmb")
        self.bra = topo.netns(f"{tag}-bra")
        self.brb = topo.netns(f"{tag}-brb")
        self.wan = topo.netns(f"{tag}-wan")
        # tcptools sees VM-A as the guest and VM-B as the peer
        self.guest_ns, self.peer_ns = self.vma, self.vmb
        self._veth(self.vma, "eth0", self.bra, "guest")
        self._veth(self.vmb, "eth0", self.brb, "guest")
        self._veth(self.bra, "uplink", self.wan, "side_a")
        self._veth(self.brb, "uplink", self.wan, "side_b")
        for ns, dev, mac in ((self.vma, "eth0", MAC_VM_A), (self.vmb, "eth0", MAC_VM_B),
                             (self.bra, "uplink", MAC_BR_A), (self.brb, "uplink", MAC_BR_B)):
            ip("-n", ns, "link", "set", "dev", dev, "address", mac)
        for ns in (self.bra, self.brb):
            topo.sysctl("net.ipv6.conf.guest.disable_ipv6", "1", ns)
        for ns in (self.wan,):
            topo.sysctl("net.ipv6.conf.side_a.disable_ipv6", "1", ns)
            topo.sysctl("net.ipv6.conf.side_b.disable_ipv6", "1", ns)
        self._addr(self.vma, "eth0", f"{VM_A}/16", f"{VM_A6}/64")
        self._addr(self.vmb, "eth0", f"{VM_B}/16", f"{VM_B6}/64")
        self._addr(self.bra, "uplink", f"{BR_A}/24", f"{BR_A6}/64")
        self._addr(self.brb, "uplink", f"{BR_B}/24", f"{BR_B6}/64")
        for ns, dev in ((self.vma, "eth0"), (self.vmb, "eth0"), (self.bra, "uplink"),
                        (self.brb, "uplink"), (self.wan, "side_a"), (self.wan, "side_b")):
            # no super-frames from the VMs or the hosts: the WAN must see wire-sized frames
            topo.run(ns, ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"])
        for ns in (self.bra, self.brb):
            # The bridges' guest ends keep TSO: what a bridge sends there goes to its VM
            # only, and a service's GSO frame sent through an AF_PACKET socket with
            # PACKET_QDISC_BYPASS to a device without TSO fails with ENOBUFS (the kernel's
            # direct xmit drops what it would have to segment). No GRO toward the bridge.
            topo.run(ns, ["ethtool", "-K", "guest", "gro", "off"])
        for ns, dev in ((self.vma, "eth0"), (self.vmb, "eth0"), (self.bra, "guest"),
                        (self.bra, "uplink"), (self.brb, "guest"), (self.brb, "uplink"),
                        (self.wan, "side_a"), (self.wan, "side_b")):
            ip("-n", ns, "link", "set", "dev", dev, "up")
        self.bridges: dict[str, NsVtl] = {}
        self._n = 0

    def _veth(self, ns1: str, dev1: str, ns2: str, dev2: str) -> None:
        ip("-n", ns1, "link", "add", dev1, "type", "veth", "peer", "name", dev2, "netns", ns2)

    def _addr(self, ns: str, dev: str, cidr: str, cidr6: str) -> None:
        ip("-n", ns, "addr", "add", cidr, "dev", dev)
        ip("-n", ns, "-6", "addr", "add", cidr6, "dev", dev, "nodad")

    # -- bridges ---------------------------------------------------------------------------

    def start(self, role: str, services: list[dict[str, Any]] | None = None,
              timeout: float = 20.0) -> NsVtl:
        """Start (or restart) bridge ``role``: "a", "b" or "wan"."""
        self.stop(role)
        ns, guest, uplink = {"a": (self.bra, "guest", "uplink"),
                             "b": (self.brb, "guest", "uplink"),
                             "wan": (self.wan, "side_a", "side_b")}[role]
        self._n += 1
        path = self.tmp / f"{role}{self._n}.toml"
        path.write_text(config_toml(f"{self.tag}{role}", guest, uplink, services or []))
        vtl = NsVtl(ns, path)
        self.bridges[role] = vtl
        vtl.wait_ready(timeout)
        return vtl

    def start_wan(self, rtt_ms: float, loss: float = 0.0, reorder: float = 0.0,
                  rate_mbit: float = 100.0, seed: int | None = 1) -> NsVtl:
        return self.start("wan", [netem_service(rtt_ms, loss, reorder, rate_mbit, seed)])

    def start_all(self, chain_a: list[dict[str, Any]] | None,
                  chain_b: list[dict[str, Any]] | None, rtt_ms: float, loss: float = 0.0,
                  reorder: float = 0.0, **wan: Any) -> None:
        """The WAN, then both bridges, then ARP through all of it (VM-A <-> VM-B, A <-> B)."""
        self.start_wan(rtt_ms, loss, reorder, **wan)
        self.start("a", chain_a)
        self.start("b", chain_b)
        self.warm_up()

    def warm_up(self) -> None:
        """Resolve neighbours afresh over the WAN, so that every (re)started bridge learns
        the MACs behind its guest port: a bridge forwards unicast from its uplink to the
        guest only to MACs it saw there, so after a restart a VM that keeps a neighbour
        entry and sends nothing would stay unreachable for tens of seconds."""
        for ns in (self.vma, self.vmb, self.bra, self.brb):
            self.topo.run(ns, ["ip", "neigh", "flush", "all"], check=False)
        self.vm_a(["ping", "-c", "1", "-W", "3", VM_B], check=False)
        self.vm_b(["ping", "-c", "1", "-W", "3", VM_A], check=False)
        self.topo.run(self.bra, ["ping", "-c", "1", "-W", "3", BR_B], check=False)

    def stop(self, role: str) -> int | None:
        vtl = self.bridges.pop(role, None)
        return vtl.stop() if vtl is not None else None

    def stop_all(self, order: tuple[str, ...] = ("a", "b", "wan")) -> dict[str, str]:
        """Stop every bridge (in ``order``, then any other). Returns those that did not
        exit 0 within 15 s of SIGTERM: role -> exit code, seconds and stderr tail."""
        slow: dict[str, str] = {}
        roles = [r for r in order if r in self.bridges]
        roles += [r for r in self.bridges if r not in roles]
        for role in roles:
            vtl = self.bridges[role]
            t0 = time.monotonic()
            code = self.stop(role)
            if code != 0:
                tail = "".join(ln for ln in vtl.lines if "stats {" not in ln)[-1500:]
                slow[role] = f"exit {code} after {time.monotonic() - t0:.1f} s:\n{tail}"
        return slow

    def wan_frame_sizes(self) -> dict[str, float]:
        """Mean bytes per frame the WAN bridge received from each side so far
        (``a_to_b``: from bridge A's side, ``b_to_a``: from B's), and the counts."""
        ports = self.bridges["wan"].stats()["ports"]
        out: dict[str, float] = {}
        for key, port in (("a_to_b", "guest"), ("b_to_a", "uplink")):
            c = ports[port]
            out[key] = c["rx_bytes"] / c["rx_frames"] if c["rx_frames"] else 0.0
            out[key + "_frames"] = c["rx_frames"]
            out[key + "_bytes"] = c["rx_bytes"]
        return out

    def congestion_control(self, name: str) -> None:
        """Set the VMs' TCP congestion control on their on-link routes (``congctl``).

        New namespaces inherit the machine's default, and a namespace other than the
        first may only pick from ``tcp_allowed_congestion_control`` with the sysctl; a
        route's ``congctl`` has no such limit and covers every connection over it."""
        for ns, src in ((self.vma, VM_A), (self.vmb, VM_B)):
            ip("-n", ns, "route", "replace", "10.187.0.0/16", "dev", "eth0", "proto", "kernel",
               "scope", "link", "src", src, "congctl", name)
            ip("-n", ns, "-6", "route", "replace", "fd00:187::/64", "dev", "eth0", "proto",
               "kernel", "metric", "256", "congctl", name)

    # -- commands --------------------------------------------------------------------------

    def vm_a(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.vma, cmd, timeout=timeout, check=check)

    def vm_b(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.vmb, cmd, timeout=timeout, check=check)

    guest = vm_a
    peer = vm_b
