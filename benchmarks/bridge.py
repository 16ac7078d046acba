#!/usr/bin/env python3
"""Benchmark: VTL with an empty chain against the Linux kernel bridge, same run.

The same two namespaces (guest 10.197.0.1, peer 10.197.0.2) are joined twice:
once by a kernel bridge (guest veth + peer veth enslaved to a `bridge`), once by
`vtl run` (guest NIC = VTL's TAP with virtio-net header, peer veth on an
AF_PACKET uplink). For each it measures iperf3 TCP throughput both ways, a
flood of 64-byte UDP datagrams (packets per second that reached the peer's NIC,
and of those the ones iperf3's server read), and the ping RTT median, then
prints both and the ratio. Needs root; cleans up after itself.

    .venv/bin/python benchmarks/bridge.py [--seconds 5] [--repeat 3] [--services FILE.toml]
        [--against empty] [--uplink pcap] [--qdisc-bypass on|off] [--matrix] [--latency]

``--latency`` measures only the ping RTT, through VTL's empty chain unpinned, pinned to
one CPU (``[bridge] cpus``), with busy polling (``busy_poll_us``) and with both, against
the kernel bridge, ``--repeat`` sittings alternating.

``--matrix`` measures every pairing of port kinds in one sitting: the TAP with a packet
uplink, the TAP with a pcap uplink, and two packet ports (a veth into the guest's
namespace on the guest side, as a WAN bridge between two interfaces), each against the
kernel bridge; then a one-connection download through ``pep`` and through ``socks``
(with danted) against the empty chain (the download cells of benchmarks/pep.py and
benchmarks/socks.py).

``--against empty`` compares the chain in ``--services`` with VTL's empty chain
instead of the kernel bridge (what a service costs), e.g. ``keepalive`` tracking:
``printf '[[services]]\nuse = "keepalive"\n' > /tmp/ka.toml``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vtl.bridge.topology import Topology, ip, parse_ping_rtts, require_root

G, P = "10.197.0.1", "10.197.0.2"


def iperf_tcp(topo: Topology, gns: str, seconds: int, reverse: bool) -> float:
    args = ["iperf3", "-c", P, "-p", "5301", "-t", str(seconds), "-O", "1", "-J"]
    if reverse:
        args.append("-R")
    for attempt in range(5):
        out = json.loads(topo.run(gns, args, timeout=seconds + 30).stdout)
        # iperf3's server closes its listening socket after each test and opens a new one:
        # a client right behind the last test's slow end (a 10 Mbit/s netem) is refused
        if "unable to connect" not in out.get("error", "") or attempt == 4:
            break
        time.sleep(1)
    if "error" in out:
        raise RuntimeError(f"iperf3 {' '.join(args[1:])}: {out['error']}")
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


def rx_packets(topo: Topology, ns: str) -> int:
    """Frames the peer's NIC (``eth0`` in ``ns``) has received so far."""
    out = topo.run(ns, ["ip", "-s", "-j", "link", "show", "eth0"]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def iperf_udp64(topo: Topology, gns: str, pns: str, seconds: int) -> tuple[float, float]:
    """A flood of 64-byte UDP datagrams (``-b 0``): (kpps forwarded, kpps received).

    Forwarded counts the frames that reached the peer's NIC, what RFC 2544 counts at a
    device's output; received counts what iperf3's server read from its socket. The two
    part on a small machine: the server shares the CPUs with the sender and the bridge,
    and what its socket cannot take is dropped there (UdpRcvbufErrors), not in the bridge.
    """
    before = rx_packets(topo, pns)
    out = topo.run(gns, ["iperf3", "-c", P, "-p", "5301", "-u", "-l", "64", "-b", "0",
                         "-t", str(seconds), "-J"], timeout=seconds + 30).stdout
    forwarded = rx_packets(topo, pns) - before
    s = json.loads(out)["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    return forwarded / s["seconds"] / 1e3, received / s["seconds"] / 1e3


def ping_median(topo: Topology, gns: str) -> float:
    out = topo.run(gns, ["ping", "-c", "200", "-i", "0.005", "-W", "1", P], timeout=60,
                   check=False).stdout
    rtts = parse_ping_rtts(out)
    return statistics.median(rtts) * 1000 if rtts else float("nan")


def measure(topo: Topology, gns: str, pns: str, seconds: int,
            repeat: int) -> dict[str, float]:
    topo.run(gns, ["ping", "-c", "3", "-i", "0.2", "-W", "2", P], timeout=20)
    runs: dict[str, list[float]] = {"tcp_g2p": [], "tcp_p2g": [], "udp64_fwd_kpps": [],
                                    "udp64_kpps": [], "rtt_us": []}
    for _ in range(repeat):
        runs["tcp_g2p"].append(iperf_tcp(topo, gns, seconds, False))
        runs["tcp_p2g"].append(iperf_tcp(topo, gns, seconds, True))
        forwarded, received = iperf_udp64(topo, gns, pns, seconds)
        runs["udp64_fwd_kpps"].append(forwarded)
        runs["udp64_kpps"].append(received)
        runs["rtt_us"].append(ping_median(topo, gns))
    return {k: statistics.median(v) for k, v in runs.items()}


@contextlib.contextmanager
def kernel_topology(tag: str) -> Iterator[tuple[Topology, str, str]]:
    """The two namespaces joined by a Linux bridge: (topology, guest ns, peer ns)."""
    with Topology(tag) as topo:
        gns, pns = topo.netns(f"{tag}-g"), topo.netns(f"{tag}-p")
        ip("link", "add", f"{tag}br", "type", "bridge")
        topo.links.append(f"{tag}br")
        topo.veth(f"{tag}g", "eth0", gns)
        topo.veth(f"{tag}p", "eth0", pns)
        for port in (f"{tag}g", f"{tag}p"):
            ip("link", "set", port, "master", f"{tag}br")
        ip("link", "set", f"{tag}br", "up")
        topo.addr(gns, "eth0", f"{G}/24")
        topo.addr(pns, "eth0", f"{P}/24")
        yield topo, gns, pns


def kernel_bridge(tag: str, seconds: int, repeat: int) -> dict[str, float]:
    with kernel_topology(tag) as (topo, gns, pns):
        topo.spawn(pns, ["iperf3", "-s", "-B", P, "-p", "5301"])
        topo.wait_tcp(pns, P, 5301)
        return measure(topo, gns, pns, seconds, repeat)


def vtl_bridge(tag: str, seconds: int, repeat: int, services: str,
               uplink: str = "packet", uplink_extra: str = "", guest: str = "tap",
               bridge_extra: str = "", only_rtt: bool = False) -> dict[str, float]:
    """``guest``: "tap" (VTL's TAP is the guest's NIC, as a VM's) or "packet" (a veth
    into the guest's namespace, attached with AF_PACKET: the WAN bridge's pairing)."""
    with Topology(tag) as topo, tempfile.TemporaryDirectory() as tmp:
        gns, pns = topo.netns(f"{tag}-g"), topo.netns(f"{tag}-p")
        topo.veth(f"{tag}u", "eth0", pns)
        topo.addr(pns, "eth0", f"{P}/24")
        if guest == "packet":
            topo.veth(f"{tag}g", "eth0", gns)
            guest_port = f'kind = "packet"\nifname = "{tag}g"'
        else:
            guest_port = f'kind = "tap"\nifname = "{tag}t"\nnetns = "{gns}"'
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(f"""[bridge]
name = "bench"
{bridge_extra}
[ports.guest]
{guest_port}
[ports.uplink]
kind = "{uplink}"
ifname = "{tag}u"
{uplink_extra}
{services}""")
        vtl = topo.spawn(None, [sys.executable, "-m", "vtl.bridge.cli", "run", str(cfg)],
                         stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        assert vtl.stderr is not None
        os.set_blocking(vtl.stderr.fileno(), False)
        seen = b""
        while b" ready" not in seen:
            if time.monotonic() > deadline or vtl.poll() is not None:
                raise SystemExit(f"vtl run did not start: {seen.decode(errors='replace')}")
            seen += vtl.stderr.read() or b""
            time.sleep(0.05)
        topo.addr(gns, "eth0" if guest == "packet" else f"{tag}t", f"{G}/24")
        if only_rtt:
            return rtt_only(topo, gns, repeat)
        topo.spawn(pns, ["iperf3", "-s", "-B", P, "-p", "5301"])
        topo.wait_tcp(pns, P, 5301)
        return measure(topo, gns, pns, seconds, repeat)


def rtt_only(topo: Topology, gns: str, repeat: int) -> dict[str, float]:
    topo.run(gns, ["ping", "-c", "3", "-i", "0.2", "-W", "2", P], timeout=20)
    return {"rtt_us": statistics.median(ping_median(topo, gns) for _ in range(repeat))}


LATENCY = [("unpinned", ""), ("pinned (cpus = [1])", "cpus = [1]"),
           ("busy_poll_us = 10000", "busy_poll_us = 10000"),
           ("busy poll, pinned", "busy_poll_us = 10000\ncpus = [1]")]


def latency(tag: str, repeat: int) -> None:
    """Ping RTT through VTL (empty chain) pinned and unpinned, with and without busy
    polling, against the kernel bridge; the sittings alternate ``repeat`` times."""
    rows: dict[str, list[float]] = {"kernel bridge": []}
    for _ in range(repeat):
        with kernel_topology(tag) as (topo, gns, _pns):
            rows["kernel bridge"].append(rtt_only(topo, gns, 1)["rtt_us"])
        for label, extra in LATENCY:
            rows.setdefault(label, []).append(
                vtl_bridge(tag, 1, 1, "", bridge_extra=extra, only_rtt=True)["rtt_us"])
    kernel = statistics.median(rows["kernel bridge"])
    print(f"\n{'ping RTT, 200 pings 5 ms apart':32} {'median (us)':>12} {'added (us)':>11}"
          "   runs")
    for label, runs in rows.items():
        med = statistics.median(runs)
        added = "" if label == "kernel bridge" else f"{med - kernel:11.1f}"
        print(f"{label:32} {med:12.1f} {added:>11}   {', '.join(f'{r:.0f}' for r in runs)}")
    print(f"\n(median of {repeat} sittings; {os.cpu_count()} CPUs)")


PAIRINGS = [("tap", "packet"), ("tap", "pcap"), ("packet", "packet")]


def matrix(tag: str, seconds: int, repeat: int) -> None:
    """Every pairing of port kinds against the kernel bridge, in one sitting."""
    kernel = kernel_bridge(tag, seconds, repeat)
    runs = {f"{g}<->{u}": vtl_bridge(tag, seconds, repeat, "", u, guest=g)
            for g, u in PAIRINGS}
    print(f"\n{'measure':36} {'kernel bridge':>14}" + "".join(f"{k:>22}" for k in runs))
    for key, label in ROWS:
        cells = "".join(f"{r[key]:>12.2f} ({r[key] / kernel[key]:5.2f}x)" for r in runs.values())
        print(f"{label:36} {kernel[key]:14.2f}{cells}")
    print(f"\n(median of {repeat} runs of {seconds} s each; {os.cpu_count()} CPUs; "
          "in brackets: of the kernel bridge)")
    terminating(seconds, repeat)


def terminating(seconds: int, repeat: int) -> None:
    """One-connection downloads through the TCP-terminating services against the empty
    chain of the same run (benchmarks/pep.py and benchmarks/socks.py, one cell each), with
    the bridge and the guest's stack spread by the scheduler and pinned apart
    (``pep.PLACEMENTS``)."""
    import pep
    import socks

    print(f"\n{'download, 1 connection':36} {'empty chain':>14} {'service':>10} {'ratio':>7}"
          "   (Gbit/s)")
    for placement in pep.PLACEMENTS:
        p = pep.run(seconds, repeat, False, only=("down1",), placement=placement)
        s = socks.run(seconds, repeat, 1, False, only=("down1",), placement=placement)
        for name, empty, svc in (("pep", p["empty"]["down1"]["gbps"], p["pep"]["down1"]["gbps"]),
                                 ("socks (danted)", s["empty"]["down1"]["value"],
                                  s["socks"]["down1"]["value"])):
            e, v = float(empty), float(svc)
            print(f"{name + ', ' + placement:36} {e:14.2f} {v:10.2f} {v / e:7.2f}", flush=True)


ROWS = [
    ("tcp_g2p", "iperf3 TCP guest->peer (Gbit/s)"),
    ("tcp_p2g", "iperf3 TCP peer->guest (Gbit/s)"),
    ("udp64_fwd_kpps", "UDP 64 B flood forwarded (kpps)"),
    ("udp64_kpps", "  of which iperf3 received (kpps)"),
    ("rtt_us", "ping RTT median (us)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--services", type=Path, default=None,
                    help="TOML file with [[services]] tables for the VTL run (default: empty)")
    ap.add_argument("--against", choices=("kernel", "empty"), default="kernel",
                    help="the reference: the kernel bridge, or VTL with an empty chain")
    ap.add_argument("--uplink", choices=("packet", "pcap"), default="packet",
                    help="VTL's uplink port kind")
    ap.add_argument("--latency", action="store_true",
                    help="only ping RTT: pinned/unpinned, with/without busy polling")
    ap.add_argument("--matrix", action="store_true",
                    help="every pairing of port kinds (tap/packet, tap/pcap, packet/packet) "
                    "against the kernel bridge")
    ap.add_argument("--qdisc-bypass", choices=("default", "on", "off"), default="default",
                    help="the packet uplink's qdisc_bypass (default: its default)")
    args = ap.parse_args()
    require_root("the benchmark")
    services = args.services.read_text() if args.services else ""
    tag = f"vb{os.getpid() % 10000:04d}"
    extra = "" if args.qdisc_bypass == "default" else \
        f"qdisc_bypass = {'true' if args.qdisc_bypass == 'on' else 'false'}"
    if args.matrix:
        return matrix(tag, args.seconds, args.repeat)
    if args.latency:
        return latency(tag, args.repeat)
    if args.against == "kernel":
        kernel = kernel_bridge(tag, args.seconds, args.repeat)
        names = ("kernel bridge", "VTL", "VTL/kernel")
    else:
        kernel = vtl_bridge(tag, args.seconds, args.repeat, "", args.uplink, extra)
        names = ("empty chain", "services", "ratio")
    vtl = vtl_bridge(tag, args.seconds, args.repeat, services, args.uplink, extra)
    print(f"\n{'measure':36} {names[0]:>14} {names[1]:>10} {names[2]:>11}")
    for key, label in ROWS:
        k, v = kernel[key], vtl[key]
        ratio = v / k if k else float("nan")
        print(f"{label:36} {k:14.2f} {v:10.2f} {ratio:11.2f}")
    added = vtl["rtt_us"] - kernel["rtt_us"]
    print(f"{'added median RTT (us)':36} {'':14} {added:10.1f}")
    print(f"\n(median of {args.repeat} runs of {args.seconds} s each; "
          f"{os.cpu_count()} CPUs; higher is better except RTT)")


if __name__ == "__main__":
    main()
