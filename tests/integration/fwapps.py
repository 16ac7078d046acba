"""Real programs behind the kernel's nftables and behind VTL's firewall, side by side.

::

    KERNEL   outside (eth0) ---- (out0) router (in0) ---- (eth0) inside
             10.90.1.10-12/24    ip forwarding, the compiled    10.90.2.20/24
             via 10.90.1.1       nft forward chain (fwcompile)  via 10.90.2.1

    VTL      outside2 (eth0) ---- (uplink) bridge (guest) ---- (eth0) inside2
             10.90.1.10-12/24     vtl run: packet ports,        10.90.2.20/24
             10.90.2.0/24 on-link [[services]] firewall         10.90.1.0/24 on-link

Unlike :mod:`fwnet` (a raw-frame replay between silent hosts), the end hosts here
own their addresses and their kernels answer: the programs (curl, nc, ping, a
Python HTTP server, UDP echoes) are the ones an operator would try. Both sides
carry the same addresses, so one command line runs at both. On the VTL side the
two hosts share one segment through the bridge (each reaches the other's /24 on
its link, by ARP); on the kernel side they are routed, so what differs is only
the TTL, the MACs and the source of an ICMP error (the router's address there,
the refused packet's destination on the bridge), none of which an application
sees. IPv6 is off everywhere (no router solicitations or MLD in the way).

The router's ICMP rate limits are off, as in :mod:`fwnet`. A VTL bridge delivers
to its guest port only frames to a MAC it has seen the guest send from:
:meth:`AppNet.start` has each inside host ping the outside once.

:func:`probe` runs one probe (``curl``, ``nc``, ``tcp``, ``udp``, ``ping``) in a
namespace and returns an :class:`Outcome`; :func:`both` runs it at both sides at
once. Namespaces are ``{tag}-o``, ``-r``, ``-i``, ``-o2``, ``-b``, ``-i2`` with a
tag unique to the run; :func:`open_appnet` removes them (their veths with them)
and every process started, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwcompile import compile_nft, sysctls
from httpsha import expected_sha256
from udtnet import NsVtl, config_toml
from vtl.bridge.topology import Topology, ip

OUT4, OUT4B, OUT4C, IN4 = "10.90.1.10", "10.90.1.11", "10.90.1.12", "10.90.2.20"
R_OUT4, R_IN4 = "10.90.1.1", "10.90.2.1"
HTTPSHA = str(Path(__file__).parent / "httpsha.py")

#: the inside host's servers: TCP listeners that accept and close, UDP echoes
SERVERS = r"""
import socket, sys, threading
def tcp(p):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(64)
    while True:
        s.accept()[0].close()
def udp(p):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", p))
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
tcps, udps = sys.argv[1].split(","), sys.argv[2].split(",")
for p in tcps:
    threading.Thread(target=tcp, args=(int(p),), daemon=True).start()
for p in udps[1:]:
    threading.Thread(target=udp, args=(int(p),), daemon=True).start()
udp(int(udps[0]))
"""

#: a TCP connect or a UDP request/answer on a connected socket, timed in the process
SOCK_PROBE = r"""
import json, socket, sys, time
host, kind, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t = time.monotonic()
detail = ""
try:
    if kind == "tcp":
        socket.create_connection((host, port), timeout=wait).close()
        out = "connected"
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(wait)
        s.connect((host, port))
        s.send(b"ping-" + str(port).encode())
        got = s.recv(2048)
        out = "answered" if got == b"ping-" + str(port).encode() else "garbled"
except ConnectionRefusedError:
    out = "refused"
except (TimeoutError, socket.timeout):
    out = "timeout"
except OSError as e:
    out, detail = "error", f"errno {e.errno}"
print(json.dumps([out, time.monotonic() - t, detail]))
"""


@dataclass(frozen=True)
class Outcome:
    """What one probe saw: ``what`` (``ok``, ``connected``, ``answered``, ``refused``,
    ``timeout``, ``replied``, ``unreachable``, ``error``...), how long it took, and a
    free-form detail for the report (who sent an ICMP error, curl's exit code...)."""

    what: str
    seconds: float
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what} {self.seconds:.2f}s" + (f" ({self.detail})" if self.detail else "")


def _run(ns: str, argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[bytes],
                                                            float]:
    t = time.monotonic()
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                          timeout=timeout)
    return proc, time.monotonic() - t


