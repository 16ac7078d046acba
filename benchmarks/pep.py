#!/usr/bin/env python3
"""Benchmark: goodput through the `pep` service against the empty chain, same run.

Topology (all removed at the end, also on Ctrl-C or failure):

    guest netns --TAP-- vtl run --AF_PACKET-- veth --eth0-- peer netns (iperf3 -s)
                           \\--- host sockets (pep) --- veth --eth1--/

The guest (10.196.0.1) reaches the peer (10.196.0.2) through `vtl run`. With the
empty chain the guest's TCP is forwarded frame by frame to the uplink; with
``[[services]] use = "pep"`` the guest's TCP ends in VTL's virtual endpoint and
the bytes travel over host TCP sockets, which reach the peer through a second
veth from the root namespace (10.196.1.1/30 <-> 10.196.1.2/30, route to the
peer's address via it; the same idea as the tests' ``Net.host_path``, on its own
addresses so that it does not collide with integration tests running at once).

For each chain it runs iperf3 (client in the guest, server in the peer):
download (``-R``) and upload, with 1 and with 16 connections (``-P 16``), and
reports the goodput the receiving end counted (median of ``--repeat`` runs;
the chains alternate within each repetition), the ratio pep/empty, and the CPU
the bridge process used during the transfer (utime+stime from /proc, in cores).
Needs root.

    .venv/bin/python benchmarks/pep.py [--seconds 5] [--repeat 3] [--placement pinned] [--json]

``--placement pinned`` runs the bridge on CPU 0 and steers the guest namespace's receive
processing to the last CPU (``[bridge] cpus``, ``[ports.guest] rx_cpus``), both chains alike:
docs/operating.md, "Throughput of split connections".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from vtl.bridge.topology import Topology, ip, require_root

from vtl.errors import SetupError

G, P = "10.196.0.1", "10.196.0.2"
HOST, HOST_PEER = "10.196.1.1", "10.196.1.2"
PORT = 5301
CHAINS = {"empty": "", "pep": '[[services]]\nuse = "pep"\n'}
CELLS = [  # key, label, iperf3 reverse (download), parallel connections
    ("down1", "download, 1 connection", True, 1),
    ("up1", "upload, 1 connection", False, 1),
    ("down16", "download, 16 connections", True, 16),
    ("up16", "upload, 16 connections", False, 16),
]
GOAL, AMBITIOUS = 0.30, 0.60
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measurement failed; the message says which and why."""


class Bridge:
    """`vtl run CONFIG` in the root namespace; its stderr is read all along by a thread
    (so the pipe never fills with stats lines) and kept for error messages."""

    def __init__(self, topo: Topology, config: Path, chain: str):
        self.topo, self.chain = topo, chain
        self.proc = topo.spawn(None, [sys.executable, "-m", "vtl.bridge.cli", "run", str(config)],
                               stderr=subprocess.PIPE)
        self.lines: deque[str] = deque(maxlen=400)
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if " ready" in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"`vtl run` ({self.chain} chain) never said ready:\n"
                                 + self.tail(30))

    def cpu_seconds(self) -> float:
        """utime + stime of the bridge process (all its threads), in seconds."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def tail(self, n: int = 20) -> str:
        lines = [ln for ln in self.lines if "stats {" not in ln][-n:]
        stats = [ln for ln in self.lines if "stats {" in ln or "stopped; {" in ln]
        if stats:
            lines.append("last counters: " + stats[-1])
        return "\n".join(lines)

    def stop(self) -> int | None:
        self.topo.stop_proc(self.proc, timeout=15)
        self.reader.join(5)
        return self.proc.returncode


def bridge_config(tag: str, gns: str, chain: str, placement: str = "spread") -> str:
    return bridge_toml(tag, gns, CHAINS[chain], "pepbench", placement)


#: where the bridge and the guest's stack run. "spread": anywhere (the scheduler's
#: choice; the guest namespace's receive processing runs inside the bridge's TAP writes).
#: "pinned": the bridge on CPU 0 (``[bridge] cpus``), the guest's receive processing
#: steered to the last CPU (``[ports.guest] rx_cpus``), as a VM's stack runs on its own
#: vCPUs rather than in the bridge's system calls
PLACEMENTS = ("spread", "pinned")


def placement_keys(placement: str) -> tuple[str, str]:
    """The ``[bridge]`` and ``[ports.guest]`` lines of a placement."""
    if placement == "spread":
        return "", ""
    last = (os.cpu_count() or 1) - 1
    return "cpus = [0]\n", f"rx_cpus = [{last}]\n"


def bridge_toml(tag: str, gns: str, services: str, name: str, placement: str = "spread") -> str:
    """`vtl run` config: guest TAP ``{tag}t`` in ``gns``, uplink ``{tag}u``, ``services``."""
    bridge_keys, guest_keys = placement_keys(placement)
    return f"""[bridge]
