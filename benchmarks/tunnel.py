#!/usr/bin/env python3
"""Benchmark: subnet tunneling between two sites, against the routed path and the kernel's vxlan.

The topology is ``tests/integration/tunnelnet.py`` without WAN delay: VM-A
(10.61.1.10) behind router A, VM-B (10.62.2.20) behind router B, a bridge host
per site with a fast-path link between them. Three ways across, measured in
the same run on the same namespaces:

1. ``empty``: both bridges with an empty chain; VM-A's packets take the routed
   slow path (VM-A -> bridge A -> router A -> router B -> bridge B -> VM-B);
2. ``tunnel``: both bridges with the ``tunnel`` service (VXLAN over the fast path)
   and its default ``datapath = "kernel"`` (the bridge's vxlan device encapsulates
   and segments whole GSO frames);
3. ``socket``: the same with ``datapath = "socket"`` (the service encapsulates each
   segment and sends it through a UDP socket);
4. ``kernel``: no VTL; each VM's eth0 (MTU 1450) is a veth into a kernel bridge
   with a Linux ``vxlan`` device over the fast path (the kernel's own VXLAN).

For each: iperf3 TCP throughput VM-A -> VM-B and VM-B -> VM-A (``-R``), and the
ping RTT median; medians of ``--repeat`` runs. Ratio columns: tunnel/empty and
tunnel/kernel (issue 14's goal: at least 0.5 and 0.3 for TCP), socket/empty. Needs root;
removes everything it made.

With ``--guest-offloads off`` the bridges' guest TAPs are opened without virtio-net
headers (``vnet_hdr = false``): the VMs' kernels then segment and checksum
their TCP themselves and VTL sees only wire-size frames (the alternative to
cutting GSO frames in Python before encapsulation).

    .venv/bin/python benchmarks/tunnel.py [--seconds 5] [--repeat 3] [--ipv6]
        [--guest-offloads on|off] [--configs empty,tunnel,socket,kernel]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "integration")]

import tunnelnet  # noqa: E402
from tunnelnet import VM_B, VM_B6, TunnelNet, open_sites  # noqa: E402
from vtl.bridge.topology import parse_ping_rtts, require_root  # noqa: E402

PORT = 5301
CONFIGS = ("empty", "tunnel", "socket", "kernel")


def iperf_tcp(net: TunnelNet, dest: str, seconds: int, reverse: bool) -> float:
    args = ["iperf3", "-c", dest, "-p", str(PORT), "-t", str(seconds), "-O", "1", "-J"]
    if reverse:
        args.append("-R")
    out = net.vm_a(args, timeout=seconds + 30).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_median_us(net: TunnelNet, dest: str) -> float:
    v6 = ["-6"] if ":" in dest else []
    out = net.vm_a(["ping", *v6, "-c", "100", "-i", "0.01", "-W", "1", dest], timeout=60,
                   check=False).stdout
    rtts = parse_ping_rtts(out)
    return statistics.median(rtts) * 1000 if rtts else float("nan")


def setup(net: TunnelNet, config: str) -> None:
    if config == "kernel":
        net.kernel_vxlan("a")
        net.kernel_vxlan("b")
        net.warm_up()
    else:
        net.chains(tunnel=config != "empty",
                   **({"datapath": "socket"} if config == "socket" else {}))


def measure(net: TunnelNet, config: str, seconds: int, repeat: int,
            ipv6: bool) -> dict[str, float]:
    setup(net, config)
    dests = [("", VM_B)] + ([("6", VM_B6)] if ipv6 else [])
    server = net.topo.spawn(net.vmb, ["iperf3", "-s", "-p", str(PORT)])
    try:
        net.topo.wait_tcp(net.vmb, "*", PORT)
        for _, dest in dests:  # resolve the far side's MACs (through the tunnel) first
            v6 = ["-6"] if ":" in dest else []
            net.vm_a(["ping", *v6, "-c", "3", "-i", "0.2", "-W", "2", dest], timeout=20)
        runs: dict[str, list[float]] = {}
        for _ in range(repeat):
            for suffix, dest in dests:
                runs.setdefault("a2b" + suffix, []).append(iperf_tcp(net, dest, seconds, False))
                runs.setdefault("b2a" + suffix, []).append(iperf_tcp(net, dest, seconds, True))
                runs.setdefault("rtt" + suffix, []).append(ping_median_us(net, dest))
    finally:
        net.topo.stop_proc(server)
    if config in ("tunnel", "socket"):
        tunnel = net.counters("a")["services"]["tunnel"]
        print(f"  bridge A's tunnel: segmented={tunnel.get('segmented', 0)} "
              f"mss_clamped={tunnel.get('mss_clamped', 0)} "
              f"too_big_sent={tunnel.get('too_big_sent', 0)} "
              f"send_failed={tunnel.get('send_failed', 0)}", file=sys.stderr)
    return {k: statistics.median(v) for k, v in runs.items()}


ROWS = [
    ("a2b", "iperf3 TCP VM-A -> VM-B (Gbit/s)"),
    ("b2a", "iperf3 TCP VM-B -> VM-A (Gbit/s)"),
    ("rtt", "ping RTT median (us)"),
    ("a2b6", "iperf3 TCP v6 VM-A -> VM-B (Gbit/s)"),
    ("b2a6", "iperf3 TCP v6 VM-B -> VM-A (Gbit/s)"),
    ("rtt6", "ping6 RTT median (us)"),
]


def guest_offloads_off() -> None:
    """Every bridge config tunnelnet writes from now on opens the guest TAP without
    virtio-net headers (no checksum or TSO offloads from the VM)."""
    config_toml = tunnelnet.config_toml

    def without_vnet(*args: Any, **kw: Any) -> str:
        return config_toml(*args, **kw).replace('kind = "tap"\n',
                                                'kind = "tap"\nvnet_hdr = false\n', 1)

    tunnelnet.config_toml = without_vnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ipv6", action="store_true", help="also measure over IPv6")
    ap.add_argument("--guest-offloads", choices=("on", "off"), default="on",
                    help="off: the guest TAPs without virtio-net headers (vnet_hdr = false), "
                         "so the VMs' kernels segment and checksum; default on")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="which of empty,tunnel,socket,kernel to measure (default: all)")
    args = ap.parse_args()
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    require_root("the benchmark")
    if args.guest_offloads == "off":
        guest_offloads_off()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            open_sites(Path(tmp), wan_delay_ms=0, fast_tx_csum=True) as net:
        for config in configs:
            print(f"measuring {config}...", file=sys.stderr)
            results[config] = measure(net, config, args.seconds, args.repeat, args.ipv6)
    nan: dict[str, float] = {}
    e, t, so, k = (results.get(c, nan) for c in CONFIGS)
    cols = ("empty/routed", "tunnel", "socket", "kernel vxlan")
    print(f"\n{'measure':38} " + " ".join(f"{c:>12}" for c in cols)
          + f" {'tun/empty':>9} {'tun/kernel':>10} {'sock/empty':>10}")

    def ratio(a: dict[str, float], b: dict[str, float], key: str) -> float:
        return a[key] / b[key] if a.get(key) and b.get(key) else float("nan")

    for key, label in ROWS:
        if not any(key in r for r in results.values()):
            continue
        vals = " ".join(f"{r.get(key, float('nan')):12.2f}" for r in (e, t, so, k))
        print(f"{label:38} {vals} {ratio(t, e, key):9.2f} {ratio(t, k, key):10.2f} "
              f"{ratio(so, e, key):10.2f}")
    print(f"\n(median of {args.repeat} runs of {args.seconds} s each; {os.cpu_count()} CPUs; "
          f"guest TAP offloads {args.guest_offloads}; no WAN delay; higher is better except "
          "RTT. Goal of issue 14: tunnel at least 0.5 of the empty chain and 0.3 of the "
          "kernel vxlan path for TCP)")


if __name__ == "__main__":
    main()