def probe(ns: str, kind: str, host: str, port: int = 0, wait: float = 2.0,
          src: str | None = None, size: int = 0, seed: int = 0) -> Outcome:
    """One probe from namespace ``ns`` toward ``host``, bounded by about ``wait`` s.

    ``curl``: GET ``size`` bytes of httpsha's stream ``seed`` (``ok`` when the body's
    SHA-256 is right, ``refused``/``timeout`` from curl's exit 7/28); ``nc``:
    ``nc -v -z -w WAIT`` (``connected``, ``refused``, ``timeout`` from its words);
    ``tcp``/``udp``: a Python socket (a connect; a request and its echo on a
    connected UDP socket: an ICMP port unreachable is ``refused``); ``ping``: one
    echo request from ``src`` (``replied``, ``unreachable`` with who said so,
    ``timeout``).
    """
    bound = wait + 15
    if kind == "curl":
        url = f"http://{host}:{port}/bytes/{size}?seed={seed}"
        proc, took = _run(ns, ["curl", "-sS", "--connect-timeout", f"{wait:g}", "--max-time",
                               f"{wait + 8:g}", "-o", "-", url], bound)
        if proc.returncode == 0:
            good = hashlib.sha256(proc.stdout).hexdigest() == expected_sha256(size, seed)
            return Outcome("ok" if good else "corrupt", took, f"{len(proc.stdout)} B")
        what = {7: "refused", 28: "timeout"}.get(proc.returncode, "error")
        return Outcome(what, took, f"curl exit {proc.returncode}")
    if kind == "nc":
        proc, took = _run(ns, ["nc", "-v", "-z", "-w", f"{wait:g}", host, str(port)], bound)
        words = proc.stderr.decode(errors="replace")
        what = ("connected" if proc.returncode == 0 else "refused" if "refused" in words
                else "timeout" if "timed out" in words else "error")
        return Outcome(what, took, "" if what != "error" else words.strip()[-80:])
    if kind in ("tcp", "udp"):
        proc, _ = _run(ns, [sys.executable, "-c", SOCK_PROBE, host, kind, str(port),
                            str(wait)], bound)
        what, took, detail = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        return Outcome(what, took, detail)
    if kind == "ping":
        proc, took = _run(ns, ["ping", "-n", "-c", "1", "-W", f"{wait:g}",
                               *(["-I", src] if src else []), host], bound)
        text = proc.stdout.decode(errors="replace")
        if "time=" in text:
            return Outcome("replied", took)
        m = re.search(r"From (\S+) icmp_seq=\d+ (.*Unreachable)", text)
        if m:
            return Outcome("unreachable", took, f"{m.group(2)} from {m.group(1)}")
        return Outcome("timeout", took)
    raise ValueError(f"unknown probe kind {kind!r}")


