"""The firewall's differential topology: the kernel's nftables and VTL's firewall side by side.

::

    KERNEL   outside (eth0) ---- (out0) router (in0) ---- (eth0) inside
                                 ip forwarding, the compiled nft ruleset
                                 (fwcompile), its conntrack sysctls

    VTL      outside2 (eth0) ---- (uplink) bridge (guest) ---- (eth0) inside2
                                  vtl run: packet ports, [[services]] firewall

Both sides carry the same addresses, so one trace applies to both: the
outside host is 10.90.1.10 and fd90:1::10 (and .11 / ::11, a second source for
set matches), the inside host (the guest) 10.90.2.20 and fd90:2::20. On the
kernel side the router holds 10.90.1.1 / fd90:1::1 and 10.90.2.1 / fd90:2::1
and static neighbour entries for the end hosts' addresses (no ARP or ND during
a trace); on the VTL side the two hosts share one segment through the bridge.
The frames differ only in their MACs (to the router's, or to the other host's)
and, through the router, in the TTL.

The router's ICMP rate limits are off (``icmp_ratelimit``, ``icmp_msgs_per_sec``):
the kernel sends at most about one ICMP error per second to a host after a burst
of six, so a trace with many rejects would see the kernel's ``reject`` turn into
a silent drop, which is about the router, not the firewall's verdict.

The end hosts' stacks stay silent (see :mod:`fwtrace`): their interfaces have
no address of the trace and IPv6 off, and an nft table drops every packet in
their prerouting and output hooks; the replayer's AF_PACKET sockets see frames
before that. A VTL bridge delivers to its guest port only frames to a MAC it
has seen the guest send from: :meth:`FwNet.start_vtl` has the inside host send
an ARP request first.

Namespaces are ``{tag}-o``, ``-r``, ``-i`` (kernel) and ``-o2``, ``-b``, ``-i2``
(VTL) with a tag unique to the run; :func:`open_fwnet` removes them all (and the
veths, which live inside them) on exit, also on failure.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fwcompile import compile_nft, sysctls
from fwtrace import IN4, IN6, OUT4, OUT4B, OUT6, OUT6B, Endpoint, Side
from udtnet import NsVtl, config_toml
from vtl.bridge.topology import Topology, ip

R_OUT4, R_IN4, R_OUT6, R_IN6 = "10.90.1.1", "10.90.2.1", "fd90:1::1", "fd90:2::1"
MAC_OUT, MAC_IN = "02:00:00:f0:01:10", "02:00:00:f0:02:20"
MAC_R_OUT, MAC_R_IN = "02:00:00:f0:01:01", "02:00:00:f0:02:01"

#: every packet the host's own stack would take in or send out is dropped
SILENT_NFT = """table inet vtlfw_end {
\tchain pre { type filter hook prerouting priority -300; policy drop; }
\tchain out { type filter hook output priority -300; policy drop; }
}
"""


def nft_load(topo: Topology, netns: str, text: str) -> None:
    """``nft -f -`` inside ``netns``; SetupError with nft's words on failure."""
    topo.run(netns, ["nft", "-f", "-"], input=text.encode())


