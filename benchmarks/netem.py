#!/usr/bin/env python3
"""Benchmark: does ``netem`` emulate the link it is configured for? (ScaleNet's check)

The guest (10.197.0.1, VTL's TAP) and the peer (10.197.0.2, a veth on a packet
uplink) of ``benchmarks/bridge.py``, with a chain of one ``netem``:

- **rate**: ``rate_mbit`` 10, 100, 1000 and 5000 (``queue_packets`` 1000): iperf3 TCP
  goodput guest->peer, and UDP (1,400-byte datagrams offered at 1.1x the rate)
  received, each against the rate: headers aside a link of R Mbit/s carries at
  most R x 1448/1538 of TCP payload (Ethernet preamble, FCS and gap counted, as
  netem's ``overhead_bytes`` does) and R x 1400/1470 of UDP payload;
- **delay**: ``delay_ms`` 1, 10, 50 (each way): the round trip of a 64-byte UDP echo,
  timed in the guest to the microsecond (ping prints whole milliseconds over 100 ms),
  against twice the delay plus the empty chain's round trip measured the same way; and,
  as the floor of what a sleeping thread can do on the machine, the same echo through
  the empty chain from a server that sleeps twice the delay before it answers.

    .venv/bin/python benchmarks/netem.py [--seconds 5] [--repeat 3] [--rates 10 100 ...]
        [--delays 1 10 50]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from vtl.bridge.topology import Topology, require_root

import bridge as B

HERE = Path(__file__).resolve()
ECHO_PORT = 7007


def echo_server(sleep_ms: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((B.P, ECHO_PORT))
        while True:
            data, addr = s.recvfrom(2048)
            if sleep_ms:
                time.sleep(sleep_ms / 1000)
            s.sendto(data, addr)


def echo_client(count: int) -> None:
    """Median round trip in microseconds of ``count`` echoes, 20 ms apart. The answer is
    waited for awake (a non-blocking socket read again and again, for at most 2 s): a
    process woken from a long sleep comes back up to a millisecond late here, which
    would be measured as the link's."""
    rtts = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for i in range(count):
            t = time.perf_counter()
            s.sendto(i.to_bytes(4, "big") + bytes(60), (B.P, ECHO_PORT))
            while time.perf_counter() - t < 2.0:
                try:
                    if int.from_bytes(s.recv(2048)[:4], "big") == i:
                        rtts.append((time.perf_counter() - t) * 1e6)
                        break
                except BlockingIOError:
                    pass
            time.sleep(0.02)
    print(json.dumps(statistics.median(rtts) if rtts else float("nan")))


def rtt_us(topo: Topology, gns: str, count: int = 100) -> float:
    out = topo.run(gns, [sys.executable, str(HERE), "--echo-client", str(count)],
                   timeout=count * 2.1 + 30).stdout
    return float(json.loads(out))


def tcp_mbit(topo: Topology, gns: str, seconds: int) -> float:
    return B.iperf_tcp(topo, gns, seconds, False) * 1000


def udp_mbit(topo: Topology, gns: str, seconds: int, rate: float) -> float:
    out = topo.run(gns, ["iperf3", "-c", B.P, "-p", "5301", "-u", "-l", "1400", "-b",
                         f"{rate * 1.1}M", "-t", str(seconds), "-J"],
                   timeout=seconds + 30).stdout
    end = json.loads(out)["end"]["sum"]
    return end["bytes"] * 8 * (1 - end["lost_percent"] / 100) / end["seconds"] / 1e6


def with_netem(options: str, seconds: int, repeat: int, what: str, rate: float = 0.0,
               echo_sleep_ms: float = 0.0) -> float:
    """The median of ``repeat`` measurements of ``what`` through ``netem`` with options;
    ``echo_sleep_ms``: the echo server sleeps that long before it answers (the floor:
    how late a thread that sleeps wakes up on this machine; the kernel's netem, the
    natural reference, is not built into this kernel)."""
    services = f'[[services]]\nuse = "netem"\n{options}\n' if options else ""
    got: list[float] = []

    def measure(topo: Topology, gns: str, pns: str, _s: int, _r: int) -> dict[str, float]:
        if what == "rtt":
            topo.spawn(pns, [sys.executable, str(HERE), "--echo-server", str(echo_sleep_ms)])
            time.sleep(0.5)
        topo.run(gns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", B.P], timeout=20)
        for _ in range(repeat):
            got.append(rtt_us(topo, gns) if what == "rtt" else tcp_mbit(topo, gns, seconds)
                       if what == "tcp" else udp_mbit(topo, gns, seconds, rate))
        return {}

    saved = B.measure
    B.measure = measure
    try:
        B.vtl_bridge(f"vn{os.getpid() % 10000:04d}", seconds, repeat, services)
    finally:
        B.measure = saved
    return statistics.median(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rates", type=float, nargs="*", default=[10, 100, 1000, 5000])
    ap.add_argument("--delays", type=float, nargs="*", default=[1, 10, 50])
    ap.add_argument("--echo-server", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--echo-client", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server is not None:
        return echo_server(args.echo_server)
    if args.echo_client:
        return echo_client(args.echo_client)
    require_root("the benchmark")
    print(f"\n[rate] {'configured':>10} {'TCP goodput':>12} {'of ceiling':>10} "
          f"{'UDP goodput':>12} {'of ceiling':>10}   (Mbit/s)")
    for rate in args.rates:
        opts = f"rate_mbit = {rate}\nqueue_packets = 1000"
        tcp = with_netem(opts, args.seconds, args.repeat, "tcp")
        udp = with_netem(opts, args.seconds, args.repeat, "udp", rate)
        tcp_ceiling, udp_ceiling = rate * 1448 / 1538, rate * 1400 / 1470
        print(f"{'':7}{rate:10.0f} {tcp:12.1f} {tcp / tcp_ceiling:10.2f} {udp:12.1f} "
              f"{udp / udp_ceiling:10.2f}")
    base = with_netem("", args.seconds, args.repeat, "rtt")
    print(f"\n[delay] {'one-way ms':>10} {'RTT ms':>10} {'expected':>10} {'error us':>9}"
          f"   (expected: twice the delay + the empty chain's {base / 1000:.3f} ms)")
    for delay in args.delays:
        rtt = with_netem(f"delay_ms = {delay}", args.seconds, args.repeat, "rtt")
        floor = with_netem("", args.seconds, args.repeat, "rtt", echo_sleep_ms=2 * delay)
        want = 2 * delay * 1000 + base
        print(f"{'':8}{delay:10.1f} {rtt / 1000:10.3f} {want / 1000:10.3f} "
              f"{rtt - want:9.0f}   (an echo server sleeping {2 * delay:g} ms instead: "
              f"error {floor - want:.0f} us)")
    print(f"\n(medians of {args.repeat} runs; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