class AppNet:
    """Both setups (see the module docstring); ``options`` is the firewall's dict."""

    def __init__(self, topo: Topology, tag: str, tmp: Path, options: dict[str, Any]):
        self.topo, self.tag, self.tmp, self.options = topo, tag, tmp, options
        names = ("o", "r", "i", "o2", "b", "i2")
        self.ns = {n: f"{tag}-{n}" for n in names}
        for n in names:
            topo.netns(self.ns[n])
            topo.sysctl("net.ipv6.conf.all.disable_ipv6", "1", self.ns[n])
            topo.sysctl("net.ipv6.conf.default.disable_ipv6", "1", self.ns[n])
        self._veth("o", "eth0", "r", "out0")
        self._veth("r", "in0", "i", "eth0")
        self._veth("o2", "eth0", "b", "uplink")
        self._veth("b", "guest", "i2", "eth0")
        r = self.ns["r"]
        for key, value in (("net.ipv4.ip_forward", "1"),
                           ("net.ipv4.icmp_ratelimit", "0"),
                           ("net.ipv4.icmp_msgs_per_sec", "100000"),
                           ("net.ipv4.icmp_msgs_burst", "100000")):
            topo.sysctl(key, value, r)
        self._addr(r, "out0", f"{R_OUT4}/24")
        self._addr(r, "in0", f"{R_IN4}/24")
        for o in ("o", "o2"):
            for a in (OUT4, OUT4B, OUT4C):
                self._addr(self.ns[o], "eth0", f"{a}/24")
        for i in ("i", "i2"):
            self._addr(self.ns[i], "eth0", f"{IN4}/24")
        ip("-n", self.ns["o"], "route", "add", "default", "via", R_OUT4)
        ip("-n", self.ns["i"], "route", "add", "default", "via", R_IN4)
        ip("-n", self.ns["o2"], "route", "add", "10.90.2.0/24", "dev", "eth0")
        ip("-n", self.ns["i2"], "route", "add", "10.90.1.0/24", "dev", "eth0")
        self.ruleset = compile_nft(options, "out0", "in0")
        topo.run(r, ["nft", "-f", "-"], input=self.ruleset.encode())
        for key, value in sysctls(options).items():
            topo.run(r, ["sysctl", "-qw", f"{key}={value}"])
        self.bridge: NsVtl | None = None

    def _veth(self, n1: str, dev1: str, n2: str, dev2: str) -> None:
        ip("-n", self.ns[n1], "link", "add", dev1, "type", "veth", "peer", "name", dev2,
           "netns", self.ns[n2])
        ip("-n", self.ns[n1], "link", "set", dev1, "up")
        ip("-n", self.ns[n2], "link", "set", dev2, "up")

    @staticmethod
    def _addr(ns: str, dev: str, cidr: str) -> None:
        ip("-n", ns, "addr", "add", cidr, "dev", dev)

    def sides(self) -> dict[str, tuple[str, str]]:
        """Side name -> (outside namespace, inside namespace)."""
        return {"kernel": (self.ns["o"], self.ns["i"]), "vtl": (self.ns["o2"], self.ns["i2"])}

    def serve(self, http_port: int, tcp_ports: list[int], udp_ports: list[int],
              outside_http: int) -> None:
        """httpsha on the inside hosts' ``http_port`` and the outside hosts' ``outside_http``,
        TCP listeners on ``tcp_ports`` and UDP echoes on ``udp_ports`` inside."""
        for out_ns, in_ns in self.sides().values():
            self.topo.spawn(in_ns, [sys.executable, HTTPSHA, IN4, str(http_port)])
            self.topo.spawn(in_ns, [sys.executable, "-c", SERVERS,
                                    ",".join(map(str, tcp_ports)), ",".join(map(str, udp_ports))])
            self.topo.spawn(out_ns, [sys.executable, HTTPSHA, OUT4, str(outside_http)])
        for out_ns, in_ns in self.sides().values():
            self.topo.wait_tcp(in_ns, IN4, http_port)
            for p in tcp_ports:
                self.topo.wait_tcp(in_ns, "0.0.0.0", p)
            self.topo.wait_tcp(out_ns, OUT4, outside_http)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                bound = self.topo.run(in_ns, ["ss", "-lunH"], check=False).stdout
                if all(f":{p} " in bound for p in udp_ports):
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"UDP echoes {udp_ports} not bound in {in_ns}")

    def start(self, timeout: float = 20) -> NsVtl:
        """Start the bridge with the firewall, then have each inside host ping the outside
        once (the bridge learns the guest's MAC; both sides' neighbour caches warm up)."""
        svc = {"use": "firewall", **self.options}
        path = self.tmp / f"{self.tag}-bridge.toml"
        path.write_text(config_toml(f"{self.tag}b", "guest", "uplink", [svc]))
        self.bridge = NsVtl(self.ns["b"], path)
        self.bridge.wait_ready(timeout)
        for side, (_, in_ns) in self.sides().items():
            got = probe(in_ns, "ping", OUT4, wait=3)
            if got.what != "replied":
                raise AssertionError(f"{side}: the inside host cannot ping out: {got}")
        return self.bridge

    def close(self) -> None:
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            bridge.stop()


def both(net: AppNet, where: str, kind: str, host: str, **kw: Any) -> dict[str, Outcome]:
    """Run :func:`probe` from each side's ``where`` host ("outside" or "inside") at once."""
    res: dict[str, Outcome] = {}
    errors: list[BaseException] = []

    def one(side: str, ns: str) -> None:
        try:
            res[side] = probe(ns, kind, host, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(side, ns[0 if where == "outside" else 1]))
               for side, ns in net.sides().items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    if len(res) != 2:
        raise AssertionError(f"a probe did not finish: {res}")
    return res


@contextmanager
def open_appnet(tmp: Path, options: dict[str, Any]) -> Iterator[AppNet]:
    """An :class:`AppNet` with a fresh tag (bridge not started), torn down on exit."""
    tag = "fwa" + secrets.token_hex(2)
    topo = Topology(tag)
    net: AppNet | None = None
    try:
        net = AppNet(topo, tag, tmp, options)
        yield net
    finally:
        if net is not None:
            net.close()
        topo.close()
