#!/usr/bin/env python3
"""Benchmark: the floods of issue 11 at full size, once each, in one table.

The scenarios of ``tests/integration/test_mac_flood.py`` and
``tests/integration/test_malformed_flood.py``, with the same helpers
(:mod:`framefuzz` sends from the guest namespace, :func:`floodrun.flood` samples
the bridge's VmRSS), at the sizes the issue names:

- ``mac-empty``, ``mac-netem``: 1,000,000 broadcast frames from as many random
  source MACs at 100,000 frames a second, through the empty chain and through
  ``netem`` (delay 0); the guest pings the peer during and after;
- ``pep``: 1,000,000 mutated frames through ``pep`` (host path to the peer); then
  a 20 MB download through pep and a ping;
- ``socks``: 1,000,000 mutated frames through ``socks`` and a real dante; then
  curl through the proxy by IPv4, IPv6 and name;
- ``socks-dns``: DNS queries (A and AAAA in turn) for ``--dns-names`` distinct names
  (default 300,000: more than both fake-ip pools hold) through ``socks``; then curl
  by address. It measures what the fake-ip pools cost when a guest fills them.

Mutated frames are sent at ``--fuzz-rate`` (default 20,000 a second, about what one
bridge with pep reads on a 2-core machine; faster, the TAP drops what the bridge
has not read, and the table says how many the bridge and the service saw).

Columns: frames the guest sent and at what rate; frames the bridge read from the
guest port (``rx``) and the service saw (``svc in``); the bridge's VmRSS before,
at its peak during the flood and a second after, in MB; the service's ``errors``
(exceptions that reached its failure policy) and ``malformed`` counters; the
bridge's own ``malformed``; the MAC table (``macs``) and ``mac_overflow``; the
pings answered during the flood; whether the checks after it passed.

Every namespace, link and process is removed at the end, also on failure or
Ctrl-C. Needs root, dante-server, dnsmasq, curl.

    .venv/bin/python benchmarks/flood.py [--frames 1000000] [--rate 100000]
        [--fuzz-rate 20000] [--dns-names 300000] [--only mac-empty,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "integration")]

from floodrun import FloodResult, Outcome, flood  # noqa: E402
from socksnet import (  # noqa: E402
    GATEWAY_MAC,
    GW_IP,
    HTTP_PORT,
    SRV_IP,
    SocksNet,
    stats,
)
from tcptools import expected_sha256  # noqa: E402
from test_mac_flood import mac_scenario  # noqa: E402
from test_malformed_flood import pep_scenario, socks_scenario  # noqa: E402
from vtl.bridge.topology import Topology, require_root  # noqa: E402
from vtlnet import GUEST_IP, GUEST_MAC, Net, VtlProcess  # noqa: E402

MB = 1 << 20
SCENARIOS = ("mac-empty", "mac-netem", "pep", "socks", "socks-dns")


@dataclass
class Row:
    scenario: str
    sent: int = 0
    rate: int = 0
    rx: int = 0
    svc_in: int | None = None
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0
    errors: int | None = None
    malformed: int | None = None
    bridge_malformed: int = 0
    macs: int | None = None
    mac_overflow: int | None = None
    ping_during: str = "-"
    after_ok: bool = False
    seconds: float = 0.0
    rss_series_mb: str = ""  # VmRSS every 5 s during the flood
    note: str = ""


def fill(row: Row, res: FloodResult, final: dict[str, Any], service: str | None) -> Row:
    """Copy what the flood measured and the bridge's final counters into ``row``."""
    row.sent, row.rate = res.sender["sent"], res.sender["rate"]
    row.seconds = res.sender["seconds"]
    row.rss_before_mb = round(res.rss_before / MB, 1)
    row.rss_peak_mb = round(res.rss_peak / MB, 1)
    row.rss_after_mb = round(res.rss_after / MB, 1)
    row.rss_series_mb = " ".join(f"{rss / MB:.0f}" for _, rss in res.rss_series[::5])
    if res.ping_sent:
        row.ping_during = f"{len(res.ping_rtts)}/{res.ping_sent}"
    bridge = final["bridge"]
    row.rx = final["ports"]["guest"]["rx_frames"]
    row.bridge_malformed = bridge.get("malformed", 0)
    row.macs, row.mac_overflow = bridge.get("macs"), bridge.get("mac_overflow")
    if service is not None:
        c = final["services"][service]
        row.svc_in, row.errors, row.malformed = c["frames_in"], c["errors"], c.get("malformed")
    return row


def stopped(vtl: VtlProcess) -> dict[str, Any]:
    if vtl.stop() != 0:
        raise RuntimeError("vtl run exited non-zero:\n" + vtl.stderr[-2000:])
    return stats(vtl)


