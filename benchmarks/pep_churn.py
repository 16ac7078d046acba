#!/usr/bin/env python3
"""Benchmark: many short connections through `pep`, a few at a time.

A busy guest opens ``--connections`` short TCP connections, ``--parallel`` at a
time, to a server in the peer namespace that sends ``--size`` bytes and closes
first (as an HTTP/1.0 server does), so that VTL's virtual endpoint is the side
that ends in TIME-WAIT. A connection in teardown must cost a small bounded
entry, not one of ``max_connections``: the table prints how many connections
the guest completed, how many failed, the rate, and the bridge's own counters
at stop (``over_limit``, ``connections_opened``, ``closing_evicted``) and the
largest number of connections pep held live or closing (from the 1 s stats).

Topology as in ``benchmarks/pep.py`` (guest netns --TAP-- vtl run --AF_PACKET--
veth -- peer netns, plus a host veth for pep's sockets), on its own addresses.
Needs root.

    .venv/bin/python benchmarks/pep_churn.py [--connections 20000] [--parallel 50]
        [--max-connections 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from vtl.bridge.topology import Topology, ip, require_root

from vtl.errors import SetupError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pep import BenchError, Bridge, bridge_toml  # noqa: E402

G, P = "10.193.0.1", "10.193.0.2"
HOST, HOST_PEER = "10.193.1.1", "10.193.1.2"
PORT = 5302

SERVER = """
import socket, sys, threading
size = int(sys.argv[3])
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=1024, reuse_port=True)
body = b"x" * size
def serve(c):
    try:
        c.sendall(body)
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = """
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
host, port, n, par, size = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
def one(_):
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            got = 0
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += len(b)
            return "ok" if got == size else "short"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return type(e).__name__
t0 = time.monotonic()
with ThreadPoolExecutor(par) as ex:
    results = list(ex.map(one, range(n)))
dt = time.monotonic() - t0
out = {}
for r in results:
    out[r] = out.get(r, 0) + 1
print(json.dumps({"seconds": dt, "results": out}))
"""


def run(connections: int, parallel: int, max_conn: int, size: int) -> dict[str, object]:
    tag = f"pc{os.getpid() % 10000:04d}"
    with Topology(tag) as topo, tempfile.TemporaryDirectory() as tmp:
        gns, pns = topo.netns(f"{tag}-g"), topo.netns(f"{tag}-p")
        topo.veth(f"{tag}u", "eth0", pns)
        topo.addr(pns, "eth0", f"{P}/24")
        hv = f"{tag}h"
        topo.veth(hv, "eth1", pns)
        ip("addr", "add", f"{HOST}/30", "dev", hv)
        topo.addr(pns, "eth1", f"{HOST_PEER}/30")
        ip("route", "replace", f"{P}/32", "via", HOST_PEER)
        topo.spawn(pns, [sys.executable, "-c", SERVER, P, str(PORT), str(size)])
        topo.wait_tcp(pns, P, PORT)
        cfg = Path(tmp) / "churn.toml"
        services = f'[[services]]\nuse = "pep"\nmax_connections = {max_conn}\n'
        cfg.write_text(bridge_toml(tag, gns, services, "pepchurn"))
        bridge = Bridge(topo, cfg, "pep")
        try:
            bridge.wait_ready()
            topo.addr(gns, f"{tag}t", f"{G}/24")
            topo.run(gns, ["ping", "-c", "3", "-i", "0.2", "-W", "2", P], timeout=20)
            proc = topo.run(gns, [sys.executable, "-c", CLIENT, P, str(PORT), str(connections),
                                  str(parallel), str(size)], timeout=connections / 10 + 120)
            client = json.loads(proc.stdout)
            time.sleep(1.5)  # one more stats line after the last connection
        finally:
            code = bridge.stop()
        if code not in (0, None):
            raise BenchError(f"`vtl run` exited {code}:\n{bridge.tail()}")
        peak_live = peak_closing = 0
        final: dict[str, object] = {}
        for line in bridge.lines:
            for marker in ("stats {", "stopped; {"):
                if marker in line:
                    snap = json.loads(line[line.index(marker) + len(marker) - 1:])
                    pep = snap["services"]["pep"]
                    peak_live = max(peak_live, pep.get("connections_active", 0))
                    peak_closing = max(peak_closing, pep.get("connections_closing", 0))
                    final = pep
        return {"client": client, "peak_live": peak_live, "peak_closing": peak_closing,
                "pep": {k: final.get(k, 0) for k in ("connections_opened", "over_limit",
                                                     "connections_closed", "closing_evicted",
                                                     "connections_failed", "errors")}}


def table(res: dict[str, object], connections: int, parallel: int) -> str:
    c = res["client"]
    pep = res["pep"]
    ok = c["results"].get("ok", 0)
    rows = [
        ("connections asked / completed", f"{connections} / {ok}"),
        ("failed (by kind)", json.dumps({k: v for k, v in c["results"].items() if k != "ok"})),
        ("rate (connections/s)", f"{connections / c['seconds']:.0f}"),
        ("parallel", str(parallel)),
        ("pep over_limit (RST for lack of a slot)", str(pep["over_limit"])),
        ("pep connections_opened", str(pep["connections_opened"])),
        ("pep closing_evicted", str(pep["closing_evicted"])),
        ("peak live / closing (1 s stats)", f"{res['peak_live']} / {res['peak_closing']}"),
        ("pep errors", str(pep["errors"])),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--max-connections", type=int, default=1024)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        require_root()
        res = run(a.connections, a.parallel, a.max_connections, a.size)
    except (SetupError, BenchError) as exc:
        print(f"pep_churn: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res) if a.json else table(res, a.connections, a.parallel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
