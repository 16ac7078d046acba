"""benchmarks/udt.py's fairness section: two connections at once over the same WAN.

Two iperf3 clients in VM-A send to two iperf3 servers in VM-B at the same time, for
the same seconds; each one's goodput is what its server counted, and its share is
that over the sum. Rows:

- ``vtl x2``: both transformed with the vtl control, ``mux = false`` so that each has
  a UDT connection (and a control) of its own (with mux they would share one);
- ``vtl vs plain bbr``: one transformed (vtl), one plain TCP with a bbr guest: the udt
  services on both bridges skip the second port (``match``), so its frames cross the
  bridges untouched;
- ``native x2`` for scale (libudt's control, with the benchmark's ``--max-rate`` cap);
- ``plain bbr x2``: both plain TCP with bbr guests (the udt services skip both), the
  reference for how two BBR v1 connections share this WAN in the same seconds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from udtnet import VM_B, UdtNet, udt_service

PORTS = (5303, 5304)  # (benchmarks/udt.py runs its own server on 5301)


@dataclass
class Pair:
    """Goodputs (Mbit/s) of the two connections, one entry per run."""

    first: list[float] = field(default_factory=list)
    second: list[float] = field(default_factory=list)
    error: str = ""

    def shares(self) -> tuple[float, float, float, float]:
        """Medians: first Mbit/s, second Mbit/s, first's share, second's share."""
        if not self.first:
            nan = float("nan")
            return nan, nan, nan, nan
        a, b = statistics.median(self.first), statistics.median(self.second)
        total = a + b
        return a, b, a / total if total else 0.0, b / total if total else 0.0


def _iperf_pair(net: UdtNet, seconds: int) -> tuple[float, float]:
    """Both clients at once; each one's goodput (Mbit/s) as its server counted it.

    A server still closing the last run's test (a transformed connection's close goes
    through both bridges) answers "busy", and a client may wait out the other's test: the
    pair is tried again, up to 5 times."""
    for attempt in range(5):
        procs = [net.topo.spawn(net.vma, ["iperf3", "-c", VM_B, "-p", str(port), "-t",
                                          str(seconds), "-O", "1", "-J", "--connect-timeout",
                                          "5000"], stdout=subprocess.PIPE, text=True)
                 for port in PORTS]
        results = [_json_of(proc.communicate(timeout=seconds + 60)[0]) for proc in procs]
        errors = [data["error"] for data in results if "error" in data]
        if not errors:
            starts = [data["start"]["timestamp"]["timesecs"] for data in results]
            if abs(starts[0] - starts[1]) > 2:  # one waited for the other: not a sharing
                errors = [f"the two tests started {abs(starts[0] - starts[1])} s apart"]
        if not any("busy" in e or "apart" in e for e in errors) or attempt == 4:
            break
        time.sleep(2)
    if errors:
        raise AssertionError(f"iperf3: {errors[0]}")
    out = [data["end"]["sum_received"]["bits_per_second"] / 1e6 for data in results]
    return out[0], out[1]


def _json_of(stdout: str) -> dict[str, Any]:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"iperf3 printed no JSON: {stdout[-300:]!r}") from None


def _variants(max_rate: float) -> list[tuple[str, dict[str, Any], str]]:
    """(name, udt options, guests' congestion control)."""
    skip_second = f"not tcp port {PORTS[1]}"
    return [("vtl x2", {"congestion": "vtl", "mux": False}, "cubic"),
            ("vtl vs plain bbr", {"congestion": "vtl", "match": skip_second}, "bbr"),
            ("native x2", {"congestion": "native", "mux": False,
                           "max_rate_mbit": max_rate}, "cubic"),
            ("plain bbr x2", {"congestion": "vtl",
                              "match": f"not tcp port {PORTS[0]} and {skip_second}"}, "bbr")]


def run(net: UdtNet, rtt_ms: float, loss: float, seconds: int, repeat: int,
        max_rate: float, only: list[str], log) -> dict[str, Pair]:
    """The fairness rows (``only``: names to keep, empty for all) at one RTT and loss."""
    for port in PORTS:
        net.topo.spawn(net.vmb, ["iperf3", "-s", "-B", VM_B, "-p", str(port)])
        net.topo.wait_tcp(net.vmb, VM_B, port)
    net.start_wan(rtt_ms, loss)
    res: dict[str, Pair] = {}
    for name, opts, cc in _variants(max_rate):
        if only and name not in only:
            continue
        pair = res.setdefault(name, Pair())
        net.congestion_control(cc)
        net.start("a", [udt_service("a", **opts)])
        net.start("b", [udt_service("b", **opts)])
        try:
            net.warm_up()
            for r in range(repeat):
                a, b = _iperf_pair(net, seconds)
                pair.first.append(a)
                pair.second.append(b)
                log(f"fairness {name} run {r + 1}/{repeat}: {a:.1f} + {b:.1f} Mbit/s")
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            pair.error = str(exc).splitlines()[0][:200]
            log(f"fairness {name} failed: {exc}")
        finally:
            net.stop("a")
            net.stop("b")
    return res


def table(res: dict[str, Pair], rtt_ms: float, loss: float, fmt_table) -> str:
    head = [f"{rtt_ms:g} ms / {loss * 100:g} %: two at once", "first Mbit/s", "second Mbit/s",
            "first share", "second share"]
    rows = []
    for name, pair in res.items():
        if pair.error:
            rows.append([name, "error", "error", "error", "error"])
            continue
        a, b, sa, sb = pair.shares()
        rows.append([name, f"{a:.1f}", f"{b:.1f}", f"{sa:.0%}", f"{sb:.0%}"])
    return fmt_table(head, rows)


def verdicts(res: dict[str, Pair]) -> list[str]:
    out = []
    if "vtl x2" in res and not res["vtl x2"].error:
        _, _, sa, sb = res["vtl x2"].shares()
        met = "met" if min(sa, sb) >= 0.4 else "NOT met"
        out.append(f"two vtl connections: {sa:.0%} / {sb:.0%} (goal 40-60 % each): {met}")
    if "vtl vs plain bbr" in res and not res["vtl vs plain bbr"].error:
        _, _, sa, sb = res["vtl vs plain bbr"].shares()
        met = "met" if sb >= 0.25 and sa >= 0.25 else "NOT met"
        out.append(f"vtl vs plain bbr: vtl {sa:.0%}, plain {sb:.0%} (goal: the plain one "
                   f">= 25 %, vtl not starved): {met}")
    return out


__all__ = ["PORTS", "Pair", "run", "table", "verdicts"]
