#!/usr/bin/env python3
"""Benchmark: goodput and new connections per second through `socks` + danted, same run.

Topology (all removed at the end, also on Ctrl-C or failure):

    guest netns --TAP-- vtl run --AF_PACKET-- veth --eth0-- servers netns
    10.192.0.1             |                                 10.192.0.2 (empty chain)
                           | (socks) 127.0.0.1:PORT          iperf3 -s, a tiny TCP server
                           v                                 10.192.1.2 (through the proxy)
                 danted (root netns) --- veth SBs --eth1----/

With the empty chain the guest's frames are forwarded to the uplink and the guest
talks to the servers at 10.192.0.2, on link. With ``[[services]] use = "socks"``
every TCP connection of the guest ends in VTL and is carried through a real
SOCKS5 server, danted (Debian's dante-server, in the root namespace, listening on
127.0.0.1, connecting out through its own veth to 10.192.1.2 and nowhere else);
the guest reaches 10.192.1.2 through its default gateway 10.192.0.254, which only
VTL answers for. The servers are the same processes either way. Addresses
10.192.x are this benchmark's own, so it can run beside the integration tests.

Measured, for each chain:
- goodput with iperf3 (client in the guest): download (``-R``) and upload, 1 and
  8 connections, as the receiving iperf3 counted it;
- new connections per second: a Python asyncio client in the guest keeps
  ``--concurrency`` connections in flight, each connect, send 1 byte, read the
  server's 64-byte answer to EOF, close; connections completed per second and the
  median / 99th percentile of one connection's lifetime.

Median of ``--repeat`` runs, chains alternating within each repetition; also the
CPU the bridge process used (utime+stime, in cores). Goals (issue 4): at least
300 new connections per second through socks; goodput at least 30% of the empty
chain's. Needs root.

    .venv/bin/python benchmarks/socks.py [--seconds 5] [--repeat 3] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "integration")]

from pep import PLACEMENTS, BenchError, Bridge, bridge_toml, iperf  # noqa: E402  (the same `vtl run` wrapper)
from socksnet import Dante  # noqa: E402  (danted in a private mount namespace)
from vtl.bridge.topology import Topology, ip, require_root  # noqa: E402

from vtl.errors import SetupError  # noqa: E402

G, S_LINK, S_PROXIED = "10.192.0.1", "10.192.0.2", "10.192.1.2"
GW, HOST_S = "10.192.0.254", "10.192.1.1"
GATEWAY_MAC = "02:5c:0c:5e:00:fe"
IPERF_PORT, CONN_PORT = 5302, 5303
CHAINS = ("empty", "socks")
CELLS = [  # key, label, iperf3 reverse (download), parallel connections
    ("down1", "download, 1 connection", True, 1),
    ("up1", "upload, 1 connection", False, 1),
    ("down8", "download, 8 connections", True, 8),
    ("up8", "upload, 8 connections", False, 8),
]
GOAL_RATIO, GOAL_CPS = 0.30, 300.0
REPLY = b"v" * 63 + b"\n"


# ---------------------------------------------------------------- in the namespaces

async def _serve(addr: str, port: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(r.read(1), 10)
            w.write(REPLY)
            await w.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, addr, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


async def _connect_loop(host: str, port: int, seconds: float, concurrency: int) -> dict:
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    lifetimes: list[float] = []
    errors: dict[str, int] = {}

    async def one() -> None:
        t = loop.time()
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            w.write(b"x")
            data = await asyncio.wait_for(r.read(), 5)
            if data != REPLY:
                raise ValueError(f"reply of {len(data)} bytes")
            lifetimes.append(loop.time() - t)
        except (TimeoutError, OSError, ValueError) as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            await asyncio.sleep(0.01)  # no busy loop against a dead server
        finally:
            if w is not None:
                w.close()

    async def worker() -> None:
        while loop.time() < deadline:
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - start
    lifetimes.sort()
    pick = (lambda q: lifetimes[min(len(lifetimes) - 1, int(q * len(lifetimes)))]) \
        if lifetimes else (lambda q: float("nan"))
    return {"connections": len(lifetimes), "seconds": elapsed,
            "per_second": len(lifetimes) / elapsed, "p50_ms": pick(0.5) * 1e3,
            "p99_ms": pick(0.99) * 1e3, "errors": errors}


# ---------------------------------------------------------------- the harness

def bridge_config(tag: str, gns: str, chain: str, proxy: str, placement: str = "spread") -> str:
    services = "" if chain == "empty" else f"""[[services]]
