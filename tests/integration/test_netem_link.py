"""netem through a real bridge: RTT and rate as configured, measured by ping and iperf3."""

from __future__ import annotations

import json
import statistics

import pytest
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import PEER_IP

pytestmark = pytest.mark.integration


def test_ping_rtt_with_50ms_each_way(net):
    net.start([{"use": "netem", "delay_ms": 50}])
    out = net.guest(["ping", "-c", "20", "-i", "0.1", "-W", "3", PEER_IP], timeout=30).stdout
    rtts = parse_ping_rtts(out)
    assert len(rtts) >= 19
    med = statistics.median(rtts)
    assert 95.0 <= med <= 105.0, rtts


def test_rate_limit_50mbit_measured_by_iperf3(net):
    net.topo.spawn(net.peer_ns, ["iperf3", "-s", "-B", PEER_IP, "-p", "5201"])
    net.topo.wait_tcp(net.peer_ns, PEER_IP, 5201)
    net.start([{"use": "netem", "rate_mbit": 50, "queue_packets": 200}])
    res = net.guest(["iperf3", "-c", PEER_IP, "-p", "5201", "-t", "8", "-O", "2", "-J"],
                    timeout=60)
    bps = json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]
    assert 45e6 <= bps <= 55e6, f"{bps / 1e6:.1f} Mbit/s"
