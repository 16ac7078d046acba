"""pep end to end: the guest's own kernel TCP against VTL's virtual endpoint.

The guest namespace's stack talks to ``pep``; pep relays over host TCP sockets
to a real HTTP server in the peer namespace (reached through the host path of
``Net.host_path``). Data are seeded streams, checked by SHA-256.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tcptools import (
    HTTP_PORT,
    connect_result,
    download,
    half_close,
    parallel_downloads,
    rss_bytes,
    slow_reader,
    tshark_bad_segments,
    upload,
)
from tcptools import expected_sha256 as expected
from vtlnet import HOST_PEER_IP, PEER_IP, PEER_IP6, Net, VtlProcess, host

pytestmark = pytest.mark.integration

GB = 1 << 30
PEP: dict[str, Any] = {"use": "pep", "connect_timeout_s": 2.0}


def start(net: Net, services: list[dict[str, Any]], **bridge: Any) -> VtlProcess:
    net.host_path()
    return net.start(services, **bridge)


def stats(vtl: VtlProcess) -> dict[str, Any]:
    """The latest `stats {...}` (or final `stopped; {...}`) snapshot the bridge logged."""
    for line in reversed(vtl.lines):
        for marker in ("stats ", "stopped; "):
            if marker in line:
                return json.loads(line.split(marker, 1)[1])
    raise AssertionError("no stats line yet")


def pep_counters(vtl: VtlProcess) -> dict[str, int]:
    return stats(vtl)["services"]["pep"]


def test_1gb_download_and_upload(net: Net) -> None:
    vtl = start(net, [PEP])
    assert download(net, GB, seed=11, timeout=300) == expected(GB, 11)
    assert upload(net, GB, seed=12, timeout=300) == expected(GB, 12)
    vtl.stop()
    c = pep_counters(vtl)
    assert c["connections_opened"] >= 2
    assert c["bytes_down"] >= GB and c["bytes_up"] >= GB


def test_1gb_through_a_lossy_link_to_the_guest(net: Net) -> None:
    netem = {"use": "netem", "loss": 0.02, "duplicate": 0.01, "reorder": 0.05, "seed": 3}
    start(net, [netem, PEP])
    assert download(net, GB, seed=21, timeout=900) == expected(GB, 21)
    assert upload(net, GB, seed=22, timeout=900) == expected(GB, 22)


def test_ipv6_download(net: Net) -> None:
    start(net, [PEP])
    size = 50 << 20
    assert download(net, size, seed=31, host=PEER_IP6) == expected(size, 31)


def test_200_parallel_connections(net: Net) -> None:
    start(net, [PEP])
    result = parallel_downloads(net, count=200, size=1_000_000, timeout=180)
    assert result.ok, result.failures()[:5]


def test_half_close(net: Net) -> None:
    start(net, [PEP])
    got, want = half_close(net, port=9090)
    assert got == want


def test_closed_port_is_refused_within_a_second(net: Net) -> None:
    start(net, [PEP])
    outcome, seconds = connect_result(net, PEER_IP, 9)
    assert outcome == "refused"
    assert seconds < 1.0


def test_unreachable_address_gets_an_error_within_the_connect_timeout(net: Net) -> None:
    vtl = start(net, [PEP])
    # an off-link prefix routed through the peer, from the guest and from the host:
    # the guest sends the SYN to the peer's MAC, pep takes it, the host's SYN goes to
    # the peer namespace, which does not forward (the routes go with our veths; no
    # packet leaves the namespaces this test made)
    net.guest(["ip", "route", "add", "10.197.0.0/16", "via", PEER_IP])
    host(["ip", "route", "add", "10.197.0.0/16", "via", HOST_PEER_IP])
    outcome, seconds = connect_result(net, "10.197.0.5", 80, timeout=10)
    assert outcome in ("unreachable", "reset", "refused"), outcome
    assert seconds <= PEP["connect_timeout_s"] + 0.5
    vtl.stop()
    c = pep_counters(vtl)
    assert c.get("connections_unreachable", 0) + c.get("connections_timeout", 0) + \
        c.get("connections_error", 0) >= 1


def test_stalled_reader_memory_stays_bounded(net: Net) -> None:
    buffer_bytes = 1 << 20
    vtl = start(net, [{**PEP, "buffer_bytes": buffer_bytes}], stats_interval_s=1)

    def sample() -> dict[str, int]:
        base = rss_bytes(vtl.pid)
        peak = base
        buffered = 0
        for _ in range(20):  # about 20 s of the 30 s stall
            time.sleep(1.0)
            peak = max(peak, rss_bytes(vtl.pid))
            try:
                c = pep_counters(vtl)
            except AssertionError:
                continue
            buffered = max(buffered, c["buffered_bytes"])
        return {"rss_growth": peak - base, "buffered": buffered}

    size = 300 << 20
    res = slow_reader(net, size, stall_s=30, during_stall=sample, timeout=240)
    assert res.ok
    # pep's own accounting: one connection's buffers plus one read chunk
    assert res.stall_value["buffered"] <= buffer_bytes + (256 << 10), res.stall_value
    # and the process did not grow with the stalled transfer (300 MB of it)
    assert res.stall_value["rss_growth"] < buffer_bytes + (16 << 20), res.stall_value


def test_frames_sent_to_the_guest_are_well_formed(net: Net) -> None:
    pcap = net.tmp / "to-guest.pcap"
    capture = {"use": "capture", "path": str(pcap), "direction": "to_guest"}
    vtl = start(net, [capture, PEP])
    size = 20 << 20
    assert download(net, size, seed=41) == expected(size, 41)
    assert upload(net, 5 << 20, seed=42) == expected(5 << 20, 42)
    vtl.stop()
    assert pcap.stat().st_size > size
    assert tshark_bad_segments(pcap) == []


def _congestion_of(ss_output: str, names: list[str]) -> set[str]:
    """The congestion controls `ss -tin` shows for the connections it lists."""
    return {tok for tok in ss_output.split() if tok in names}


def test_host_connections_get_the_configured_congestion_control(net: Net) -> None:
    """A guest on reno behind pep: its own TCP stays reno, the host leg uses what
    ``congestion`` says (a control other than the host's default, so it shows). A
    network namespace may only default to a control listed in
    net.ipv4.tcp_allowed_congestion_control (reno always is; cubic is not here)."""
    names = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    chosen = next(n for n in ("cubic", "bbr") if n in names and n != default)
    net.guest(["sysctl", "-q", "-w", "net.ipv4.tcp_congestion_control=reno"])
    start(net, [{**PEP, "congestion": chosen}])

    def look() -> tuple[set[str], set[str]]:
        flt = ["dst", f"{PEER_IP}:{HTTP_PORT}"]
        guest_side = net.guest(["ss", "-tinH", *flt]).stdout
        host_side = subprocess.run(["ss", "-tinH", *flt], capture_output=True, text=True,
                                   check=True, timeout=10).stdout
        return _congestion_of(guest_side, names), _congestion_of(host_side, names)

    res = slow_reader(net, 8 << 20, stall_s=2, during_stall=look, timeout=60)
    assert res.ok
    assert res.stall_value == ({"reno"}, {chosen}), res.stall_value
