"""``vtl demo``: VTL end to end on a throw-away topology.

    [guest netns]  eth0 = the bridge's TAP --- VTL --- veth ---  [peer netns]
     10.199.0.1                         netem, capture            10.199.0.2

1. With an empty chain: ping the peer (the baseline RTT).
2. With ``netem`` (delay each way) and ``capture``: ping again, then fetch a
   file over HTTP from a Python server in the peer and check its SHA-256.
3. Print what each service did and where the capture is; remove every
   namespace and device made, also on Ctrl-C or failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table
from vtl.bridge.config import parse_config
from vtl.bridge.engine import Bridge
from vtl.bridge.topology import Topology, parse_ping_rtts, require_root

GUEST_IP = "10.199.0.1"
PEER_IP = "10.199.0.2"
GUEST_MAC = "02:00:00:00:c0:01"


def demo_config(tag: str, services: list[dict[str, Any]], guest_ns: str) -> dict[str, Any]:
    return {
        "bridge": {"name": "demo"},
        "ports": {
            "guest": {"kind": "tap", "ifname": f"{tag}t", "netns": guest_ns, "mac": GUEST_MAC},
            "uplink": {"kind": "packet", "ifname": f"{tag}u"},
        },
        "services": services,
    }


class _Interrupted(Exception):
    pass


def _on_term(_signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted()


def _ping(topo: Topology, ns: str, count: int) -> list[float]:
    out = topo.run(ns, ["ping", "-c", str(count), "-i", "0.05", "-W", "2", PEER_IP],
                   timeout=30, check=False).stdout
    return parse_ping_rtts(out)


def _bridge(topo: Topology, tag: str, guest_ns: str, services: list[dict[str, Any]]) -> Bridge:
    cfg = parse_config(demo_config(tag, services, guest_ns))
    bridge = Bridge(cfg, logging.getLogger("vtl.demo"))
    bridge.open()
    bridge.start()
    topo.addr(guest_ns, f"{tag}t", f"{GUEST_IP}/24")
    return bridge


def run_demo(keep_capture: str | None = None, size_mb: int = 20, delay_ms: float = 20.0) -> int:
    require_root("vtl demo")
    console = Console(stderr=False)
    tag = f"vd{os.getpid() % 100000:05d}"
    old_term = signal.signal(signal.SIGTERM, _on_term)
    workdir = Path(tempfile.mkdtemp(prefix="vtl-demo-"))
    capture = Path(keep_capture) if keep_capture else workdir / "demo.pcap"
    try:
        with Topology(tag) as topo:
            guest_ns, peer_ns = topo.netns(f"{tag}-vm"), topo.netns(f"{tag}-peer")
            topo.veth(f"{tag}u", "eth0", peer_ns)
            topo.addr(peer_ns, "eth0", f"{PEER_IP}/24")
            console.print(f"[bold]topology[/]: netns {guest_ns} (VM, {GUEST_IP}) --TAP-- VTL "
                          f"--veth-- netns {peer_ns} ({PEER_IP})")

            bridge = _bridge(topo, tag, guest_ns, [])
            try:
                base = _ping(topo, guest_ns, 20)
            finally:
                bridge.close()

            services = [
                {"use": "netem", "delay_ms": delay_ms},
                {"use": "capture", "path": str(capture)},
            ]
            www = workdir / "www"
            www.mkdir()
            payload = os.urandom(size_mb * 1024 * 1024)
            (www / "file.bin").write_bytes(payload)
            want = hashlib.sha256(payload).hexdigest()
            topo.spawn(peer_ns, ["python3", "-m", "http.server", "8080", "--bind", PEER_IP,
                                 "--directory", str(www)])
            topo.wait_tcp(peer_ns, PEER_IP, 8080)
            bridge = _bridge(topo, tag, guest_ns, services)
            try:
                delayed = _ping(topo, guest_ns, 10)
                out = workdir / "fetched.bin"
                t0 = time.monotonic()
                topo.run(guest_ns, ["curl", "-sS", "--max-time", "120", "-o", str(out),
                                    f"http://{PEER_IP}:8080/file.bin"], timeout=130)
                elapsed = time.monotonic() - t0
                got = hashlib.sha256(out.read_bytes()).hexdigest()
            finally:
                bridge.close()
            snap = bridge.snapshot()
            _report(console, base, delayed, delay_ms, size_mb, elapsed, want == got, snap, capture)
            return 0 if (want == got and base and delayed) else 1
    except (KeyboardInterrupt, _Interrupted):
        console.print("[yellow]interrupted; everything the demo made has been removed[/]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for p in sorted(workdir.rglob("*"), reverse=True):
            if p != capture:
                p.unlink() if p.is_file() else p.rmdir()
        if capture.parent != workdir:
            workdir.rmdir()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ms" if values else "no reply"


def _report(console: Console, base: list[float], delayed: list[float], delay_ms: float,
            size_mb: int, elapsed: float, intact: bool, snap: dict[str, Any],
            capture: Path) -> None:
    t = Table(title="what VTL did")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("ping RTT, empty chain (median)", _median(base))
    t.add_row(f"ping RTT, netem {delay_ms:g} ms each way (median)", _median(delayed))
    t.add_row("expected with netem", f"~{2 * delay_ms:.0f} ms + baseline")
    rate = size_mb * 8 / elapsed if elapsed > 0 else 0.0
    t.add_row(f"HTTP download {size_mb} MB", f"{elapsed:.2f} s, {rate:.0f} Mbit/s")
    t.add_row("SHA-256 equal", "yes" if intact else "[red]NO[/]")
    console.print(t)
    s = Table(title="per service")
    for col in ("service", "frames in", "bytes in", "passed", "dropped", "held", "injected",
                "errors"):
        s.add_column(col, justify="right")
    for name, c in snap["services"].items():
        s.add_row(name, str(c["frames_in"]), _size(c["bytes_in"]), str(c["frames_out"]),
                  str(c["dropped"]), str(c["consumed"]), str(c["injected"]), str(c["errors"]))
    console.print(s)
    console.print(f"capture: {capture} ({capture.stat().st_size if capture.exists() else 0:,} "
                  "bytes); open it with `tshark -r` or Wireshark")
