#!/usr/bin/env python3
"""Benchmark: one TCP connection over a lossy long-fat WAN, plain vs TCP-to-UDT, same run.

Topology (tests/integration/udtnet.py; all removed at the end, also on Ctrl-C or
failure): VM-A (10.187.1.1) -- bridge A -- WAN -- bridge B -- VM-B (10.187.2.1),
one L2 segment of network namespaces. The WAN is a third ``vtl run`` with
``netem``: 100 Mbit/s, RTT/2 of delay each way, the same random loss in both
directions, a rate queue of about one bandwidth-delay product. TSO/GSO/GRO are
off on every veth, so the WAN sees wire-sized frames and loses them one by one
(the mean frame size it counted is checked after every run).

Section 1 (goodput): for every RTT x loss cell, iperf3 in VM-A sends to iperf3 -s
in VM-B over ONE connection (data VM-A -> VM-B; ``--direction down`` for -R), once
per variant (``--variants``), the variants alternating within each cell:

- ``plain-cubic``, ``plain-bbr``: both bridges on the empty chain, plain TCP end to
  end with the VMs' congestion control set to cubic / bbr (route ``congctl``: a new
  namespace would inherit the machine's default, bbr on this kernel);
- ``native``, ``vtl``: ``udt`` on both bridges with ``congestion = "native"`` (libudt's
  own control, capped at ``--max-rate``, 90 by default: it overshoots the WAN
  otherwise) or ``"vtl"`` (VTL's control, ``--vtl-max-rate``, no cap by default); VM-A's
  TCP ends at bridge A, the bytes cross the WAN over UDT, bridge B re-originates TCP
  to VM-B; the VMs' control is ``--cc`` (cubic);
- ``pep-bbr``: ``pep`` with ``congestion = "bbr"`` on bridge A only and a cubic VM-A:
  VM-A's TCP ends at bridge A, whose host opens a bbr connection to VM-B.

It prints the goodput the receiving iperf3 counted per variant, vtl against the link's
goodput ceiling (100 Mbit/s x 1448 / (1514 + 24): 94.1 Mbit/s) and against plain
bbr, and the share of vtl's packets the WAN's rate queue (one BDP) tail-dropped. A
first sanity row measures the empty chain at 0 ms / 0 % (it should reach the
100 Mbit/s line, ~94 Mbit/s of TCP goodput) and at an unlimited rate (the WAN bridge's
headroom).

Section 2 (fairness, ``--fairness``): two connections at once over the WAN at
``--fairness-rtt`` and 0 % loss (benchmarks/udt_fairness.py): two vtl ones (each its
own UDT connection), one vtl against one plain bbr, two native ones, and two plain bbr
ones for reference; each one's goodput and share. ``--seconds 57`` makes them 60 s.

Section 3 (mux): udt with ``mux = false`` (one UDT connection per TCP connection)
vs ``mux = true`` (one per peer pair) at 60 ms RTT, 0 % loss: time to first byte
of a small HTTP GET on a new connection (first one cold, then the median of
later ones), and the time for 50 parallel 1 MB downloads; plain TCP for scale.

Needs root. The default run (every cell, every variant, once) takes about 35 minutes;
single cells with --rtts, --losses, --variants.

    .venv/bin/python benchmarks/udt.py [--seconds 8] [--rtts 10,30,60,120]
        [--losses 0,0.001,0.01] [--variants plain-cubic,plain-bbr,native,vtl,pep-bbr]
        [--repeat 1] [--mux false|true] [--direction up|down] [--fairness]
        [--fairness-rows "vtl x2,vtl vs plain bbr"] [--skip-goodput] [--skip-mux]

    e.g. one cell, three runs: --rtts 60 --losses 0.01 --variants plain-bbr,vtl --repeat 3
        --skip-sanity --skip-mux
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "integration")]

import udt_fairness  # noqa: E402
from pep import BenchError, iperf  # noqa: E402  (the same iperf3 run and its checks)
from tcptools import ensure_http_server, parallel_downloads  # noqa: E402
from udtnet import BR_A, VM_B, NsVtl, UdtNet, udt_service  # noqa: E402
from vtl.bridge import plugins  # noqa: E402
from vtl.bridge.topology import Topology, ip, require_root  # noqa: E402

from vtl.errors import ConfigError, SetupError  # noqa: E402

PORT = 5301
HTTP_PORT = 8080
MAX_FRAME = 1514
CEILING = 100 * 1448 / (1514 + 24)  # TCP goodput of the 100 Mbit/s WAN (netem counts +24)
VARIANTS = ("plain-cubic", "plain-bbr", "native", "vtl", "pep-bbr")


class Meter:
    """What pep.iperf needs of a bridge (its chain's name, CPU, stderr) over an NsVtl."""

    def __init__(self, vtl: NsVtl, chain: str):
        self.vtl, self.chain = vtl, chain

    def cpu_seconds(self) -> float:
        return self.vtl.cpu_seconds()

    def tail(self, n: int = 20) -> str:
        return "".join(ln for ln in self.vtl.lines if "stats {" not in ln)[-3000:]


@dataclass
class Cell:
    mbps: list[float] = field(default_factory=list)
    wan_cores: list[float] = field(default_factory=list)
    bridge_cores: list[float] = field(default_factory=list)
    frame: list[float] = field(default_factory=list)
    qdrop: list[float] = field(default_factory=list)
    error: str = ""

    def med(self, name: str) -> float:
        xs = getattr(self, name)
        return statistics.median(xs) if xs else float("nan")


def udt_available() -> str:
    """"" when the udt service can be loaded, else why not."""
    try:
        plugins.resolve("udt", None)
    except ConfigError as exc:
        return "; ".join(exc.problems)
    return ""


def cell_seconds(base: int, rtt_ms: float) -> int:
    """Longer runs at high RTT, so slow start is not the whole story."""
    return int(base + rtt_ms / 20)


class Bench:
    def __init__(self, net: UdtNet, args: argparse.Namespace, progress: bool):
        self.net, self.args, self.progress = net, args, progress
        self.topo: Topology = net.topo
        self.server: Any = None

    def fresh_server(self) -> None:
        """A new iperf3 server in VM-B: after a transformed run the old one may still be
        busy with a test whose connection the stopped bridges left half-open."""
        if self.server is not None:
            self.topo.stop_proc(self.server)
        self.server = self.topo.spawn(self.net.vmb, ["iperf3", "-s", "-B", VM_B, "-p",
                                                     str(PORT)])
        self.topo.wait_tcp(self.net.vmb, VM_B, PORT)

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def chain(self, variant: str, **udt: Any
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        """(bridge A's services, bridge B's, the VMs' congestion control) of a variant."""
        if variant.startswith("plain-"):
            return [], [], variant.removeprefix("plain-")
        if variant == "pep-bbr":
            # pep's host connection leaves bridge A's host for VM-B: on-link both ways
            ip("-n", self.net.bra, "route", "replace", "10.187.0.0/16", "dev", "uplink")
            ip("-n", self.net.vmb, "route", "replace", f"{BR_A}/32", "dev", "eth0")
            return [{"use": "pep", "congestion": "bbr"}], [], "cubic"
        udt.setdefault("congestion", variant)
        udt.setdefault("max_rate_mbit", self.args.max_rate if variant == "native"
                       else self.args.vtl_max_rate)
        return [udt_service("a", **udt)], [udt_service("b", **udt)], self.args.cc

    def one_iperf(self, chain: str, seconds: int, cell: Cell, **udt: Any) -> None:
        net = self.net
        a, b, cc = self.chain(chain, **udt)
        net.congestion_control(cc)
        self.fresh_server()
        net.start("a", a)
        net.start("b", b)
        try:
            net.warm_up()
            wan = net.bridges["wan"]
            try:
                f0: dict[str, float] | None = net.wan_frame_sizes()
                d0 = self.wan_data_link()
            except AssertionError:  # no stats line yet
                f0, d0 = None, {}
            busy = net.bridges["a"].cpu_seconds() + net.bridges["b"].cpu_seconds()
            t0 = time.monotonic()
            gbps, cores = iperf(self.topo, net.vma, Meter(wan, chain), seconds, "one",
                                self.args.direction == "down", 1, target=VM_B, port=PORT)
            dt = time.monotonic() - t0
            busy = net.bridges["a"].cpu_seconds() + net.bridges["b"].cpu_seconds() - busy
            wan.next_stats()  # counters that include the whole run
            f1 = net.wan_frame_sizes()
            d1 = self.wan_data_link()
            key = "b_to_a" if self.args.direction == "down" else "a_to_b"
            frames = f1[key + "_frames"] - (f0[key + "_frames"] if f0 else 0)
            nbytes = f1[key + "_bytes"] - (f0[key + "_bytes"] if f0 else 0)
            mean = nbytes / frames if frames else 0.0
            if mean > MAX_FRAME + 1:
                raise BenchError(f"the WAN saw {mean:.0f} bytes per frame on average: "
                                 "super-frames reach it (offloads not off?)")
            cell.mbps.append(gbps * 1000)
            cell.wan_cores.append(cores)
            cell.bridge_cores.append(busy / dt)
            cell.frame.append(mean)
            sent = d1.get("delayed", 0) - d0.get("delayed", 0)
            dropped = d1.get("queue_drops", 0) - d0.get("queue_drops", 0)
            cell.qdrop.append(dropped / (sent + dropped) if sent + dropped else 0.0)
        finally:
            for side in ("a", "b"):
                code = net.stop(side)
                if code not in (0, None):
                    self.log(f"warning: bridge {side} ({chain}) exited {code}")

    def wan_data_link(self) -> dict[str, int]:
        """netem's counters for the direction the data takes (guest = bridge A's side)."""
        dirs = self.net.bridges["wan"].stats()["services"]["netem"]["directions"]
        return dirs["to_uplink" if self.args.direction == "up" else "to_guest"]

    def goodput(self) -> dict[tuple[float, float], dict[str, Cell]]:
        args = self.args
        chains = list(args.variants)
        udt_opts = {} if args.mux is None else {"mux": args.mux == "true"}
        res: dict[tuple[float, float], dict[str, Cell]] = {}
        cells = [(0.0, 0.0, "sanity")] if not args.skip_sanity else []
        cells += [(rtt, loss, "") for rtt in args.rtts for loss in args.losses]
        for rtt, loss, tag in cells:
            seconds = cell_seconds(args.seconds, rtt)
            self.net.start_wan(rtt, loss)
            sanity = f"plain-{args.cc}"
            row = res.setdefault((rtt, loss), {c: Cell() for c in
                                               (chains if tag != "sanity" else [sanity])})
            for r in range(args.repeat):
                for chain in row:
                    try:
                        opts = udt_opts if chain in ("native", "vtl") else {}
                        self.one_iperf(chain, seconds, row[chain], **opts)
                    except (BenchError, SetupError, AssertionError) as exc:
                        row[chain].error = str(exc).splitlines()[0][:200]
                        self.log(f"  {chain} failed: {exc}")
                        continue
                    c = row[chain]
                    self.log(f"run {r + 1}/{args.repeat} rtt {rtt:g} ms loss {loss:g} "
                             f"{chain:11} {c.mbps[-1]:7.2f} Mbit/s  WAN {c.wan_cores[-1]:.2f} "
                             f"cores  A+B {c.bridge_cores[-1]:.2f} cores  "
                             f"{c.frame[-1]:.0f} B/frame  WAN queue drops {c.qdrop[-1]:.1%}")
            if tag == "sanity":
                self.net.start_wan(0, 0, rate_mbit=0)
                unl = res.setdefault((0.0, -1.0), {sanity: Cell()})
                try:
                    self.one_iperf(sanity, args.seconds, unl[sanity])
                    self.log(f"WAN without rate limit: {unl[sanity].mbps[-1]:.0f} Mbit/s, "
                             f"WAN bridge {unl[sanity].wan_cores[-1]:.2f} cores")
                except (BenchError, SetupError, AssertionError) as exc:
                    unl[sanity].error = str(exc).splitlines()[0][:200]
        return res

    # -- section 2 ----------------------------------------------------------------------

    def ttfb(self, count: int = 8) -> tuple[float, float]:
        """Time to first byte (ms) of GET /bytes/1000 on a new connection: the first one,
        and the median of the next ``count``."""
        url = f"http://{VM_B}:{HTTP_PORT}/bytes/1000"
        times = []
        for _ in range(count + 1):
            out = self.net.vm_a(["curl", "-sS", "-o", "/dev/null", "--max-time", "10",
                                 "-w", "%{time_starttransfer}", url], timeout=20)
            times.append(float(out.stdout.strip()) * 1000)
        return times[0], statistics.median(times[1:])

    def mux(self) -> dict[str, dict[str, Any]]:
        net, rtt = self.net, 60.0
        net.start_wan(rtt, 0.0)
        ensure_http_server(net, HTTP_PORT, VM_B)  # type: ignore[arg-type]
        out: dict[str, dict[str, Any]] = {}
        variants = [(f"plain-{self.args.cc}", {})] + ([] if self.args.no_udt else
                                                    [("vtl mux=false", {"mux": False}),
                                                     ("vtl mux=true", {"mux": True})])
        for name, opts in variants:
            a, b, cc = self.chain(name.split()[0], **opts)
            net.congestion_control(cc)
            net.start("a", a)
            net.start("b", b)
            try:
                net.warm_up()
                first, later = self.ttfb()
                par = parallel_downloads(net, count=50, size=1_000_000,  # type: ignore[arg-type]
                                         host=VM_B, port=HTTP_PORT, timeout=120)
                out[name] = {"ttfb_first_ms": first, "ttfb_ms": later,
                             "parallel_s": par.seconds, "parallel_ok": par.ok,
                             "failures": par.failures()[:3]}
            except (BenchError, SetupError, AssertionError) as exc:
                out[name] = {"error": str(exc).splitlines()[0][:200]}
            finally:
                net.stop("a")
                net.stop("b")
            self.log(f"{name}: {out[name]}")
        return out


def fmt_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + (":" if i else "-") for i, w in enumerate(widths)) \
        + " |"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def f(x: float, spec: str = ".1f") -> str:
    return "n/a" if x != x else format(x, spec)


def med(row: dict[str, Cell], variant: str, name: str = "mbps") -> float:
    c = row.get(variant)
    return c.med(name) if c is not None and not c.error else float("nan")


def goodput_table(res: dict[tuple[float, float], dict[str, Cell]], variants: list[str]) -> str:
    head = (["RTT / loss"] + [f"{v} Mbit/s" for v in variants]
            + ["vtl/link", "vtl/plain bbr", "vtl WAN drops", "A+B CPU vtl"])
    rows = []
    for (rtt, loss), row in res.items():
        if loss < 0:
            label = "sanity: 0 ms, no rate limit"
        elif rtt == 0:
            label = "sanity: 0 ms / 0 %"
        else:
            label = f"{rtt:g} ms / {loss * 100:g} %"
        cells = []
        for v in variants:
            c = row.get(v)
            cells.append("-" if c is None else "error" if c.error else f(c.med("mbps")))
        vtl, bbr = med(row, "vtl"), med(row, "plain-bbr")
        rows.append([label, *cells, f(vtl / CEILING, ".2f"), f(vtl / bbr, ".2f"),
                     f(med(row, "vtl", "qdrop") * 100, ".1f") + " %",
                     f(med(row, "vtl", "bridge_cores"), ".2f")])
    return fmt_table(head, rows)


def mux_table(res: dict[str, dict[str, Any]]) -> str:
    head = ["60 ms RTT, 0 % loss", "TTFB first (ms)", "TTFB later (median, ms)",
            "50 x 1 MB parallel (s)"]
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append([name, "error", "error", "error"])
            continue
        par = f(r["parallel_s"], ".2f") + ("" if r["parallel_ok"] else " (CORRUPT)")
        rows.append([name, f(r["ttfb_first_ms"]), f(r["ttfb_ms"]), par])
    return fmt_table(head, rows)


def verdicts(res: dict[tuple[float, float], dict[str, Cell]]) -> list[str]:
    """Issue 18's goals, for the cells that were measured."""
    out = []

    def say(what: str, value: float, goal: float, unit: str = "x") -> None:
        if value == value:
            met = "met" if value >= goal else "NOT met"
            out.append(f"{what}: {value:.2f}{unit} (goal >= {goal:g}{unit}): {met}")

    row = res.get((60.0, 0.01), {})
    say("60 ms / 1 %: vtl / link goodput ceiling", med(row, "vtl") / CEILING, 0.9)
    say("60 ms / 1 %: vtl / plain bbr", med(row, "vtl") / med(row, "plain-bbr"), 1.0)
    say("60 ms / 1 %: pep bbr / plain cubic", med(row, "pep-bbr") / med(row, "plain-cubic"),
        5.0)
    say("120 ms / 1 %: vtl / link goodput ceiling", med(res.get((120.0, 0.01), {}), "vtl")
        / CEILING, 0.8)
    for (rtt, loss), row in res.items():
        if loss == 0.0 and rtt > 0:
            best = max(med(row, "plain-cubic"), med(row, "plain-bbr"))
            say(f"{rtt:g} ms / 0 %: vtl / best plain", med(row, "vtl") / best, 0.95)
            drops = med(row, "vtl", "qdrop")
            if drops == drops:
                met = "met" if drops < 0.01 else "NOT met"
                out.append(f"{rtt:g} ms / 0 %, queue one BDP: vtl's WAN drops {drops:.2%} "
                           f"(goal < 1 %): {met}")
    return out


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad}; known: {VARIANTS}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8,
                    help="seconds per iperf3 run at low RTT; + RTT/20 ms more (default 8)")
    ap.add_argument("--rtts", type=_floats, default=[10.0, 30.0, 60.0, 120.0],
                    help="comma-separated RTTs in ms (default 10,30,60,120)")
    ap.add_argument("--losses", type=_floats, default=[0.0, 0.001, 0.01],
                    help="comma-separated loss probabilities, each direction (default "
                    "0,0.001,0.01)")
    ap.add_argument("--variants", type=_names, default=list(VARIANTS),
                    help="comma-separated, of " + ",".join(VARIANTS) + " (default: all)")
    ap.add_argument("--max-rate", type=float, default=90.0,
                    help="native's max_rate_mbit (default 90: ~10 %% under the WAN's 100; "
                         "0: no cap, libudt's control alone)")
    ap.add_argument("--vtl-max-rate", type=float, default=0.0,
                    help="vtl's max_rate_mbit (default 0: no cap)")
    ap.add_argument("--fairness", action="store_true", help="run the fairness section")
    ap.add_argument("--fairness-rtt", type=float, default=60.0, help="its RTT (default 60)")
    ap.add_argument("--fairness-rows", type=lambda t: [x.strip() for x in t.split(",")],
                    default=[], help="comma-separated row names (default: all)")
    ap.add_argument("--skip-goodput", action="store_true", help="no goodput section")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell, median (default 1)")
    ap.add_argument("--mux", choices=["false", "true"], default=None,
                    help="udt's mux in section 1 (default: the service's default)")
    ap.add_argument("--direction", choices=["up", "down"], default="up",
                    help="up: VM-A sends to VM-B (default); down: iperf3 -R")
    ap.add_argument("--cc", default="cubic",
                    help="the VMs' TCP congestion control in the transformed runs and the "
                    "sanity rows (default cubic, Linux's default; this machine's namespaces "
                    "would otherwise inherit its own)")
    ap.add_argument("--no-udt", action="store_true", help="plain TCP only")
    ap.add_argument("--skip-sanity", action="store_true", help="no 0 ms sanity rows")
    ap.add_argument("--skip-mux", action="store_true", help="no mux section")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.seconds < 1 or args.repeat < 1:
        ap.error("--seconds and --repeat must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    why = udt_available()
    if why and not args.no_udt:
        print(f"benchmarks/udt.py: the udt service is not available ({why}); "
              "measuring plain TCP only", file=sys.stderr)
        args.no_udt = True
    if args.no_udt:
        args.variants = [v for v in args.variants if v not in ("native", "vtl")]
    tag = f"vub{os.getpid() % 10000:04d}"
    try:
        require_root("the benchmark")
        with Topology(tag) as topo, tempfile.TemporaryDirectory() as tmp:
            net = UdtNet(topo, tag, Path(tmp))
            try:
                machine_cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
                net.congestion_control(args.cc)
                cc = f"{args.cc} (route congctl; the machine's default: {machine_cc})"
                bench = Bench(net, args, progress=not args.json)
                res = {} if args.skip_goodput else bench.goodput()
                fair = {} if not args.fairness or args.no_udt else udt_fairness.run(
                    net, args.fairness_rtt, 0.0, cell_seconds(args.seconds, args.fairness_rtt),
                    args.repeat, args.max_rate, args.fairness_rows, bench.log)
                mux = {} if args.skip_mux else bench.mux()
            finally:
                net.stop_all()
    except (BenchError, SetupError) as exc:
        print(f"benchmarks/udt.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks/udt.py: interrupted; namespaces removed", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({
            "args": {k: v for k, v in vars(args).items()}, "congestion_control": cc,
            "goodput": {f"{rtt:g}ms/{loss:g}": {c: vars(v) for c, v in row.items()}
                        for (rtt, loss), row in res.items()},
            "fairness": {k: vars(v) for k, v in fair.items()},
            "mux": mux, "seconds": elapsed}, indent=2))
        return 0
    print()
    data = "VM-A -> VM-B" if args.direction == "up" else "VM-B -> VM-A"
    if res:
        print(goodput_table(res, args.variants))
        print(f"\n(one TCP connection, data {data}"
              f"; goodput counted by the receiving iperf3, median of {args.repeat} run(s) of "
              f"{args.seconds} s + RTT/20 ms, first second omitted; WAN: netem in a `vtl run`, "
              f"100 Mbit/s, loss in both directions, queue ~1 BDP; the VMs' TCP in the "
              f"transformed rows: {cc}; "
              f"CPU in cores of 2; udt mux = {args.mux or 'default'}; native capped at "
              f"{args.max_rate:g} Mbit/s, vtl at {args.vtl_max_rate:g} (0: none); link goodput "
              f"ceiling {CEILING:.1f} Mbit/s; WAN drops: frames the WAN's rate queue "
              f"tail-dropped in the data direction, of those offered; the machine's load "
              f"average at the end: {os.getloadavg()[0]:.1f})")
        for line in verdicts(res):
            print(line)
    if fair:
        print()
        print(udt_fairness.table(fair, args.fairness_rtt, 0.0, fmt_table))
        print(f"(median of {args.repeat} run(s) of "
              f"{cell_seconds(args.seconds, args.fairness_rtt)} s, both at once)")
        for line in udt_fairness.verdicts(fair):
            print(line)
    if mux:
        print()
        print(mux_table(mux))
    print(f"\ntotal {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
