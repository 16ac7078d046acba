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

from floodrun import FloodResult, flood  # noqa: E402
from socksnet import (  # noqa: E402
    GATEWAY_MAC,
    GW_IP,
    GW_IP6,
    HTTP_PORT,
    SRV_IP,
    SRV_IP6,
    WEB_NAME,
    SocksNet,
    stats,
)
from tcptools import download, expected_sha256  # noqa: E402
from test_mac_flood import CHAINS, mac_flood  # noqa: E402
from test_malformed_flood import PEP, fuzz_args  # noqa: E402
from vtl.bridge.topology import Topology, require_root  # noqa: E402
from vtlnet import GUEST_IP, GUEST_MAC, PEER_IP, PEER_IP6, Net, VtlProcess  # noqa: E402

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


def ping_ok(run: Callable[..., Any], host: str) -> bool:
    out = run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", host], timeout=20,
              check=False).stdout
    return out.count("time=") == 3


def stopped(vtl: VtlProcess) -> dict[str, Any]:
    if vtl.stop() != 0:
        raise RuntimeError("vtl run exited non-zero:\n" + vtl.stderr[-2000:])
    return stats(vtl)


def run_mac(name: str, args: argparse.Namespace, tmp: Path) -> Row:
    chain = name.split("-", 1)[1]
    with Topology("vfb" + secrets.token_hex(3)) as topo:
        net = Net(topo, topo.prefix, tmp)
        try:
            vtl = net.start(CHAINS[chain])
            net.guest(["ping", "-n", "-c", "1", "-W", "2", PEER_IP], timeout=10)
            res = mac_flood(net, vtl.pid, args.frames, args.rate,
                            timeout=args.frames / args.rate * 3 + 30)
            ok = ping_ok(net.guest, PEER_IP)
            row = fill(Row(name), res, stopped(vtl), chain if chain != "empty" else None)
            row.after_ok = ok
            return row
        finally:
            net.stop_all()


def run_pep(name: str, args: argparse.Namespace, tmp: Path) -> Row:
    with Topology("vfb" + secrets.token_hex(3)) as topo:
        net = Net(topo, topo.prefix, tmp)
        try:
            net.host_path()
            vtl = net.start([PEP])
            net.guest(["ping", "-n", "-c", "1", "-W", "2", PEER_IP], timeout=10)
            peer_mac = net.peer(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
            timeout = args.frames / args.fuzz_rate * 3 + 60
            res = flood(topo, net.guest_ns, vtl.pid,
                        fuzz_args(net.tap, args.frames, args.fuzz_rate, 21, peer_mac, PEER_IP,
                                  PEER_IP6, PEER_IP, PEER_IP6, timeout),
                        ping=PEER_IP, ping_seconds=args.frames / args.fuzz_rate - 1,
                        timeout=timeout)
            net.peer(["ip", "neigh", "flush", "dev", "eth0"])
            size = 20 * MB
            ok = download(net, size, seed=51, timeout=60) == expected_sha256(size, 51)
            ok = ping_ok(net.guest, PEER_IP) and ok
            row = fill(Row(name), res, stopped(vtl), "pep")
            row.after_ok = ok
            return row
        finally:
            net.stop_all()


def run_socks(name: str, args: argparse.Namespace, tmp: Path) -> Row:
    with Topology("vfb" + secrets.token_hex(3)) as topo:
        snet = SocksNet(topo, topo.prefix, tmp)
        try:
            vtl = snet.start(snet.socks(dns="fake-ip"))
            timeout = args.frames / args.fuzz_rate * 3 + 60
            res = flood(topo, snet.guest_ns, vtl.pid,
                        fuzz_args(snet.tap, args.frames, args.fuzz_rate, 22, GATEWAY_MAC,
                                  SRV_IP, SRV_IP6, GW_IP, GW_IP6, timeout), timeout=timeout)
            size, ok = 5 * MB, True
            for host, seed in ((SRV_IP, 61), (f"[{SRV_IP6}]", 62), (WEB_NAME, 63)):
                url = f"http://{host}:{HTTP_PORT}/bytes/{size}?seed={seed}"
                ok = snet.curl_sha256(url, timeout=60) == expected_sha256(size, seed) and ok
            row = fill(Row(name), res, stopped(vtl), "socks")
            row.after_ok = ok
            return row
        finally:
            snet.close()


def run_socks_dns(name: str, args: argparse.Namespace, tmp: Path) -> Row:
    with Topology("vfb" + secrets.token_hex(3)) as topo:
        snet = SocksNet(topo, topo.prefix, tmp)
        try:
            vtl = snet.start(snet.socks(dns="fake-ip"))
            timeout = args.dns_names / args.fuzz_rate * 3 + 60
            res = flood(topo, snet.guest_ns, vtl.pid,
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
                f"v{v[1]} {p.get('in_use')}/{p.get('capacity')}" for v, p in pools.items())
            row.after_ok = ok
            return row
        finally:
            snet.close()


RUNNERS: dict[str, Callable[[str, argparse.Namespace, Path], Row]] = {
    "mac-empty": run_mac, "mac-netem": run_mac, "pep": run_pep, "socks": run_socks,
    "socks-dns": run_socks_dns}


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
                    row = RUNNERS[name](name, args, Path(tmp))
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
