"""The bridge forwards a real kernel stack's traffic (empty chain)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import PEER_IP, PEER_IP6, ctl_json, host, wait_for

TICKER = Path(__file__).with_name("timerservice.py")

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("uplink_kind", ["packet", "pcap"])
def test_arp_and_ping_through_empty_chain(net, uplink_kind):
    vtl = net.start(uplink_kind=uplink_kind)
    out = net.guest(["ping", "-c", "5", "-i", "0.1", "-W", "2", PEER_IP], timeout=20).stdout
    assert len(parse_ping_rtts(out)) == 5
    neigh = net.guest(["ip", "neigh", "show", PEER_IP]).stdout
    assert "lladdr" in neigh  # ARP resolved through the bridge
    out6 = net.guest(["ping", "-6", "-c", "3", "-i", "0.1", "-W", "2", PEER_IP6], timeout=20)
    assert len(parse_ping_rtts(out6.stdout)) == 3
    assert vtl.stop() == 0
    assert "Traceback" not in vtl.stderr


@pytest.mark.parametrize(("uplink_kind", "tso"), [("packet", True), ("pcap", True),
                                                   ("pcap", False)])
def test_the_guest_is_offered_only_the_offloads_the_uplink_carries(net, uplink_kind, tso):
    """Both uplink kinds write with virtio-net headers: the guest is offered TSO when the
    uplink device has it (the host's kernel segments on the way out) and checksum
    offload only when it has not (the guest's own kernel segments). Either way Python
    never cuts a GSO frame (the bridge's ``segmented`` stays 0) and every byte arrives."""
    if not tso:
        host(["ethtool", "-K", net.uplink, "tso", "off"])
    vtl = net.start(uplink_kind=uplink_kind)
    features = net.guest(["ethtool", "-k", net.tap]).stdout
    assert f"tcp-segmentation-offload: {'on' if tso else 'off'}" in features
    assert "tx-checksumming: on" in features
    status = ctl_json(f"/run/vtl/{net.tag}.sock", "status")
    assert status["ports"][0]["offloads"] == ("csum+tso4+tso6+tso-ecn" if tso else "csum")
    got = net.tmp / "received"
    net.topo.spawn(net.peer_ns, ["sh", "-c", f"nc -l {PEER_IP} 7100 > {got}"])
    net.topo.wait_tcp(net.peer_ns, PEER_IP, 7100)
    net.guest(["sh", "-c", f"head -c 20000000 /dev/urandom | tee {net.tmp}/sent | "
               f"nc -N -w 5 {PEER_IP} 7100"], timeout=60)
    assert wait_for(lambda: got.exists() and got.stat().st_size >= 20_000_000, timeout=10)
    assert got.read_bytes() == (net.tmp / "sent").read_bytes()
    counters = ctl_json(f"/run/vtl/{net.tag}.sock", "counters")
    assert counters["bridge"]["segmented"] == 0
    assert counters["ports"]["uplink"]["tx_bytes"] > 20_000_000
    assert vtl.stop() == 0


def test_timers_fire_within_a_fifth_of_a_millisecond(net):
    """The forwarding threads sleep in select() with microseconds and a 1 us timer slack
    (poll() rounded every timeout up to the next millisecond)."""
    vtl = net.start([{"use": f"{TICKER}:Ticker", "period_ms": 2.5, "count": 200}])
    sock = f"/run/vtl/{net.tag}.sock"
    assert wait_for(lambda: ctl_json(sock, "counters")["services"]["ticker"]["timers"] >= 200,
                    timeout=20)
    report = ctl_json(sock, "counters")["services"]["ticker"]
    assert 0 <= report["late_median_us"] < 200, report
    assert vtl.stop() == 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_cpus_pin_every_thread_and_busy_polling_stops_when_traffic_does(net):
    """``cpus`` keeps every thread of the bridge on those CPUs; with ``busy_poll_us`` one
    thread spins while frames keep coming (pings 5 ms apart: about a core) and stops
    spinning once they stop, so an idle bridge still costs nothing."""
    cpu = max(os.sched_getaffinity(0))
    vtl = net.start(cpus=[cpu], busy_poll_us=20_000)
    tasks = list(Path(f"/proc/{vtl.pid}/task").iterdir())
    assert len(tasks) >= 3  # main, two forwarding threads, ...
    for task in tasks:
        status = (task / "status").read_text()
        assert f"Cpus_allowed_list:\t{cpu}\n" in status, (task, status[-400:])
    before = _cpu_seconds(vtl.pid)
    t0 = time.monotonic()
    out = net.guest(["ping", "-c", "300", "-i", "0.005", "-W", "1", PEER_IP], timeout=30).stdout
    busy = (_cpu_seconds(vtl.pid) - before) / (time.monotonic() - t0)
    assert len(parse_ping_rtts(out)) >= 295
    time.sleep(0.2)
    before, t0 = _cpu_seconds(vtl.pid), time.monotonic()
    time.sleep(2.0)
    idle = (_cpu_seconds(vtl.pid) - before) / (time.monotonic() - t0)
    assert busy > 0.6, busy  # it spun between the pings
    assert idle < 0.1, idle  # and stopped when they did