use = "socks"
proxy = "{proxy}"
gateway_mac = "{GATEWAY_MAC}"
connect_timeout_s = 5
max_connections = 4096
"""
    return bridge_toml(tag, gns, services, "socksbench", placement)


def connect_rate(topo: Topology, gns: str, bridge: Bridge, target: str, seconds: int,
                 concurrency: int) -> tuple[dict, float]:
    """The connect loop in the guest; (its report, bridge cores)."""
    cpu0, t0 = bridge.cpu_seconds(), time.monotonic()
    argv = [sys.executable, __file__, "_connect", target, str(CONN_PORT), str(seconds),
            str(concurrency)]
    try:
        proc = topo.run(gns, argv, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the connect loop through the {bridge.chain} chain did not finish "
                         f"in {seconds + 60} s; bridge stderr:\n" + bridge.tail()) from None
    cores = (bridge.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    if proc.returncode:
        raise BenchError(f"the connect loop through the {bridge.chain} chain failed: "
                         f"{proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["connections"]:
        raise BenchError(f"no connection through the {bridge.chain} chain completed: "
                         f"{out['errors']}; bridge stderr:\n" + bridge.tail())
    return out, cores


@dataclass
class Runs:
    values: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"value": statistics.median(self.values),
                                  "cpu_cores": statistics.median(self.cores),
                                  "runs": [round(x, 4) for x in self.values]}
        if self.extra:
            out["p50_ms"] = statistics.median(e["p50_ms"] for e in self.extra)
            out["p99_ms"] = statistics.median(e["p99_ms"] for e in self.extra)
            errors: dict[str, int] = {}
            for e in self.extra:
                for k, v in e["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            out["errors"] = errors
        return out


def run(seconds: int, repeat: int, concurrency: int, progress: bool,
        only: tuple[str, ...] = (), placement: str = "spread") -> dict:
    """``only``: these cells' keys (``"cps"`` for the connection rate) and no others;
    ``placement``: see ``pep.PLACEMENTS``."""
    tag = f"sb{os.getpid() % 10000:04d}"
    cells = [c for c in CELLS if not only or c[0] in only]
    keys = [k for k, *_ in cells] + (["cps"] if not only or "cps" in only else [])
    runs = {c: {k: Runs() for k in keys} for c in CHAINS}

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    with Topology(tag) as topo, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        gns, sns = topo.netns(f"{tag}-g"), topo.netns(f"{tag}-s")
        topo.veth(f"{tag}u", "eth0", sns)
        topo.addr(sns, "eth0", f"{S_LINK}/24")
        topo.veth(f"{tag}s", "eth1", sns)
        ip("addr", "add", f"{HOST_S}/24", "dev", f"{tag}s")
        topo.addr(sns, "eth1", f"{S_PROXIED}/24")
        topo.spawn(sns, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        topo.spawn(sns, [sys.executable, __file__, "_serve", "0.0.0.0", str(CONN_PORT)])
        topo.wait_tcp(sns, "*", IPERF_PORT)
        topo.wait_tcp(sns, "0.0.0.0", CONN_PORT)
        dante = Dante(topo, tmp, f"{tag}s", [f"{S_PROXIED}/32"], users={}, log_connects=False)
        dante.start()
        for r in range(repeat):
            for chain in CHAINS:
                target = S_LINK if chain == "empty" else S_PROXIED
                cfg = tmp / f"{chain}.toml"
                cfg.write_text(bridge_config(tag, gns, chain, dante.url(), placement))
                bridge = Bridge(topo, cfg, chain)
                try:
                    bridge.wait_ready()
                    topo.addr(gns, f"{tag}t", f"{G}/24")
                    topo.run(gns, ["ip", "route", "add", "default", "via", GW])
                    if chain == "empty":
                        topo.run(gns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", target],
                                 timeout=20)
                    for key, _label, reverse, parallel in cells:
                        gbps, cores = iperf(topo, gns, bridge, seconds, key, reverse,
                                            parallel, target=target, port=IPERF_PORT)
                        runs[chain][key].values.append(gbps)
                        runs[chain][key].cores.append(cores)
                        say(f"run {r + 1}/{repeat} {chain:5} {key:6} {gbps:6.2f} Gbit/s "
                            f"{cores:4.2f} cores")
                    if "cps" not in keys:
                        continue
                    out, cores = connect_rate(topo, gns, bridge, target, seconds, concurrency)
                    runs[chain]["cps"].values.append(out["per_second"])
                    runs[chain]["cps"].cores.append(cores)
                    runs[chain]["cps"].extra.append(out)
                    say(f"run {r + 1}/{repeat} {chain:5} cps    {out['per_second']:6.0f} conn/s "
                        f"{cores:4.2f} cores, p50 {out['p50_ms']:.1f} ms, p99 "
                        f"{out['p99_ms']:.1f} ms, errors {out['errors']}")
                finally:
                    code = bridge.stop()
                if code not in (0, None):
                    raise BenchError(f"`vtl run` ({chain} chain) exited {code}:\n"
                                     + bridge.tail())
        dante.stop()
    return {c: {k: v.summary() for k, v in cells.items()} for c, cells in runs.items()}


def markdown(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + (":" if i else "-")
                            for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def ratio(res: dict, key: str) -> float:
    e, s = float(res["empty"][key]["value"]), float(res["socks"][key]["value"])
    return s / e if e else float("nan")


def table(res: dict) -> str:
    rows = []
    for key, label, *_ in CELLS:
        e, s = res["empty"][key], res["socks"][key]
        rows.append([label, f"{e['value']:.2f} Gbit/s", f"{s['value']:.2f} Gbit/s",
                     f"{ratio(res, key):.2f}", f"{e['cpu_cores']:.2f}", f"{s['cpu_cores']:.2f}"])
    e, s = res["empty"]["cps"], res["socks"]["cps"]
    rows.append(["new connections", f"{e['value']:.0f} /s", f"{s['value']:.0f} /s",
                 f"{ratio(res, 'cps'):.2f}", f"{e['cpu_cores']:.2f}", f"{s['cpu_cores']:.2f}"])
    rows.append(["connection lifetime p50 / p99", f"{e['p50_ms']:.1f} / {e['p99_ms']:.1f} ms",
                 f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} ms", "", "", ""])
    return markdown(["measure", "empty chain", "socks + danted", "socks/empty",
                     "bridge CPU empty (cores)", "bridge CPU socks (cores)"], rows)


def verdict(res: dict) -> str:
    worst = min(ratio(res, "down1"), ratio(res, "up1"))
    cps = float(res["socks"]["cps"]["value"])
    errors = res["socks"]["cps"]["errors"]
    return (f"one connection through socks: download {ratio(res, 'down1'):.1%}, upload "
            f"{ratio(res, 'up1'):.1%} of the empty chain (goal >= {GOAL_RATIO:.0%}): "
            f"{'met' if worst >= GOAL_RATIO else 'NOT met'}; new connections through socks: "
            f"{cps:.0f}/s (goal >= {GOAL_CPS:.0f}/s): {'met' if cps >= GOAL_CPS else 'NOT met'}"
            + (f"; failed connections: {errors}" if errors else ""))


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    if sys.argv[1:2] == ["_serve"]:
        asyncio.run(_serve(sys.argv[2], int(sys.argv[3])))
        return 0
    if sys.argv[1:2] == ["_connect"]:
        host, port, seconds, conc = sys.argv[2:6]
        out = asyncio.run(_connect_loop(host, int(port), float(seconds), int(conc)))
        print(json.dumps(out))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="seconds per measurement (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, median (default 3)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="connections in flight in the connection-rate loop (default 32)")
    ap.add_argument("--placement", choices=PLACEMENTS, default="spread",
                    help="as benchmarks/pep.py: spread (default) or pinned (the bridge on "
                         "CPU 0, the guest's receive processing on the last CPU)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.seconds < 1 or args.repeat < 1 or args.concurrency < 1:
        ap.error("--seconds, --repeat and --concurrency must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        require_root("the benchmark")
        res = run(args.seconds, args.repeat, args.concurrency, progress=not args.json,
                  placement=args.placement)
    except (BenchError, SetupError) as exc:
        print(f"benchmarks/socks.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks/socks.py: interrupted; namespaces removed", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"seconds": args.seconds, "repeat": args.repeat,
                          "concurrency": args.concurrency, "cpus": os.cpu_count(),
                          "placement": args.placement,
                          "results": res,
                          "ratio_socks_empty": {k: ratio(res, k) for k in res["empty"]}},
                         indent=2))
        return 0
    print()
    print(table(res))
    print(f"\n(goodput counted by the receiving iperf3, median of {args.repeat} runs of "
          f"{args.seconds} s after 1 s omitted; new connections: {args.concurrency} in flight "
          f"from one asyncio client in the guest, each connect + 1 byte + 64-byte answer + "
          f"close; bridge CPU = utime+stime of `vtl run`; {os.cpu_count()} CPUs shared by the "
          "guest, the bridge, danted and the servers)")
    print(verdict(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
