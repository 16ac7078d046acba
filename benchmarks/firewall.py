#!/usr/bin/env python3
"""Benchmark: the ``firewall`` service's per-frame costs, and TCP through it vs the empty chain.

Section ``frame`` (no root): the service's ``process`` on prebuilt frames, one
thread, with 10 and with 1,000 rules (none of which matches the measured flow
before the last, the worst case for a new flow):

- an established TCP flow: a 1,500-byte segment and a 64 KB GSO frame (the
  lookup, the window tracking, the established accept);
- new flows: a SYN of a fresh 5-tuple each time, accepted by the last rule and
  confirmed into the table (``max_entries`` large enough);
- a one-way UDP flow's next datagram (state ``new``, its first one accepted by the
  default: the remembered decision);
- against an empty service's ``process`` called the same way.

Section ``throughput`` (root): ``benchmarks/bridge.py --against empty`` with a
chain of one ``firewall`` (``default_in = "drop"``, 10 rules, the benchmark's
own traffic accepted as established replies of the guest's connections): TCP
both ways, 64-byte UDP and ping RTT, against VTL's empty chain in the same run.

Goal (issue 16): TCP through the firewall at least 80% of the empty chain's.

    .venv/bin/python benchmarks/firewall.py [--sections frame throughput] [--repeat 5]
        [--count 20000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from microbench import time_us
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from vtl.services.firewall import Firewall

from vtl import Direction, Frame, Service, VnetHeader
from vtl.testing import FakeContext

HERE = Path(__file__).resolve().parent
IN, OUT = Direction.TO_GUEST, Direction.TO_UPLINK
G, F = "10.80.0.2", "10.90.0.9"


def _rules(n: int) -> list[dict[str, object]]:
    """``n`` rules: ``n - 1`` that match nothing measured, then one that accepts TCP in."""
    filler = [{"dir": "in", "proto": "tcp", "dport": [10_000 + i], "saddr": ["192.0.2.0/24"],
               "action": "drop"} for i in range(n - 1)]
    return [*filler, {"dir": "in", "proto": "tcp", "action": "accept"}]


def _service(n_rules: int) -> Firewall:
    fw = Firewall(Firewall.Options(default_in="drop", rules=_rules(n_rules),
                                   max_entries=2_000_000), FakeContext("firewall"))
    fw.start(0.0)
    return fw


def _tcp(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int,
         payload: bytes = b"") -> bytearray:
    return bytearray(bytes(Ether() / IP(src=src, dst=dst) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535) / payload))


def section_frame(count: int, repeat: int) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    empty = Service(None, FakeContext("empty"))
    small = _tcp(F, G, 80, 40000, "A", 5001, 1001, b"x" * 1448)
    small2 = _tcp(F, G, 80, 40000, "A", 5001 + 1448, 1001, b"x" * 1448)

    def baseline(n: int) -> None:
        f = Frame(small)
        for _ in range(n):
            empty.process(f, IN, 1.0)

    base = time_us(baseline, count, repeat)
    ports = iter(range(1, 10**9))
    for n_rules in (10, 1000):
        fw = _service(n_rules)
        p = fw.process
        # the guest's connection out, then the far side's data toward it
        for frame, d in ((_tcp(G, F, 40000, 80, "S", 1000, 0), OUT),
                         (_tcp(F, G, 80, 40000, "SA", 5000, 1001), IN),
                         (_tcp(G, F, 40000, 80, "A", 1001, 5001), OUT)):
            p(Frame(frame), d, 0.5)
        big = _tcp(F, G, 80, 40000, "A", 5001, 1001, b"y" * 64_000)
        big2 = _tcp(F, G, 80, 40000, "A", 5001 + 1448, 1001, b"y" * 64_000)
        gso = VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                         csum_offset=16)

        # two in-window segments in turn (one again and again would be a retransmission,
        # which the tracker counts and times differently)
        def established_small(n: int, fw: Firewall = fw) -> None:
            a, b = Frame(small), Frame(small2)
            for _ in range(n // 2):
                fw.process(a, IN, 1.0)
                fw.process(b, IN, 1.0)

        def established_gso(n: int, fw: Firewall = fw, big: bytearray = big, big2: bytearray = big2,
                            gso: VnetHeader = gso) -> None:
            a, b = Frame(big, gso), Frame(big2, gso)
            for _ in range(n // 2):
                fw.process(a, IN, 1.0)
                fw.process(b, IN, 1.0)

        syns = []  # prebuilt: only the service is timed
        for _ in range(count // 10 * repeat):
            i = next(ports)
            syns.append(_tcp(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", G,
                             1024 + i % 60000, 22, "S", i, 0))
        todo = iter(syns)

        def new_flows(n: int, fw: Firewall = fw, todo: Iterator[bytearray] = todo) -> None:
            for _ in range(n):
                fw.process(Frame(next(todo)), IN, 1.0)

        dgram = bytearray(bytes(Ether() / IP(src=G, dst=F) / UDP(sport=40001, dport=5201)
                                / (b"u" * 22)))  # a 64-byte frame, one way as iperf3 -u
        p(Frame(dgram), OUT, 0.5)  # the first: through the rules (default_out accepts)

        def udp_next(n: int, fw: Firewall = fw, dgram: bytearray = dgram) -> None:
            f = Frame(dgram)
            for _ in range(n):
                fw.process(f, OUT, 1.0)

        rows += [
            (f"{n_rules} rules: established, 1500-byte segment", time_us(
                established_small, count, repeat) - base),
            (f"{n_rules} rules: established, 64 KB GSO frame", time_us(
                established_gso, count, repeat) - base),
            (f"{n_rules} rules: new flow (SYN, last rule accepts)",
             time_us(new_flows, count // 10, repeat) - base),
            (f"{n_rules} rules: UDP, a one-way flow's next datagram",
             time_us(udp_next, count, repeat) - base),
        ]
        assert fw.ctx.counters.extra.get("accepted_new", 0) > 0  # type: ignore[attr-defined]
    rows.append(("(an empty service's process, subtracted)", base))
    return rows


FW_TOML = """[[services]]
use = "firewall"
default_in = "drop"
default_out = "accept"
""" + "".join(f"""[[services.rules]]
dir = "in"
proto = "tcp"
dport = [{10_000 + i}]
action = "drop"
""" for i in range(9)) + """[[services.rules]]
dir = "in"
proto = "icmp"
icmp_type = [8]
action = "accept"
"""


def section_throughput(seconds: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "fw.toml"
        cfg.write_text(FW_TOML)
        subprocess.run([sys.executable, str(HERE / "bridge.py"), "--services", str(cfg),
                        "--against", "empty", "--seconds", str(seconds), "--repeat",
                        str(repeat)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=("frame", "throughput"),
                    default=["frame", "throughput"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if "frame" in args.sections:
        print(f"\n[frame]\n{'measure':52} {'us/frame':>9} {'frames/s':>12}")
        for label, us in section_frame(args.count, args.repeat):
            print(f"{label:52} {us:9.3f} {1e6 / us if us > 0 else float('inf'):12,.0f}")
        print(f"(median of {args.repeat} runs; one thread)")
    if "throughput" in args.sections:
        print("\n[throughput] firewall (10 rules) against the empty chain:")
        section_throughput(args.seconds, args.repeat)


if __name__ == "__main__":
    main()