class FwNet:
    """Both setups (see the module docstring); ``options`` is the firewall's dict."""

    def __init__(self, topo: Topology, tag: str, tmp: Path, options: dict[str, Any]):
        self.topo, self.tag, self.tmp, self.options = topo, tag, tmp, options
        names = ("o", "r", "i", "o2", "b", "i2")
        self.ns = {n: f"{tag}-{n}" for n in names}
        for n in names:
            ns = topo.netns(self.ns[n])
            if n != "r":
                topo.sysctl("net.ipv6.conf.all.disable_ipv6", "1", ns)
                topo.sysctl("net.ipv6.conf.default.disable_ipv6", "1", ns)
        r = self.ns["r"]
        topo.sysctl("net.ipv6.conf.default.accept_dad", "0", r)
        self._veth("o", "eth0", MAC_OUT, "r", "out0", MAC_R_OUT)
        self._veth("r", "in0", MAC_R_IN, "i", "eth0", MAC_IN)
        self._veth("o2", "eth0", MAC_OUT, "b", "uplink", "02:00:00:f0:0b:01")
        self._veth("b", "guest", "02:00:00:f0:0b:02", "i2", "eth0", MAC_IN)
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1"),
                           ("net.ipv4.conf.all.rp_filter", "0"),
                           ("net.ipv4.conf.default.rp_filter", "0"),
                           # the router's ICMP errors (nft's reject) are not rate-limited
                           # (else after six to one host, rejects turn into silent drops)
                           ("net.ipv4.icmp_ratelimit", "0"), ("net.ipv6.icmp.ratelimit", "0"),
                           ("net.ipv4.icmp_msgs_per_sec", "100000"),
                           ("net.ipv4.icmp_msgs_burst", "100000")):
            topo.sysctl(key, value, r)
        for dev, addrs in (("out0", (f"{R_OUT4}/24", f"{R_OUT6}/64")),
                           ("in0", (f"{R_IN4}/24", f"{R_IN6}/64"))):
            topo.sysctl(f"net.ipv4.conf.{dev}.rp_filter", "0", r)
            for a in addrs:
                ip("-n", r, "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []))
        for dev, mac, addrs in (("out0", MAC_OUT, (OUT4, OUT4B, OUT6, OUT6B)),
                                ("in0", MAC_IN, (IN4, IN6))):
            for a in addrs:
                ip("-n", r, "neigh", "replace", a, "lladdr", mac, "dev", dev,
                   "nud", "permanent")
        for n in ("o", "i", "o2", "i2"):
            nft_load(topo, self.ns[n], SILENT_NFT)
        self.load_kernel_rules(options)
        self.kernel = Side("kernel", Endpoint(self.ns["o"], "eth0", MAC_OUT, MAC_R_OUT),
                           Endpoint(self.ns["i"], "eth0", MAC_IN, MAC_R_IN))
        self.vtl = Side("vtl", Endpoint(self.ns["o2"], "eth0", MAC_OUT, MAC_IN),
                        Endpoint(self.ns["i2"], "eth0", MAC_IN, MAC_OUT))
        self.bridge: NsVtl | None = None

    def _veth(self, n1: str, dev1: str, mac1: str, n2: str, dev2: str, mac2: str) -> None:
        ip("-n", self.ns[n1], "link", "add", dev1, "address", mac1, "type", "veth", "peer",
           "name", dev2, "address", mac2, "netns", self.ns[n2])
        ip("-n", self.ns[n1], "link", "set", dev1, "up")
        ip("-n", self.ns[n2], "link", "set", dev2, "up")

    # -- the kernel's side ------------------------------------------------------------

    def load_kernel_rules(self, options: dict[str, Any]) -> str:
        """Replace the router's ruleset with ``options`` compiled and set its sysctls
        (and empty its conntrack table if conntrack(8) is installed); returns the
        ruleset's text."""
        r = self.ns["r"]
        text = compile_nft(options, "out0", "in0")
        nft_load(self.topo, r, "flush ruleset\n" + text)
        for key, value in sysctls(options).items():
            self.topo.run(r, ["sysctl", "-qw", f"{key}={value}"])
        self.flush_conntrack()
        self.ruleset = text
        return text

    def flush_conntrack(self) -> None:
        """Empty the router's conntrack table with ``conntrack -F`` when that tool is
        installed (else the entries stay: each trace uses ports of its own)."""
        subprocess.run(["ip", "netns", "exec", self.ns["r"], "conntrack", "-F"],
                       capture_output=True, check=False)

    def nft_counters(self) -> str:
        """The router's ruleset with its counters, for a report."""
        return self.topo.run(self.ns["r"], ["nft", "list", "ruleset"]).stdout

    # -- VTL's side -------------------------------------------------------------------

    def start_vtl(self, options: dict[str, Any] | None = None, timeout: float = 20) -> NsVtl:
        """(Re)start the bridge with the firewall and ``options`` (default: this net's),
        then teach it the guest's MAC."""
        self.stop_vtl()
        svc = {"use": "firewall", **(options or self.options)}
        path = self.tmp / f"{self.tag}-bridge.toml"
        path.write_text(config_toml(f"{self.tag}b", "guest", "uplink", [svc]))
        self.bridge = NsVtl(self.ns["b"], path)
        self.bridge.wait_ready(timeout)
        from scapy.layers.l2 import ARP, Ether
        arp = Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC_IN) / ARP(
            op=1, hwsrc=MAC_IN, psrc=IN4, pdst=R_IN4)
        self.vtl.inside.send_frame(bytes(arp))
        return self.bridge

    def stop_vtl(self) -> int | None:
        bridge, self.bridge = self.bridge, None
        return None if bridge is None else bridge.stop()

    def close(self) -> None:
        self.kernel.close()
        self.vtl.close()
        self.stop_vtl()


@contextmanager
def open_fwnet(tmp: Path, options: dict[str, Any]) -> Iterator[FwNet]:
    """A :class:`FwNet` with a fresh tag (the VTL bridge not started), torn down on exit."""
    tag = "fw" + secrets.token_hex(2)
    topo = Topology(tag)
    net: FwNet | None = None
    try:
        net = FwNet(topo, tag, tmp, options)
        yield net
    finally:
        if net is not None:
            net.close()
        topo.close()