name = "{name}"
stats_interval_s = 1
{bridge_keys}[ports.guest]
kind = "tap"
ifname = "{tag}t"
netns = "{gns}"
{guest_keys}[ports.uplink]
kind = "packet"
ifname = "{tag}u"
{services}"""


def host_path(topo: Topology, tag: str, pns: str) -> None:
    """A veth from the root namespace into the peer's, and a host route to the peer via it."""
    hv = f"{tag}h"
    topo.veth(hv, "eth1", pns)
    ip("addr", "add", f"{HOST}/30", "dev", hv)
    topo.addr(pns, "eth1", f"{HOST_PEER}/30")
    ip("route", "replace", f"{P}/32", "via", HOST_PEER)


def iperf(topo: Topology, gns: str, bridge: Bridge, seconds: int, key: str, reverse: bool,
          parallel: int, target: str = P, port: int = PORT) -> tuple[float, float]:
    """One iperf3 run; returns (goodput in Gbit/s as the receiver counted it, bridge cores)."""
    args = ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-O", "1", "-J",
            "-P", str(parallel), "--connect-timeout", "5000"]
    if reverse:  # download; the client receives, so it can notice a stalled transfer
        args += ["-R", "--rcv-timeout", "10000"]
    what = f"iperf3 {key} ({' '.join(args[1:])}) through the {bridge.chain} chain"
    cpu0, t0 = bridge.cpu_seconds(), time.monotonic()
    try:
        proc = topo.run(gns, args, timeout=seconds + 40, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish in {seconds + 40} s; bridge stderr:\n"
                         + bridge.tail()) from None
    cores = (bridge.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out = {"error": (proc.stderr or proc.stdout or "no output").strip()[-500:]}
    if proc.returncode or "error" in out:
        raise BenchError(f"{what} failed (exit {proc.returncode}): {out.get('error')}; "
                         f"bridge stderr:\n{bridge.tail()}")
    return out["end"]["sum_received"]["bits_per_second"] / 1e9, cores


@dataclass
class Runs:
    gbps: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {"gbps": statistics.median(self.gbps), "cpu_cores": statistics.median(self.cores),
                "runs_gbps": [round(x, 4) for x in self.gbps]}


def run(seconds: int, repeat: int, progress: bool, only: tuple[str, ...] = (),
        placement: str = "spread") -> dict[str, dict[str, dict[str, object]]]:
    """``only``: these cells' keys and no others; ``placement``: see :data:`PLACEMENTS`."""
    tag = f"pb{os.getpid() % 10000:04d}"
    cells = [c for c in CELLS if not only or c[0] in only]
    runs = {c: {k: Runs() for k, *_ in cells} for c in CHAINS}
    with Topology(tag) as topo, tempfile.TemporaryDirectory() as tmp:
        gns, pns = topo.netns(f"{tag}-g"), topo.netns(f"{tag}-p")
        topo.veth(f"{tag}u", "eth0", pns)
        topo.addr(pns, "eth0", f"{P}/24")
        host_path(topo, tag, pns)
        topo.spawn(pns, ["iperf3", "-s", "-B", P, "-p", str(PORT)])
        topo.wait_tcp(pns, P, PORT)
        for r in range(repeat):
            for chain in CHAINS:
                cfg = Path(tmp) / f"{chain}.toml"
                cfg.write_text(bridge_config(tag, gns, chain, placement))
                bridge = Bridge(topo, cfg, chain)
                try:
                    bridge.wait_ready()
                    topo.addr(gns, f"{tag}t", f"{G}/24")
                    topo.run(gns, ["ping", "-c", "3", "-i", "0.2", "-W", "2", P], timeout=20)
                    for key, _label, reverse, parallel in cells:
                        gbps, cores = iperf(topo, gns, bridge, seconds, key, reverse, parallel)
                        runs[chain][key].gbps.append(gbps)
                        runs[chain][key].cores.append(cores)
                        if progress:
                            print(f"run {r + 1}/{repeat} {chain:5} {key:6} {gbps:6.2f} Gbit/s "
                                  f"{cores:4.2f} cores", file=sys.stderr, flush=True)
                finally:
                    code = bridge.stop()
                if code not in (0, None):
                    raise BenchError(f"`vtl run` ({chain} chain) exited {code}:\n"
                                     + bridge.tail())
    return {c: {k: v.summary() for k, v in cells.items()} for c, cells in runs.items()}


def table(res: dict[str, dict[str, dict[str, object]]]) -> str:
    head = ["transfer", "empty chain (Gbit/s)", "pep (Gbit/s)", "pep/empty",
            "bridge CPU empty (cores)", "bridge CPU pep (cores)"]
    rows = []
    for key, label, *_ in CELLS:
        e, p = res["empty"][key], res["pep"][key]
        eg, pg = float(e["gbps"]), float(p["gbps"])  # type: ignore[arg-type]
        rows.append([label, f"{eg:.2f}", f"{pg:.2f}", f"{pg / eg if eg else float('nan'):.2f}",
                     f"{float(e['cpu_cores']):.2f}", f"{float(p['cpu_cores']):.2f}"])  # type: ignore[arg-type]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + (":" if i else "-")
                            for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def ratio(res: dict[str, dict[str, dict[str, object]]], key: str) -> float:
    e, p = float(res["empty"][key]["gbps"]), float(res["pep"][key]["gbps"])  # type: ignore[arg-type]
    return p / e if e else float("nan")


def verdict(res: dict[str, dict[str, dict[str, object]]]) -> str:
    worst = min(ratio(res, "down1"), ratio(res, "up1"))
    met = "ambitious goal met" if worst >= AMBITIOUS else "goal met" if worst >= GOAL \
        else "goal NOT met"
    return (f"one connection through pep: download {ratio(res, 'down1'):.1%}, upload "
            f"{ratio(res, 'up1'):.1%} of the empty chain (goal >= {GOAL:.0%}, ambitious "
            f">= {AMBITIOUS:.0%}): {met}")


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, median (default 3)")
    ap.add_argument("--placement", choices=PLACEMENTS, default="spread",
                    help="spread: bridge and guest stack anywhere (default); pinned: the "
                         "bridge on CPU 0, the guest namespace's receive processing on the "
                         "last CPU (both chains alike)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.seconds < 1 or args.repeat < 1:
        ap.error("--seconds and --repeat must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)  # so that SIGTERM cleans up like Ctrl-C
    try:
        require_root("the benchmark")
        res = run(args.seconds, args.repeat, progress=not args.json, placement=args.placement)
    except (BenchError, SetupError) as exc:
        print(f"benchmarks/pep.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks/pep.py: interrupted; namespaces removed", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"seconds": args.seconds, "repeat": args.repeat,
                          "placement": args.placement,
                          "cpus": os.cpu_count(), "results": res,
                          "ratio_pep_empty": {k: ratio(res, k) for k, *_ in CELLS}}, indent=2))
        return 0
    print()
    print(table(res))
    print(f"\n(goodput counted by the receiving iperf3; median of {args.repeat} runs of "
          f"{args.seconds} s each after 1 s omitted; bridge CPU = utime+stime of `vtl run` "
          f"during the run; {os.cpu_count()} CPUs; placement {args.placement})")
    print(verdict(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