def row_of(name: str, out: Outcome, service: str | None) -> Row:
    row = fill(Row(name), out.flood, stopped(out.vtl), service)
    row.after_ok = all(out.after.values())
    if not row.after_ok:
        row.note = f"after the flood: {out.after}"
    return row


def mac_row(name: str, net: Net, args: argparse.Namespace) -> Row:
    chain = name.split("-", 1)[1]
    out = mac_scenario(net, chain, args.frames, args.rate)
    return row_of(name, out, chain if chain != "empty" else None)


def pep_row(name: str, net: Net, args: argparse.Namespace) -> Row:
    return row_of(name, pep_scenario(net, args.frames, args.fuzz_rate), "pep")


def socks_row(name: str, snet: SocksNet, args: argparse.Namespace) -> Row:
    return row_of(name, socks_scenario(snet, args.frames, args.fuzz_rate), "socks")


def socks_dns_row(name: str, snet: SocksNet, args: argparse.Namespace) -> Row:
    vtl = snet.start(snet.socks(dns="fake-ip"))
    timeout = args.dns_names / args.fuzz_rate * 3 + 60
    res = flood(snet.topo, snet.guest_ns, vtl.pid,
                ["dnsflood", snet.tap, "--count", str(args.dns_names),
                 "--rate", str(args.fuzz_rate), "--seconds", str(timeout - 15),
                 "--src-mac", GUEST_MAC, "--dst-mac", GATEWAY_MAC,
                 "--src-ip", GUEST_IP, "--dns-ip", GW_IP], timeout=timeout)
    size = 5 * MB
    url = f"http://{SRV_IP}:{HTTP_PORT}/bytes/{size}?seed=64"
    ok = snet.curl_sha256(url, timeout=60) == expected_sha256(size, 64)
    final = stopped(vtl)
    row = fill(Row(name), res, final, "socks")
    pools = final["services"]["socks"].get("dns_fake_ip_pool", {})
    row.note = "fake-ip names held: " + ", ".join(
        f"{v} {p.get('in_use')}/{p.get('capacity')}" for v, p in pools.items())
    row.after_ok = ok
    return row


#: scenario -> (needs the socks topology, what to run in it)
RUNNERS: dict[str, tuple[bool, Callable[[str, Any, argparse.Namespace], Row]]] = {
    "mac-empty": (False, mac_row), "mac-netem": (False, mac_row), "pep": (False, pep_row),
    "socks": (True, socks_row), "socks-dns": (True, socks_dns_row)}


def run(name: str, args: argparse.Namespace, tmp: Path) -> Row:
    """One scenario in a topology of its own (unique prefix), always removed."""
    socks, body = RUNNERS[name]
    with Topology("vfb" + secrets.token_hex(3)) as topo:
        net = SocksNet(topo, topo.prefix, tmp) if socks else Net(topo, topo.prefix, tmp)
        try:
            return body(name, net, args)
        finally:
            if isinstance(net, SocksNet):
                net.close()
            else:
                net.stop_all()


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int) and v >= 10_000:
        return f"{v:,}"
    return str(v)


def table(rows: list[Row]) -> str:
    cols = [("scenario", "scenario"), ("sent", "sent"), ("rate", "frames/s"), ("rx", "rx"),
            ("svc_in", "svc in"), ("rss_before_mb", "RSS MB"), ("rss_peak_mb", "peak"),
            ("rss_after_mb", "after"), ("errors", "errors"), ("malformed", "svc malf"),
            ("bridge_malformed", "br malf"), ("macs", "macs"), ("mac_overflow", "overflow"),
            ("ping_during", "ping"), ("after_ok", "after ok")]
    cells = [[h for _, h in cols]] + [[fmt(getattr(r, k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{r.scenario}: RSS MB every 5 s: {r.rss_series_mb}" for r in rows
             if r.rss_series_mb]
    notes += [f"{r.scenario}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + notes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=100_000, help="MAC flood, frames a second")
    p.add_argument("--fuzz-rate", type=float, default=20_000,
                   help="mutated frames a second")
    p.add_argument("--dns-names", type=int, default=300_000)
    p.add_argument("--only", default=",".join(SCENARIOS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    require_root("benchmarks/flood.py")
    rows = []
    try:
        for name in args.only.split(","):
            if name not in RUNNERS:
                p.error(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
            t = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="vtl-flood-") as tmp:
                try:
                    row = run(name, args, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - one scenario's failure is a row
                    row = Row(name, note=f"failed: {type(exc).__name__}: {exc}"[:500])
                    traceback.print_exc()
            print(f"{name}: done in {time.monotonic() - t:.0f} s", file=sys.stderr)
            rows.append(row)
    except KeyboardInterrupt:
        print("benchmarks/flood.py: interrupted; namespaces removed", file=sys.stderr)
        return 130
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else table(rows))
    return 0 if all(r.after_ok and not r.errors for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
